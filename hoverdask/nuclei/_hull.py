"""Compiled convex-area counts: pixel centres inside the hull of each label's row extremes.

skimage's ``convex_hull_image`` keeps the pixel centres inside or on the convex hull of the
border pixels offset by half a pixel along each axis (a diamond per pixel). Only the leftmost
and rightmost pixel of each row can be hull vertices, so the hull is that of six points per row.
In doubled coordinates (X = 2x, Y = 2y) every such point is an integer; the hull's left edge is
the lower convex chain of the leftmost X per Y, its right edge the upper chain of the rightmost,
and a row's count is the integers between the two chains there. All arithmetic is on integers,
so the counts are exact, whatever the hull algorithm.
"""

from __future__ import annotations

import numpy as np

from hoverdask.nuclei._jit import kernel


@kernel(inline="always")
def _turn(oy, ox, ay, ax, by, bx):  # pragma: no cover - compiled
    return (ay - oy) * (bx - ox) - (ax - ox) * (by - oy)


@kernel()
def _chain(ys, xs, n, lower, chain_y, chain_x):  # pragma: no cover - compiled
    """Monotone chain over points sorted by Y: the left edge (``lower``, smallest X) or the
    right edge of their hull; returns its length."""
    size = 0
    for k in range(n):
        while size >= 2:
            turn = _turn(chain_y[size - 2], chain_x[size - 2], chain_y[size - 1],
                         chain_x[size - 1], ys[k], xs[k])  # fmt: skip
            if (lower and turn <= 0) or (not lower and turn >= 0):
                size -= 1
            else:
                break
        chain_y[size], chain_x[size] = ys[k], xs[k]
        size += 1
    return size


@kernel()
def _hull_pixel_counts(row, left, right, first, out):  # pragma: no cover - compiled
    n_groups = first.size - 1
    longest = 0
    for g in range(n_groups):
        longest = max(longest, first[g + 1] - first[g])
    capacity = 3 * longest + 1
    ys = np.empty(capacity, dtype=np.int64)
    lxs = np.empty(capacity, dtype=np.int64)
    rxs = np.empty(capacity, dtype=np.int64)
    chain_y = np.empty(capacity, dtype=np.int64)
    chain_x = np.empty(capacity, dtype=np.int64)
    right_y = np.empty(capacity, dtype=np.int64)
    right_x = np.empty(capacity, dtype=np.int64)
    for g in range(n_groups):
        n = 0
        for k in range(first[g], first[g + 1]):  # rows ascending: Y = 2r - 1, 2r, 2r + 1
            r, lo, hi = row[k], left[k], right[k]
            for dy, lx, rx in ((-1, 2 * lo, 2 * hi), (0, 2 * lo - 1, 2 * hi + 1), (1, 2 * lo, 2 * hi)):
                y = 2 * r + dy
                if n and ys[n - 1] == y:  # the row above reached this Y too
                    lxs[n - 1] = min(lxs[n - 1], lx)
                    rxs[n - 1] = max(rxs[n - 1], rx)
                else:
                    ys[n], lxs[n], rxs[n] = y, lx, rx
                    n += 1
        _chain(ys, lxs, n, True, chain_y, chain_x)  # both end at the first and last Y
        _chain(ys, rxs, n, False, right_y, right_x)
        total = 0
        i = j = 0
        for y2 in range(ys[0] + 1, ys[n - 1], 2):  # the even Y: pixel rows
            while chain_y[i + 1] < y2:
                i += 1
            while right_y[j + 1] < y2:
                j += 1
            span = chain_y[i + 1] - chain_y[i]  # X >= left edge: x >= ceil(X / 2)
            num = chain_x[i] * span + (chain_x[i + 1] - chain_x[i]) * (y2 - chain_y[i])
            lo = -((-num) // (2 * span))
            span = right_y[j + 1] - right_y[j]  # X <= right edge: x <= floor(X / 2)
            num = right_x[j] * span + (right_x[j + 1] - right_x[j]) * (y2 - right_y[j])
            hi = num // (2 * span)
            if hi >= lo:
                total += hi - lo + 1
        out[g] = total


def hull_pixel_counts(
    row: np.ndarray, left: np.ndarray, right: np.ndarray, first: np.ndarray
) -> np.ndarray:
    """Pixels of each group's convex hull image; group ``g`` is the rows
    ``first[g]:first[g + 1]`` (ascending, one entry per row that has pixels) with the columns
    of their leftmost and rightmost pixels."""
    first = np.ascontiguousarray(first, dtype=np.int64)
    out = np.zeros(first.size - 1, dtype=np.float64)
    if out.size:
        _hull_pixel_counts(*(np.ascontiguousarray(a, dtype=np.int64) for a in (row, left, right)),
                           first, out)  # fmt: skip
    return out
