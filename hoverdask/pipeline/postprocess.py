"""Post-processing as committed Dask tasks: the three seam-stable passes over the map cache.

The passes and the ownership rule are :mod:`hoverdask.nuclei.seams`; this module schedules
them as futures and commits each block's result through the ledger, so a rerun redoes only the
blocks whose part is missing. Post-processing blocks use the map-tile grid (a block's core is
one map tile), so a block's maps are ready as soon as the tiles of its window are.

* pass 1 (slide-wide h/v ranges) comes from the inference tasks' tile markers: no extra reads;
* pass 2 (Sobel ranges) runs per block on the core plus 10 px;
* pass 3 runs per block on the core plus the halo, measures its nuclei on the RGB it saw and
  writes ``.work/blocks/r_c.parquet``; clusters too large for any block go to one refit task.

Blocks whose window holds no tissue tile read as all background: they contribute the range
(0, 0) and no nuclei, which is exactly what computing them would give, so they are skipped.

Each task measures its own seconds (map-window reads apart from the computing) and keeps them in
its marker; the last task sums those of this run into run.json's ``breakdown``
(:mod:`hoverdask.pipeline.breakdown`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from hoverdask.core.atomic import atomic_write, atomic_write_json
from hoverdask.export.parts import index_parts
from hoverdask.nuclei import seams
from hoverdask.nuclei.features import measure
from hoverdask.nuclei.stable import SOBEL_REACH, Box, NormRanges, merge_ranges
from hoverdask.pipeline import maps_store
from hoverdask.pipeline.breakdown import breakdown
from hoverdask.pipeline.outputs import finish_slide, finish_slide_parts, write_run_record
from hoverdask.pipeline.plan import SlidePlan
from hoverdask.pipeline.spec import ModelSpec, RunOptions
from hoverdask.pipeline.tasks import read_rgb_box

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import geopandas as gpd
    from distributed import Future


BACKGROUND_RANGE = (0.0, 0.0)


class HvRanges(NamedTuple):
    """Pass 1's result: the slide-wide h and v ranges, and the seconds it took."""

    h: tuple[float, float]
    v: tuple[float, float]
    seconds: float = 0.0


def block_grid(plan: SlidePlan) -> seams.BlockGrid:
    return plan.grid.blocks


def tiles_meeting(plan: SlidePlan, box: Box) -> bool:
    """Whether any tissue tile (map tile with data) overlaps ``box``."""
    y0, x0, y1, x1 = box
    tile = plan.grid.tile
    rows = range(y0 // tile, (y1 - 1) // tile + 1)
    cols = range(x0 // tile, (x1 - 1) // tile + 1)
    return any((r, c) in plan.tissue_tile_set for r in rows for c in cols)


def submit_postprocess(
    submit: Callable[..., Future], plan: SlidePlan, spec: ModelSpec, tiles: list[Future]
) -> list[Future]:
    """Submit passes 1-3 and the oversize refit; the last future's result feeds ``assemble``."""
    grid = block_grid(plan)
    blocks = plan.busiest_first(grid.blocks())
    hv = submit("hv-ranges", "slide", slide_hv_ranges, tiles, plan.skips_tiles)
    sobel = [
        submit("sobel", f"{r}_{c}", sobel_block, plan, (r, c), hv, spec.nr_types)
        for r, c in blocks
        if tiles_meeting(plan, grid.grow(grid.core(r, c), SOBEL_REACH))
    ]
    skipped = len(sobel) < len(blocks)
    ranges = submit("norm-ranges", "slide", slide_norm_ranges, hv, sobel, skipped)
    nuclei = [
        submit("nuclei", f"{r}_{c}", nuclei_block, plan, (r, c), ranges, spec.nr_types)
        for r, c in blocks
        if tiles_meeting(plan, grid.window(r, c))
    ]
    refit = submit("oversized", "slide", oversized_nuclei, plan, nuclei, ranges, spec.nr_types)
    return [hv, *sobel, ranges, *nuclei, refit]  # hv first, refit last: what assemble takes


def slide_hv_ranges(tile_stats: list[dict[str, Any]], skips_tiles: bool) -> HvRanges:
    """Pass 1 from the tile markers (the ranges of the stored, dequantised maps)."""
    started = time.perf_counter()
    h = [(s["h_min"], s["h_max"]) for s in tile_stats]
    v = [(s["v_min"], s["v_max"]) for s in tile_stats]
    if skips_tiles or not tile_stats:
        h.append(BACKGROUND_RANGE)
        v.append(BACKGROUND_RANGE)
    return HvRanges(merge_ranges(h), merge_ranges(v), time.perf_counter() - started)


def sobel_block(
    plan: SlidePlan,
    block: tuple[int, int],
    hv: tuple[tuple[float, float], tuple[float, float]] | HvRanges,
    nr_types: int | None,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Pass 2 on one block, committed as ``.work/sobel/r_c.json``.

    The marker holds the ranges and the task's seconds (``read_s`` of them reading the maps);
    a marker of earlier versions, the ranges alone as a list, is read back all the same.
    """
    ledger = plan.ledger
    marker = ledger.stage_part("sobel", *block)
    committed = ledger.read_marker(marker)
    if committed is not None:
        ranges = committed["ranges"] if isinstance(committed, dict) else committed
        return tuple(tuple(r) for r in ranges)  # type: ignore[return-value]
    started = time.perf_counter()
    grid = block_grid(plan)
    core = grid.core(*block)
    context = grid.grow(core, SOBEL_REACH)
    # pass 2 reads h and v only (``sobel_ranges`` takes the last two channels)
    window = maps_store.read_window(ledger.maps_store, *context, nr_types, channels=("h", "v"))
    read = time.perf_counter()
    result = seams.sobel_ranges(window, context, core, NormRanges(hv[0], hv[1]))
    atomic_write_json(marker, {"ranges": [list(r) for r in result],
                               "seconds": time.perf_counter() - started, "read_s": read - started,
                               "ended_at": time.time()})
    return result


def slide_norm_ranges(
    hv: tuple[tuple[float, float], tuple[float, float]],
    sobel: list[tuple[tuple[float, float], tuple[float, float]]],
    skipped_blocks: bool,
) -> NormRanges:
    sobel_h = [s[0] for s in sobel] + ([BACKGROUND_RANGE] if skipped_blocks or not sobel else [])
    sobel_v = [s[1] for s in sobel] + ([BACKGROUND_RANGE] if skipped_blocks or not sobel else [])
    return NormRanges(hv[0], hv[1], merge_ranges(sobel_h), merge_ranges(sobel_v))


def nuclei_block(
    plan: SlidePlan, block: tuple[int, int], ranges: NormRanges, nr_types: int | None
) -> dict[str, Any]:
    """Pass 3 on one block: its nuclei as ``.work/blocks/r_c.parquet`` plus its cut clusters."""
    ledger = plan.ledger
    part = ledger.block_part(*block)
    marker = ledger.stage_part("blocks", *block)
    committed = ledger.read_marker(marker)
    if committed is not None and part.exists():
        return committed
    started = time.perf_counter()
    grid = block_grid(plan)
    box = grid.window(*block)
    window = maps_store.read_window(ledger.maps_store, *box, nr_types)
    read = time.perf_counter()
    found = seams.block_nuclei(window, box, grid, block, ranges, nr_types)
    segmented = time.perf_counter()
    table = measured_table(plan, found.records)
    atomic_write(part, lambda tmp: table.to_parquet(tmp, index=False))
    summary = {"part": str(part), "nuclei": len(table),
               "fragments": [list(f) for f in found.fragments],
               "postprocess_s": segmented - started,  # map read + segmentation
               "map_read_s": read - started, "segment_s": segmented - read,
               "features_s": time.perf_counter() - segmented, "ended_at": time.time()}
    atomic_write_json(marker, summary)
    return summary


def oversized_nuclei(
    plan: SlidePlan, blocks: list[dict[str, Any]], ranges: NormRanges, nr_types: int | None
) -> dict[str, Any]:
    """Decide the clusters no block could hold, on windows grown until they fit."""
    fragments = [tuple(f) for b in blocks for f in b["fragments"]]
    parts = [b["part"] for b in blocks]
    timings = {key: sum(b.get(key, 0.0) for b in blocks) for key in ("postprocess_s", "features_s")}
    if not fragments:
        return {"parts": parts, "oversized": [], "timings_s": timings}
    ledger = plan.ledger
    part = ledger.work / "oversized.parquet"
    marker = ledger.work / "oversized.json"
    committed = ledger.read_marker(marker)
    if committed is not None and part.exists():
        return committed
    started = time.perf_counter()
    grid = block_grid(plan)

    def run(jobs: list[tuple[Box, Box]]) -> list[seams.RefitNuclei]:
        return [seams.refit_nuclei(maps_store.read_window(ledger.maps_store, *w, nr_types), w,
                                   grid, target, ranges, nr_types) for w, target in jobs]

    records, oversized = [], []
    for refit in seams.refit_rounds(fragments, grid, run):
        records.append(refit.records)
        oversized.extend(list(b) for b in refit.oversized)
    table = _concat([measured_table(plan, recs) for recs in records])
    table = table.drop_duplicates("nucleus_id") if len(table) else table
    atomic_write(part, lambda tmp: table.to_parquet(tmp, index=False))
    summary = {"parts": [*parts, str(part)], "oversized": sorted(oversized), "timings_s": timings,
               "seconds": time.perf_counter() - started, "ended_at": time.time()}
    atomic_write_json(marker, summary)
    return summary


def measured_table(plan: SlidePlan, records: list[Any]) -> gpd.GeoDataFrame:
    """Records -> nuclei table in level-0 coordinates, with features from the processed RGB.

    The one place where a region's offset enters the coordinates (the records are in the
    processed image's pixels). Only the RGB under the nuclei is read (their contours' bounding
    box, one slice): not the halo of the block window, which the neighbours read again.
    """
    ox, oy = plan.offset
    frame = seams.records_frame(records)
    table = seams.nuclei_table(frame, plan.scale, (ox, oy))
    if not len(table):
        return table

    points = np.concatenate(list(frame["contour"]))  # (x, y) pixel indices
    (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0) + 1
    image = read_rgb_box(plan.source, int(y0), int(x0), int(y1), int(x1))
    origin = ((x0 + ox) * plan.scale, (y0 + oy) * plan.scale)
    return measure(table, image, plan.slide_mpp, origin=origin, scale=plan.scale,
                   type_table=plan.type_table)


def _concat(tables: list[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    import geopandas as gpd
    import pandas as pd

    tables = [t for t in tables if len(t)]
    if not tables:
        return seams.nuclei_table(seams.records_frame([]))
    return gpd.GeoDataFrame(pd.concat(tables, ignore_index=True), geometry="geometry")


def assemble_slide(
    plan: SlidePlan, finish: SlideFinish, refit: dict[str, Any], hv: HvRanges | None = None
) -> dict[str, Any]:
    """The slide's last task: write its files from the block parts, then ``run.json``.

    The files are written one row group at a time from the parts (memory does not grow with
    the slide); only a slide without nuclei, or with parts whose columns differ, is
    concatenated into one table first (same files). ``run.json`` is written last (it marks the
    slide finished), then the work folder goes unless the run keeps it. All of it runs on a
    worker, so the client only keeps the score. ``hv`` is pass 1's result (for its seconds).
    """
    started = time.perf_counter()
    paths = [Path(p) for p in refit["parts"]]
    formats, oversized = finish.options.formats, refit["oversized"]
    parts = index_parts(paths, extent=plan.extent)
    if parts is not None:
        outcome = finish_slide_parts(plan, parts, formats, oversized=oversized,
                                     model=finish.model)
    else:
        table = _concat([_read_part(p) for p in paths])
        outcome = finish_slide(plan, table, formats, oversized=oversized, model=finish.model)
    markers = tile_markers(plan)
    outcome["timings_s"] = {**tile_timings(markers), **refit.get("timings_s", {})}
    outcome["inference_busy_fraction"] = inference_busy_fraction(markers, finish.started_at)
    stages = stage_seconds(plan, markers, finish.started_at)
    stages["pass1_hv_ranges"] = hv.seconds if isinstance(hv, HvRanges) else 0.0
    stages["writing"] = time.perf_counter() - started
    wall = time.time() - finish.started_at
    outcome["breakdown"] = breakdown(
        stages, wall_s=wall, worker_threads=finish.worker_threads, tissue_mm2=plan.tissue_mm2,
        processed_mm2=plan.processed_pixels * (plan.source.target_mpp / 1000) ** 2,
    )
    write_run_record(plan, finish.model, finish.options, outcome, wall, bench=finish.bench)
    if not finish.options.keep_work:
        plan.ledger.clean_work()
    draw_report_pictures(plan.slide_dir)
    return outcome


def draw_report_pictures(slide_dir: str) -> None:
    """Draw the slide's report pictures here, on the worker that finished it: slides are drawn
    in parallel, beside other slides' work, and the client's ``report.html`` only reuses them
    (they are cached by a fingerprint of the slide's files). A picture that cannot be drawn
    never fails the slide: the client tries again and says why."""
    from hoverdask.export.report import slide_pictures

    try:
        slide_pictures(slide_dir)
    except Exception as err:  # noqa: BLE001 - reported, and redone by the client
        log.warning("report pictures of %s not drawn on the worker: %s", slide_dir, err)


@dataclass(frozen=True)
class SlideFinish:
    """What the last task needs besides the plan: the run's options and model, the start time,
    the client machine's last ``hoverdask bench`` figures and the cluster's worker threads when
    the slide's graph was submitted (for run.json)."""

    options: RunOptions
    model: dict[str, Any]
    started_at: float  # time.time() on the client when the slide was taken up
    bench: dict[str, Any] | None = None
    worker_threads: int | None = None


def tile_markers(plan: SlidePlan) -> list[dict[str, Any]]:
    """The committed markers of the slide's inference tiles (also resumed ones)."""
    markers = [plan.ledger.read_marker(plan.ledger.tile_marker(*t)) for t in plan.tissue_tiles]
    return [m for m in markers if m is not None]


def tile_timings(markers: list[dict[str, Any]]) -> dict[str, float]:
    """Summed task seconds of the inference stage."""
    return {key: sum(m.get(key, 0.0) for m in markers) for key in ("read_s", "predict_s", "write_s")}


def stage_seconds(
    plan: SlidePlan, tiles: list[dict[str, Any]], since: float
) -> dict[str, float]:
    """This run's task seconds per stage of the breakdown, from the committed markers.

    Only units that ended after ``since`` (the slide's start) count: a resumed unit's seconds
    were spent by an earlier run. Pass 1 and the writing are the assemble task's to add.
    """
    ledger = plan.ledger
    fresh_tiles = [m for m in tiles if m.get("predict_end", 0.0) > since]
    sobel = [m for m in _stage_markers(ledger.work / "sobel") if m.get("ended_at", 0.0) > since]
    blocks = [m for m in _stage_markers(ledger.work / "blocks") if m.get("ended_at", 0.0) > since]
    refit = ledger.read_marker(ledger.work / "oversized.json")
    fresh_refit = isinstance(refit, dict) and refit.get("ended_at", 0.0) > since

    def total(markers: list[dict[str, Any]], key: str) -> float:
        return sum(float(m.get(key, 0.0)) for m in markers)

    pass2_read = total(sobel, "read_s")
    return {
        "plan": plan.plan_s,
        "read": total(fresh_tiles, "read_s"),
        "inference": total(fresh_tiles, "predict_s"),
        "maps_write": total(fresh_tiles, "write_s"),
        "pass2_read": pass2_read,
        "pass2_sobel": total(sobel, "seconds") - pass2_read,
        "pass3_read": total(blocks, "map_read_s"),
        "pass3_segment": total(blocks, "segment_s"),
        "features": total(blocks, "features_s"),
        "oversized": float(refit.get("seconds", 0.0)) if fresh_refit else 0.0,
    }


def _stage_markers(folder: Path) -> Iterator[dict[str, Any]]:
    """The committed JSON markers of a post-processing stage (dict ones: with their seconds)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):  # a temporary file of a write in progress
            continue
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict):
            yield marker


def inference_busy_fraction(markers: list[dict[str, Any]], since: float) -> float | None:
    """Of the time each worker spent on this slide's inference (first prediction started to last
    ended; tiles of this run only: those ended after ``since``), the part its predictor worked.

    On a GPU worker this is how busy the GPU was kept; below 1 it waited for reads, writes or
    the scheduler. None when no tile was predicted in this run.
    """
    fresh = [m for m in markers if m.get("predict_end", 0.0) > since and "worker" in m]
    spans: dict[str, list[float]] = {}
    for m in fresh:
        span = spans.setdefault(m["worker"], [m["predict_start"], m["predict_end"]])
        span[0], span[1] = min(span[0], m["predict_start"]), max(span[1], m["predict_end"])
    busy = sum(m["predict_end"] - m["predict_start"] for m in fresh)
    total = sum(end - start for start, end in spans.values())
    return min(1.0, busy / total) if total > 0 else None


def _read_part(path: Path) -> gpd.GeoDataFrame:
    import geopandas as gpd

    return gpd.read_parquet(path)

