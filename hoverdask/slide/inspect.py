"""What a slide is made of: its format, pyramid levels and a decode of sampled storage tiles.

Used by ``run``'s plan step and by ``hoverdask check`` alike, so a slide that ``check`` finds
damaged, ``run`` refuses with the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hoverdask.core.errors import SlideError, one_line
from hoverdask.slide.base import Slide

SAMPLE_GRID = 4  # storage tiles decoded per level: up to SAMPLE_GRID x SAMPLE_GRID, spread out
RECOPY = "copy the file again from its source"


@dataclass(frozen=True)
class BadTile:
    level: int
    x: int  # level pixels of the storage tile's top-left corner
    y: int
    error: str


@dataclass(frozen=True)
class LevelFacts:
    level: int
    width: int
    height: int
    downsample: float
    mpp: float | None
    tile_width: int
    tile_height: int
    tiles: int
    tiles_decoded: int
    tiles_bad: int


@dataclass(frozen=True)
class SlideFacts:
    """What opening a slide and decoding sampled tiles of each level found."""

    path: str
    format: str
    levels: tuple[LevelFacts, ...]
    objective_power: float | None
    bad_tiles: tuple[BadTile, ...]

    @property
    def tiles_decoded(self) -> int:
        return sum(level.tiles_decoded for level in self.levels)

    def damage_error(self) -> SlideError | None:
        """The error of a slide whose sampled tiles do not all decode, else None."""
        if not self.bad_tiles:
            return None
        first = self.bad_tiles[0]
        return SlideError(
            f"{self.path}: {len(self.bad_tiles)} of {self.tiles_decoded} sampled tiles do not "
            f"decode (first: level {first.level} at x {first.x}, y {first.y}: {first.error}); "
            f"the file is damaged, {RECOPY}",
            code="damaged",
        )

    def raise_if_damaged(self) -> None:
        error = self.damage_error()
        if error is not None:
            raise error


def slide_format(slide: Slide) -> str:
    """``aperio``, ``generic-tiff``, ``ome-zarr``...: what kind of file the slide is."""
    path = Path(slide.path)
    if path.is_dir():
        return "ome-zarr"
    if slide.properties.get("hoverdask.mpp-source") == "ome" or path.name.lower().endswith(
        (".ome.tif", ".ome.tiff")
    ):
        return "ome-tiff"
    return str(slide.properties.get("tiffslide.vendor") or "tiff")


def sample_boxes(width: int, height: int, tile: tuple[int, int],
                 grid: int = SAMPLE_GRID) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` of up to ``grid`` x ``grid`` storage tiles spread over a level
    (every tile when there are fewer), corners and the last row/column included."""
    tw, th = max(1, int(tile[0])), max(1, int(tile[1]))
    cols, rows = math.ceil(width / tw), math.ceil(height / th)
    pick_cols = np.unique(np.linspace(0, cols - 1, min(cols, grid)).round().astype(int))
    pick_rows = np.unique(np.linspace(0, rows - 1, min(rows, grid)).round().astype(int))
    return [(int(c) * tw, int(r) * th, min(width, (int(c) + 1) * tw), min(height, (int(r) + 1) * th))
            for r in pick_rows for c in pick_cols]


def inspect_slide(slide: Slide, grid: int = SAMPLE_GRID) -> SlideFacts:
    """Levels and format of an open slide, and a decode of sampled tiles of every level."""
    levels, bad = [], []
    for level, (width, height) in enumerate(slide.level_dimensions):
        th, tw = slide.reader.tile_size(level)  # (rows, cols) of a storage tile
        boxes = sample_boxes(width, height, (tw, th), grid) if width and height else []
        failed = 0
        for x0, y0, x1, y1 in boxes:
            try:
                pixels = slide.reader.read(level, y0, y1, x0, x1)
                if pixels.shape[:2] != (y1 - y0, x1 - x0):
                    raise ValueError(f"decoded {pixels.shape[:2]}, expected {(y1 - y0, x1 - x0)}")
            except Exception as err:  # noqa: BLE001 - any decoder failure means a damaged tile
                failed += 1
                bad.append(BadTile(level, x0, y0, _decode_error(err)))
        downsample = slide.level_downsample_xy(level)[2]
        levels.append(LevelFacts(
            level=level, width=int(width), height=int(height), downsample=round(downsample, 4),
            mpp=None, tile_width=int(tw), tile_height=int(th),
            tiles=math.ceil(width / max(tw, 1)) * math.ceil(height / max(th, 1)),
            tiles_decoded=len(boxes), tiles_bad=failed,
        ))  # fmt: skip
    return SlideFacts(str(slide.path), slide_format(slide), tuple(levels), slide.objective_power,
                      tuple(bad))


def _decode_error(err: BaseException) -> str:
    """The decoder's own words (a SlideError from a reader wraps them with the location)."""
    cause = err.__cause__ if isinstance(err, SlideError) and err.__cause__ else err
    return one_line(cause)


OBJECTIVES = (2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)


def magnification_from_mpp(mpp: float) -> float:
    """The usual objective closest (by ratio) to ``10 / mpp``: scanners image about 1 µm/px
    at 10x, 0.5 at 20x, 0.25 at 40x (a Leica GT450's 0.263 µm/px is 40x)."""
    return min(OBJECTIVES, key=lambda power: abs(math.log(power * mpp / 10.0)))
