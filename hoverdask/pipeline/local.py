"""Nuclei of one whole map in memory or on disk: the seam passes composed with ``dask.delayed``.

:func:`nuclei_from_maps` runs the three passes of :mod:`hoverdask.nuclei.seams` (and the refit
of oversized clusters) on any scheduler; the result does not depend on ``chunk_size``. The
distributed run schedules the same pass functions as committed tasks
(:mod:`hoverdask.pipeline.postprocess`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hoverdask.nuclei.seams import (
    DEFAULT_HALO,
    BlockGrid,
    OversizedClusterWarning,
    RefitNuclei,
    block_nuclei,
    box_slices,
    hv_ranges,
    nuclei_table,
    records_frame,
    refit_nuclei,
    refit_rounds,
    sobel_ranges,
)
from hoverdask.nuclei.stable import SOBEL_REACH, Box, NormRanges, merge_ranges

if TYPE_CHECKING:
    import geopandas as gpd


def _as_array(maps: Any) -> Any:
    """``maps`` as a dask array, or as numpy if it is in memory: windows of an in-memory map are
    views handed to the tasks directly, which spares the scheduler a graph of slices."""
    import dask.array as da

    return maps if isinstance(maps, da.Array) else np.asarray(maps)


def _check_maps(maps: Any, nr_types: int | None) -> None:
    if maps.ndim != 3 or maps.shape[-1] not in (3, 4):
        raise ValueError(
            f"maps must be (H, W, 4) [tp, np, h, v] or (H, W, 3) [np, h, v], got {maps.shape}"
        )
    if nr_types is not None and maps.shape[-1] != 4:
        raise ValueError(f"nr_types={nr_types} needs a tp channel: (H, W, 4) [tp, np, h, v] maps")


def slide_ranges(maps: Any, grid: BlockGrid) -> NormRanges:
    """Passes 1 and 2 with dask: the slide-wide normalisation ranges."""
    import dask

    cores = [grid.core(*b) for b in grid.blocks()]
    hv = dask.compute(*[dask.delayed(hv_ranges)(maps[box_slices(c)]) for c in cores])
    ranges = NormRanges(merge_ranges([r[0] for r in hv]), merge_ranges([r[1] for r in hv]))
    tasks = []
    for core in cores:
        context = grid.grow(core, SOBEL_REACH)
        tasks.append(dask.delayed(sobel_ranges)(maps[box_slices(context)], context, core, ranges))
    sobel = dask.compute(*tasks)
    return NormRanges(
        ranges.h, ranges.v, merge_ranges([s[0] for s in sobel]), merge_ranges([s[1] for s in sobel])
    )


def resolve_oversized(
    maps: Any,
    grid: BlockGrid,
    fragments: Sequence[Box],
    ranges: NormRanges,
    nr_types: int | None,
) -> RefitNuclei:
    """Decide every oversized cluster from the cut pieces the blocks reported."""
    import dask

    result = RefitNuclei()
    seen: set[tuple[int, int, int, int]] = set()
    reported: set[int] = set()  # overlapping refits decide some clusters twice, identically

    def run(jobs: list[tuple[Box, Box]]) -> Sequence[RefitNuclei]:
        return dask.compute(*[
            dask.delayed(refit_nuclei)(maps[box_slices(w)], w, grid, target, ranges, nr_types)
            for w, target in jobs
        ])

    for refit in refit_rounds(fragments, grid, run):
        result.records.extend(r for r in refit.records if r.nucleus_id not in reported)
        reported.update(r.nucleus_id for r in refit.records)
        result.seed_ties.extend(box for box in refit.seed_ties if box not in seen)
        for box in refit.oversized:
            if box not in seen:
                seen.add(box)
                result.oversized.append(box)
    return result


def nuclei_from_maps(
    maps: Any,
    chunk_size: int,
    nr_types: int | None = None,
    *,
    halo: int = DEFAULT_HALO,
    scale: float = 1.0,
) -> gpd.GeoDataFrame:
    """Nuclei of a whole map, identical for every ``chunk_size``; no two polygons overlap.

    ``maps`` is an ``(H, W, 4)`` ``[tp, np, h, v]`` (or ``(H, W, 3)`` ``[np, h, v]``) numpy or
    dask array (e.g. ``da.from_zarr``). With ``nr_types`` None the tp channel is ignored, ``type``
    is 0 and ``type_prob`` NaN. ``scale`` is level-0 px per map px. Rows are sorted by
    ``nucleus_id`` (``y * W + x`` of the nucleus's first pixel). ``attrs`` holds
    ``oversized_clusters`` (boxes ``(y0, x0, y1, x1)`` of clusters decided on fitted windows)
    and ``seed_tie_clusters`` (clusters where two watershed seeds tie, flooded on their own: there
    the reference's whole-map result depends on the rest of the map, ours does not).
    """
    import dask

    arr = _as_array(maps)
    _check_maps(arr, nr_types)
    height, width = int(arr.shape[0]), int(arr.shape[1])
    grid = BlockGrid(height, width, chunk_size, halo)
    ranges = slide_ranges(arr, grid)
    tasks = []
    for block in grid.blocks():
        box = grid.window(*block)
        tasks.append(
            dask.delayed(block_nuclei)(arr[box_slices(box)], box, grid, block, ranges, nr_types)
        )
    blocks = dask.compute(*tasks)
    records = [r for b in blocks for r in b.records]
    fragments = [f for b in blocks for f in b.fragments]
    oversized = resolve_oversized(arr, grid, fragments, ranges, nr_types)
    ids = [r.nucleus_id for r in records]
    if len(set(ids)) != len(ids) or not set(ids).isdisjoint(
        r.nucleus_id for r in oversized.records
    ):
        raise RuntimeError("ownership rule broken: a nucleus was reported by two blocks")
    if oversized.oversized:
        warnings.warn(
            f"{len(oversized.oversized)} nucleus cluster(s) did not fit a {halo} px halo and were "
            "decided on fitted windows (exact, but slower); see attrs['oversized_clusters']",
            OversizedClusterWarning,
            stacklevel=2,
        )
    table = nuclei_table(records_frame(records + oversized.records), scale)
    table.attrs.update(
        oversized_clusters=sorted(oversized.oversized),
        seed_tie_clusters=sorted(
            {box for b in blocks for box in b.seed_ties} | set(oversized.seed_ties)
        ),
        chunk_size=chunk_size,
        halo=halo,
    )
    return table
