"""Every compiled post-processing kernel at once: :func:`warm` compiles (or loads) them all.

For an image build, or a machine's first run, so that no worker compiles them at the
post-processing barrier (see :mod:`hoverdask.nuclei._jit`).
"""

from __future__ import annotations

import numpy as np

from hoverdask.nuclei._flood import flood_markers, groups_with_equal_values, growing_seeds
from hoverdask.nuclei._hull import hull_pixel_counts
from hoverdask.nuclei._sums import instance_sums, outline_sums, pixel_means


def warm() -> None:
    """Compile (or load) every post-processing kernel now, on tiny inputs: for an image build or
    a machine's first run, so that no worker compiles them at the post-processing barrier."""
    labels = np.zeros((6, 7), dtype=np.int32)
    labels[1:4, 1:3], labels[2:5, 4:6] = 1, 2
    dist = np.linspace(0.0, 1.0, labels.size).reshape(labels.shape)
    flood_markers(dist, labels, labels > 0)
    values, groups = growing_seeds(dist, labels, labels > 0, labels)
    groups_with_equal_values(values, groups, 3)
    instance_sums(labels, labels)
    _, *entries = outline_sums(labels, np.zeros(50), 3)
    hull_pixel_counts(entries[1], entries[2], entries[3], np.array([0, 3, 6]))
    pixel_means(np.array([1, 2]), np.zeros(2), np.zeros(2), np.zeros((2, 3)),
                np.zeros((2, 3), dtype=np.uint8), 3)  # fmt: skip
