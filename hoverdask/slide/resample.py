"""The slide as the model sees it: a lazy array at the model's pixel size (the mpp rule).

HoVer-Net's official weights expect 0.25 µm/px. :func:`processing_array` picks the pyramid
level to read and resamples it block by block, never reading the whole slide:

* A level whose pixel size is within 2 % of the target is used as it is (no resampling).
* Otherwise the level with the largest pixel size still below the target is read and reduced;
  if every level is coarser (a 20x slide at 0.5 µm/px) level 0 is enlarged.

Interpolation is separable and linear with pixel-centre alignment: output pixel ``i`` samples
the source at ``(i + 0.5) * f - 0.5`` (``f`` = source px per output px). When enlarging this is
plain bilinear interpolation (as ``cv2.resize(INTER_LINEAR)``); when reducing, the triangle widens
to ``f`` source pixels so every source pixel contributes (antialiased, like PIL's bilinear).
Edges repeat the border pixel. Each output pixel depends only on its own position, so any
chunking gives the same values.

Coordinates go back to the original slide with ``scale`` (level-0 px per processing px), see
:func:`hoverdask.core.schema.to_level0`: processing pixel ``i`` covers level-0 ``[i*scale, (i+1)*scale)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hoverdask.slide.base import Slide, lazy_rgb

if TYPE_CHECKING:
    import dask.array as da
    from scipy.sparse import csr_matrix

MODEL_MPP = 0.25
SAME_MPP_TOLERANCE = 0.02
DEFAULT_CHUNK = 2048


@dataclass(frozen=True)
class ProcessingView:
    """``array`` (H, W, 3) uint8 at ``mpp`` µm/px; ``scale`` level-0 px per array px."""

    array: da.Array
    scale: float
    target_mpp: float
    source_level: int
    mpp: float
    resampled: bool


def choose_level(slide: Slide, target_mpp: float) -> tuple[int, bool]:
    """``(level, resample?)`` by the rule in the module docstring."""
    mpps = [slide.level_mpp(level) for level in range(slide.level_count)]
    close = [lvl for lvl, m in enumerate(mpps) if abs(m - target_mpp) <= SAME_MPP_TOLERANCE * target_mpp]
    if close:
        return min(close, key=lambda lvl: abs(mpps[lvl] - target_mpp)), False
    finer = [lvl for lvl, m in enumerate(mpps) if m < target_mpp]
    if finer:
        return max(finer, key=lambda lvl: mpps[lvl]), True
    return 0, True


def processing_array(
    slide: Slide, target_mpp: float = MODEL_MPP, chunk: int | None = None
) -> ProcessingView:
    """Lazy view of ``slide`` at ``target_mpp`` (see the module docstring for the rules)."""
    if not target_mpp > 0:
        raise ValueError(f"target_mpp must be positive, got {target_mpp}")
    level, resample = choose_level(slide, target_mpp)
    if not resample:
        _, _, downsample = slide.level_downsample_xy(level)
        array = slide.level_array(level, chunk)
        return ProcessingView(array, downsample, target_mpp, level, slide.level_mpp(level), False)
    w0, h0 = slide.dimensions
    scale = target_mpp / slide.mpp
    shape = (max(1, round(h0 / scale)), max(1, round(w0 / scale)), 3)
    view = _ResampledView(slide, level, scale, shape)
    chunk = chunk or DEFAULT_CHUNK
    array = lazy_rgb(view, chunk, f"resampled-{slide.reader.token()}-{level}-{scale!r}-{chunk}")
    return ProcessingView(array, scale, target_mpp, level, target_mpp, True)


class _ResampledView:
    """Array-like: output pixels computed on demand from a window of one source level."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, slide: Slide, level: int, scale: float, shape: tuple[int, int, int]):
        dx, dy, _ = slide.level_downsample_xy(level)
        self.slide, self.level, self.shape = slide, level, shape
        self.factor_y, self.factor_x = scale / dy, scale / dx  # source px per output px

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        y0, y1, _ = key[0].indices(self.shape[0])
        x0, x1, _ = key[1].indices(self.shape[1])
        width, height = self.slide.level_dimensions[self.level]
        wy, sy0, sy1 = resampling_weights(y0, y1, self.factor_y, height)
        wx, sx0, sx1 = resampling_weights(x0, x1, self.factor_x, width)
        source = self.slide.reader.read(self.level, sy0, sy1, sx0, sx1)
        out = apply_separable(source, wy, wx)
        return out[:, :, key[2]] if len(key) > 2 else out


def resampling_weights(
    start: int, stop: int, factor: float, source_size: int
) -> tuple[csr_matrix, int, int]:
    """Sparse weights (out x window) for output pixels ``start:stop`` and the source window.

    ``factor`` is source pixels per output pixel; see the module docstring for the kernel.
    """
    from scipy.sparse import csr_matrix

    support = max(1.0, factor)
    centres = (np.arange(start, stop, dtype=np.float64) + 0.5) * factor - 0.5
    first = max(0, math.floor(centres[0] - support) + 1) if stop > start else 0
    last = min(source_size, math.ceil(centres[-1] + support)) if stop > start else 0
    first = min(first, source_size - 1)
    last = max(last, first + 1)
    taps = np.arange(math.floor(-support) + 1, math.ceil(support) + 1)
    index = np.floor(centres)[:, None] + taps[None, :]
    weight = np.clip(1.0 - np.abs(index - centres[:, None]) / support, 0.0, None)
    weight /= weight.sum(axis=1, keepdims=True)
    column = np.clip(index, 0, source_size - 1).astype(np.int64)
    window_column = np.clip(column, first, last - 1) - first
    rows = np.repeat(np.arange(stop - start), taps.size)
    matrix = csr_matrix(
        (weight.ravel().astype(np.float32), (rows, window_column.ravel())),
        shape=(stop - start, last - first),
    )  # duplicate (row, column) entries from edge clamping are summed
    return matrix, first, last


def apply_separable(source: np.ndarray, wy: csr_matrix, wx: csr_matrix) -> np.ndarray:
    """``wy @ source @ wx.T`` per channel, rounded back to uint8."""
    h, w, c = source.shape
    rows = wy @ source.reshape(h, w * c).astype(np.float32)  # (out_h, w*c)
    out_h = rows.shape[0]
    cols = wx @ rows.reshape(out_h, w, c).transpose(1, 0, 2).reshape(w, out_h * c)
    result = cols.reshape(wx.shape[0], out_h, c).transpose(1, 0, 2)
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)


def output_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size at ``scale`` source px per output px (the rounding :func:`processing_array` uses)."""
    return max(1, round(height / scale)), max(1, round(width / scale))


def resample_image(image: np.ndarray, scale: float) -> np.ndarray:
    """A whole (H, W, 3) uint8 image resampled exactly as slides are (``scale``: source px per
    output px); training data goes through this too, so the model sees what inference gives it."""
    height, width = image.shape[:2]
    out_h, out_w = output_shape(height, width, scale)
    wy, y0, y1 = resampling_weights(0, out_h, scale, height)
    wx, x0, x1 = resampling_weights(0, out_w, scale, width)
    return apply_separable(np.ascontiguousarray(image[y0:y1, x0:x1]), wy, wx)


def resample_labels(labels: np.ndarray, scale: float) -> np.ndarray:
    """A label map resampled by nearest neighbour on the same pixel-centre grid as
    :func:`resample_image` (output pixel ``i`` takes source pixel ``floor((i + 0.5) * scale)``)."""
    height, width = labels.shape[:2]
    out_h, out_w = output_shape(height, width, scale)
    rows = np.minimum(((np.arange(out_h) + 0.5) * scale).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * scale).astype(np.int64), width - 1)
    return labels[np.ix_(rows, cols)]
