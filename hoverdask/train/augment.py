"""On-the-fly augmentation: mirror-padded random windows, the paper's affine/flip and colour changes.

Shape changes follow the reference training loader: affine (scale 0.8-1.2, translate ±1 %,
shear ±5°, rotate ±179°), centre crop to the model input, horizontal and vertical flips (each
p = 0.5). Labels are resampled with nearest neighbour; the image with bilinear interpolation
(the reference uses nearest for the image too).

Stain changes (:func:`stain_jitter`): the haematoxylin, eosin and residual amounts are scaled and
shifted separately in optical density space. Colour changes: one of Gaussian blur (kernel 1/3/5 per axis), median blur (1/3/5) or additive
Gaussian noise (σ up to 0.05·255, per channel half the time); then, in random order, hue ±8
(OpenCV units), saturation ±20 %, brightness ±26 and contrast 0.75-1.25. The reference's
contrast step is a no-op because of a bug; here it changes contrast as the paper describes.

Windows that run past the image are filled by mirroring (``symmetric``), and every mirrored copy
of a nucleus gets its own id, so a nucleus cut by the border and its reflection are two touching
nuclei, not one nucleus of double size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

MIN_SCALE, MAX_SCALE = 0.8, 1.2
MAX_SHEAR_DEG = 5.0


@dataclass(frozen=True)
class Window:
    """An image window with its instance ids and (optional) per-pixel types."""

    image: np.ndarray  # (h, w, 3) uint8
    inst: np.ndarray  # (h, w) int32, 0 = background
    types: np.ndarray | None  # (h, w) int32, 0 = background


def context_size(input_size: int) -> int:
    """Window side that still covers the model input after any rotation at the smallest scale."""
    shear = 1 + math.tan(math.radians(MAX_SHEAR_DEG))
    return math.ceil(input_size * math.sqrt(2) * shear / MIN_SCALE) + 4


def _fold(coords: np.ndarray, size: int) -> np.ndarray:
    """Which mirrored copy (0, 1, 2, …) a virtual coordinate falls in, for symmetric padding."""
    folds = np.floor_divide(coords, size)
    return folds - folds.min()


def mirror_window(win: Window, top: int, left: int, size: int) -> Window:
    """The ``size`` x ``size`` window at (top, left), mirroring where it leaves the image."""
    height, width = win.inst.shape
    rows = np.arange(top, top + size)
    cols = np.arange(left, left + size)
    src = np.ix_(_reflect_index(rows, height), _reflect_index(cols, width))
    inst = win.inst[src].astype(np.int64)
    row_fold, col_fold = _fold(rows, height), _fold(cols, width)
    if row_fold.max() > 0 or col_fold.max() > 0:
        copy = row_fold[:, None] * (col_fold.max() + 1) + col_fold[None, :]
        inst = np.where(inst > 0, inst + copy * (int(inst.max()) + 1), 0)
    types = None if win.types is None else win.types[src]
    return Window(win.image[src], _sequential(inst), types)


def _reflect_index(coords: np.ndarray, size: int) -> np.ndarray:
    """Source index for symmetric padding (edge pixel repeated): -1 -> 0, size -> size - 1."""
    period = coords % (2 * size)
    return np.where(period < size, period, 2 * size - 1 - period)


def _sequential(inst: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..N in ascending order (keeps them exact in float32 for cv2 warps)."""
    present = np.zeros(int(inst.max(initial=0)) + 1, bool)
    present[inst.ravel()] = True
    present[0] = False
    lookup = np.cumsum(present).astype(np.int32) * present
    return lookup[inst]


def random_window(win: Window, input_size: int, rng: np.random.Generator) -> Window:
    """A context window whose centre input-sized square lies inside the image where it fits."""
    size = context_size(input_size)
    centre = []
    for extent in win.inst.shape:
        low = input_size // 2
        high = extent - (input_size - input_size // 2)
        centre.append(int(rng.integers(low, high + 1)) if high >= low else extent // 2)
    return mirror_window(win, centre[0] - size // 2, centre[1] - size // 2, size)


def centre_window(win: Window, input_size: int) -> Window:
    """The model-input-sized centre of an image (validation and tests; mirrored if too small)."""
    height, width = win.inst.shape
    return mirror_window(win, (height - input_size) // 2, (width - input_size) // 2, input_size)


def affine_crop(win: Window, input_size: int, rng: np.random.Generator) -> Window:
    """Random affine transform and flips, keeping the ``input_size`` square at the centre."""
    scale = rng.uniform(MIN_SCALE, MAX_SCALE, size=2)
    angle = math.radians(rng.uniform(-179.0, 179.0))
    shear = math.radians(rng.uniform(-MAX_SHEAR_DEG, MAX_SHEAR_DEG))
    shift = rng.uniform(-0.01, 0.01, size=2) * input_size
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = np.array([[cos, -sin], [sin, cos]])
    shear_m = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
    linear = rotate @ shear_m @ np.diag(scale)
    # Output (x, y) -> source (x, y): about the centres; the inverse of "scale up" samples less.
    inverse = np.linalg.inv(linear)
    out_centre = np.array([input_size / 2.0, input_size / 2.0])
    src_centre = np.array([win.inst.shape[1] / 2.0, win.inst.shape[0] / 2.0]) + shift
    matrix = np.hstack([inverse, (src_centre - inverse @ out_centre)[:, None]])
    dsize = (input_size, input_size)
    inverse_map = cv2.WARP_INVERSE_MAP
    image = cv2.warpAffine(
        win.image, matrix, dsize, flags=cv2.INTER_LINEAR | inverse_map,
        borderMode=cv2.BORDER_REFLECT,
    )

    def labels(array: np.ndarray) -> np.ndarray:
        warped = cv2.warpAffine(
            array.astype(np.float32), matrix, dsize, flags=cv2.INTER_NEAREST | inverse_map,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        return np.rint(warped).astype(np.int32)

    out = Window(image, labels(win.inst), None if win.types is None else labels(win.types))
    return flip(out, bool(rng.random() < 0.5), bool(rng.random() < 0.5))


def flip(win: Window, horizontal: bool, vertical: bool) -> Window:
    """Mirror the window left-right and/or up-down."""
    index = (slice(None, None, -1 if vertical else 1), slice(None, None, -1 if horizontal else 1))
    types = None if win.types is None else np.ascontiguousarray(win.types[index])
    return Window(
        np.ascontiguousarray(win.image[index]), np.ascontiguousarray(win.inst[index]), types
    )


# Ruifrok & Johnston's haematoxylin, eosin and DAB optical-density vectors (rows; skimage's)
_HED_FROM_RGB_OD = np.linalg.inv(
    np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    / np.linalg.norm([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], axis=1)[:, None]
)
_RGB_OD_FROM_HED = np.linalg.inv(_HED_FROM_RGB_OD)
STAIN_SCALE = 0.2  # each stain's amount is scaled by 1 ± this ...
STAIN_SHIFT = 0.05  # ... and shifted by ± this (optical density units)


def stain_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vary the amount of haematoxylin and eosin (and the residual) separately, in optical
    density space (Tellez et al. 2018): labs and scanners differ most in this way."""
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    stains = od.reshape(-1, 3) @ _HED_FROM_RGB_OD.astype(np.float32)
    scale = rng.uniform(1 - STAIN_SCALE, 1 + STAIN_SCALE, size=3).astype(np.float32)
    shift = rng.uniform(-STAIN_SHIFT, STAIN_SHIFT, size=3).astype(np.float32)
    od = (stains * scale + shift) @ _RGB_OD_FROM_HED.astype(np.float32)
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(image.shape)


def colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One blur-or-noise step, then hue, saturation, brightness and contrast in random order."""
    out = _blur_or_noise(image, rng)
    steps = [_hue, _saturation, _brightness, _contrast]
    for index in rng.permutation(len(steps)):
        out = steps[index](out, rng)
    return out


def _blur_or_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    choice = int(rng.integers(3))
    if choice == 0:
        kx, ky = (int(k) for k in rng.choice([1, 3, 5], size=2))
        return cv2.GaussianBlur(image, (kx, ky), 0)
    if choice == 1:
        return cv2.medianBlur(image, int(rng.choice([1, 3, 5])))
    sigma = rng.uniform(0.0, 0.05 * 255)
    channels = 3 if rng.random() < 0.5 else 1
    noise = rng.normal(0.0, sigma, size=(*image.shape[:2], channels))
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _hue(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    shift = int(rng.integers(-8, 9))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    value = rng.uniform(-0.2, 0.2)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None].astype(np.float32)
    return np.clip(image * (1 + value) - gray * value, 0, 255).astype(np.uint8)


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image.astype(np.float32) + rng.uniform(-26, 26), 0, 255).astype(np.uint8)


def _contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    value = rng.uniform(0.75, 1.25)
    mean = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean()
    return np.clip(image * value + mean * (1 - value), 0, 255).astype(np.uint8)
