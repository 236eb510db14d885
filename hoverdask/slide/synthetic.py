"""Synthetic H&E-like slides with known nuclei: ground truth for tests and a demo input.

The picture is built the way light goes through a stained section (Beer-Lambert): each pixel has
a hematoxylin and an eosin concentration, and its RGB is ``255 * exp(-(cH * H + cE * E))`` with
the Ruifrok-Johnston stain vectors. Colour deconvolution (``skimage.color.rgb2hed``) therefore
separates the two stains again. Eosin-pink stroma carries a smooth texture; white glass fills
the regions where a smooth noise field is lowest (``background_fraction``); nuclei are
hematoxylin-dense ellipses with a wavy outline, 6-12 µm across, some touching, of ``n_types``
kinds that differ in size, shape and darkness.

Rendering is done in bands of rows and written as a tiled pyramidal TIFF with mpp metadata
(Aperio SVS-like by default, or OME-TIFF), so slides larger than memory can be made for
benchmarks. Where two nuclei overlap a pixel goes to the one it lies deepest in (smallest normalised
radius), so ownership does not depend on drawing order and band-by-band rendering equals
whole-image rendering.

The same module makes synthetic network outputs with known nuclei (:func:`synthetic_pred_map`):
a label image of touching elliptical nuclei, hv maps that run from -1 to 1 across each nucleus
(the training target's definition), a blurred noisy foreground probability and a per-nucleus
class with pixel noise; and reads the parity fixture's quantised maps back
(:func:`dequantised_pred_map`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from scipy import ndimage

from hoverdask.core.atomic import atomic_write

STAIN_H = np.array([0.650, 0.704, 0.286])  # Ruifrok & Johnston 2001, normalised OD vectors
STAIN_E = np.array([0.072, 0.990, 0.105])
TILE = 256
BAND = 1024  # rows rendered at once (a multiple of TILE and of the pyramid factor)
PYRAMID_FACTOR = 4  # like Aperio: each level 4x smaller
SMALLEST_LEVEL = 256
NUCLEUS_AREA_FRACTION = 0.18  # share of tissue covered by nuclei

# (mean semi-axes in µm (major, minor), hematoxylin concentration) per nucleus type
NUCLEUS_KINDS: tuple[tuple[tuple[float, float], float], ...] = (
    ((5.5, 4.5), 0.85),  # 1: large, round-oval, paler, "neoplastic-like"
    ((3.2, 3.0), 1.45),  # 2: small, round, dark, "lymphocyte-like"
    ((6.0, 2.0), 1.05),  # 3: elongated spindle, "connective-like"
    ((4.5, 3.2), 1.15),  # 4: medium, irregular
)


@dataclass(frozen=True)
class Nucleus:
    x: float
    y: float
    major: float  # semi-axes in pixels
    minor: float
    angle: float
    wobble: float  # outline waviness amplitude (fraction of radius)
    phase: float
    lobes: int
    type: int
    density: float  # hematoxylin concentration


@dataclass
class SyntheticTruth:
    """What the synthetic slide contains.

    ``instances``: int32 level-0 label map (0 = no nucleus; ``None`` when not kept);
    ``types``: type id per label, ``types[0] == 0``, so ``types[instances]`` is the type map.
    The RGB image is whatever reading ``path`` gives (JPEG tiles are lossy).
    """

    path: Path
    width: int
    height: int
    mpp: float
    nuclei: list[Nucleus]
    types: np.ndarray
    instances: np.ndarray | None
    fields: _FieldSampler = dc_field(repr=False)

    def glass(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Whether the level-0 points on the grid ``y x x`` (continuous coordinates) are glass."""
        return self.fields.glass(np.asarray(y, np.float32), np.asarray(x, np.float32))

    @property
    def n_instances(self) -> int:
        return len(self.nuclei)

    def type_map(self) -> np.ndarray:
        if self.instances is None:
            raise ValueError("the label map was not kept (keep_instances=False)")
        return self.types[self.instances]


def write_synthetic_slide(
    path: str | Path,
    width: int,
    height: int,
    *,
    mpp: float = 0.25,
    seed: int = 0,
    n_types: int = 4,
    background_fraction: float = 0.25,
    flavour: Literal["aperio", "ome"] = "aperio",
    compression: Literal["jpeg", "lossless"] = "jpeg",
    keep_instances: bool = True,
    nucleus_fraction: float = NUCLEUS_AREA_FRACTION,
) -> SyntheticTruth:
    """Write a synthetic pyramidal tiled TIFF at ``path``; return its ground truth.

    ``flavour`` "aperio" writes an SVS-like file (``MPP``/``AppMag`` in the description),
    "ome" an OME-TIFF (``PhysicalSizeX``, SubIFD pyramid, TIFF resolution tags). ``compression``
    "lossless" uses zlib tiles so the pixels read back exactly as rendered.
    ``nucleus_fraction`` is the share of the tissue area covered by nuclei (fewer is faster).
    """
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if not 0.0 <= background_fraction < 1.0:
        raise ValueError("background_fraction must be in [0, 1)")
    path = Path(path)
    rng = np.random.default_rng(seed)
    field = _FieldSampler(rng, width, height, mpp, background_fraction)
    nuclei = _place_nuclei(rng, field, width, height, mpp, max(1, n_types), nucleus_fraction)
    renderer = _Renderer(field, nuclei, width, height, rng.integers(1 << 31))
    labels = np.zeros((height, width), np.int32) if keep_instances else None
    atomic_write(path, lambda tmp: _write_tiff(tmp, renderer, labels, mpp, flavour, compression))
    types = np.array([0, *[n.type for n in nuclei]], dtype=np.int16)
    return SyntheticTruth(path, width, height, mpp, nuclei, types, labels, field)


class _FieldSampler:
    """Smooth random fields (glass mask, eosin texture), evaluated for any block of rows."""

    def __init__(
        self, rng: np.random.Generator, width: int, height: int, mpp: float, background: float
    ) -> None:
        self.cell = max(8, round(120.0 / mpp))  # ~120 µm features
        gh, gw = height // self.cell + 3, width // self.cell + 3
        self.glass_grid = rng.random((gh, gw)).astype(np.float32)
        self.texture_grid = rng.random((gh * 4, gw * 4)).astype(np.float32)
        self.threshold = -1.0
        if background > 0:  # quantile of the interpolated field: an area fraction
            ys = np.linspace(0, height, 256, dtype=np.float32)
            xs = np.linspace(0, width, 256, dtype=np.float32)
            sample = self._sample(self.glass_grid, self.cell, ys, xs)
            self.threshold = float(np.quantile(sample, background))

    def _sample(self, grid: np.ndarray, cell: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Bilinear sample of a coarse grid at pixel coordinates (smooth, chunk-independent)."""
        gy, gx = y / cell, x / cell
        y0, x0 = np.floor(gy).astype(int), np.floor(gx).astype(int)
        fy, fx = (gy - y0)[:, None], (gx - x0)[None, :]
        y0 = np.clip(y0, 0, grid.shape[0] - 2)[:, None]
        x0 = np.clip(x0, 0, grid.shape[1] - 2)[None, :]
        top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
        bottom = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
        return (top * (1 - fy) + bottom * fy).astype(np.float32)

    def glass(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self._sample(self.glass_grid, self.cell, y, x) < self.threshold

    def glass_at(self, y: float, x: float) -> bool:
        """:meth:`glass` for one point, without array overhead (used once per candidate)."""
        gy, gx = y / self.cell, x / self.cell
        y0 = min(max(int(gy), 0), self.glass_grid.shape[0] - 2)
        x0 = min(max(int(gx), 0), self.glass_grid.shape[1] - 2)
        fy, fx = gy - math.floor(gy), gx - math.floor(gx)
        g = self.glass_grid
        top = g[y0, x0] * (1 - fx) + g[y0, x0 + 1] * fx
        bottom = g[y0 + 1, x0] * (1 - fx) + g[y0 + 1, x0 + 1] * fx
        return bool(top * (1 - fy) + bottom * fy < self.threshold)

    def texture(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self._sample(self.texture_grid, self.cell / 4, y, x)


def _place_nuclei(
    rng: np.random.Generator,
    field: _FieldSampler,
    width: int,
    height: int,
    mpp: float,
    n_types: int,
    nucleus_fraction: float,
) -> list[Nucleus]:
    """Random nuclei on tissue, spaced so neighbours at most touch (a quarter placed touching)."""
    kinds = [NUCLEUS_KINDS[i % len(NUCLEUS_KINDS)] for i in range(n_types)]
    mean_area = np.mean([math.pi * a * b for (a, b), _ in kinds]) / mpp**2
    target = int(nucleus_fraction * width * height / mean_area)
    largest = max(a for (a, _), _ in kinds) * 1.15 * 1.08 / mpp  # semi-axis incl. size, wobble
    grid_size = 2.0 * largest  # neighbours that can touch are at most one grid cell away
    grid: dict[tuple[int, int], list[int]] = {}
    nuclei: list[Nucleus] = []
    for _ in range(target * 3):
        if len(nuclei) >= target:
            break
        type_index = int(rng.integers(n_types))
        (major_um, minor_um), density = kinds[type_index]
        size = rng.uniform(0.85, 1.15)
        major, minor = major_um * size / mpp, minor_um * size / mpp
        angle = rng.uniform(0, math.pi)
        if nuclei and rng.random() < 0.25:  # touch a previous nucleus
            other = nuclei[int(rng.integers(len(nuclei)))]
            direction = rng.uniform(0, 2 * math.pi)
            reach = _radius(other, direction) + _radius_raw(major, minor, angle, direction + math.pi)
            x = other.x + math.cos(direction) * reach * 0.97
            y = other.y + math.sin(direction) * reach * 0.97
        else:
            x, y = rng.uniform(0, width), rng.uniform(0, height)
        if not (0 <= x < width and 0 <= y < height):
            continue
        if field.glass_at(y, x):
            continue
        candidate = Nucleus(
            x, y, major, minor, angle, rng.uniform(0.0, 0.08), rng.uniform(0, 2 * math.pi),
            int(rng.integers(2, 5)), type_index + 1, density * rng.uniform(0.9, 1.1),
        )  # fmt: skip
        if _too_close(candidate, nuclei, grid, grid_size):
            continue
        key = (int(x // grid_size), int(y // grid_size))
        grid.setdefault(key, []).append(len(nuclei))
        nuclei.append(candidate)
    return nuclei


def _radius_raw(major: float, minor: float, angle: float, direction: float) -> float:
    theta = direction - angle
    return major * minor / math.hypot(minor * math.cos(theta), major * math.sin(theta))


def _radius(n: Nucleus, direction: float) -> float:
    return _radius_raw(n.major, n.minor, n.angle, direction) * (1 + n.wobble)


def _too_close(
    c: Nucleus, nuclei: list[Nucleus], grid: dict[tuple[int, int], list[int]], grid_size: float
) -> bool:
    gx, gy = int(c.x // grid_size), int(c.y // grid_size)
    for ix in (gx - 1, gx, gx + 1):
        for iy in (gy - 1, gy, gy + 1):
            for index in grid.get((ix, iy), ()):
                other = nuclei[index]
                distance = math.hypot(c.x - other.x, c.y - other.y)
                if distance >= 0.9 * (c.major * (1 + c.wobble) + other.major * (1 + other.wobble)):
                    continue  # too far apart to touch in any direction
                direction = math.atan2(c.y - other.y, c.x - other.x)
                needed = _radius(other, direction) + _radius(c, direction + math.pi)
                if distance < 0.9 * needed:
                    return True
    return False


class _Renderer:
    """Rows ``y0:y1`` of the RGB picture and of the label map."""

    def __init__(
        self, field: _FieldSampler, nuclei: list[Nucleus], width: int, height: int, seed: int
    ) -> None:
        self.field, self.nuclei, self.width, self.height = field, nuclei, width, height
        self.seed = int(seed)
        self.eosin_in_nucleus = 0.1
        tops = np.array([n.y - n.major * 1.1 for n in nuclei])
        self.order = np.argsort(tops, kind="stable")
        self.tops = tops[self.order]

    def band(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        ys = np.arange(y0, y1, dtype=np.float32) + 0.5
        xs = np.arange(self.width, dtype=np.float32) + 0.5
        glass = self.field.glass(ys, xs)
        texture = self.field.texture(ys, xs)
        noise = np.concatenate(  # drawn per tile row, so the band height does not matter
            [
                np.random.default_rng((self.seed, row)).standard_normal(
                    (TILE, self.width, 2), dtype=np.float32
                )
                for row in range(y0 // TILE, -(-y1 // TILE))
            ]
        )[y0 % TILE : y0 % TILE + (y1 - y0)]
        eosin = (0.25 + 0.45 * texture + 0.04 * noise[..., 0]).astype(np.float32)
        hema = (0.04 + 0.02 * noise[..., 1]).astype(np.float32)
        labels = np.zeros((y1 - y0, self.width), np.int32)
        nearest = np.full((y1 - y0, self.width), np.inf, np.float32)
        for index in self.order[: np.searchsorted(self.tops, y1)]:
            self._draw(int(index), y0, y1, labels, nearest, hema, eosin)
        eosin[glass & (labels == 0)] = 0.0
        hema[glass & (labels == 0)] = 0.0
        od = hema[..., None] * STAIN_H + eosin[..., None] * STAIN_E
        rgb = 250.0 * np.exp(-od) + noise[..., :1] * 1.5
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels

    def _draw(
        self,
        index: int,
        y0: int,
        y1: int,
        labels: np.ndarray,
        nearest: np.ndarray,
        hema: np.ndarray,
        eosin: np.ndarray,
    ) -> None:
        """Paint one nucleus; where nuclei overlap, a pixel goes to the one it is deepest in."""
        n = self.nuclei[index]
        r = n.major * (1 + n.wobble) + 1
        top, bottom = max(int(n.y - r), y0), min(int(n.y + r) + 1, y1)
        left, right = max(int(n.x - r), 0), min(int(n.x + r) + 1, self.width)
        if bottom <= top or right <= left:
            return
        dy = (np.arange(top, bottom) + 0.5 - n.y)[:, None]
        dx = (np.arange(left, right) + 0.5 - n.x)[None, :]
        cos, sin = math.cos(n.angle), math.sin(n.angle)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        phi = np.arctan2(v, u)
        rho = np.hypot(u / n.major, v / n.minor) / (1 + n.wobble * np.cos(n.lobes * phi + n.phase))
        rows = slice(top - y0, bottom - y0)
        inside = (rho <= 1.0) & (rho < nearest[rows, left:right])
        labels[rows, left:right][inside] = index + 1
        nearest[rows, left:right][inside] = rho[inside]
        rim = 1.0 + 0.25 * np.clip(rho, 0, 1) ** 4  # darker nuclear membrane
        grain = 1.0 + 0.12 * np.sin(u * 1.7 + n.phase) * np.cos(v * 1.3 - n.phase)
        hema[rows, left:right][inside] = (n.density * rim * grain)[inside]
        eosin[rows, left:right][inside] = self.eosin_in_nucleus


def _write_tiff(
    path: Path,
    renderer: _Renderer,
    labels: np.ndarray | None,
    mpp: float,
    flavour: str,
    compression: str,
) -> None:
    import cv2
    import tifffile

    width, height = renderer.width, renderer.height
    levels = [(width, height)]
    while min(levels[-1]) // PYRAMID_FACTOR >= SMALLEST_LEVEL:
        w, h = levels[-1]
        levels.append((-(-w // PYRAMID_FACTOR), -(-h // PYRAMID_FACTOR)))
    reduced = [np.zeros((h, w, 3), np.uint8) for w, h in levels[1:]]

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, height, BAND):
            y1 = min(y0 + BAND, height)
            rgb, band_labels = renderer.band(y0, y1)
            if labels is not None:
                labels[y0:y1] = band_labels
            if reduced:
                w1, _ = levels[1]
                r0, r1 = y0 // PYRAMID_FACTOR, -(-y1 // PYRAMID_FACTOR)
                reduced[0][r0:r1] = cv2.resize(rgb, (w1, r1 - r0), interpolation=cv2.INTER_AREA)
            for ty in range(0, y1 - y0, TILE):
                for tx in range(0, width, TILE):
                    tile = np.full((TILE, TILE, 3), 255, np.uint8)
                    part = rgb[ty : ty + TILE, tx : tx + TILE]
                    tile[: part.shape[0], : part.shape[1]] = part
                    yield tile

    codec: dict[str, object] = (
        {"compression": "jpeg", "compressionargs": {"level": 90}}
        if compression == "jpeg"
        else {"compression": "zlib", "compressionargs": {"level": 6}}
    )
    common = {"tile": (TILE, TILE), "photometric": "rgb", **codec}
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    magnification = round(10.0 / mpp)
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**29, ome=flavour == "ome") as tw:
        if flavour == "ome":
            metadata = {
                "axes": "YXS",
                "PhysicalSizeX": mpp,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp,
                "PhysicalSizeYUnit": "µm",
            }
            tw.write(
                tiles(), shape=(height, width, 3), dtype=np.uint8, subifds=len(reduced),
                metadata=metadata, **resolution, **common,
            )  # fmt: skip
        else:
            description = (
                f"Aperio Image Library hoverdask-synth\r\n{width}x{height} ({TILE}x{TILE}) "
                f"{'JPEG' if compression == 'jpeg' else 'ZLIB'}/RGB|AppMag = {magnification}"
                f"|MPP = {mpp}"
            )
            tw.write(
                tiles(), shape=(height, width, 3), dtype=np.uint8, description=description,
                metadata=None, **common,
            )  # fmt: skip
        for index in range(1, len(reduced)):
            w, h = levels[index + 1]
            reduced[index][:] = cv2.resize(reduced[index - 1], (w, h), interpolation=cv2.INTER_AREA)
        if flavour != "ome":  # SVS: the second page is a stripped thumbnail
            thumb = _downscale(reduced[-1] if reduced else _first_band(renderer), 512)
            tw.write(thumb, photometric="rgb", metadata=None, description="thumbnail")
        for image in reduced:
            extra = {"subfiletype": 1} if flavour == "ome" else {}
            tw.write(image, metadata=None, **extra, **common)


def _first_band(renderer: _Renderer) -> np.ndarray:
    return renderer.band(0, min(renderer.height, BAND))[0]


def _downscale(image: np.ndarray, longest: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    factor = max(1.0, max(h, w) / longest)
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# --- synthetic network outputs (maps) ---------------------------------------------------------


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
