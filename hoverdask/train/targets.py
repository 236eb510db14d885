"""Training targets: nucleus-pixel (np), horizontal/vertical distance (hv) and type (tp) maps.

The hv map follows the reference ``gen_instance_hv_map`` exactly, because it is the target the
official weights were trained on:

* every 4-connected piece of an instance id is its own instance (mirror padding or tiling can
  cut a nucleus into pieces);
* only instances with at least 30 pixels inside the output crop get hv values (the others keep 0
  although they are nucleus pixels in np);
* the centre of mass is taken over the whole (uncropped) instance and rounded half up;
* the distance is ``col + 1 - com_col`` (and the same for rows): the reference measures from a
  box that starts one pixel early, so **the zero crossing sits one pixel left of/above the
  rounded centre of mass**. We keep this off-by-one on purpose;
* negative and positive values are scaled separately per instance, to [-1, 0) and (0, 1].

The only difference: the reference skips instances whose bounding box begins within 2 px of the
top or left edge of the label map it is given (its box expansion wraps around there). Here they
get their values. In the reference training flow such instances never reach the output crop,
so targets computed on model-input-sized windows are identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import label as label_pieces

MIN_INSTANCE_PIXELS = 30


def centre_crop(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The centre ``shape`` window of the first two axes (the model output sits there)."""
    top = (array.shape[0] - shape[0]) // 2
    left = (array.shape[1] - shape[1]) // 2
    return array[top : top + shape[0], left : left + shape[1]]


def split_disconnected(inst: np.ndarray) -> np.ndarray:
    """Relabel so that each 4-connected piece of each id is its own instance (ids 1..N)."""
    return label_pieces(inst, background=0, connectivity=1).astype(np.int32)


def hv_map(inst: np.ndarray, crop_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The (H, W, 2) float32 hv map ``[x, y]`` of ``inst`` at full size (reference semantics).

    ``crop_shape`` is the output window that decides which instances count (>= 30 pixels
    inside it); None means the whole map.
    """
    pieces = split_disconnected(np.asarray(inst))
    height, width = pieces.shape
    out = np.zeros((height, width, 2), np.float32)
    count = int(pieces.max())
    if count == 0:
        return out
    window = pieces if crop_shape is None else centre_crop(pieces, crop_shape)
    kept = np.bincount(window.ravel(), minlength=count + 1) >= MIN_INSTANCE_PIXELS
    kept[0] = False
    ids = np.arange(count + 1)
    rows, cols = np.indices(pieces.shape)
    inside = kept[pieces]
    lab = pieces[inside]
    for channel, coord in enumerate((cols, rows)):
        centre = ndi.mean(coord, pieces, ids)
        centre[0] = 0.0
        rounded = np.floor(np.asarray(centre) + 0.5).astype(np.int64)
        dist = (coord[inside] + 1 - rounded[lab]).astype(np.float32)
        out[inside, channel] = _scale_per_instance(dist, lab, count)
    return out


def _scale_per_instance(dist: np.ndarray, lab: np.ndarray, count: int) -> np.ndarray:
    """Divide negatives by -min and positives by max, per instance (in float32, as the reference)."""
    lowest = np.zeros(count + 1, np.float32)
    highest = np.zeros(count + 1, np.float32)
    np.minimum.at(lowest, lab, dist)
    np.maximum.at(highest, lab, dist)
    scaled = dist.copy()
    neg = dist < 0
    pos = dist > 0
    scaled[neg] = dist[neg] / -lowest[lab[neg]]
    scaled[pos] = dist[pos] / highest[lab[pos]]
    return scaled


@dataclass(frozen=True)
class Targets:
    """Per-sample targets at the model's output size."""

    np: np.ndarray  # (h, w) int64, 1 on nucleus pixels
    hv: np.ndarray  # (h, w, 2) float32, [x, y]
    tp: np.ndarray | None  # (h, w) int64 type per pixel, 0 = background


def make_targets(
    inst: np.ndarray, types: np.ndarray | None, output_shape: tuple[int, int]
) -> Targets:
    """Targets for a label window of model-input size, cropped to ``output_shape``.

    This is the reference ``gen_targets`` plus the centre-cropped type map.
    """
    hv = centre_crop(hv_map(inst, output_shape), output_shape)
    nuclei = (centre_crop(inst, output_shape) > 0).astype(np.int64)
    tp = None if types is None else centre_crop(types, output_shape).astype(np.int64)
    return Targets(np=nuclei, hv=np.ascontiguousarray(hv), tp=tp)
