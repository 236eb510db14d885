"""Compiled marker flooding, equal to skimage's watershed wherever its order is defined.

skimage's ``watershed`` (no compactness, no watershed line) labels a pixel when it is pushed,
with the label of the pixel that pushed it, and pops its queue by ``(value, age)``: seeds have
age 0, every pushed pixel the next integer. Inside one 4-connected component of the mask that
order is strict unless two seeds that can still grow share a value, and it does not depend on
the other components. So a flood done here component by component, with its own queue on the
same key, gives skimage's labels for every component without such a tie; the kernel reports the
components that have one, and the caller decides what to do with them.

Why compiled: the flood itself is one priority-queue pass, but around skimage's call the work of
splitting the mask into components, counting their markers and packing the ones that need a
queue took longer than the queue. Here it is one pass over the mask, and components holding a
single marker label take it without a queue. The seeds that can grow, and the groups where two
of them tie (:func:`growing_seeds`, :func:`groups_with_equal_values`), are found here too.
"""

from __future__ import annotations

import numpy as np

from hoverdask.nuclei._jit import kernel
from hoverdask.nuclei._sums import group_order

# skimage's neighbour order for connectivity 1 (``_offsets_to_raveled_neighbors``): up, left,
# right, down. It decides which pixel gets the next age, so it is part of the result.
_DY = np.array([-1, 0, 0, 1], dtype=np.int64)
_DX = np.array([0, -1, 1, 0], dtype=np.int64)


@kernel(inline="always")
def _before(v, a, w, b):  # pragma: no cover - compiled
    """skimage's heap order: by value, then by age."""
    return v < w or (v == w and a < b)


@kernel(inline="always")
def _push(value, age, ys, xs, size, v, a, y, x):  # pragma: no cover - compiled
    """Add an item; return the new size."""
    child = size
    while child > 0:
        parent = (child - 1) >> 1
        if not _before(v, a, value[parent], age[parent]):
            break
        value[child], age[child], ys[child], xs[child] = value[parent], age[parent], ys[parent], xs[parent]
        child = parent
    value[child], age[child], ys[child], xs[child] = v, a, y, x
    return size + 1


@kernel(inline="always")
def _pop(value, age, ys, xs, size):  # pragma: no cover - compiled
    """Remove the first item (read it before calling); return the new size."""
    size -= 1
    if size == 0:
        return 0
    v, a, y, x = value[size], age[size], ys[size], xs[size]
    parent = 0
    while True:
        child = 2 * parent + 1
        if child >= size:
            break
        if child + 1 < size and _before(value[child + 1], age[child + 1], value[child], age[child]):
            child += 1
        if not _before(value[child], age[child], v, a):
            break
        value[parent], age[parent], ys[parent], xs[parent] = value[child], age[child], ys[child], xs[child]
        parent = child
    value[parent], age[parent], ys[parent], xs[parent] = v, a, y, x
    return size


@kernel()
def _can_grow(marker, mask, y, x):  # pragma: no cover - compiled
    height, width = mask.shape
    for d in range(4):
        ny, nx = y + _DY[d], x + _DX[d]
        if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and marker[ny, nx] == 0:
            return True
    return False


@kernel()
def _flood_component(dist, marker, mask, out, qy, qx, n, value, age, ys, xs, monotone):  # pragma: no cover
    """Flood one component (pixels ``qy[:n], qx[:n]``) from its seeds; return True, flooding
    nothing, if two seeds that can grow share a value."""
    height, width = mask.shape
    size = 0
    for k in range(n):  # the seeds, at age 0; those that cannot grow would push nothing
        y, x = qy[k], qx[k]
        if marker[y, x] != 0:
            out[y, x] = marker[y, x]
            if _can_grow(marker, mask, y, x):
                size = _push(value, age, ys, xs, size, dist[y, x], 0, y, x)
    clock = 0
    last_seed = np.inf
    while size > 0:
        y, x, floor = ys[0], xs[0], value[0]
        if age[0] == 0:  # seeds leave in value order, so two equal ones leave one after the other
            if floor == last_seed:
                for k in range(n):
                    out[qy[k], qx[k]] = 0
                return True
            last_seed = floor
        size = _pop(value, age, ys, xs, size)
        label = out[y, x]
        for d in range(4):
            ny, nx = y + _DY[d], x + _DX[d]
            if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and out[ny, nx] == 0:
                clock += 1
                out[ny, nx] = label
                cost = dist[ny, nx]
                if monotone and cost < floor:
                    cost = floor
                size = _push(value, age, ys, xs, size, cost, clock, ny, nx)
    return False


@kernel()
def _flood(dist, marker, mask, out, monotone):  # pragma: no cover - compiled
    height, width = mask.shape
    seen = np.zeros((height, width), dtype=np.bool_)
    capacity = max(np.count_nonzero(mask), 1)  # a queue never holds more than its component
    tied = np.empty(capacity, dtype=np.int64)
    qy = np.empty(capacity, dtype=np.int32)
    qx = np.empty(capacity, dtype=np.int32)
    value = np.empty(capacity, dtype=np.float64)
    age = np.empty(capacity, dtype=np.int64)
    ys = np.empty(capacity, dtype=np.int32)
    xs = np.empty(capacity, dtype=np.int32)
    n_tied = 0
    for sy in range(height):
        for sx in range(width):
            if not mask[sy, sx] or seen[sy, sx]:
                continue
            seen[sy, sx] = True
            qy[0], qx[0] = sy, sx
            n, head = 1, 0
            first, several = 0, False
            while head < n:  # breadth first: the component's pixels and its marker labels
                y, x = qy[head], qx[head]
                head += 1
                m = marker[y, x]
                if m != 0:
                    if first == 0:
                        first = m
                    elif m != first:
                        several = True
                for d in range(4):
                    ny, nx = y + _DY[d], x + _DX[d]
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        qy[n], qx[n] = ny, nx
                        n += 1
            if not several:
                if first != 0:
                    for k in range(n):
                        out[qy[k], qx[k]] = first
                continue
            if _flood_component(dist, marker, mask, out, qy, qx, n, value, age, ys, xs, monotone):
                tied[n_tied] = sy * width + sx
                n_tied += 1
    return tied[:n_tied].copy()


def flood_markers(
    dist: np.ndarray, marker: np.ndarray, mask: np.ndarray, *, monotone: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, tied)``: skimage's ``watershed(dist, markers=marker, mask=mask)`` on every
    4-connected component of ``mask`` except those in ``tied`` (flat index of each one's first
    pixel), where two seeds that can grow share a ``dist`` value and skimage's order depends on
    its queue's layout; those are left 0.

    Markers outside ``mask`` are ignored, as skimage ignores them. ``monotone``: a pushed
    pixel's cost is at least the cost of the pixel that pushed it, as in skimage 0.25 and later.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    marker = np.ascontiguousarray(marker, dtype=np.int32)  # read inside the mask only
    dist = np.ascontiguousarray(dist, dtype=np.float64)
    out = np.zeros(mask.shape, dtype=np.int32)
    return out, _flood(dist, marker, mask, out, monotone)


@kernel()
def _growing_seeds(dist, marker, mask, groups, values, group_of):  # pragma: no cover - compiled
    height, width = mask.shape
    n = 0
    for y in range(height):
        for x in range(width):
            if mask[y, x] and marker[y, x] != 0 and _can_grow(marker, mask, y, x):
                values[n], group_of[n] = dist[y, x], groups[y, x]
                n += 1
    return n


def growing_seeds(
    dist: np.ndarray, marker: np.ndarray, mask: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, groups)`` of the seeds that can grow (a marker pixel in ``mask`` with a
    4-neighbour in ``mask`` that is no marker), in raster order: the seeds whose turn in
    skimage's queue matters."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    values = np.empty(np.count_nonzero(mask), dtype=np.float64)
    group_of = np.empty(values.size, dtype=np.int64)
    n = _growing_seeds(np.ascontiguousarray(dist, dtype=np.float64),
                       np.ascontiguousarray(marker, dtype=np.int32), mask,
                       np.ascontiguousarray(groups, dtype=np.int32), values, group_of)  # fmt: skip
    return values[:n], group_of[:n]


@kernel()
def groups_with_equal_values(values, groups, n_groups):  # pragma: no cover - compiled
    """``out[g]``: True if two entries of group ``g`` (0 <= g < n_groups) share a value."""
    order, start = group_order(groups, n_groups)
    by_group = values[order]
    out = np.zeros(n_groups, dtype=np.bool_)
    for g in range(n_groups):
        lo, hi = start[g], start[g + 1]
        if hi - lo > 1:
            run = np.sort(by_group[lo:hi])
            for k in range(1, run.size):
                if run[k] == run[k - 1]:
                    out[g] = True
                    break
    return out
