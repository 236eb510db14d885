"""Planning one slide on the client: open it, lay out the map tiles, pick the tissue tiles.

A :class:`SlidePlan` is everything the task graph of one slide needs, all small and picklable.
Planning happens on the client before any task of the slide is submitted, so a slide that cannot
be opened fails here, alone, with its :class:`~hoverdask.errors.SlideError`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hoverdask.pipeline.grid import TileGrid
from hoverdask.pipeline.ledger import SlideLedger
from hoverdask.pipeline.tasks import SlideSource


@dataclass(frozen=True)
class SlidePlan:
    slide_path: str
    slide_id: str
    slide_dir: str
    source: SlideSource
    grid: TileGrid
    scale: float  # level-0 px per processing px
    slide_mpp: float  # µm per level-0 px
    level0_size: tuple[int, int]  # (width, height)
    tissue_tiles: tuple[tuple[int, int], ...]
    tissue_mm2: float | None
    type_table: Any = field(default=None, hash=False, compare=False)
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def ledger(self) -> SlideLedger:
        return SlideLedger(Path(self.slide_dir))

    @functools.cached_property
    def tissue_tile_set(self) -> frozenset[tuple[int, int]]:
        return frozenset(self.tissue_tiles)

    @property
    def skips_tiles(self) -> bool:
        rows, cols = self.grid.shape
        return len(self.tissue_tiles) < rows * cols


def plan_slide(
    slide_path: str,
    out_dir: Path,
    *,
    mpp: float | None,
    target_mpp: float,
    chunk_size: int,
    output: int,
    margin: int,
    use_tissue_mask: bool = True,
    type_table: Any = None,
) -> tuple[SlidePlan, Any]:
    """Open the slide, size its processing grid and list the tiles that hold tissue.

    Returns the plan and the tissue mask (None without ``use_tissue_mask``), which is kept out
    of the plan because tasks never need its pixels.
    """
    from hoverdask.resample import processing_array
    from hoverdask.slide import open_slide

    slide = open_slide(slide_path, mpp)
    try:
        view = processing_array(slide, target_mpp=target_mpp)
        height, width = (int(n) for n in view.array.shape[:2])
        grid = TileGrid.for_chunk_size(height, width, chunk_size, output, margin)
        scale = float(view.scale)
        tiles = tuple(grid.tiles())
        mask = None
        if use_tissue_mask:
            from hoverdask.tissue import tissue_mask

            mask = tissue_mask(slide)
            tiles = tuple(t for t in tiles if _has_tissue(mask, grid, scale, *t))
        level0 = (int(slide.dimensions[0]), int(slide.dimensions[1]))
        slide_id = str(slide.slide_id)
        slide_mpp = float(slide.mpp)
    finally:
        slide.close()
    params = {
        "slide_mpp": slide_mpp,
        "target_mpp": target_mpp,
        "processing_size_hw": [height, width],
        "scale": scale,
        "tile": grid.tile,
        "patch_output": output,
        "patch_margin": margin,
        "tissue_mask": use_tissue_mask,
    }
    plan = SlidePlan(
        slide_path=str(slide_path),
        slide_id=slide_id,
        slide_dir=str(out_dir / slide_id),
        source=SlideSource(path=str(slide_path), mpp=mpp, target_mpp=target_mpp),
        grid=grid,
        scale=scale,
        slide_mpp=slide_mpp,
        level0_size=level0,
        tissue_tiles=tiles,
        tissue_mm2=float(mask.area_mm2) if mask is not None else None,
        type_table=type_table,
        params=params,
    )
    return plan, mask


def _has_tissue(mask: Any, grid: TileGrid, scale: float, row: int, col: int) -> bool:
    y0, x0, y1, x1 = grid.extent(row, col)
    return bool(mask.any_in_box(math.floor(x0 * scale), math.floor(y0 * scale),
                                math.ceil(x1 * scale), math.ceil(y1 * scale)))
