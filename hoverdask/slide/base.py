"""Open a whole-slide image: pyramid geometry, pixel size, pixels (eager or lazy).

Every slide hoverdask touches goes through :func:`open_slide`, so the rules live in one place:

* TIFF-based slides (svs, ndpi, tif/tiff, ome-tiff, scn, bif, ... whatever tiffslide reads) and
  OME-Zarr stores written by ``hoverdask convert`` open to the same :class:`Slide` interface.
* The pixel size (µm/px at level 0, "mpp") comes from, in order: the ``mpp`` override (``--mpp``),
  the vendor metadata (Aperio ``MPP``), OME ``PhysicalSizeX/Y``, the TIFF resolution tags. A slide
  with none of these is refused: guessing would silently change nucleus sizes by 2x.
* Broken input (missing, empty, not an image, truncated, undecodable) raises
  :class:`~hoverdask.core.errors.SlideError` with a message that says what is wrong.

Pixels are RGB uint8 ``(h, w, 3)``. :meth:`Slide.level_array` is a lazy dask array whose blocks
re-open the slide by path in whatever thread or process computes them, so graphs pickle cleanly.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np

from hoverdask.core.errors import SlideError

if TYPE_CHECKING:
    import dask.array as da

SUPPORTED_FORMATS = (
    "TIFF-based slides (svs, ndpi, tif/tiff, ome-tiff, scn, bif) and OME-Zarr stores written by "
    "`hoverdask convert`"
)
# Pixel sizes outside this range are metadata accidents (e.g. a 72 dpi screen resolution tag
# reads as 352 µm/px), never a microscope.
PLAUSIBLE_MPP = (0.02, 50.0)
MPP_HINT = "pass the pixel size with --mpp (µm per level-0 pixel, e.g. --mpp 0.25 for 40x)"
DEFAULT_ARRAY_CHUNK = 1024
BACKGROUND = 255  # what lies outside the slide when a region crosses its edge: white glass


def sanitize_slide_id(name: str) -> str:
    """A slide identifier that is safe as a file or folder name inside an output folder.

    Keeps letters, digits, ``.``, ``_`` and ``-``; everything else becomes ``_``; runs of dots
    collapse (no ``..``) and leading dots are dropped (no hidden files, no parent folder).
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    cleaned = re.sub(r"\.{2,}", ".", cleaned).lstrip(".")
    return cleaned or "slide"


def slide_stem(path: Path) -> str:
    """The file name without its slide extension (``x.ome.tiff`` -> ``x``, ``x.zarr`` -> ``x``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class PixelReader(Protocol):
    """Reads RGB pixels of one pyramid level; picklable, opens its file lazily per thread."""

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...

    def tile_size(self, level: int) -> tuple[int, int]: ...

    def token(self) -> str: ...

    def close(self) -> None: ...


@dataclass
class Slide:
    """A whole-slide image: level geometry, pixel size and pixel access.

    ``read_region`` follows OpenSlide: ``location`` is ``(x, y)`` in level-0 pixels, ``size`` is
    ``(w, h)`` in pixels of ``level``. Pixels outside the slide read as white (255).
    """

    path: Path
    slide_id: str
    level_dimensions: tuple[tuple[int, int], ...]
    mpp: float
    objective_power: float | None
    properties: dict[str, Any]
    reader: PixelReader = field(repr=False)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self.level_downsample_xy(level)[2] for level in range(self.level_count))

    def level_downsample_xy(self, level: int) -> tuple[float, float, float]:
        """``(dx, dy, mean)``: level-0 pixels per pixel of ``level`` along x, y, and their mean.

        Pyramid levels are rarely an exact power of two (4443 -> 2221 px); the per-axis factors
        keep coordinates exact where it matters.
        """
        w0, h0 = self.level_dimensions[0]
        w, h = self.level_dimensions[level]
        dx, dy = w0 / w, h0 / h
        return dx, dy, (dx + dy) / 2.0

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB ``(h, w, 3)`` uint8 of ``size=(w, h)`` at ``level``, top-left at level-0 ``(x, y)``."""
        self._check_level(level)
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise ValueError(f"region size must be non-negative, got {size}")
        dx, dy, _ = self.level_downsample_xy(level)
        x0 = math.floor(location[0] / dx)
        y0 = math.floor(location[1] / dy)
        return self.read_level_window(level, y0, y0 + h, x0, x0 + w)

    def read_level_window(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` (level pixel indices), white outside the slide."""
        width, height = self.level_dimensions[level]
        out = np.full((max(y1 - y0, 0), max(x1 - x0, 0), 3), BACKGROUND, dtype=np.uint8)
        cy0, cy1 = max(y0, 0), min(y1, height)
        cx0, cx1 = max(x0, 0), min(x1, width)
        if cy1 > cy0 and cx1 > cx0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self.reader.read(
                level, cy0, cy1, cx0, cx1
            )
        return out

    def level_array(self, level: int = 0, chunk: int | None = None) -> da.Array:
        """Lazy ``(h, w, 3)`` uint8 dask array of one level, chunks aligned to the storage tiles.

        ``chunk`` defaults to the multiple of the tile size closest to 1024 px.
        """
        self._check_level(level)
        width, height = self.level_dimensions[level]
        if chunk is None:
            chunk = aligned_chunk(self.reader.tile_size(level), DEFAULT_ARRAY_CHUNK)
        view = _LevelView(self.reader, level, (height, width, 3))
        return lazy_rgb(view, chunk, f"slide-level-{self.reader.token()}-{level}-{chunk}")

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range: the slide has {self.level_count}")


def lazy_rgb(view: Any, chunk: int, name: str) -> da.Array:
    """A dask array over an array-like ``view`` that reads its own pixels when sliced."""
    import dask.array as da

    return da.from_array(
        view,
        chunks=(chunk, chunk, 3),
        name=name,
        asarray=False,
        lock=False,
        meta=np.empty((0, 0, 3), dtype=np.uint8),
    )


def aligned_chunk(tile: tuple[int, int], target: int) -> int:
    """The multiple of the (larger) tile side closest to ``target``: whole tiles per chunk."""
    side = max(max(tile), 1)
    return side * max(1, round(target / side))


class _LevelView:
    """Array-like over one level, so ``dask.array.from_array`` can slice it block by block."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, reader: PixelReader, level: int, shape: tuple[int, int, int]) -> None:
        self.reader, self.level, self.shape = reader, level, shape

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.empty((max(y1 - y0, 0), max(x1 - x0, 0), 3), dtype=np.uint8)
        block = self.reader.read(self.level, y0, y1, x0, x1)
        return block[:, :, key[2]] if len(key) > 2 else block


class ThreadLocalHandles:
    """One open file handle per thread (tiffslide/zarr handles are not shared across threads)."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._opener()
            self._local.handle = handle
            with self._lock:
                self._all.append(handle)
        return handle

    def close(self) -> None:
        with self._lock:
            for handle in self._all:
                closer = getattr(handle, "close", None)
                if closer is not None:
                    closer()
            self._all.clear()
        self._local = threading.local()


def cache_token(*parts: object) -> str:
    from dask.base import tokenize

    return str(tokenize(*parts))


def check_mpp(mpp: float, source: str) -> float:
    low, high = PLAUSIBLE_MPP
    if not (math.isfinite(mpp) and low <= mpp <= high):
        raise SlideError(
            f"pixel size {mpp!r} µm/px from {source} is not plausible for a slide "
            f"(expected {low}..{high}); {MPP_HINT}",
            code="bad-mpp",
        )
    return float(mpp)
