"""Compiled per-instance sums: one raster pass over a label map for every record's numbers.

The records of a block's nuclei need, per instance, its pixel count, the exact integer sums of
its pixel coordinates (the centroid), its bounding box (the crop its outline is traced on), its
first pixel in raster order (its id) and its pixels per class (the type vote). As numpy these
were a dozen passes over the window (a gather, three weighted bincounts, ``find_objects``, a
joint bincount); here they are one. Sums are integers, so they equal numpy's to the last bit.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from hoverdask.nuclei._jit import kernel


@kernel()
def group_order(groups, n_groups):  # pragma: no cover - compiled
    """``(order, start)``: a counting sort of ``groups`` (ids in ``[0, n_groups)``) that keeps
    equal ids in their given order; group ``g`` is ``order[start[g]:start[g + 1]]``."""
    start = np.zeros(n_groups + 1, dtype=np.int64)
    for g in groups:
        start[g + 1] += 1
    start = np.cumsum(start)
    fill = start[:-1].copy()
    order = np.empty(groups.size, dtype=np.int64)
    for k in range(groups.size):
        order[fill[groups[k]]] = k
        fill[groups[k]] += 1
    return order, start


@kernel()
def _instance_sums(labels, types, n_labels, n_types, with_types):  # pragma: no cover - compiled
    height, width = labels.shape
    area = np.zeros(n_labels, dtype=np.int64)
    sum_y = np.zeros(n_labels, dtype=np.int64)
    sum_x = np.zeros(n_labels, dtype=np.int64)
    top = np.zeros(n_labels, dtype=np.int64)
    first_x = np.zeros(n_labels, dtype=np.int64)
    bottom = np.zeros(n_labels, dtype=np.int64)
    left = np.full(n_labels, width, dtype=np.int64)
    right = np.zeros(n_labels, dtype=np.int64)
    counts = np.zeros((n_labels, n_types), dtype=np.int64)
    negative = False
    for y in range(height):
        for x in range(width):
            label = labels[y, x]
            if label == 0:
                continue
            if area[label] == 0:
                top[label], first_x[label] = y, x
            area[label] += 1
            sum_y[label] += y
            sum_x[label] += x
            bottom[label] = y
            left[label] = min(left[label], x)
            right[label] = max(right[label], x)
            if with_types:
                t = types[y, x]
                if t < 0:
                    negative = True
                else:
                    counts[label, t] += 1
    return area, sum_y, sum_x, top, bottom, left, right, first_x, counts, negative


class InstanceSums(NamedTuple):
    """Per label id (index = id, 0 unused): pixel count, exact coordinate sums, inclusive
    bounding box, the column of its first pixel in raster order, and pixels per type."""

    area: np.ndarray
    sum_y: np.ndarray
    sum_x: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray
    first_x: np.ndarray
    type_counts: np.ndarray | None


def instance_sums(labels: np.ndarray, types: np.ndarray | None = None) -> InstanceSums:
    """One raster pass over a label map for what every instance's record needs.

    ``types`` (same shape, class ids >= 0) adds ``type_counts[id, t]``; a negative class is a
    ``ValueError``, as in :func:`hoverdask.nuclei.instances.type_counts`.
    """
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    n_labels = int(labels.max(initial=0)) + 1
    with_types = types is not None
    if with_types:
        types = np.ascontiguousarray(types, dtype=np.int32)
        n_types = int(types.max(initial=0)) + 1
    else:
        types, n_types = np.zeros((1, 1), dtype=np.int32), 1
    *sums, counts, negative = _instance_sums(labels, types, n_labels, n_types, with_types)
    if negative:
        raise ValueError("type map holds negative classes; expected argmax class ids >= 0")
    return InstanceSums(*sums, counts if with_types else None)


@kernel()
def _pixel_sums(label, rows, cols, stains, rgb, size):  # pragma: no cover - compiled
    n_px = label.size
    area = np.zeros(size)
    first = np.zeros((2, size))  # row and column sums
    for k in range(n_px):
        area[label[k]] += 1.0
        first[0, label[k]] += rows[k]
        first[1, label[k]] += cols[k]
    safe = np.where(area > 0, area, 1.0)
    mean_r, mean_c = first[0] / safe, first[1] / safe
    # columns: c*c, r*r, r*c central moments; h, h*h, e, e*e; r, g, b
    second = np.zeros((10, size))
    for k in range(n_px):
        j = label[k]
        dr, dc = rows[k] - mean_r[j], cols[k] - mean_c[j]
        second[0, j] += dc * dc
        second[1, j] += dr * dr
        second[2, j] += dr * dc
        h, e = stains[k, 0], stains[k, 1]
        second[3, j] += h
        second[4, j] += h * h
        second[5, j] += e
        second[6, j] += e * e
        second[7, j] += rgb[k, 0]
        second[8, j] += rgb[k, 1]
        second[9, j] += rgb[k, 2]
    return area, mean_r, mean_c, second / safe


class PixelMeans(NamedTuple):
    """Per label (index = label, 0 unused): pixel count and the means the features need."""

    area: np.ndarray
    row: np.ndarray
    col: np.ndarray
    var_c: np.ndarray  # the inertia tensor's entries as skimage builds it
    var_r: np.ndarray
    cov_rc: np.ndarray  # mean of (r - r_mean)(c - c_mean)
    h_od: np.ndarray
    h_od_sq: np.ndarray
    e_od: np.ndarray
    e_od_sq: np.ndarray
    red: np.ndarray
    green: np.ndarray
    blue: np.ndarray


def pixel_means(label: np.ndarray, rows: np.ndarray, cols: np.ndarray, stains: np.ndarray,
                rgb: np.ndarray, size: int) -> PixelMeans:  # fmt: skip
    """Means per label of the pixels' coordinates, central second moments, stains and colour.

    Each sum adds the pixels in the given order, one float64 addition at a time, as
    ``np.bincount(label, weights=...)`` does, so every mean equals that bincount divided by the
    count, to the last bit; two passes (the central moments need the means) instead of thirteen.
    """
    area, row, col, means = _pixel_sums(
        np.ascontiguousarray(label, dtype=np.int64), np.ascontiguousarray(rows, dtype=np.float64),
        np.ascontiguousarray(cols, dtype=np.float64), np.ascontiguousarray(stains, np.float64),
        np.ascontiguousarray(rgb, dtype=np.uint8), size,
    )  # fmt: skip
    return PixelMeans(area, row, col, *means)


@kernel()
def _outline_sums(labels, weights, size):  # pragma: no cover - compiled
    height, width = labels.shape
    border = np.zeros((height + 2, width + 2), dtype=labels.dtype)  # label at border pixels
    top = np.full(size, height, dtype=np.int64)
    bottom = np.full(size, -1, dtype=np.int64)
    for y in range(height):
        for x in range(width):
            own = labels[y, x]
            if own == 0:
                continue
            top[own] = min(top[own], y)
            bottom[own] = y
            if (
                x == 0 or labels[y, x - 1] != own or x == width - 1 or labels[y, x + 1] != own
                or y == 0 or labels[y - 1, x] != own or y == height - 1 or labels[y + 1, x] != own
            ):
                border[y + 1, x + 1] = own
    # (label, row) entries in raster order, then grouped by label (a counting sort keeps the
    # rows ascending); left and right are the row's first and last pixel
    n_rows = 0  # at most this many: every row between a label's top and bottom
    for own in range(size):
        n_rows += max(bottom[own] - top[own] + 1, 0)
    entry_label = np.empty(n_rows, dtype=np.int64)
    entry_row = np.empty(n_rows, dtype=np.int64)
    entry_left = np.empty(n_rows, dtype=np.int64)
    entry_right = np.empty(n_rows, dtype=np.int64)
    current = np.full(size, -1, dtype=np.int64)
    last_row = np.full(size, -1, dtype=np.int64)
    perimeter = np.zeros(size)
    n = 0
    for y in range(height):
        for x in range(width):
            own = labels[y, x]
            if own == 0:
                continue
            if last_row[own] != y:
                last_row[own] = y
                current[own] = n
                entry_label[n], entry_row[n], entry_left[n] = own, y, x
                n += 1
            entry_right[current[own]] = x
            if border[y + 1, x + 1] == own:  # skimage's neighbour code of a border pixel
                code = 1
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        if (dy != 0 or dx != 0) and border[y + 1 + dy, x + 1 + dx] == own:
                            code += 10 if dy != 0 and dx != 0 else 2
                perimeter[own] += weights[code]
    order = group_order(entry_label[:n], size)[0]
    return perimeter, entry_label[order], entry_row[order], entry_left[order], entry_right[order]


def outline_sums(
    labels: np.ndarray, weights: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(perimeter, label, row, left, right)`` of a label map (ids below ``size``).

    ``perimeter[id]`` is skimage's 4-connectivity perimeter estimate: each border pixel (a
    labelled pixel with a 4-neighbour of another label, the edge counting as other) adds
    ``weights[code]``, ``code`` being 1 plus 2 per edge-adjacent and 10 per corner-adjacent
    border pixel of the same label; the additions come in raster order, as a weighted
    ``np.bincount`` over the border pixels makes them. The other four arrays give, per label
    and row it occupies, the columns of its first and last pixel there, grouped by label (rows
    ascending within a label).
    """
    return _outline_sums(np.ascontiguousarray(labels), np.asarray(weights, np.float64), size)
