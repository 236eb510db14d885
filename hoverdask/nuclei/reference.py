"""HoVer-Net's marker-controlled watershed, step for step as the reference ``__proc_np_hv``.

Each step is its own small function so that other variants (the fast one, the seam-stable
whole-slide one) reuse the exact arithmetic instead of re-deriving it. The opencv calls, their
dtypes and the order of operations are those of the reference: changing any of them (even
float64 -> float32) can move a watershed tie and so change instance boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

FG_THRESHOLD = 0.5  # np foreground probability cut
MIN_OBJECT_PX = 10  # foreground components and markers smaller than this are dropped
SOBEL_KSIZE = 21
MARKER_ENERGY_THRESHOLD = 0.4  # energy at or above this is "between nuclei"
OPEN_KERNEL = (5, 5)  # elliptical opening that separates touching markers


def remove_small_labels(labels: np.ndarray, min_size: int = MIN_OBJECT_PX) -> np.ndarray:
    """Zero every labelled component with fewer than ``min_size`` pixels (in place, returned).

    Works on an already-labelled array, as the reference's ``misc.utils.remove_small_objects``
    does for integer input: sizes come from one ``bincount`` over the labels.
    """
    small = np.bincount(labels.ravel()) < min_size
    labels[np.take(small, labels)] = 0  # np.take: much faster than fancy indexing here
    return labels


def foreground_mask(
    np_prob: np.ndarray, threshold: float = FG_THRESHOLD, min_size: int = MIN_OBJECT_PX
) -> np.ndarray:
    """``blb``: int32 0/1 nucleus mask, 4-connected components under ``min_size`` px removed."""
    blb = np.asarray(np_prob >= threshold, dtype=np.int32)
    blb = ndimage.label(blb)[0]
    blb = remove_small_labels(blb, min_size)
    blb[blb > 0] = 1
    return blb


def minmax_normalise(x: np.ndarray) -> np.ndarray:
    """float32 min-max normalisation to [0, 1] over the whole array, via ``cv2.normalize``."""
    return cv2.normalize(x, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)


def inverted_gradients(h: np.ndarray, v: np.ndarray, ksize: int = SOBEL_KSIZE) -> np.ndarray:
    """float32 ``max(1 - |d h/dx|_norm, 1 - |d v/dy|_norm)``: low on nucleus slopes, high at edges.

    ``h`` and ``v`` are the raw hv channels; both are min-max normalised over the whole array
    first, so the result depends on the extent of the map being processed.
    """
    sobel_h = cv2.Sobel(minmax_normalise(h), cv2.CV_64F, 1, 0, ksize=ksize)
    sobel_v = cv2.Sobel(minmax_normalise(v), cv2.CV_64F, 0, 1, ksize=ksize)
    return np.maximum(1 - minmax_normalise(sobel_h), 1 - minmax_normalise(sobel_v))


def sobel_energy(
    h: np.ndarray, v: np.ndarray, blb: np.ndarray, ksize: int = SOBEL_KSIZE
) -> np.ndarray:
    """``overall``: float64 boundary energy inside the foreground, 0 (clipped) outside.

    Subtracting the int32 ``1 - blb`` from float32 promotes to float64, as in the reference.
    """
    overall = inverted_gradients(h, v, ksize) - (1 - blb)
    overall[overall < 0] = 0
    return overall


def watershed_surface(overall: np.ndarray, blb: np.ndarray) -> np.ndarray:
    """``dist``: the flooded surface, nuclei interiors as basins (float64)."""
    return -cv2.GaussianBlur((1.0 - overall) * blb, (3, 3), 0)


def open_kernel() -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, OPEN_KERNEL)


def markers_from_energy(
    overall: np.ndarray,
    blb: np.ndarray,
    threshold: float = MARKER_ENERGY_THRESHOLD,
    min_size: int = MIN_OBJECT_PX,
) -> np.ndarray:
    """``marker``: int32 labels of nucleus cores (raster-order ids, gaps where small ones went)."""
    marker = blb - np.asarray(overall >= threshold, dtype=np.int32)
    marker[marker < 0] = 0
    return label_filled_cores(ndimage.binary_fill_holes(marker).astype(np.uint8), min_size)


def label_filled_cores(filled: np.ndarray, min_size: int = MIN_OBJECT_PX) -> np.ndarray:
    """Open the hole-filled uint8 core mask (splits touching cores), label, drop small ones."""
    opened = cv2.morphologyEx(filled, cv2.MORPH_OPEN, open_kernel())
    return remove_small_labels(ndimage.label(opened)[0], min_size)


def watershed_instances(dist: np.ndarray, marker: np.ndarray, blb: np.ndarray) -> np.ndarray:
    """Grow the markers over ``dist`` inside ``blb`` (4-connectivity, no compactness, no lines)."""
    return watershed(dist, markers=marker, mask=blb)


@dataclass(frozen=True)
class Intermediates:
    """The reference's intermediate arrays, kept for parity checks and debugging."""

    blb: np.ndarray
    overall: np.ndarray
    dist: np.ndarray
    marker: np.ndarray
    inst_map: np.ndarray


def split_channels(pred_map: np.ndarray, nr_types: int | None) -> tuple[np.ndarray | None, ...]:
    """``(type_map, np, h, v)`` from the ``[tp, np, h, v]`` / ``[np, h, v]`` network output.

    ``type_map`` is the per-pixel class cast to int32 (truncation, as the reference), or None.
    """
    pred_map = np.asarray(pred_map)
    n_channels = 3 if nr_types is None else 4
    if pred_map.ndim != 3 or pred_map.shape[-1] != n_channels:
        layout = "[np, h, v]" if nr_types is None else "[tp, np, h, v]"
        raise ValueError(
            f"pred_map must be (H, W, {n_channels}) {layout} for nr_types={nr_types}, "
            f"got shape {pred_map.shape}"
        )
    if min(pred_map.shape[:2]) < 2:
        raise ValueError(f"pred_map must be at least 2x2 pixels, got {pred_map.shape[:2]}")
    type_map = None
    if nr_types is not None:
        type_map = pred_map[..., 0].astype(np.int32)
        pred_map = pred_map[..., 1:]
    inst = np.asarray(pred_map, dtype=np.float32)
    return type_map, inst[..., 0], inst[..., 1], inst[..., 2]


def proc_np_hv_reference(np_prob: np.ndarray, h: np.ndarray, v: np.ndarray) -> Intermediates:
    """The reference ``__proc_np_hv`` on float32 ``np``, ``h``, ``v`` maps, with intermediates."""
    blb = foreground_mask(np_prob)
    overall = sobel_energy(h, v, blb)
    dist = watershed_surface(overall, blb)
    marker = markers_from_energy(overall, blb)
    inst_map = watershed_instances(dist, marker, blb)
    return Intermediates(blb, overall, dist, marker, inst_map)
