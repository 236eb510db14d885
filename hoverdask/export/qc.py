"""QC picture per slide: thumbnail, tissue outline, and every nucleus as a dot coloured by type.

One glance shows whether detection covered the tissue, stopped at its edge and found plausible
type mixtures; the picture is drawn at thumbnail resolution so its cost does not depend on the
number of pixels in the slide.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import geopandas as gpd
import numpy as np

from hoverdask.atomic import atomic_path
from hoverdask.features import type_info, type_name_and_color

UNCLASSIFIED_COLOR = (160, 160, 160)
OUTLINE_COLOR = (20, 20, 20)


def write_qc_picture(
    thumbnail_rgb: np.ndarray,
    tissue_mask: np.ndarray | None,
    nuclei: gpd.GeoDataFrame,
    path: str | os.PathLike[str],
    *,
    downsample: float,
    type_table: Any = None,
) -> Path:
    """Draw the QC picture and write it as PNG (temp name, then rename).

    ``downsample`` is level-0 pixels per thumbnail pixel; ``tissue_mask`` may have any size (it is
    resized to the thumbnail) or be ``None``.
    """
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] < 3:
        raise ValueError(f"thumbnail must be RGB (H, W, 3), got shape {thumbnail_rgb.shape}")
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, got {downsample}")
    picture = np.ascontiguousarray(thumbnail_rgb[..., :3], dtype=np.uint8).copy()
    height, width = picture.shape[:2]
    if tissue_mask is not None and tissue_mask.any():
        mask = cv2.resize(
            tissue_mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST
        )
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(
            picture, contours, -1, OUTLINE_COLOR, max(1, round(min(height, width) / 400))
        )
    _draw_nuclei(picture, nuclei, downsample, type_info(type_table))
    path = Path(path)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return path


def _draw_nuclei(picture: np.ndarray, nuclei: gpd.GeoDataFrame, downsample: float, info) -> None:
    """Untyped nuclei first, so typed ones stay visible on top."""
    if len(nuclei) == 0:
        return
    xs = np.floor(nuclei["centroid_x"].to_numpy(dtype=float) / downsample).astype(np.int64)
    ys = np.floor(nuclei["centroid_y"].to_numpy(dtype=float) / downsample).astype(np.int64)
    types = nuclei["type"].to_numpy() if "type" in nuclei else np.zeros(len(nuclei), int)
    height, width = picture.shape[:2]
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    radius_level0 = np.sqrt(float(np.median(nuclei.geometry.area)) / np.pi)
    radius = round(radius_level0 / downsample)
    for type_id in sorted(set(types.tolist())):
        color = UNCLASSIFIED_COLOR if type_id == 0 else type_name_and_color(int(type_id), info)[1]
        sel = inside & (types == type_id)
        if radius <= 0:
            picture[ys[sel], xs[sel]] = color
            continue
        for x, y in zip(xs[sel].tolist(), ys[sel].tolist(), strict=True):
            cv2.circle(picture, (x, y), radius, color, -1)
