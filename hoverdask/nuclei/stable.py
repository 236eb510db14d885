"""Seam-stable HoVer-Net post-processing: the reference steps with slide-wide constants.

The reference ``process()`` depends on the extent of the map it is given in exactly two ways:
the min-max normalisation of the hv maps and of their Sobel responses (over the whole tile), and
the operations that act on whole connected components (small-object removal, hole filling,
labelling, the watershed). This module removes the first dependency: the four value ranges are
passed in as :class:`NormRanges`, computed once over the whole slide, and every normalisation
reproduces ``cv2.normalize(..., NORM_MINMAX, CV_32F)`` bit for bit with those ranges. What is
left is local: inside a window, every pixel of a *cluster* (an 8-connected component of the
hole-filled foreground) whose pixels lie at least :data:`CONTEXT_MARGIN` pixels from every window
edge that is not a slide edge gets exactly the value it gets on the whole slide, and its instances
depend on that cluster alone. The block layout and the rule that says which block reports which
cluster live in :mod:`hoverdask.nuclei.seams`; everything here works on plain numpy windows.

One choice the reference leaves open: skimage orders two watershed seeds with the same ``dist``
value by the layout of its queue, i.e. by everything else in the call, so the reference's result
for such a cluster depends on the extent of the map. Clusters with such a tie are flooded alone
(a function of the cluster only); all others share one call, which gives the reference labels
exactly (:func:`seed_ties`, ``docs/seams.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.segmentation import watershed

from hoverdask.nuclei._flood import groups_with_equal_values, growing_seeds
from hoverdask.nuclei._sums import instance_sums
from hoverdask.nuclei.fast import (
    SEEDS_QUEUE_BY_VALUE,
    fill_holes,
    foreground_components,
    markers_at,
    surface_at,
    watershed_by_component,
)
from hoverdask.nuclei.instances import first_contour, vote_types
from hoverdask.nuclei.reference import (
    SOBEL_KSIZE,
    split_channels,
)

SOBEL_REACH = SOBEL_KSIZE // 2  # a Sobel value depends on inputs this far away (10 px)
OPEN_REACH = 4  # erosion then dilation with the 5x5 ellipse: 2 + 2 px
# A cluster is decided exactly in a window when all its pixels are at least this far from every
# window edge that is not a slide edge. The Sobel reach (10 px) dominates; the opening needs 4 and
# the 3x3 blur needs none (outside the cluster its input is 0). It also exceeds the 9 px a
# foreground piece below the 10 px size limit can reach from the edge, so a piece that the window
# cuts below that limit (and drops) cannot hide part of a cluster that looks complete. +2 px spare.
CONTEXT_MARGIN = max(SOBEL_REACH, OPEN_REACH) + 2

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open, slide pixel indices


@dataclass(frozen=True)
class NormRanges:
    """Slide-wide (min, max) of h, v and of their Sobel responses: the reference's four
    per-tile normalisations, made global."""

    h: tuple[float, float]
    v: tuple[float, float]
    sobel_h: tuple[float, float] = (0.0, 0.0)
    sobel_v: tuple[float, float] = (0.0, 0.0)


def normalise_with_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``cv2.normalize(x, None, 0, 1, NORM_MINMAX, CV_32F)`` as if ``x``'s range were [lo, hi].

    opencv rounds the scale and the shift to float32 and applies them with a fused multiply-add;
    rather than re-deriving that, the two range values are appended to the data so opencv itself
    finds exactly ``lo`` and ``hi`` and does its own arithmetic. Values outside [lo, hi] are
    clipped first: with slide-wide ranges they only occur near a window edge, where a filter saw
    opencv's reflection instead of the slide and the value is discarded anyway; left in, they
    would move opencv's min/max and so every other value.
    """
    flat = np.empty(x.size + 2, dtype=x.dtype)
    np.clip(x, x.dtype.type(lo), x.dtype.type(hi), out=flat[:-2].reshape(x.shape))
    flat[-2:] = lo, hi
    out = cv2.normalize(flat, None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F)
    return out.ravel()[:-2].reshape(x.shape)


def value_range(x: np.ndarray) -> tuple[float, float]:
    """(min, max) of a 2-D NaN-free array.

    opencv's one-pass ``minMaxLoc`` is the faster for float32 (the map channels), numpy's two
    SIMD reductions for float64 (the Sobel responses), where ``minMaxLoc`` is ~7x slower.
    """
    if x.size == 0:
        raise ValueError("the range of an empty array is undefined")
    if x.dtype == np.float64:
        return float(x.min()), float(x.max())
    low, high, _, _ = cv2.minMaxLoc(x)
    return float(low), float(high)


def merge_ranges(ranges: list[tuple[float, float]]) -> tuple[float, float]:
    """The exact min/max of a union from the min/max of its parts."""
    return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)


def sobel_responses(
    h: np.ndarray, v: np.ndarray, ranges: NormRanges
) -> tuple[np.ndarray, np.ndarray]:
    """Raw float64 Sobel responses of the globally normalised h (along x) and v (along y).

    Values are exact wherever the input reaches :data:`SOBEL_REACH` px past the pixel or the
    window edge is the slide edge (where opencv reflects, as on the whole slide).
    """
    h_n = normalise_with_range(h, *ranges.h)
    v_n = normalise_with_range(v, *ranges.v)
    sobel_h = cv2.Sobel(h_n, cv2.CV_64F, 1, 0, ksize=SOBEL_KSIZE)
    sobel_v = cv2.Sobel(v_n, cv2.CV_64F, 0, 1, ksize=SOBEL_KSIZE)
    return sobel_h, sobel_v


def _float32_error_bound(dx: int, dy: int) -> float:
    """A bound on |float32 Sobel - float64 Sobel| for inputs in [0, 1]: each output is two
    21-term sums of integer-weighted inputs (the weights are exact in float32), so whatever the
    order of the additions the float32 result is within gamma_n * sum|weights| of the exact value
    (Higham, with n = 64 > 2 * 21 + 2 roundings on any path), and the float64 one far closer."""
    kx, ky = cv2.getDerivKernels(dx, dy, SOBEL_KSIZE, ktype=cv2.CV_64F)
    weights = float(np.abs(kx).sum() * np.abs(ky).sum())
    n = 64
    gamma32 = n * 2.0**-24 / (1 - n * 2.0**-24)
    gamma64 = n * 2.0**-53 / (1 - n * 2.0**-53)
    return (gamma32 + gamma64) * weights


_SOBEL_FLOAT32_ERROR = {(1, 0): _float32_error_bound(1, 0), (0, 1): _float32_error_bound(0, 1)}
MAX_EXACT_CANDIDATES = 256  # beyond this many near-extreme pixels the float64 filter is cheaper


def sobel_range(x: np.ndarray, dx: int, dy: int, inner: tuple[slice, slice]) -> tuple[float, float]:
    """(min, max) over ``inner`` of ``cv2.Sobel(x, CV_64F, dx, dy, ksize=21)``, for float32
    ``x`` in [0, 1], without the float64 filter over the whole window.

    The float32 filter (about 3x cheaper) finds the extremes to within twice its error bound;
    the float64 value is then computed at those few candidate pixels only, each on the crop of
    ``x`` its 21x21 kernel reads (anchored at the window's edge where it reaches it, so that
    opencv reflects there as on the window). opencv's float64 separable filter computes a pixel
    from the same inputs in the same order wherever the pixel sits, so those values are the
    window's (``tests/test_seams.py`` checks it on every pixel of a window).
    """
    fast = cv2.Sobel(x, cv2.CV_32F, dx, dy, ksize=SOBEL_KSIZE)[inner]
    low, high = value_range(fast)
    slack = 2.0 * _SOBEL_FLOAT32_ERROR[(dx, dy)]
    near_low = np.flatnonzero(fast <= low + slack)
    near_high = np.flatnonzero(fast >= high - slack)
    if near_low.size + near_high.size > MAX_EXACT_CANDIDATES:
        return value_range(cv2.Sobel(x, cv2.CV_64F, dx, dy, ksize=SOBEL_KSIZE)[inner])
    top, left = inner[0].start or 0, inner[1].start or 0
    width = fast.shape[1]

    def exact(flat: int) -> float:
        y, x_ = top + flat // width, left + flat % width
        y0, x0 = max(y - SOBEL_REACH, 0), max(x_ - SOBEL_REACH, 0)
        crop = x[y0 : y + SOBEL_REACH + 1, x0 : x_ + SOBEL_REACH + 1]
        return float(cv2.Sobel(crop, cv2.CV_64F, dx, dy, ksize=SOBEL_KSIZE)[y - y0, x_ - x0])

    return min(map(exact, near_low.tolist())), max(map(exact, near_high.tolist()))


def energy_with_ranges(
    h: np.ndarray, v: np.ndarray, blb: np.ndarray, ranges: NormRanges
) -> np.ndarray:
    """The reference ``overall`` (float64 boundary energy) with slide-wide normalisations."""
    sobel_h, sobel_v = sobel_responses(h, v, ranges)
    sobel_h = 1 - normalise_with_range(sobel_h, *ranges.sobel_h)
    sobel_v = 1 - normalise_with_range(sobel_v, *ranges.sobel_v)
    overall = np.maximum(sobel_h, sobel_v)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0
    return overall


def foreground_energy_with_ranges(
    h: np.ndarray, v: np.ndarray, ranges: NormRanges, inside: np.ndarray
) -> np.ndarray:
    """float32 energy of the foreground pixels (flat indices ``inside``), equal there to
    :func:`energy_with_ranges`.

    There the reference value is ``float64(max) - 0`` (the maximum is never negative), which
    is this float32 value exactly; outside the foreground the value is never read (see
    :func:`hoverdask.nuclei.fast.energy_in_foreground`), so only the foreground's Sobel
    responses are normalised (each value's arithmetic depends on the ranges alone).
    """
    sobel_h, sobel_v = sobel_responses(h, v, ranges)
    energy = 1 - normalise_with_range(sobel_h.ravel()[inside], *ranges.sobel_h)
    np.maximum(energy, 1 - normalise_with_range(sobel_v.ravel()[inside], *ranges.sobel_v),
               out=energy)  # fmt: skip
    return energy


@dataclass(frozen=True)
class Cluster:
    """One 8-connected component of the hole-filled foreground, in slide pixel indices."""

    label: int  # label in the window's cluster map
    box: Box
    anchor: tuple[int, int]  # (y, x) of its first pixel in raster order
    centroid: tuple[int, int]  # (y, x): floor of the mean pixel position


@dataclass(frozen=True)
class WindowSegmentation:
    """The reference intermediates of one window, plus its clusters.

    ``origin`` is the slide index ``(y, x)`` of the window's top-left pixel.
    """

    origin: tuple[int, int]
    blb: np.ndarray
    dist: np.ndarray
    marker: np.ndarray
    clusters_map: np.ndarray
    clusters: tuple[Cluster, ...]
    type_map: np.ndarray | None


@dataclass(frozen=True)
class WindowForeground:
    """The foreground of a window and its clusters (the first steps of :func:`segment_window`)."""

    origin: tuple[int, int]
    blb: np.ndarray
    clusters_map: np.ndarray
    clusters: tuple[Cluster, ...]


def window_foreground(np_prob: np.ndarray, origin: tuple[int, int]) -> WindowForeground:
    """``blb`` and :func:`find_clusters` of a window's np map (the channel third from last in
    both map layouts), compared in float32 as ``split_channels`` hands it to the reference."""
    blb = foreground_components(np.asarray(np_prob, dtype=np.float32))[0]
    return WindowForeground(origin, blb, *find_clusters(blb, origin))


def segment_window(
    window: np.ndarray,
    origin: tuple[int, int],
    ranges: NormRanges,
    nr_types: int | None,
    foreground: WindowForeground | None = None,
) -> WindowSegmentation:
    """Run the reference steps up to the markers on one window of the maps.

    ``window`` is ``(h, w, 4)`` ``[tp, np, h, v]`` or ``(h, w, 3)`` ``[np, h, v]``; with
    ``nr_types`` None a tp channel, if present, is ignored.

    ``foreground``, that of a larger window holding this one, is cropped instead of being found
    again. That is exact for every cluster of it that lies :data:`CONTEXT_MARGIN` px inside this
    window's edges (other than slide edges), the only ones a caller may use: the energy there is
    exact, and the markers of such a cluster depend only on its own pixels (an opened pixel's
    5x5 ellipse lies in the hole-filled core, hence in the pixel's cluster; a core hole touching
    a cluster either reaches the window's edge, and so this one's, or lies inside the cluster).
    """
    if nr_types is None and window.shape[-1] == 4:
        window = window[..., 1:]
    type_map, np_prob, h, v = split_channels(window, nr_types)
    if foreground is None:
        foreground = window_foreground(np_prob, origin)
    top, left = origin[0] - foreground.origin[0], origin[1] - foreground.origin[1]
    crop = slice(top, top + window.shape[0]), slice(left, left + window.shape[1])
    blb, clusters_map = foreground.blb[crop], foreground.clusters_map[crop]
    inside = np.flatnonzero(blb)
    energy = foreground_energy_with_ranges(h, v, ranges, inside)
    dist = surface_at(energy, inside, blb.shape)
    marker = markers_at(energy, inside, blb.shape, raster_ids=False)  # ids are only names here
    return WindowSegmentation(
        origin, blb, dist, marker, clusters_map, foreground.clusters, type_map
    )


def find_clusters(
    blb: np.ndarray, origin: tuple[int, int]
) -> tuple[np.ndarray, tuple[Cluster, ...]]:
    """Label the 8-connected components of the hole-filled foreground.

    Why these units: markers are a subset of the foreground, a marker hole is enclosed by an
    8-connected marker ring, and the watershed floods 4-connected foreground only, so hole
    filling, marker labelling and flooding never reach from one such component into another.
    """
    filled = fill_holes(blb > 0)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(
        filled.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    if count == 1:
        return labels, ()
    oy, ox = origin
    # opencv's centroids are integer pixel sums over the area, divided once in float64; the
    # quotient is never within rounding of an integer it does not equal, so floor is exact
    floor_y = np.floor(centroids[1:, 1]).astype(np.int64) + oy
    floor_x = np.floor(centroids[1:, 0]).astype(np.int64) + ox
    left, top, width, height = (stats[1:, k].tolist() for k in range(4))
    clusters = []
    for label, y0, x0, w, h, cy, cx in zip(
        range(1, count), top, left, width, height, floor_y.tolist(), floor_x.tolist(), strict=True
    ):
        first = x0 + int(np.argmax(labels[y0, x0 : x0 + w] == label))  # leftmost of the top row
        clusters.append(Cluster(label=label, box=(y0 + oy, x0 + ox, y0 + h + oy, x0 + w + ox),
                                anchor=(y0 + oy, first + ox), centroid=(cy, cx)))  # fmt: skip
    return labels, tuple(clusters)


@dataclass(frozen=True)
class NucleusRecord:
    """One nucleus in slide pixel indices (contour points through pixel centres, ``(x, y)``)."""

    nucleus_id: int
    centroid: tuple[float, float]  # (x, y)
    contour: np.ndarray  # int32 (n, 2) x, y
    area_px: int
    type: int
    type_prob: float


def seed_ties(seg: WindowSegmentation) -> np.ndarray:
    """Per cluster label: True if two of its seeds that can still grow share a ``dist`` value.

    skimage queues seeds by (value, age 0) and grown pixels with increasing ages, so inside a
    cluster the flooding order is the cluster's own, with or without other clusters in the same
    call, except between two seeds with equal values: their order then follows the queue's
    layout, i.e. everything else in the call. (A seed whose neighbours are all seeds grows
    nothing, so its turn does not matter.) Releases that queue every seed at -inf tie them all.
    """
    n = len(seg.clusters)
    if not SEEDS_QUEUE_BY_VALUE:
        return np.ones(n + 1, dtype=bool)
    values, labels = growing_seeds(seg.dist, seg.marker, seg.blb > 0, seg.clusters_map)
    return groups_with_equal_values(values, labels, n + 1)


def flood_clusters(
    seg: WindowSegmentation, clusters: Sequence[Cluster], ties: np.ndarray
) -> np.ndarray:
    """Watershed labels (window-sized, marker ids) of ``clusters``, each as if flooded alone.

    Clusters without a seed tie share one flood (identical to flooding each alone, see
    :func:`seed_ties`), done by :func:`~hoverdask.nuclei.fast.watershed_by_component`, which
    gives exactly skimage's single call on the same region (each 4-connected component flooded
    on its own with skimage's queue order); a tied cluster gets its own skimage call, so its
    result depends on it alone.
    """
    selected = np.zeros(len(seg.clusters) + 1, dtype=bool)
    selected[[c.label for c in clusters if not ties[c.label]]] = True
    region = np.take(selected, seg.clusters_map) & (seg.blb > 0)
    # a tie inside a 4-connected component is a tie inside its cluster: none is left here
    flooded = watershed_by_component(seg.dist, seg.marker, region)  # markers outside: ignored
    for cluster in clusters:
        if not ties[cluster.label]:
            continue
        crop = _crop(cluster, seg.origin)
        inside = (seg.clusters_map[crop] == cluster.label) & (seg.blb[crop] > 0)
        alone = watershed(
            seg.dist[crop], markers=np.where(inside, seg.marker[crop], 0), mask=inside
        )
        flooded[crop][inside] = alone[inside]
    return flooded


def _crop(cluster: Cluster, origin: tuple[int, int]) -> tuple[slice, slice]:
    y0, x0, y1, x1 = cluster.box
    return slice(y0 - origin[0], y1 - origin[0]), slice(x0 - origin[1], x1 - origin[1])


def window_nuclei(
    seg: WindowSegmentation, clusters: Sequence[Cluster], slide_width: int
) -> tuple[list[NucleusRecord], list[Box]]:
    """Nuclei of ``clusters``, and the boxes of those with a seed tie (flooded alone)."""
    if not clusters:
        return [], []
    ties = seed_ties(seg)
    flooded = flood_clusters(seg, clusters, ties)
    return flooded_nuclei(seg, flooded, slide_width), [c.box for c in clusters if ties[c.label]]


def flooded_nuclei(
    seg: WindowSegmentation, flooded: np.ndarray, slide_width: int
) -> list[NucleusRecord]:
    """Describe the flooded instances as the reference does, in one pass over the window.

    ``flooded`` holds only the clusters asked for (0 elsewhere), and a marker id never spans two
    clusters (a marker lies in one 8-connected component of the filled foreground), so each id
    is one instance: its bounding-box crop is the very mask the reference describes, and its
    outline is traced there. Areas, type votes and the moments of the centroid are sums over
    the instances' pixels, taken for all at once; the moments are exact integers, so the
    centroid ``m10 / m00 + x0`` is the reference's to the last bit.
    ``nucleus_id = y * slide_width + x`` of the instance's first pixel in raster order (leftmost
    pixel of its top row): a property of the pixels alone, so identical for every chunking.
    """
    sums = instance_sums(flooded, seg.type_map)
    if sums.area.size <= 1:
        return []
    oy, ox = seg.origin
    types, probs = None, None
    if sums.type_counts is not None:
        types, probs = vote_types(sums.type_counts)
    records = []
    for instance in np.flatnonzero(sums.area).tolist():
        top, left = int(sums.top[instance]), int(sums.left[instance])
        box = slice(top, int(sums.bottom[instance]) + 1), slice(left, int(sums.right[instance]) + 1)
        contour = first_contour((flooded[box] == instance).view(np.uint8))
        if contour is None:
            continue
        y0, x0 = oy + top, ox + left
        contour[:, 0] += x0
        contour[:, 1] += y0
        m00 = float(sums.area[instance])
        records.append(
            NucleusRecord(
                nucleus_id=(oy + top) * slide_width + ox + int(sums.first_x[instance]),
                centroid=(float((float(sums.sum_x[instance]) - left * m00) / m00 + x0),
                          float((float(sums.sum_y[instance]) - top * m00) / m00 + y0)),
                contour=contour,
                area_px=int(sums.area[instance]),
                type=int(types[instance]) if types is not None else 0,
                type_prob=float(probs[instance]) if probs is not None else float("nan"),
            )
        )
    return records
