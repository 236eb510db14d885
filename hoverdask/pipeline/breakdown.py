"""Where a slide's time went: the ``"breakdown"`` of ``run.json`` and of ``hoverdask bench``.

Every stage measures its own seconds inside its tasks (``time.perf_counter`` on the worker), so
the figures mean the same on any cluster. :func:`breakdown` turns them into shares:

* ``stages_s``: the summed task seconds of each stage in this run (work committed by an
  earlier, interrupted run and resumed from the ledger counts 0):

  - ``plan``: the plan task (open, check, tile the slide, tissue mask);
  - ``read``, ``inference``, ``maps_write``: the inference tiles' slide read, network and map
    cache write;
  - ``pass1_hv_ranges``: pass 1 (merging the tile markers' ranges: no reads of its own);
  - ``pass2_read``, ``pass2_sobel``: pass 2's map-window read and its Sobel ranges;
  - ``pass3_read``, ``pass3_segment``: pass 3's map-window read and its segmentation;
  - ``features``: pass 3's nucleus features (with its RGB read) and Parquet part;
  - ``oversized``: the refit of clusters no block could hold (0 when there are none);
  - ``writing``: the slide's output files (Parquet, QuPath, stats, QC picture).

* ``shares``: each stage's seconds over ``wall_s * worker_threads``, the thread-seconds the
  cluster had while the slide ran (``wall_s`` from the slide's plan task being submitted to its
  ``run.json`` being written). ``overhead`` is what is left: scheduling, transfers, the
  client, threads waiting for the work they depend on (a thread idle while the last blocks
  finish counts here), clipped at 0. The shares sum to 1 unless the stages alone exceed it
  (workers that joined while the slide ran, beyond the threads counted when its graph was
  submitted). When several slides run at once their tasks overlap in time, so a slide's
  ``overhead`` also holds the other slides' work: the shares of a one-slide run are the ones
  that describe the pipeline.

* ``s_per_mm2``: wall seconds per mm² of tissue (the tissue mask's area; None without a mask);
  ``processed_mm2`` is the area the network ran on (tissue tiles less their glass patches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STAGES: tuple[str, ...] = (
    "plan",
    "read",
    "inference",
    "maps_write",
    "pass1_hv_ranges",
    "pass2_read",
    "pass2_sobel",
    "pass3_read",
    "pass3_segment",
    "features",
    "oversized",
    "writing",
)

POSTPROCESS_STAGES: tuple[str, ...] = (
    "pass1_hv_ranges", "pass2_read", "pass2_sobel", "pass3_read", "pass3_segment", "oversized",
)


def breakdown(
    stages_s: Mapping[str, float],
    *,
    wall_s: float,
    worker_threads: int | None,
    tissue_mm2: float | None,
    processed_mm2: float,
) -> dict[str, Any]:
    """The ``"breakdown"`` dict of ``run.json`` (see the module's docstring).

    ``stages_s`` names stages of :data:`STAGES` (a missing one is 0; an unknown one is an
    error; seconds are rounded to 0.1 ms). Without a known number of worker threads (or wall
    time) the shares are None.
    """
    unknown = set(stages_s) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages: {sorted(unknown)}")
    seconds = {name: round(max(0.0, float(stages_s.get(name, 0.0))), 4) for name in STAGES}
    capacity = wall_s * worker_threads if worker_threads else 0.0
    shares: dict[str, float] | None = None
    if capacity > 0:
        shares = {name: value / capacity for name, value in seconds.items()}
        shares["overhead"] = max(0.0, 1.0 - sum(shares.values()))
    return {
        "wall_s": float(wall_s),
        "tissue_mm2": tissue_mm2,
        "processed_mm2": float(processed_mm2),
        "s_per_mm2": wall_s / tissue_mm2 if tissue_mm2 else None,
        "worker_threads": worker_threads,
        "stages_s": seconds,
        "shares": shares,
    }

