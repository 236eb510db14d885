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
  whatever the flooding order. Components with several markers are flooded by skimage's own
  watershed, all at once on a canvas where their bounding boxes are packed side by side (skimage's
  per-pixel set-up then covers their pixels, not the whole map). Why this gives the reference
  labels: skimage pops its queue by (value, age); pushed pixels get unique, increasing ages, seeds
  all get age 0. A seed with no unseeded foreground neighbour ("inner") pushes nothing when
  popped, so it is left out of the queue altogether (masked out, labelled directly); every other
  element of a component is then strictly ordered as long as no two "frontier" seeds of that
  component share a ``dist`` value, and the pop order within the component is the same with or
  without the other components and the inner seeds. That condition is checked; if any component
  violates it (or this skimage queues seeds at -inf, as newer releases do), the whole map is
  flooded in one call, as the reference.
* Energy: the Sobel steps are the reference's. ``overall`` is kept as the float32 maximum
  (equal to the reference's float64 value inside the foreground, the only place it is read);
  the watershed surface is still blurred in float64, because ``1 - overall`` is not exactly
  representable in float32.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from hoverdask.nuclei.reference import (
    FG_THRESHOLD,
    MARKER_ENERGY_THRESHOLD,
    MIN_OBJECT_PX,
    inverted_gradients,
    label_filled_cores,
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
) -> np.ndarray:
    """:func:`markers_fast` from the energy of the foreground pixels (flat indices ``inside``)."""
    core = np.zeros(shape, dtype=bool)
    core.ravel()[inside] = ~_at_least(energy, threshold)
    return label_filled_cores(fill_holes(core).view(np.uint8), min_size)


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
CANVAS_WIDTH = 1024  # components to flood are packed side by side in rows about this wide


def watershed_by_component(
    dist: np.ndarray,
    marker: np.ndarray,
    blb: np.ndarray,
    components: np.ndarray | None = None,
    *,
    ties_excluded: bool = False,
    canvas_width: int = CANVAS_WIDTH,
) -> np.ndarray:
    """:func:`~hoverdask.nuclei.reference.watershed_instances`, component by component.

    ``components`` are 4-connected labels of ``blb`` (any ids); labelled here when not given.
    ``ties_excluded``: the caller has already left out every component where two frontier
    seeds share a value (:func:`hoverdask.nuclei.stable.seed_ties`), so that check is skipped.
    The components that need flooding are packed into one small canvas
    (:func:`_flood_packed`), so skimage works on their pixels instead of the whole window.
    """
    mask = blb > 0
    if components is None:
        components = label_four_connected(mask)
    n_comp = int(components.max())
    marker = marker * mask  # skimage ignores markers outside the mask
    seeds = marker > 0
    n_markers, single_label = _markers_per_component(components[seeds], marker[seeds], n_comp)
    out = np.take(single_label, components)
    flooded = n_markers >= 2
    if not flooded.any():
        return out
    in_flooded = np.take(flooded, components)
    frontier = seeds & in_flooded & _next_to(mask & ~seeds)
    if not SEEDS_QUEUE_BY_VALUE or (
        not ties_excluded and _values_tie(dist[frontier], components[frontier])
    ):
        return watershed_instances(dist, marker, blb)
    # seeds without unseeded neighbours push nothing when popped: keep them out of the queue
    inner = seeds & in_flooded & ~frontier
    out[inner] = marker[inner]
    _flood_packed(dist, marker, components, in_flooded & ~inner, flooded, out, canvas_width)
    return out


def _flood_packed(
    dist: np.ndarray,
    marker: np.ndarray,
    components: np.ndarray,
    floodable: np.ndarray,
    flooded: np.ndarray,
    out: np.ndarray,
    canvas_width: int,
) -> None:
    """Flood the ``floodable`` pixels of the ``flooded`` components in one skimage call, each
    component's bounding box copied into a canvas with a one-pixel gap around it, and write
    the labels into ``out``.

    The pop order inside a component does not depend on what else is in the queue (see the
    module's docstring), and the gaps keep components apart, so each gets the labels it would
    get alone, and so the labels of one call on the whole map.
    """
    ids = np.flatnonzero(flooded)
    boxes = ndimage.find_objects(components, max_label=int(ids[-1]))
    tops, lefts, heights, widths = np.array(
        [(box[0].start, box[1].start, box[0].stop - box[0].start, box[1].stop - box[1].start)
         for box in (boxes[i - 1] for i in ids)]
    ).T
    width = max(canvas_width, int(widths.max()))
    at_y, at_x = _shelf_layout(heights.tolist(), widths.tolist(), width)
    shift_y = np.zeros(int(ids[-1]) + 1, dtype=np.int64)
    shift_x = np.zeros_like(shift_y)
    shift_y[ids] = np.asarray(at_y) - tops
    shift_x[ids] = np.asarray(at_x) - lefts
    height = int(max(y + h for y, h in zip(at_y, heights.tolist(), strict=True)))
    index = np.flatnonzero(floodable)
    comp = components.ravel()[index]
    rows, cols = np.divmod(index, components.shape[1])
    packed = (rows + shift_y[comp]) * width + cols + shift_x[comp]
    canvas_dist = np.zeros(height * width, dtype=dist.dtype)
    canvas_dist[packed] = dist.ravel()[index]
    canvas_marker = np.zeros(height * width, dtype=marker.dtype)
    canvas_marker[packed] = marker.ravel()[index]
    canvas_mask = np.zeros(height * width, dtype=bool)
    canvas_mask[packed] = True
    shape = (height, width)
    flood = watershed_instances(canvas_dist.reshape(shape), canvas_marker.reshape(shape),
                                canvas_mask.reshape(shape))  # fmt: skip
    np.put(out, index, flood.ravel()[packed])


def _shelf_layout(
    heights: list[int], widths: list[int], width: int
) -> tuple[list[int], list[int]]:
    """Top-left corners of boxes laid out in rows ("shelves") of ``width``, tallest first,
    with a one-pixel gap after every box and below every shelf."""
    at_y, at_x = [0] * len(heights), [0] * len(heights)
    x = y = shelf = 0
    for k in sorted(range(len(heights)), key=heights.__getitem__, reverse=True):
        if x and x + widths[k] > width:
            y, x, shelf = y + shelf + 1, 0, 0
        at_y[k], at_x[k] = y, x
        x += widths[k] + 1
        shelf = max(shelf, heights[k])
    return at_y, at_x


def _markers_per_component(
    seed_comp: np.ndarray, seed_label: np.ndarray, n_comp: int
) -> tuple[np.ndarray, np.ndarray]:
    """Number of distinct marker labels per component, and the label where there is one."""
    base = int(seed_label.max(initial=0)) + 1
    pairs = np.unique(seed_comp.astype(np.int64) * base + seed_label)
    pair_comp, pair_label = pairs // base, pairs % base
    n_markers = np.bincount(pair_comp, minlength=n_comp + 1)
    single_label = np.zeros(n_comp + 1, dtype=np.int32)
    single = n_markers[pair_comp] == 1
    single_label[pair_comp[single]] = pair_label[single]
    return n_markers, single_label


def _next_to(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour in ``mask``."""
    padded = np.pad(mask, 1)
    return padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _values_tie(values: np.ndarray, group: np.ndarray) -> bool:
    """True if two entries of one group share a value."""
    order = np.lexsort((values, group))
    values, group = values[order], group[order]
    return bool(np.any((group[1:] == group[:-1]) & (values[1:] == values[:-1])))


def proc_np_hv_fast(np_prob: np.ndarray, h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Instance map equal to :func:`~hoverdask.nuclei.reference.proc_np_hv_reference`'s."""
    blb, components = foreground_components(np_prob)
    energy = energy_in_foreground(h, v)
    dist = surface_from_energy(energy, blb)
    marker = markers_fast(energy, blb)
    return watershed_by_component(dist, marker, blb, components)
