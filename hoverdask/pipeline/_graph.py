"""The task graph of one slide, submitted as futures (never a collection that fusion could merge).

::

    plan (CPU) ··► infer r_c (GPU, one per tissue tile) ──► post-processing passes (CPU, per
                   block) ──► assemble (CPU, one per slide: files, run.json)

The plan task's result is what the rest of the graph is built from, so the client submits the
rest when it arrives (``··►``); everything after it is submitted at once.

Keys name the stage, the slide, the unit and a token drawn per run, so a rerun in the same client
never picks up the finished futures of an earlier run (resuming goes through the ledger's files)
and the dashboard shows which slide a task belongs to.
Only inference tasks ask for the ``GPU`` resource; with futures that request stays on exactly
those tasks (annotations on array graphs can be merged away by blockwise fusion).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoverdask.pipeline import maps_store, tasks
from hoverdask.pipeline.ledger import tissue_file
from hoverdask.pipeline.postprocess import SlideFinish, assemble_slide, submit_postprocess

if TYPE_CHECKING:
    from distributed import Client, Future

    from hoverdask.pipeline.plan import SlidePlan
    from hoverdask.pipeline.spec import ModelSpec, RunOptions

def submit_slide(
    client: Client,
    plan: SlidePlan,
    staged_tissue: Path,
    spec: ModelSpec,
    options: RunOptions,
    *,
    priority: int,
    gpu_resources: dict[str, float] | None,
    started_at: float,
    bench: dict[str, Any] | None = None,
    worker_threads: int | None = None,
) -> tuple[list[Future], Future]:
    """Submit every task of ``plan``; return all futures and the one that finishes the slide.

    Earlier committed parts are reused when the parameters match (see the ledger); the tissue
    mask the plan task staged moves into the slide's work folder. ``worker_threads`` (the
    cluster's, for run.json's breakdown) is None when unknown.
    """
    ledger = plan.ledger
    ledger.prepare(_ledger_params(plan, spec, options), overwrite=options.overwrite)
    if staged_tissue.exists():
        os.replace(staged_tissue, tissue_file(ledger))
    maps_store.create_store(ledger.maps_store, (plan.grid.height, plan.grid.width),
                            plan.grid.tile, spec.nr_types)
    token = uuid.uuid4().hex[:10]  # fresh per run: never the finished futures of an earlier one

    def submit(stage: str, unit: str, func: Callable[..., Any], *args: Any,
               resources: dict[str, float] | None = None) -> Future:
        return client.submit(
            func, *args, key=f"{stage}-{plan.slide_id}-{unit}-{token}", priority=priority,
            resources=resources, retries=options.retries, pure=False,
        )

    ahead = read_ahead_depth(options, gpu_resources)
    order = plan.tiles_longest_first()
    tiles = [
        submit("infer", f"{row}_{col}", tasks.infer_tile, plan.source, plan.grid,
               plan.slide_dir, row, col, spec.factory, spec.nr_types,
               tuple(order[index + 1 : index + 1 + ahead]), plan.active_patches(row, col),
               resources=gpu_resources)
        for index, (row, col) in enumerate(order)
    ]
    post = submit_postprocess(submit, plan, spec, tiles)
    finish = SlideFinish(options, spec.description, started_at, bench, worker_threads)
    final = submit("assemble", "slide", assemble_slide, plan, finish, post[-1], post[0])
    return [*tiles, *post, final], final


def read_ahead_depth(options: RunOptions, gpu_resources: dict[str, float] | None) -> int:
    """How many next tiles an inference task reads in the background (``--read-ahead``).

    By default 2 on GPU workers, where decoding the slide would otherwise leave the GPU idle
    between tiles, and 0 on CPU, where the network dwarfs the read and threads are better
    spent on it. Tiles run in submission order, so the next tiles are the likely next tasks.
    """
    if options.read_ahead is not None:
        return max(0, options.read_ahead)
    return 2 if gpu_resources else 0


def _ledger_params(plan: SlidePlan, spec: ModelSpec, options: RunOptions) -> dict[str, Any]:
    """What the cached parts depend on; anything else may change between a crash and a rerun."""
    return {
        "slide": plan.slide_path,
        "model": {k: v for k, v in spec.description.items() if k != "path"},  # sha256 decides
        "plan": plan.params,
        "tissue_tiles": [list(t) for t in plan.tissue_tiles],
    }
