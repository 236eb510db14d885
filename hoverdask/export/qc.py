"""QC picture per slide: thumbnail, tissue outline, and every nucleus as a dot coloured by type.

One glance shows whether detection covered the tissue, stopped at its edge and found plausible
type mixtures; the picture is drawn at thumbnail resolution so its cost does not depend on the
number of pixels in the slide.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np

from hoverdask.core.atomic import atomic_path
from hoverdask.core.types import TypeTableLike
from hoverdask.nuclei.features import type_info, type_name_and_color

UNCLASSIFIED_COLOR = (160, 160, 160)
OUTLINE_COLOR = (20, 20, 20)


def write_qc_picture(
    thumbnail_rgb: np.ndarray,
    tissue_mask: np.ndarray | None,
    nuclei: gpd.GeoDataFrame,
    path: str | os.PathLike[str],
    *,
    downsample: float,
    type_table: TypeTableLike | None = None,
) -> Path:
    """Draw the QC picture and write it as PNG (temp name, then rename).

    ``downsample`` is level-0 pixels per thumbnail pixel; ``tissue_mask`` may have any size (it is
    resized to the thumbnail) or be ``None``.
    """
    picture = _background(thumbnail_rgb, tissue_mask, downsample)
    _draw_nuclei(picture, nuclei, downsample, type_info(type_table))
    return _write_png(picture, path)


class QcDots:
    """The QC picture's nucleus dots, drawn chunk by chunk (a slide's parts, row groups).

    The whole-table drawing paints types in ascending order, later types over earlier ones; here
    each type gets its own mask of dot pixels and the masks are painted in that order at the
    end, so the picture is the same whatever order the chunks come in. ``median_area`` is the
    slide's median nucleus area (level-0 px²), which sets the dot radius.
    """

    def __init__(self, shape: tuple[int, int], *, downsample: float, median_area: float) -> None:
        if downsample <= 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        self.shape = shape
        self.downsample = downsample
        self.radius = _dot_radius(median_area, downsample)
        self.masks: dict[int, np.ndarray] = {}

    def add(self, nuclei: gpd.GeoDataFrame) -> None:
        xs, ys, types, inside = _dot_positions(nuclei, self.downsample, self.shape)
        for type_id in set(types.tolist()):
            mask = self.masks.setdefault(int(type_id), np.zeros(self.shape, np.uint8))
            sel = inside & (types == type_id)
            if self.radius <= 0:
                mask[ys[sel], xs[sel]] = 1
                continue
            for x, y in zip(xs[sel].tolist(), ys[sel].tolist(), strict=True):
                cv2.circle(mask, (x, y), self.radius, 1, -1)

    def paint(self, picture: np.ndarray, type_table: TypeTableLike | None = None) -> None:
        info = type_info(type_table)
        for type_id in sorted(self.masks):
            picture[self.masks[type_id] > 0] = _type_color(type_id, info)


def write_qc_picture_dots(
    thumbnail_rgb: np.ndarray,
    tissue_mask: np.ndarray | None,
    dots: QcDots,
    path: str | os.PathLike[str],
    *,
    type_table: TypeTableLike | None = None,
) -> Path:
    """:func:`write_qc_picture` for nuclei already drawn into ``dots`` (same picture)."""
    picture = _background(thumbnail_rgb, tissue_mask, dots.downsample)
    if picture.shape[:2] != dots.shape:
        raise ValueError(f"dots drawn for {dots.shape}, thumbnail is {picture.shape[:2]}")
    dots.paint(picture, type_table)
    return _write_png(picture, path)


def _background(
    thumbnail_rgb: np.ndarray, tissue_mask: np.ndarray | None, downsample: float
) -> np.ndarray:
    """The thumbnail (RGB copy) with the tissue outline drawn on it."""
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
    return picture


def _write_png(picture: np.ndarray, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    return path


def _draw_nuclei(picture: np.ndarray, nuclei: gpd.GeoDataFrame, downsample: float, info) -> None:
    """Untyped nuclei first, so typed ones stay visible on top."""
    if len(nuclei) == 0:
        return
    xs, ys, types, inside = _dot_positions(nuclei, downsample, picture.shape[:2])
    radius = _dot_radius(float(np.median(nuclei.geometry.area)), downsample)
    for type_id in sorted(set(types.tolist())):
        color = _type_color(type_id, info)
        sel = inside & (types == type_id)
        if radius <= 0:
            picture[ys[sel], xs[sel]] = color
            continue
        for x, y in zip(xs[sel].tolist(), ys[sel].tolist(), strict=True):
            cv2.circle(picture, (x, y), radius, color, -1)


def _dot_positions(
    nuclei: gpd.GeoDataFrame, downsample: float, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thumbnail pixel of each centroid, its type, and whether it falls on the thumbnail."""
    xs = np.floor(nuclei["centroid_x"].to_numpy(dtype=float) / downsample).astype(np.int64)
    ys = np.floor(nuclei["centroid_y"].to_numpy(dtype=float) / downsample).astype(np.int64)
    types = nuclei["type"].to_numpy() if "type" in nuclei else np.zeros(len(nuclei), int)
    height, width = shape[:2]
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    return xs, ys, types, inside


def _dot_radius(median_area: float, downsample: float) -> int:
    return round(np.sqrt(median_area / np.pi) / downsample)


def _type_color(type_id: int, info) -> tuple[int, int, int]:
    return UNCLASSIFIED_COLOR if type_id == 0 else type_name_and_color(int(type_id), info)[1]
