"""Post-processing with output identical to the reference, without its avoidable work.

Profiling the reference on the 1000x1400 parity WSI map (784 nuclei, CPU time per call):
instance records ~160 ms (one full-image mask per nucleus, so it grows with nuclei x pixels),
watershed ~50 ms, Sobel energy ~22 ms, ``binary_fill_holes`` ~20 ms, foreground labelling ~8 ms.
What changes here, each with the reason the result cannot change:

* Instance records: one ``find_objects`` pass and per-instance crops; the crops equal the
  reference's, so moments and contours are computed on identical arrays
  (:func:`hoverdask.nuclei.instances.instance_info_fast`).
* Hole filling: a hole is a 4-connected background component that does not touch the image
  border; that is exactly what ``binary_fill_holes`` (cross structure, dilation from the
  border) fills, so one 4-connected flood fill of the background from a one-pixel frame
  replaces the iterated dilation.
* Labelling whose ids are only names (the foreground's components, dropped or binarised
  again): opencv's 4-connected labelling, the same partition as ``ndimage.label``'s in half
  the time. Labels that reach an output (the markers) keep scipy's raster-order ids.
* Watershed: the flood is confined to 4-connected foreground components, which never touch. A
  component holding no marker stays 0; one holding a single marker label takes that label whole,
  whatever the flooding order. Components with several markers are flooded one at a time by a
  compiled queue with skimage's order (:mod:`hoverdask.nuclei._flood`). Why this gives the
  reference labels: skimage pops its queue by (value, age); pushed pixels get unique, increasing
  ages, seeds all get age 0 (and since skimage 0.25 a pushed pixel's value is at least that of
  the pixel that pushed it). Every element of a component is then strictly ordered as long as no
  two seeds of that component that can still grow share a ``dist`` value, and the pop order within
  the component is the same with or without the other components. That condition is checked; if
  any component violates it (or this skimage queues seeds at -inf, as 0.25.0 did), the whole map
  is flooded in one skimage call, as the reference.
* Energy: the Sobel steps are the reference's. ``overall`` is kept as the float32 maximum
  (equal to the reference's float64 value inside the foreground, the only place it is read);
  the watershed surface is still blurred in float64, because ``1 - overall`` is not exactly
  representable in float32.
"""

from __future__ import annotations

import cv2
import numpy as np

from hoverdask.nuclei._flood import flood_markers
from hoverdask.nuclei.reference import (
    FG_THRESHOLD,
    MARKER_ENERGY_THRESHOLD,
    MIN_OBJECT_PX,
    inverted_gradients,
    label_filled_cores,
    open_kernel,
    remove_small_labels,
    watershed_instances,
)


def foreground_components(
    np_prob: np.ndarray, threshold: float = FG_THRESHOLD, min_size: int = MIN_OBJECT_PX
) -> tuple[np.ndarray, np.ndarray]:
    """``(blb, components)``: the reference mask and its 4-connected component labels.

    Dropping whole components leaves the other labels valid, so the watershed reuses this
    labelling (ids keep gaps) instead of labelling the mask again.
    """
    components = label_four_connected(np_prob >= threshold)
    components = remove_small_labels(components, min_size)
    return (components > 0).astype(np.int32), components


def energy_in_foreground(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float32 energy equal to the reference ``overall`` wherever ``blb`` is 1.

    There ``overall`` is ``float64(max) - 0`` clipped at 0, which is this value exactly. Outside
    the foreground the reference value is never used: ``dist`` multiplies it by ``blb`` and the
    markers subtract it from ``blb`` and clip, so it is not computed here.
    """
    energy = inverted_gradients(h, v)
    energy[energy < 0] = 0
    return energy


def surface_from_energy(energy: np.ndarray, blb: np.ndarray) -> np.ndarray:
    """Reference ``dist`` from :func:`energy_in_foreground` (same float64 blur input)."""
    inside = np.flatnonzero(blb)
    return surface_at(energy.ravel()[inside], inside, blb.shape)


def surface_at(energy: np.ndarray, inside: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reference ``dist`` from the energy of the foreground pixels (flat indices ``inside``)."""
    basin = np.zeros(shape, dtype=np.float64)
    basin.ravel()[inside] = 1.0 - energy.astype(np.float64)
    return -cv2.GaussianBlur(basin, (3, 3), 0)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` (default cross structure): the background that a
    4-connected flood from a one-pixel frame around the image cannot reach is a hole."""
    height, width = mask.shape
    framed = np.zeros((height + 2, width + 2), dtype=np.uint8)
    framed[1:-1, 1:-1] = mask
    cv2.floodFill(framed, None, (0, 0), 1, flags=4)
    filled = framed[1:-1, 1:-1] == 0
    return np.logical_or(filled, mask, out=filled)


def label_four_connected(mask: np.ndarray) -> np.ndarray:
    """int32 labels of the 4-connected components of a bool mask (ids in no particular order:
    for components whose ids are only names)."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    return cv2.connectedComponents(mask.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)[1]


def markers_fast(
    overall: np.ndarray,
    blb: np.ndarray,
    threshold: float = MARKER_ENERGY_THRESHOLD,
    min_size: int = MIN_OBJECT_PX,
) -> np.ndarray:
    """:func:`~hoverdask.nuclei.reference.markers_from_energy` with labelled hole filling.

    ``overall`` only needs to be right inside ``blb``; it is compared as float64, as there.
    ``blb - (overall >= t)`` clipped at 0 is 1 exactly where ``blb`` is 1 and ``overall >= t``
    is False (NaN included), which is the mask taken here.
    """
    inside = np.flatnonzero(blb)
    return markers_at(overall.ravel()[inside], inside, blb.shape, threshold, min_size)


def markers_at(
    energy: np.ndarray,
    inside: np.ndarray,
    shape: tuple[int, ...],
    threshold: float = MARKER_ENERGY_THRESHOLD,
    min_size: int = MIN_OBJECT_PX,
    *,
    raster_ids: bool = True,
) -> np.ndarray:
    """:func:`markers_fast` from the energy of the foreground pixels (flat indices ``inside``).

    ``raster_ids=False``: the same markers with ids in no particular order (opencv's labelling,
    which also counts the sizes), for callers where a marker id is only a name.
    """
    core = np.zeros(shape, dtype=bool)
    core.ravel()[inside] = ~_at_least(energy, threshold)
    filled = fill_holes(core).view(np.uint8)
    if raster_ids:
        return label_filled_cores(filled, min_size)
    opened = cv2.morphologyEx(filled, cv2.MORPH_OPEN, open_kernel())
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        opened, connectivity=4, ltype=cv2.CV_32S
    )
    small = stats[:, cv2.CC_STAT_AREA] < min_size
    small[0] = False
    if not small.any():
        return labels
    kept = np.arange(count, dtype=np.int32)
    kept[small] = 0
    return np.take(kept, labels)


def _at_least(values: np.ndarray, threshold: float) -> np.ndarray:
    """``float64(values) >= threshold``; float32 values are compared in float32 with the
    smallest float32 not below ``threshold`` (the same answer, without a float64 copy)."""
    if values.dtype != np.float32:
        return np.asarray(values, dtype=np.float64) >= threshold
    bound = np.float32(threshold)
    if float(bound) < threshold:
        bound = np.nextafter(bound, np.float32(np.inf))
    return values >= bound


def _seeds_queue_by_value() -> bool:
    """Whether this skimage queues seed pixels at their image value (0.26 does) or all at -inf
    (newer releases, ``from_minima``); with -inf every seed ties and the per-component flood
    never applies.

    Asked of the watershed itself: on ``5 1 1 1 0`` with seeds at both ends, the seed at 0 is
    popped first and floods the plateau only when seeds queue at their value; at -inf the first
    seed in raster order goes first and the plateau is shared.
    """
    from skimage.segmentation import watershed

    labels = watershed(np.array([[5.0, 1.0, 1.0, 1.0, 0.0]]), np.array([[1, 0, 0, 0, 2]]))
    return bool(labels[0, 1] == 2)


SEEDS_QUEUE_BY_VALUE = _seeds_queue_by_value()


def _cost_never_decreases() -> bool:
    """Whether this skimage raises a pushed pixel's cost to the cost of the pixel that pushed it
    (0.25 and later do), which changes the order of the queue.

    Asked of the watershed itself: on ``2 -1 0 2 -3`` with seeds at both ends, the right seed
    pushes its neighbour at cost 2, the left seed its neighbour at cost -1 (no floor) or 2 (the
    floor, and later than the other): the middle pixel goes left without the floor, right with it.
    """
    from skimage.segmentation import watershed

    labels = watershed(np.array([[2.0, -1.0, 0.0, 2.0, -3.0]]), np.array([[1, 0, 0, 0, 2]]))
    return bool(labels[0, 2] == 2)


COST_NEVER_DECREASES = _cost_never_decreases()


def watershed_by_component(dist: np.ndarray, marker: np.ndarray, blb: np.ndarray) -> np.ndarray:
    """:func:`~hoverdask.nuclei.reference.watershed_instances`, component by component.

    The flood is confined to 4-connected components of ``blb``, which never touch, so each is
    flooded on its own by :func:`hoverdask.nuclei._flood.flood_markers` (skimage's queue order
    without skimage's per-call set-up over the whole map; a component holding one marker label
    takes it whole). If two seeds that can grow tie in one component, skimage's order there
    depends on its queue's layout, i.e. on the whole call; then, or if this skimage queues every
    seed at -inf (all seeds tie), the whole map is flooded in one skimage call, as the reference.
    """
    if not SEEDS_QUEUE_BY_VALUE:
        return watershed_instances(dist, marker, blb)
    labels, tied = flood_markers(dist, marker, blb > 0, monotone=COST_NEVER_DECREASES)
    if tied.size:
        return watershed_instances(dist, marker, blb)
    return labels


def proc_np_hv_fast(np_prob: np.ndarray, h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Instance map equal to :func:`~hoverdask.nuclei.reference.proc_np_hv_reference`'s."""
    blb = foreground_components(np_prob)[0]
    energy = energy_in_foreground(h, v)
    dist = surface_from_energy(energy, blb)
    marker = markers_fast(energy, blb)
    return watershed_by_component(dist, marker, blb)
