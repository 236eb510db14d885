"""Where the tissue is: a low-resolution mask used to skip blocks of bare glass.

The mask is computed on a thumbnail at about :data:`MASK_MPP` µm/px (1.25x), built chunk-wise
from the smallest pyramid level that is still fine enough, so no full-resolution image is ever
held in memory. A thumbnail pixel is tissue when it is

* coloured: HSV saturation above a threshold chosen by Otsu's method and kept within
  ``[0.05, 0.15]`` (white glass and grey haze are unsaturated; the clamp keeps an all-tissue
  slide from being split in two),
* not pen ink: saturated green/blue hues (60-230 deg) are not H&E (pure hematoxylin sits near
  245 deg, mixtures with eosin between 245 and 340 deg),
* not dark debris or black ink: brightness below 0.25,

then cleaned with a small closing, small-hole filling and removal of specks under
:data:`MIN_TISSUE_UM2`. Mask pixel ``(r, c)`` covers level-0 ``[c*d, (c+1)*d) x [r*d, (r+1)*d)``
with ``d = downsample``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hoverdask.core.atomic import atomic_write
from hoverdask.slide.base import Slide

MASK_MPP = 8.0
MIN_TISSUE_UM2 = 20_000.0  # smaller specks are dust or debris (about 140 µm across)
MAX_HOLE_UM2 = 20_000.0
SATURATION_RANGE = (0.05, 0.15)
PEN_HUES_DEG = (60.0, 230.0)
PEN_SATURATION = 0.25
DARK_VALUE = 0.25


@dataclass
class TissueMask:
    """Boolean tissue mask at low resolution, with the geometry to query it in level-0 pixels."""

    mask: np.ndarray
    downsample: float  # level-0 px per mask px
    mpp: float  # level-0 µm/px
    thumbnail: np.ndarray | None = field(default=None, repr=False)  # RGB the mask was made from

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.downsample * self.mpp) ** 2 / 1e6

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def _window(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        d = self.downsample
        c0, r0 = max(0, math.floor(x0 / d)), max(0, math.floor(y0 / d))
        c1, r1 = max(0, math.ceil(x1 / d)), max(0, math.ceil(y1 / d))
        return self.mask[r0:r1, c0:c1]

    def fraction_in_box(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Share of the mask pixels touching the level-0 box ``[x0, x1) x [y0, y1)`` that are tissue."""
        window = self._window(x0, y0, x1, y1)
        return float(window.mean()) if window.size else 0.0

    def any_in_box(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether any tissue touches the level-0 box (conservative: partial mask pixels count)."""
        return bool(self._window(x0, y0, x1, y1).any())

    def to_png(self, path: str | Path, *, overlay: bool = True) -> None:
        """The thumbnail with glass dimmed and tissue as is, or (``overlay=False`` or no
        thumbnail, as after :meth:`load`) the mask in black and white."""
        import cv2

        thumbnail = self.thumbnail if overlay else None
        if thumbnail is None:
            image = self.mask.astype(np.uint8) * 255
        else:
            image = thumbnail[: self.mask.shape[0], : self.mask.shape[1]].copy()
            image[~self.mask] = (image[~self.mask] * 0.35).astype(np.uint8)
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        atomic_write(Path(path), lambda tmp: cv2.imwrite(str(tmp), image) or _fail(tmp))

    def save(self, path: str | Path) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez_compressed(
                    handle, mask=self.mask, downsample=self.downsample, mpp=self.mpp
                )

        atomic_write(Path(path), write)

    @classmethod
    def load(cls, path: str | Path) -> TissueMask:
        with np.load(path) as data:
            return cls(data["mask"].astype(bool), float(data["downsample"]), float(data["mpp"]))


def _fail(path: Path) -> None:
    raise OSError(f"could not write {path}")




def tissue_path(zarr_path: str | Path) -> Path:
    """Where the mask of a converted slide lives: ``X.zarr`` -> ``X.tissue.npz`` beside it."""
    zarr_path = Path(zarr_path)
    stem = zarr_path.name.removesuffix(".zarr")
    return zarr_path.with_name(f"{stem}.tissue.npz")


def thumbnail(slide: Slide, mpp: float = MASK_MPP) -> tuple[np.ndarray, float]:
    """RGB thumbnail near ``mpp`` µm/px and its downsample (level-0 px per thumbnail px).

    Made by k x k mean pooling of the smallest level finer than ``mpp``, chunk by chunk.
    """
    import dask.array as da

    wanted = max(1.0, mpp / slide.mpp)
    candidates = [lvl for lvl, d in enumerate(slide.level_downsamples) if d <= wanted * 1.01]
    level = max(candidates, key=lambda lvl: slide.level_downsamples[lvl]) if candidates else 0
    factor = max(1, math.floor(wanted / slide.level_downsamples[level] + 1e-6))
    source = slide.level_array(level)
    chunk = max(factor, (source.chunksize[0] // factor) * factor)
    source = source.rechunk((chunk, chunk, 3))
    pooled = da.map_blocks(
        _mean_pool,
        source,
        factor,
        chunks=(*(tuple(-(-c // factor) for c in dim) for dim in source.chunks[:2]), (3,)),
        dtype=np.uint8,
    )
    return pooled.compute(), slide.level_downsamples[level] * factor


def _mean_pool(block: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` cells; partial cells at the edges average what they hold."""
    h, w = block.shape[:2]
    rows, cols = -(-h // factor), -(-w // factor)
    total = np.add.reduceat(np.add.reduceat(block.astype(np.uint32), np.arange(0, h, factor), 0),
                            np.arange(0, w, factor), 1)  # fmt: skip
    counts = np.outer(
        np.diff(np.append(np.arange(0, h, factor), h)), np.diff(np.append(np.arange(0, w, factor), w))
    )
    out = (total + counts[..., None] // 2) // counts[..., None]
    return out.reshape(rows, cols, block.shape[2]).astype(np.uint8)


def detect_tissue(rgb: np.ndarray, um_per_px: float) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``um_per_px`` wide."""
    import cv2
    from skimage.filters import threshold_otsu

    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    hsv = cv2.cvtColor(cv2.medianBlur(rgb, 3), cv2.COLOR_RGB2HSV_FULL).astype(np.float32) / 255
    hue, saturation, value = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    low, high = SATURATION_RANGE
    threshold = low
    if saturation.max() > saturation.min():
        threshold = float(np.clip(threshold_otsu(saturation), low, high))
    pen = (hue >= PEN_HUES_DEG[0]) & (hue <= PEN_HUES_DEG[1]) & (saturation > PEN_SATURATION)
    mask = (saturation > threshold) & ~pen & (value > DARK_VALUE)
    kernel = np.ones((3, 3), np.uint8)  # cv2's default border is neutral for morphology
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    pixel_area = um_per_px**2
    mask = ~_drop_small(~mask, MAX_HOLE_UM2 / pixel_area, keep_border=True)
    return _drop_small(mask, MIN_TISSUE_UM2 / pixel_area, keep_border=False)


def _drop_small(mask: np.ndarray, min_pixels: float, *, keep_border: bool) -> np.ndarray:
    """``mask`` without 8-connected components under ``min_pixels`` (optionally keeping those
    that touch the border: glass around the tissue is not a hole)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    if keep_border:
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep[edge] = True
    keep[0] = False
    return keep[labels]


def tissue_mask(slide: Slide, mask_mpp: float = MASK_MPP) -> TissueMask:
    """The tissue mask of ``slide`` at about ``mask_mpp`` µm per mask pixel."""
    image, downsample = thumbnail(slide, mask_mpp)
    mask = detect_tissue(image, downsample * slide.mpp)
    return TissueMask(mask, downsample, slide.mpp, thumbnail=image)
