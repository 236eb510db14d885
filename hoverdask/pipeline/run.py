"""``run_cohort``: every slide of a cohort through one Dask workload, with resume and isolation.

Each slide is first planned by a task on a worker (opened, tiled, tissue tiles picked); when its
plan arrives the client submits the rest of its graph at once: map-tile inference (GPU workers
when there are any), then the post-processing passes (CPU), then one task that writes the
slide's files and ``run.json``. Slides go on without waiting for each other, so the GPU moves on
to the next slide while the CPUs finish the previous one; earlier slides get higher priority so
they also finish first. The client does no per-slide computing of its own, so workers are what
scale. A failing task fails its slide only: the slide is recorded in ``summary.csv`` and the
others go on.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoverdask.core.errors import HoverdaskError, SlideError, one_line
from hoverdask.core.types import select_type_table
from hoverdask.deploy.cluster import client_for, describe
from hoverdask.deploy.figures import latest_figures
from hoverdask.deploy.logs import LOG_NAME, dask_logs, worker_logging_env
from hoverdask.deploy.security import tls_security
from hoverdask.pipeline import outputs
from hoverdask.pipeline._graph import submit_slide
from hoverdask.pipeline._progress import CohortProgress
from hoverdask.pipeline.plan import PlanFailure, SlidePlan, plan_task
from hoverdask.pipeline.predictors import (
    PLUGIN_NAME,
    PredictorPlugin,
    TorchPredictorFactory,
)
from hoverdask.pipeline.spec import (
    NO_TISSUE_WARNING,
    ModelSpec,
    PredictorFactory,
    Region,
    RunOptions,
)
from hoverdask.pipeline.warmup import import_worker_modules, prepare_worker
from hoverdask.slide import open_slide

if TYPE_CHECKING:
    from distributed import Client, Future

@dataclass
class SlideResult:
    slide: str
    slide_id: str
    status: str
    nuclei: int = 0
    seconds: float = 0.0
    error: str = ""
    out_dir: str = ""
    outputs: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The cohort summary's row (``slide`` is the slide id, the output folder's name)."""
        return {"slide": self.slide_id, "status": self.status, "nuclei": self.nuclei,
                "seconds": self.seconds, "error": self.error, "outputs": self.outputs}


@dataclass
class CohortResult:
    out_dir: Path
    slides: list[SlideResult] = field(default_factory=list)

    @property
    def failed(self) -> list[SlideResult]:
        return [s for s in self.slides if s.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def resolve_model(
    model: str | Path | None,
    predictor_factory: PredictorFactory | None,
    options: RunOptions,
) -> ModelSpec:
    """Validate the checkpoint (or factory) on the client before any worker loads it."""
    if predictor_factory is None:
        from hoverdask.model.catalog import model_card
        from hoverdask.model.checkpoints import load_model, sha256_of
        from hoverdask.model.registry import entry_for_path, resolve_model_argument

        path = resolve_model_argument(model)
        network = load_model(path, "cpu")
        predictor_factory = TorchPredictorFactory(
            model_path=str(path.resolve()),
            device=options.device,
            batch_size=options.batch_size,
            autocast=options.autocast,
            autocast_dtype=options.autocast_dtype,
            compile=options.compile,
        )
        from hoverdask.model import patch_geometry

        geometry = patch_geometry(network.mode)
        type_table, why = select_type_table(network.nr_types, network.mode, network.metadata)
        card = model_card(network.metadata)
        official = entry_for_path(path)
        if official is not None:
            card = {"name": official.name, "licence": official.licence, **card}
        description = {"path": str(path.resolve()), "sha256": sha256_of(path),
                       "name": card.get("name", path.stem), "licence": card.get("licence"),
                       "mode": network.mode, "nr_types": network.nr_types,
                       "type_table": why}
        return ModelSpec(predictor_factory, geometry.output, geometry.margin, network.nr_types,
                         description, type_table)
    probe = predictor_factory()
    description = {"factory": repr(predictor_factory), "nr_types": probe.nr_types}
    return ModelSpec(predictor_factory, probe.output, probe.margin, probe.nr_types, description)


def run_security(
    ca: str | Path | None, cert: str | Path | None, key: str | Path | None
) -> object | None:
    """A TLS ``distributed.Security`` from the three PEM files, or None when none is given."""
    given = [p for p in (ca, cert, key) if p is not None]
    if not given:
        return None
    if len(given) != 3:
        raise HoverdaskError("TLS needs all three of --tls-ca, --tls-cert and --tls-key")

    return tls_security(ca, cert, key)  # type: ignore[arg-type]


def run_cohort(
    slides: Sequence[str | Path],
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    predictor_factory: PredictorFactory | None = None,
    client: Client | None = None,
    options: RunOptions | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    security: object | None = None,
    slurm: str | Path | None = None,
    progress: bool = True,
    log_file: bool = False,
    verbose: bool = True,
) -> CohortResult:
    """Segment every slide into ``out_dir``; one failed slide never stops the others.

    Give either ``model`` (a checkpoint path; each worker loads it once) or
    ``predictor_factory`` (any picklable callable returning a predictor). Without ``client`` a
    local cluster (or ``scheduler``, or the SLURM cluster of the config file ``slurm``, whose
    jobs are cancelled when the run ends) is started and closed here. ``log_file`` sends Dask's log
    records to ``out_dir/hoverdask.log`` once the inputs are checked; unless ``verbose`` the
    terminal then only gets their warnings and errors, one line each; a local cluster's
    workers log the same way (see :mod:`hoverdask.deploy.logs`).
    """
    options = options or RunOptions()
    if not slides:
        raise HoverdaskError("no slides given")
    out = Path(out_dir)
    if options.region is not None:
        check_region(options.region, slides, options.mpp)
    check_writable(out)
    if client is not None:
        # fire and forget: the workers import while this process checks the checkpoint
        client.run(prepare_worker, wait=False)
    spec = resolve_model(model, predictor_factory, options)

    logs = dask_logs(out, verbose=verbose) if log_file else contextlib.nullcontext()
    worker_env = worker_logging_env(out / LOG_NAME, verbose=verbose) if log_file else None
    with logs, client_for(client, workers, threads_per_worker, scheduler, options.device,  # type: ignore[arg-type]
                          security, worker_env=worker_env, slurm=slurm) as live:
        runner = _CohortRunner(live, out, spec, options, progress=progress)
        return runner.run([str(s) for s in slides])


def check_writable(out: Path) -> None:
    """Fail early, with one line, when the output folder cannot be made or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HoverdaskError(f"cannot create output folder {out}: {err}") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise HoverdaskError(f"cannot write to output folder {out}: {err}") from None


def check_region(region: Region, slides: Sequence[str | Path], mpp: float | None) -> None:
    """A region is one slide's rectangle: fail early (usage error) when it cannot be that.

    A slide that cannot be opened is left to planning, which records it as failed.
    """
    if len(slides) != 1:
        raise HoverdaskError(f"--region needs exactly one slide, got {len(slides)}")

    try:
        slide = open_slide(slides[0], mpp)
    except SlideError:
        return
    try:
        size = (int(slide.dimensions[0]), int(slide.dimensions[1]))
    finally:
        slide.close()
    region.check_inside(size, str(slides[0]))


@dataclass
class _SlideState:
    plan: SlidePlan
    futures: list[Future]
    final: Future
    started_at: float  # time.time() when the slide's plan was submitted


@dataclass
class _Pending:
    """A slide whose plan task has been submitted but whose graph has not."""

    slide: str
    index: int
    plan: Future
    staged_tissue: Path
    started_at: float


class _CohortRunner:
    """Plans every slide on the workers, then submits each slide's graph as its plan arrives.

    Plans are admitted in cohort order (so that of two slides with the same id, the first one
    listed wins, whatever order the plans finish in); the client itself only submits, keeps
    the score and rewrites the cohort summary.
    """

    def __init__(self, client: Client, out: Path, spec: ModelSpec, options: RunOptions,
                 *, progress: bool) -> None:
        self.client = client
        self.out = out
        self.spec = spec
        self.options = options
        self.progress = progress
        info = describe(client)
        self.worker_threads = info.worker_threads
        self.gpu_resources = {"GPU": 1} if info.has_gpus else None
        threads = max(info.threads.values())
        cap = getattr(client.cluster, "compute_threads", None)  # more workers than cores
        threads = min(threads, cap) if cap else threads
        client.register_plugin(PredictorPlugin(spec.factory, torch_threads=threads,
                                               gpu_cluster=info.has_gpus,
                                               prepare=import_worker_modules),
                               name=PLUGIN_NAME)
        self.results: dict[str, SlideResult] = {}
        self.order: list[str] = []
        self.summary = outputs.CohortSummary(out)
        self.states: dict[str, _SlideState] = {}

        self.bench = latest_figures()  # quoted in each run.json, to estimate cohort times
        self.token = uuid.uuid4().hex[:10]
        self.staging = out / f".plans-{self.token}"

    def run(self, slides: list[str]) -> CohortResult:
        from distributed import as_completed


        self.order = list(slides)
        self.staging.mkdir(parents=True, exist_ok=True)
        pending: list[_Pending] = []
        try:
            pending = [self._submit_plan(slide, index, len(slides))
                       for index, slide in enumerate(slides)]
            stream = as_completed([p.plan for p in pending])
            with CohortProgress(enabled=self.progress) as bar:
                self._drive(pending, stream, bar)
        except KeyboardInterrupt:
            self.client.cancel([p.plan for p in pending]
                               + [f for s in self.states.values() for f in s.futures])
            raise
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        return CohortResult(self.out, [self.results[s] for s in self.order])

    def _submit_plan(self, slide: str, index: int, count: int) -> _Pending:
        staged = self.staging / f"{index}.npz"
        started_at = time.time()
        future = self.client.submit(
            plan_task, slide, str(self.out), str(staged), key=f"plan-{index}-{self.token}",
            priority=count - index + 1, pure=False, retries=0, **self._plan_settings(),
        )
        return _Pending(slide, index, future, staged, started_at)

    def _plan_settings(self) -> dict[str, Any]:
        return {"mpp": self.options.mpp, "target_mpp": self.options.target_mpp,
                "chunk_size": self.options.chunk_size, "output": self.spec.output,
                "margin": self.spec.margin, "use_tissue_mask": self.options.tissue_mask,
                "type_table": self.spec.type_table, "region": self.options.region}

    def _drive(self, pending: list[_Pending], stream: Any, bar: Any) -> None:
        """Admit plans in cohort order as they arrive; follow each slide's tasks to its end."""
        states = self.states
        owner: dict[str, str] = {}
        seen_ids: dict[str, str] = {}
        live: set[str] = set()
        admitted = 0
        for future in stream:
            while admitted < len(pending) and pending[admitted].plan.done():
                state = self._admit(pending[admitted], seen_ids, bar, len(pending))
                admitted += 1
                if state is None:
                    continue
                slide = state.plan.slide_path
                states[slide] = state
                live.add(slide)
                owner.update({f.key: slide for f in state.futures})
                stream.update(state.futures)
            slide = owner.get(future.key)
            if slide not in live:
                continue
            state = states[slide]
            if future.status == "error":
                live.discard(slide)
                self._fail(state, future.exception())
                bar.finish(state.plan.slide_id, ok=False)
                continue
            bar.advance(state.plan.slide_id)
            if future.key == state.final.key:
                live.discard(slide)
                self._succeed(state, future.result())
                bar.finish(state.plan.slide_id, ok=True)

    def _admit(self, pending: _Pending, seen_ids: dict[str, str], bar: Any,
               count: int) -> _SlideState | None:
        """The slide's planned graph, submitted; None when it failed, is a duplicate or is done."""
        slide = pending.slide
        try:
            plan: SlidePlan | PlanFailure = pending.plan.result()
        except Exception as err:  # noqa: BLE001 - one bad slide must not stop the cohort
            return self._unplanned(pending, one_line(err))
        if isinstance(plan, PlanFailure):
            return self._unplanned(pending, plan.line)
        if plan.slide_id in seen_ids:
            return self._unplanned(pending, one_line(HoverdaskError(
                f"slide id {plan.slide_id!r} is also the id of {seen_ids[plan.slide_id]}")))
        seen_ids[plan.slide_id] = slide
        if plan.ledger.is_finished() and not self.options.overwrite:
            pending.staged_tissue.unlink(missing_ok=True)
            self._record(_finished_result(slide, plan))
            bar.skip(plan.slide_id)
            return None

        try:
            futures, final = submit_slide(
                self.client, plan, pending.staged_tissue, self.spec, self.options,
                priority=count - pending.index, gpu_resources=self.gpu_resources,
                started_at=pending.started_at, bench=self.bench,
                worker_threads=self._worker_threads(),
            )
        except Exception as err:  # noqa: BLE001 - e.g. an unwritable slide folder
            self._record(SlideResult(slide, plan.slide_id, "failed",
                                     error=one_line(err), out_dir=plan.slide_dir))
            return None
        bar.add_slide(plan.slide_id, len(futures))
        return _SlideState(plan, futures, final, pending.started_at)

    def _worker_threads(self) -> int:
        """The cluster's worker threads now (a SLURM cluster's grow as its jobs start)."""
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # noqa: BLE001 - only a figure of run.json: keep the last one
            return self.worker_threads
        threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        self.worker_threads = threads or self.worker_threads
        return self.worker_threads

    def _unplanned(self, pending: _Pending, line: str) -> None:
        """Record a slide that failed before its graph was submitted (no plan, or a duplicate)."""
        pending.staged_tissue.unlink(missing_ok=True)
        self._record(SlideResult(pending.slide, Path(pending.slide).stem, "failed", error=line))

    def _succeed(self, state: _SlideState, outcome: dict[str, Any]) -> None:
        seconds = time.time() - state.started_at
        plan = state.plan
        self._record(SlideResult(plan.slide_path, plan.slide_id, "ok",
                                 nuclei=int(outcome["nuclei"]), seconds=round(seconds, 3),
                                 error=_warning(plan, self.options),
                                 out_dir=plan.slide_dir, outputs=outcome.get("files", {})))

    def _fail(self, state: _SlideState, error: BaseException | None) -> None:
        self.client.cancel(state.futures)
        seconds = time.time() - state.started_at
        plan = state.plan
        self._record(SlideResult(plan.slide_path, plan.slide_id, "failed",
                                 seconds=round(seconds, 3), error=one_line(error),
                                 out_dir=plan.slide_dir))

    def _record(self, result: SlideResult) -> None:
        self.results[result.slide] = result
        rows = [self.results[s].row() for s in self.order if s in self.results]
        try:
            self.summary.write(rows)
        except OSError as err:
            raise HoverdaskError(f"cannot write the cohort summary in {self.out}: {err}") from None


def _finished_result(slide: str, plan: SlidePlan) -> SlideResult:
    record = plan.ledger.read_marker(plan.ledger.run_path) or {}
    counts = record.get("counts", {})
    return SlideResult(slide, plan.slide_id, "skipped", nuclei=int(counts.get("nuclei", 0)),
                       seconds=0.0, out_dir=plan.slide_dir,
                       error="finished earlier; --overwrite redoes it")


def _warning(plan: SlidePlan, options: RunOptions) -> str:
    """What a finished slide's row should still tell the user."""
    if options.tissue_mask and not plan.tissue_tiles:
        return NO_TISSUE_WARNING
    return ""
