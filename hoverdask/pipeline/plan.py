"""Planning one slide: open it, lay out the map tiles, pick the tissue tiles.

A :class:`SlidePlan` is everything the task graph of one slide needs, all small and picklable.
Planning is each slide's first task (:func:`plan_task`, on a worker, so the slides of a cohort
are planned in parallel and the client stays free); its result decides the rest of the graph,
and a slide that cannot be opened fails there, alone, with its
:class:`~hoverdask.core.errors.SlideError`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.errors import HoverdaskError, one_line
from hoverdask.core.types import TypeTable
from hoverdask.pipeline.grid import TileGrid
from hoverdask.pipeline.ledger import SlideLedger, save_tissue
from hoverdask.pipeline.spec import Region, region_level0_box
from hoverdask.pipeline.tasks import SlideSource
from hoverdask.slide import open_slide
from hoverdask.slide.inspect import inspect_slide
from hoverdask.slide.resample import processing_array
from hoverdask.slide.tissue import tissue_mask


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
    extent: tuple[float, float, float, float]  # level-0 (x0, y0, x1, y1) of what was processed
    type_table: TypeTable | None = field(default=None, hash=False, compare=False)
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # per tissue tile whose patches do not all meet tissue: which patches run (bool, patch grid)
    tissue_patches: dict[tuple[int, int], np.ndarray] = field(
        default_factory=dict, hash=False, compare=False)
    plan_s: float = field(default=0.0, compare=False)  # the plan task's seconds (0: not timed)

    @property
    def ledger(self) -> SlideLedger:
        return SlideLedger(Path(self.slide_dir))

    @functools.cached_property
    def tissue_tile_set(self) -> frozenset[tuple[int, int]]:
        return frozenset(self.tissue_tiles)

    @property
    def offset(self) -> tuple[int, int]:
        """Processing-pixel ``(x, y)`` of the grid's origin in the slide (non-zero for a region):
        the ``offset`` of :func:`hoverdask.core.schema.to_level0`."""
        return self.source.origin[1], self.source.origin[0]

    def active_patches(self, row: int, col: int) -> np.ndarray | None:
        """The patches of tissue tile ``(row, col)`` the network runs on; None: all of them."""
        return self.tissue_patches.get((row, col))

    def patches_to_run(self, row: int, col: int) -> int:
        """How many patches of tissue tile ``(row, col)`` the network runs on (its cost)."""
        return self.grid.patches_to_run(row, col, self.active_patches(row, col))

    def tiles_longest_first(self) -> list[tuple[int, int]]:
        """The tissue tiles, most patches first (raster order among equals).

        Submitted in this order, the tiles end close together on every worker (the longest
        first, the short ones filling in), so no worker waits long at the end of the
        inference stage, which post-processing cannot start before."""
        return self.busiest_first(self.tissue_tiles)

    def busiest_first(self, blocks: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Post-processing blocks, those over the most predicted patches first (raster order
        among equals; a block is its map tile). Their cost follows the nuclei, so the tissue:
        submitted in this order, the long blocks do not come last (as
        :meth:`tiles_longest_first` for inference)."""
        def patches(block: tuple[int, int]) -> int:
            return self.patches_to_run(*block) if block in self.tissue_tile_set else 0

        return sorted(blocks, key=lambda block: -patches(block))

    @property
    def processed_pixels(self) -> int:
        """Image pixels the network predicts: the tissue tiles less their skipped patches."""
        total = 0
        for row, col in self.tissue_tiles:
            active = self.active_patches(row, col)
            if active is None:
                total += self.grid.pixels([(row, col)])
                continue
            for i, j in zip(*np.nonzero(active), strict=True):
                y0, x0, y1, x1 = self.grid.patch_extent(row, col, int(i), int(j))
                total += (y1 - y0) * (x1 - x0)
        return total

    @property
    def skips_tiles(self) -> bool:
        rows, cols = self.grid.shape
        return len(self.tissue_tiles) < rows * cols


def plan_slide(
    slide_path: str, out_dir: Path, *, mpp: float | None, **settings: Any
) -> tuple[SlidePlan, Any]:
    """Open the slide, check it as ``hoverdask check`` does, size its processing grid and list
    the tiles that hold tissue (``settings``: those of :func:`plan_open_slide`).

    With ``region`` the grid covers only that level-0 rectangle (see :mod:`.region`). Returns
    the plan and the tissue mask (None without ``use_tissue_mask``), which is kept out of the
    plan because tasks never need its pixels. A slide ``check`` fails raises the same
    :class:`~hoverdask.core.errors.SlideError` here.
    """
    with open_slide(slide_path, mpp) as slide:
        inspect_slide(slide).raise_if_damaged()
        return plan_open_slide(slide, slide_path, out_dir, mpp=mpp, **settings)


def plan_open_slide(
    slide: Any,
    slide_path: str,
    out_dir: Path,
    *,
    mpp: float | None,
    target_mpp: float,
    chunk_size: int,
    output: int,
    margin: int,
    use_tissue_mask: bool = True,
    type_table: TypeTable | None = None,
    region: Region | None = None,
) -> tuple[SlidePlan, Any]:
    """:func:`plan_slide` on a slide that is already open (and checked); it stays open."""
    view = processing_array(slide, target_mpp=target_mpp)
    scale = float(view.scale)
    level0 = (int(slide.dimensions[0]), int(slide.dimensions[1]))
    box = (0, 0, *(int(n) for n in view.array.shape[:2]))
    if region is not None:
        region.check_inside(level0, slide_path)
        box = region.processing_box(scale, box[2:])
    y0, x0, y1, x1 = box
    height, width = y1 - y0, x1 - x0
    grid = TileGrid.for_chunk_size(height, width, chunk_size, output, margin)
    tiles = tuple(grid.tiles())
    extent = (0.0, 0.0, float(level0[0]), float(level0[1]))
    if region is not None:
        extent = region_level0_box(box, scale)
    mask = None
    patches: dict[tuple[int, int], np.ndarray] = {}
    if use_tissue_mask:
        mask = tissue_mask(slide)
        tiles = tuple(t for t in tiles if _has_tissue(mask, grid, scale, (y0, x0), *t))
        for tile in tiles:
            active = _tissue_patches(mask, grid, scale, (y0, x0), *tile)
            if not active.all():
                patches[tile] = active
    slide_id = str(slide.slide_id) + (region.suffix if region is not None else "")
    slide_mpp = float(slide.mpp)
    params = {
        "slide_mpp": slide_mpp,
        "target_mpp": target_mpp,
        "processing_size_hw": [height, width],
        "scale": scale,
        "tile": grid.tile,
        "patch_output": output,
        "patch_margin": margin,
        "tissue_mask": use_tissue_mask,
        "patches_total": sum(math.prod(grid.patch_shape(*t)) for t in tiles),
        "patches_run": sum(grid.patches_to_run(*t, patches.get(t)) for t in tiles),
    }
    if region is not None:
        params["region"] = [region.x, region.y, region.width, region.height]
        params["region_processing_yx"] = [y0, x0, y1, x1]
    plan = SlidePlan(
        slide_path=str(slide_path),
        slide_id=slide_id,
        slide_dir=str(out_dir / slide_id),
        source=SlideSource(path=str(slide_path), mpp=mpp, target_mpp=target_mpp, origin=(y0, x0)),
        grid=grid,
        scale=scale,
        slide_mpp=slide_mpp,
        level0_size=level0,
        tissue_tiles=tiles,
        tissue_mm2=_tissue_mm2(mask, extent if region is not None else None),
        extent=extent,
        type_table=type_table,
        params=params,
        tissue_patches=patches,
    )
    return plan, mask


def _has_tissue(mask: Any, grid: TileGrid, scale: float, origin_yx: tuple[int, int],
                row: int, col: int) -> bool:
    y0, x0, y1, x1 = grid.extent(row, col)
    oy, ox = origin_yx
    return bool(mask.any_in_box(math.floor((x0 + ox) * scale), math.floor((y0 + oy) * scale),
                                math.ceil((x1 + ox) * scale), math.ceil((y1 + oy) * scale)))


def _tissue_patches(mask: Any, grid: TileGrid, scale: float, origin_yx: tuple[int, int],
                    row: int, col: int) -> np.ndarray:
    """Which patches of a tissue tile the network runs on: those whose input (the output plus
    the patch margin of context) meets tissue. The others hold glass only; their maps are
    background, exactly as for the tiles without tissue, and cost no network time."""
    oy, ox = origin_yx
    m = grid.margin
    rows, cols = grid.patch_shape(row, col)
    active = np.zeros((rows, cols), dtype=bool)
    for i in range(rows):
        for j in range(cols):
            y0, x0, y1, x1 = grid.patch_extent(row, col, i, j)
            if y1 > y0 and x1 > x0:
                active[i, j] = mask.any_in_box(
                    math.floor((x0 - m + ox) * scale), math.floor((y0 - m + oy) * scale),
                    math.ceil((x1 + m + ox) * scale), math.ceil((y1 + m + oy) * scale))
    return active


def _tissue_mm2(mask: Any, box: tuple[float, float, float, float] | None) -> float | None:
    """Tissue area of the whole slide, or of the level-0 ``box`` (x0, y0, x1, y1) of a region."""
    if mask is None:
        return None
    if box is None:
        return float(mask.area_mm2)
    x0, y0, x1, y1 = box
    return mask.fraction_in_box(x0, y0, x1, y1) * (x1 - x0) * (y1 - y0) * mask.mpp**2 / 1e6


@dataclass(frozen=True)
class PlanFailure:
    """Why a slide cannot be planned, when the reason is the user's to fix (a bad file, a region
    outside the slide), as the cohort summary's one line. Returned rather than raised so that
    workers do not log a traceback for bad input."""

    line: str


def plan_task(
    slide_path: str, out_dir: str, tissue_path: str, **settings: Any
) -> SlidePlan | PlanFailure:
    """:func:`plan_slide` as a Dask task; the tissue mask goes to ``tissue_path`` (for QC).

    The mask's thumbnail is reduced here with dask's synchronous scheduler: a task must not
    spread nested tasks over the cluster it runs on. The plan carries the task's seconds
    (``plan_s``, for run.json's breakdown); they are not one of the ledger's parameters.
    """
    import dask

    started = time.perf_counter()
    try:
        with dask.config.set(scheduler="synchronous"):
            plan, mask = plan_slide(slide_path, Path(out_dir), **settings)
    except HoverdaskError as err:
        return PlanFailure(one_line(err))
    save_tissue(Path(tissue_path), mask)
    return dataclasses.replace(plan, plan_s=time.perf_counter() - started)
