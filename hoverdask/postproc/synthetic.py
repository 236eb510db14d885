"""Synthetic HoVer-Net network outputs with known nuclei, for tests and benchmarks.

The maps mimic a trained model: a label image of touching elliptical nuclei, hv maps that run
from -1 to 1 across each nucleus (the training target's definition), a blurred noisy
foreground probability and a per-nucleus class with pixel noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
from scipy import ndimage


def synthetic_labels(
    height: int, width: int, seed: int = 0, spacing: int = 22, radius: tuple[int, int] = (5, 11)
) -> np.ndarray:
    """int32 label image of ellipses on a jittered grid; neighbours touch or overlap."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.int32)
    ys, xs = np.mgrid[spacing // 2 : height : spacing, spacing // 2 : width : spacing]
    centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
    centres = centres + rng.integers(-spacing // 3, spacing // 3 + 1, centres.shape)
    keep = rng.random(len(centres)) < 0.85
    for inst_id, (cx, cy) in enumerate(centres[keep], start=1):
        axes = tuple(int(a) for a in rng.integers(radius[0], radius[1] + 1, 2))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(labels, (int(cx), int(cy)), axes, angle, 0, 360, inst_id, -1)
    return labels


def hv_maps(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical distance to each nucleus's centre, scaled to [-1, 1] per side."""
    ids = np.arange(1, int(labels.max()) + 1)
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    fg = labels > 0
    maps = []
    for coord in (cols, rows):
        with np.errstate(invalid="ignore"):  # ids painted over entirely have no pixels
            centre = np.asarray(ndimage.mean(coord, labels, ids))
        offset = np.zeros(labels.shape, dtype=np.float64)
        offset[fg] = coord[fg] - np.round(centre[labels[fg] - 1])
        low = np.asarray(ndimage.minimum(offset, labels, ids))
        high = np.asarray(ndimage.maximum(offset, labels, ids))
        scale = np.where(offset < 0, -low[labels - 1], high[labels - 1])
        norm = np.divide(offset, scale, out=np.zeros_like(offset), where=fg & (scale != 0))
        maps.append(norm.astype(np.float32))
    return maps[0], maps[1]


def synthetic_pred_map(
    height: int, width: int, nr_types: int | None = 6, seed: int = 0
) -> np.ndarray:
    """``[tp, np, h, v]`` (or ``[np, h, v]`` without types) float32 map, shape (H, W, C)."""
    rng = np.random.default_rng(seed)
    labels = synthetic_labels(height, width, seed)
    h, v = hv_maps(labels)
    fg = (labels > 0).astype(np.float32)
    np_prob = cv2.GaussianBlur(fg, (5, 5), 1.0) + rng.normal(0, 0.08, fg.shape)
    np_prob = np.clip(np_prob, 0, 1).astype(np.float32)
    h = h + rng.normal(0, 0.05, h.shape).astype(np.float32)
    v = v + rng.normal(0, 0.05, v.shape).astype(np.float32)
    channels = [np_prob, h, v]
    if nr_types is not None:
        inst_type = rng.integers(1, nr_types, int(labels.max()) + 1)
        inst_type[0] = 0
        tp = inst_type[labels]
        noisy = rng.random(tp.shape) < 0.2
        tp[noisy] = rng.integers(0, nr_types, int(noisy.sum()))
        channels.insert(0, tp.astype(np.float32))
    return np.stack(channels, axis=-1).astype(np.float32)


def dequantised_pred_map(stored: Mapping[str, np.ndarray]) -> np.ndarray:
    """``[tp, np, h, v]`` float32 from the quantised storage of the parity WSI fixture
    (``tp``, ``q_np`` /255, ``q_h`` and ``q_v`` /32767, as its README defines)."""
    return np.stack(
        [
            stored["tp"].astype(np.float32),
            stored["q_np"].astype(np.float32) / np.float32(255),
            stored["q_h"].astype(np.float32) / np.float32(32767),
            stored["q_v"].astype(np.float32) / np.float32(32767),
        ],
        axis=-1,
    )
