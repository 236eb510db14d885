"""Time the real pipeline end to end on a synthetic slide (for ``hoverdask bench``).

The figure includes everything a user waits for: planning, tissue mask, reading, inference,
the three post-processing passes, features and writing the files, on the cluster given (or a
LocalCluster started for the measurement, whose start-up is not counted).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hoverdask.errors import HoverdaskError
from hoverdask.pipeline.predictors import PredictorFactory
from hoverdask.pipeline.run import RunOptions, run_cohort

if TYPE_CHECKING:
    from distributed import Client


@dataclass(frozen=True)
class PipelineTiming:
    megapixels: float  # processing-resolution pixels of the slide, in millions
    seconds: float
    nuclei: int

    @property
    def mpix_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else float("inf")


def time_pipeline(
    model: str | Path | None = None,
    *,
    width: int = 2048,
    height: int = 2048,
    predictor_factory: PredictorFactory | None = None,
    client: Client | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    options: RunOptions | None = None,
    seed: int = 0,
) -> PipelineTiming:
    """Write a ``width`` x ``height`` synthetic slide at 0.25 µm/px and time one full run."""
    from hoverdask.synth import write_synthetic_slide

    options = options or RunOptions()
    scratch = Path(tempfile.mkdtemp(prefix="hoverdask-bench-"))
    owned = None
    try:
        slide = scratch / "bench.svs"
        write_synthetic_slide(slide, width, height, mpp=0.25, seed=seed, keep_instances=False)
        if client is None:
            from hoverdask.cluster import make_client

            owned = client = make_client(workers, threads_per_worker,
                                         device=options.device,  # type: ignore[arg-type]
                                         quiet=True, dashboard=False)
        start = time.perf_counter()
        result = run_cohort([slide], scratch / "out", model=model,
                            predictor_factory=predictor_factory, client=client,
                            options=options, progress=False)
        seconds = time.perf_counter() - start
        outcome = result.slides[0]
        if outcome.status != "ok":
            raise HoverdaskError(f"the benchmark run failed: {outcome.error}")
        return PipelineTiming(width * height * (0.25 / options.target_mpp) ** 2 / 1e6, seconds,
                              outcome.nuclei)
    finally:
        if owned is not None:
            cluster = owned.cluster
            owned.close()
            if cluster is not None:
                cluster.close()
        shutil.rmtree(scratch, ignore_errors=True)


def end_to_end_mpix_per_s(model: str | Path | None = None, **kwargs: object) -> float:
    """Megapixels (at processing resolution) per second of a whole run; see :func:`time_pipeline`."""
    return time_pipeline(model, **kwargs).mpix_per_s  # type: ignore[arg-type]
