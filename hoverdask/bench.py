"""Speed figures for ``hoverdask bench``: network throughput against the machine's matmul peak.

The model measured is the one ``run`` would use (the bundled default unless ``--model``); fast
HoVer-Net with random weights is measured in the same run beside it (``reference_fast``).
The network's work is counted analytically (2 x multiply-adds of every convolution, from the
layer shapes, on a shape-only "meta" forward), so GFLOP/s and utilisation do not depend on a
profiler. The fast PanNuke layout is ~298 GFLOP per 256x256 patch (11.1 MFLOP per output pixel).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hoverdask.core.errors import HoverdaskError
from hoverdask.deploy.figures import (  # noqa: F401 - re-exported: the bench figures API
    latest_figures,
    latest_figures_path,
    remember_figures,
)
from hoverdask.model.build import Network
from hoverdask.model.geometry import patch_geometry
from hoverdask.model.infer import (
    INFERENCE_MEMORY_FORMAT,
    autocast_dtype_on,
    cpu_has_native_bfloat16,
    inference_network,
    resolve_device,
)
from hoverdask.model.network import HoVerNet

BENCH_MODE = "fast"
BENCH_TYPES = 6  # the PanNuke layout


def conv_gflop(
    mode: str = BENCH_MODE,
    nr_types: int | None = BENCH_TYPES,
    size: int = 0,
    *,
    network: Network | None = None,
) -> float:
    """GFLOP (2 x MACs of every convolution) of one ``size`` x ``size`` patch of ``network``
    (default: a HoVer-Net of ``mode`` and ``nr_types``)."""
    if network is not None:
        mode = network.mode
        model = copy.deepcopy(network).to("meta").eval()
    else:
        with torch.device("meta"):
            model = HoVerNet(mode, nr_types).eval()
    size = size or patch_geometry(mode).input
    total = 0

    def count(module: torch.nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += 2 * output.numel() * kh * kw * (module.in_channels // module.groups)

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    return total / 1e9


def mflop_per_output_pixel(network: Network) -> float:
    """MFLOP per output pixel of a patch of the network's geometry (its margin included)."""
    geometry = patch_geometry(network.mode)
    return conv_gflop(network=network) * 1e3 / geometry.output**2


def _best_seconds(
    step: Callable[[], None],
    sync: Callable[[], None],
    budget_s: float,
    between: Callable[[], None] = lambda: None,
) -> float:
    """Fastest of repeated calls after one warm-up (oneDNN/cuDNN pick kernels on the first).

    ``between`` runs, untimed, after every timed call (the matmul peak, so that it samples the
    same moments of machine load as the network).
    """
    step()
    sync()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 2 or spent < budget_s:
        start = time.perf_counter()
        step()
        sync()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
        between()
        if runs >= 50:
            break
    return best


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class MatmulPeak:
    """Best matrix-multiply rate seen so far, fp32 on CPU, bf16 on CUDA (what the network runs).

    A large product is timed twice, through the BLAS (``torch.mm``) and as a 1x1 convolution
    through the convolution library the network uses (oneDNN/cuDNN): on CPU oneDNN's GEMM is
    often much faster than the BLAS's, and the peak is the faster of the two.
    :meth:`sample` times a few products; calling it between the network's runs makes the peak
    and the network's best see the same machine (other processes on shared cores slow both).
    """

    def __init__(self, device: torch.device) -> None:
        n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
        side = 64  # the convolution's GEMM: (side^2 x n) @ (n x n), n/2 channels on CPU
        channels = n // 2 if device.type == "cpu" else n
        a = torch.rand(n, n, device=device, dtype=dtype)
        b = torch.rand(n, n, device=device, dtype=dtype)
        conv = torch.nn.Conv2d(channels, channels, 1, bias=False).to(device, dtype)
        conv = conv.to(memory_format=torch.channels_last).requires_grad_(False)
        x = torch.rand(1, channels, side, side, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        self._products = {
            "mm": (lambda: torch.mm(a, b), 2 * n**3),
            "conv1x1": (lambda: conv(x), 2 * side * side * channels**2),
        }
        self._sync = _sync_for(device)
        self.best: dict[str, float] = dict.fromkeys(self._products, 0.0)

    def sample(self, budget_s: float = 0.0) -> None:
        for name, (product, flop) in self._products.items():
            seconds = _best_seconds(product, self._sync, budget_s / len(self._products))
            self.best[name] = max(self.best[name], flop / seconds / 1e9)

    @property
    def gflop_per_s(self) -> float:
        return max(self.best.values())


def matmul_peak_gflop_per_s(device: torch.device, budget_s: float = 2.0) -> float:
    """Best large-matmul rate within ``budget_s`` (see :class:`MatmulPeak`)."""
    peak = MatmulPeak(device)
    peak.sample(budget_s)
    return peak.gflop_per_s


@dataclass(frozen=True)
class ModelBench:
    device: str
    threads: int
    batch_size: int
    memory_format: str
    autocast: bool
    gflop_per_patch: float
    seconds_per_batch: float
    gflop_per_s: float
    peak_gflop_per_s: float
    peak_by_product: dict[str, float]
    utilisation: float
    mpix_per_s: float  # output pixels (the patch less its margin)
    tried: list[dict[str, Any]]
    mode: str
    nr_types: int | None
    mflop_per_px: float  # per output pixel


_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def bench_model(
    device: str | torch.device = "auto",
    *,
    seconds: float = 20.0,
    batch_sizes: tuple[int, ...] | None = None,
    input_size: int = 0,
    network: Network | None = None,
    autocast: bool | None = None,
) -> dict[str, Any]:
    """Network throughput (output pixels/s, GFLOP/s) at the best batch size and memory layout.

    ``autocast`` (default: on CUDA only) runs the network in bfloat16 as ``run --autocast``
    does; on a CPU without bfloat16 in hardware that is fp32 (:func:`autocast_dtype_on`).

    Times ``network`` (default: the fast PanNuke-layout network with random weights: speed does
    not depend on them) as ``predict_patches`` runs it: fp32 on CPU with all cores (its inference copy), bf16
    autocast on CUDA. The matmul peak is sampled between the network's runs, so both see the
    same machine load. First the
    two memory layouts are compared at one batch size, then batch sizes with the faster layout.
    ``input_size`` (default 256) exists so that tests can run a tiny version.
    """
    target = resolve_device(device)
    cuda = target.type == "cuda"
    low = autocast_dtype_on(target, torch.bfloat16 if (cuda if autocast is None else autocast)
                            else None)
    mode = network.mode if network is not None else BENCH_MODE
    input_size = input_size or patch_geometry(mode).input
    output_size = input_size - 2 * patch_geometry(mode).margin
    sizes = batch_sizes or ((8, 16, 32, 64) if cuda else (1, 2, 4))
    threads_before = torch.get_num_threads()
    threads = torch.get_num_threads() if cuda else len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    measured = network if network is not None else HoVerNet(BENCH_MODE, BENCH_TYPES)
    model = measured.eval().to(target)
    if not cuda:  # what predict_patches runs there
        model = inference_network(model, target, low)
    sync = _sync_for(target)
    peak = MatmulPeak(target)
    budget = seconds / (len(_FORMATS) + len(sizes))
    tried: list[dict[str, Any]] = []

    def run(batch: int, layout: str) -> float:
        model.to(memory_format=_FORMATS[layout])
        x = torch.rand(batch, 3, input_size, input_size, device=target) * 255
        x = x.contiguous(memory_format=_FORMATS[layout])

        def step() -> None:
            with (
                torch.inference_mode(),
                torch.autocast(target.type, dtype=low or torch.bfloat16, enabled=low is not None),
            ):
                model(x)

        best = _best_seconds(step, sync, budget, between=peak.sample)
        tried.append({"batch_size": batch, "memory_format": layout, "seconds": best})
        return best

    try:
        probe = sizes[len(sizes) // 2]
        layout = min(_FORMATS, key=lambda name: run(probe, name) / probe)
        timings = {probe: next(t["seconds"] for t in tried if t["memory_format"] == layout)}
        for batch in sizes:
            if batch not in timings:
                timings[batch] = run(batch, layout)
        batch = min(timings, key=lambda b: timings[b] / b)
        seconds_per_batch = timings[batch]
        peak.sample(budget_s=2.0)
    finally:
        torch.set_num_threads(threads_before)
    gflop = conv_gflop(size=input_size, network=measured)
    rate = gflop * batch / seconds_per_batch
    result = ModelBench(
        device=str(target),
        threads=threads,
        batch_size=batch,
        memory_format=layout,
        autocast=low is not None,
        gflop_per_patch=gflop,
        seconds_per_batch=seconds_per_batch,
        gflop_per_s=rate,
        peak_gflop_per_s=peak.gflop_per_s,
        peak_by_product=dict(peak.best),
        utilisation=rate / peak.gflop_per_s,
        mpix_per_s=batch * output_size**2 / seconds_per_batch / 1e6,
        tried=tried,
        mode=mode,
        nr_types=measured.nr_types,
        mflop_per_px=gflop * 1e3 / output_size**2,
    )
    if layout != _layout_name(INFERENCE_MEMORY_FORMAT):
        result.tried.append(
            {"note": f"predict_patches uses {_layout_name(INFERENCE_MEMORY_FORMAT)}"}
        )
    return asdict(result)


def _layout_name(memory_format: torch.memory_format) -> str:
    return next(name for name, fmt in _FORMATS.items() if fmt == memory_format)


def bench_postproc(seconds: float = 3.0) -> dict[str, Any]:
    """Post-processing throughput: :func:`benchmark_mpix_per_s` of the fast method (one tile),
    and ``run_mpix_per_s_per_core``, :func:`run_postproc_mpix_per_core`."""
    return {"mpix_per_s": benchmark_mpix_per_s(seconds=seconds), "method": "fast",
            "run_mpix_per_s_per_core": run_postproc_mpix_per_core()}


def run_postproc_mpix_per_core(size: int = 2048) -> float:
    """Megapixels per CPU second of what ``run`` does after inference, on a synthetic ``size``²
    map: passes 1-3 with the default chunk size (seam-stable, the slide's nuclei) and their
    features. CPU seconds of this process, so the figure is per core whatever the threads.
    The synthetic map is crowded (~1,700 nuclei per Mpx, three times the parity fixture's), and
    the cost grows with the nuclei: real tissue usually runs faster. The compiled kernels are
    loaded (or compiled) before the clock starts, as a worker does once."""
    import dask
    import numpy as np

    from hoverdask.nuclei.compiled import warm
    from hoverdask.nuclei.features import measure
    from hoverdask.pipeline.local import nuclei_from_maps
    from hoverdask.pipeline.spec import DEFAULT_CHUNK_SIZE
    from hoverdask.slide.synthetic import synthetic_pred_map

    maps = synthetic_pred_map(size, size, nr_types=6, seed=0)
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    warm()
    with dask.config.set(scheduler="synchronous"):
        start = time.process_time()
        measure(nuclei_from_maps(maps, DEFAULT_CHUNK_SIZE, nr_types=6), rgb, 0.25)
        seconds = time.process_time() - start
    return size * size / 1e6 / seconds


SYNTHETIC_GLASS_FRACTION = 0.25  # share of the synthetic slide that is empty glass


def bench_end_to_end(
    model_path: str | None,
    device: str,
    size: int,
    *,
    glass_fraction: float = SYNTHETIC_GLASS_FRACTION,
    predictor_factory: Any = None,
    client: Any = None,
    chunk_size: int | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """A whole pipeline run on a synthetic ``size`` x ``size`` slide at 0.25 µm/px.

    Only map tiles that hold tissue are segmented, so two rates are given: ``mpix_per_s`` counts
    the processed (tissue tile) pixels, comparable with the network's output rate, and
    ``slide_mpix_per_s`` the whole slide, which depends on how much of it is glass:
    ``glass_fraction`` of the synthetic picture is glass, ``tissue_mask_fraction`` is what the
    tissue mask found and ``tissue_fraction`` the share of pixels predicted (tissue tiles less
    their glass patches).
    ``seconds_per_mm2`` is per mm² processed. ``breakdown`` is the run's, from its ``run.json``
    (:mod:`hoverdask.pipeline.breakdown`: seconds per mm² of tissue and each stage's share).
    Without a checkpoint a randomly initialised fast network is used: the speed is a real
    model's, but almost no nuclei are found, so post-processing is light. With one (the bundled
    model by default in ``hoverdask bench``) the synthetic nuclei are found and post-processed. Everything
    ``run_cohort`` does is timed (its plan task included); the cluster's start-up and the plan
    made here beforehand, only to count the processed pixels, are not.
    """
    import tempfile

    from hoverdask.model.checkpoints import save_checkpoint
    from hoverdask.pipeline.plan import plan_slide
    from hoverdask.pipeline.run import RunOptions, run_cohort
    from hoverdask.slide.synthetic import write_synthetic_slide

    options = RunOptions(device=device, autocast=device == "cuda")
    if chunk_size is not None:
        options = replace(options, chunk_size=chunk_size)
    random_weights = model_path is None and predictor_factory is None
    if mode is None:  # the checkpoint's, unless the caller has it loaded already
        mode = BENCH_MODE if model_path is None else _mode_of(model_path)
    geometry = patch_geometry(mode)
    with tempfile.TemporaryDirectory(prefix="hoverdask-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        if random_weights:
            torch.manual_seed(0)
            model_path = str(save_checkpoint(HoVerNet(BENCH_MODE, BENCH_TYPES), scratch / "m.tar"))
        slide = scratch / "bench.svs"
        write_synthetic_slide(slide, size, size, mpp=0.25, seed=0, keep_instances=False,
                              background_fraction=glass_fraction)
        plan, _ = plan_slide(str(slide), scratch / "plan", mpp=None,
                             target_mpp=options.target_mpp, chunk_size=options.chunk_size,
                             output=geometry.output, margin=geometry.margin)
        processed = plan.processed_pixels
        slide_px = plan.grid.height * plan.grid.width
        with ExitStack() as cleanup:
            if client is None:  # a local cluster for the measurement; its start is not timed
                from hoverdask.deploy.cluster import make_client
                from hoverdask.deploy.logs import LOG_NAME, dask_logs, worker_logging_env

                cleanup.enter_context(dask_logs(scratch))  # Dask's INFO lines off the terminal
                client = make_client(device=device, quiet=True, dashboard=False,  # type: ignore[arg-type]
                                     worker_env=worker_logging_env(scratch / LOG_NAME))
                if client.cluster is not None:
                    cleanup.callback(client.cluster.close)
                cleanup.callback(client.close)  # runs first
            start = time.perf_counter()
            result = run_cohort([slide], scratch / "out", model=model_path,
                                predictor_factory=predictor_factory, client=client,
                                options=options, progress=False)
            seconds = time.perf_counter() - start
        record = _read_run_record(scratch / "out" / plan.slide_id / "run.json")
    outcome = result.slides[0]
    if outcome.status != "ok":
        raise HoverdaskError(f"the end-to-end benchmark run failed: {outcome.error}")
    mm2_per_px = (options.target_mpp / 1000) ** 2
    return {
        "mpix_per_s": processed / 1e6 / seconds,
        "slide_mpix_per_s": slide_px / 1e6 / seconds,
        "processed_megapixels": processed / 1e6,
        "slide_megapixels": slide_px / 1e6,
        "tissue_fraction": processed / slide_px,
        "tissue_mask_fraction": (plan.tissue_mm2 or 0.0) / (slide_px * mm2_per_px),
        "synthetic_glass_fraction": glass_fraction,
        "seconds_per_mm2": seconds / (processed * mm2_per_px) if processed else None,
        "s_per_mm2": seconds / (processed * mm2_per_px) if processed else None,
        "map_tiles": plan.grid.shape[0] * plan.grid.shape[1],
        "tissue_tiles": len(plan.tissue_tiles),
        "patches_run": plan.params["patches_run"],  # patches of the tissue tiles meeting tissue
        "patches_total": plan.params["patches_total"],
        "chunk_size": options.chunk_size,
        "seconds": seconds,
        "nuclei": outcome.nuclei,
        "random_weights": random_weights,
        "inference_busy_fraction": record.get("inference_busy_fraction"),
        "breakdown": record.get("breakdown"),  # run.json's: where the run's time went
    }


def _mode_of(model_path: str) -> str:
    from hoverdask.model.checkpoints import load_model

    return load_model(model_path).mode


def _read_run_record(run_json: Path) -> dict[str, Any]:
    import json

    try:
        record = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def bench_all(
    device: str = "auto",
    *,
    seconds: float = 20.0,
    model_path: str | None = None,
    end_to_end_size: int = 1024,
    remember: bool = True,
) -> dict[str, Any]:
    """``{"model": ..., "reference_fast": ..., "postproc": ..., "end_to_end": ...}``.

    ``model`` is the network ``run`` would use (``model_path``, else the bundled default),
    ``reference_fast`` fast HoVer-Net with random weights in the same run (half the time
    budget each), ``end_to_end`` a pipeline run of ``model`` on a synthetic slide.
    With ``remember`` the figures are also kept as the machine's latest (:func:`latest_figures`),
    so that later runs can record them in their ``run.json``.
    """
    from hoverdask.model.catalog import default_model_path, model_card
    from hoverdask.model.checkpoints import load_model

    target = resolve_device(device)
    model_path = model_path or str(default_model_path())
    network = load_model(model_path)
    results: dict[str, Any] = {
        "model": {**bench_model(target, seconds=seconds / 2, network=network),
                  "path": model_path, "name": model_card(network.metadata).get("name")},
        "reference_fast": bench_model(target, seconds=seconds / 2),
    }
    if target.type == "cpu" and cpu_has_native_bfloat16():  # what `run --autocast` gets here
        results["model_autocast"] = bench_model(target, seconds=seconds / 4, network=network,
                                                autocast=True)
    results["postproc"] = bench_postproc()
    if end_to_end_size > 0:
        # at least 2 x 2 map tiles, so that every CPU worker (one thread each) has one: with the
        # default chunk a small slide is one tile, run by one worker on one core
        from hoverdask.pipeline.spec import RunOptions

        output = patch_geometry(network.mode).output
        chunk = min(RunOptions().chunk_size, max(output, end_to_end_size // 2))
        results["end_to_end"] = bench_end_to_end(model_path, target.type, end_to_end_size,
                                                 chunk_size=chunk, mode=network.mode)
    else:
        results["end_to_end"] = {"mpix_per_s": None, "skipped": "end-to-end size 0"}
    results["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    if remember:
        remember_figures(results)
    return results


def bench_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) rows of the ``hoverdask bench`` table."""
    m, e2e = results["model"], results["end_to_end"]
    rows = [("model", f"{m.get('name') or m.get('path', '')} ({m.get('mode', BENCH_MODE)})")]
    if "mflop_per_px" in m:
        rows.append(("network MFLOP per output pixel", f"{m['mflop_per_px']:.3f}"))
    rows += [
        ("network GFLOP/s", f"{m['gflop_per_s']:.1f}"),
        ("matmul peak GFLOP/s (same run)", f"{m['peak_gflop_per_s']:.1f}"),
        ("utilisation", f"{m['utilisation']:.1%}"),
        ("network output Mpx/s", f"{m['mpix_per_s']:.4f}"),
        *([("network output Mpx/s, --autocast (bfloat16)",
            f"{results['model_autocast']['mpix_per_s']:.4f}")]
          if "model_autocast" in results else []),
        ("best batch / layout", f"{m['batch_size']} / {m['memory_format']}"),
        ("post-processing Mpx/s (one tile, fast method)",
         f"{results['postproc']['mpix_per_s']:.2f}"),
        *([("post-processing Mpx/s per core, as run (passes 1-3 + features)",
            f"{results['postproc']['run_mpix_per_s_per_core']:.2f}")]
          if "run_mpix_per_s_per_core" in results["postproc"] else []),
    ]
    fast = results.get("reference_fast")
    if fast is not None:
        rows += [
            ("fast HoVer-Net output Mpx/s (same run)", f"{fast['mpix_per_s']:.4f}"),
            ("fast HoVer-Net MFLOP per output pixel", f"{fast['mflop_per_px']:.2f}"),
        ]
    if e2e.get("mpix_per_s") is None:
        return [*rows, ("end-to-end", "skipped")]
    return [*rows, *_e2e_rows(e2e), *breakdown_rows(e2e.get("breakdown"))]


def _e2e_rows(e2e: dict[str, Any]) -> list[tuple[str, str]]:
    per_mm2 = e2e["seconds_per_mm2"]
    busy = e2e.get("inference_busy_fraction")
    return [
        ("end-to-end Mpx/s, processed (tissue tiles)", f"{e2e['mpix_per_s']:.4f}"),
        ("end-to-end Mpx/s, whole slide", f"{e2e['slide_mpix_per_s']:.4f}"),
        ("tissue fraction processed / glass in slide",
         f"{e2e['tissue_fraction']:.0%} / {e2e['synthetic_glass_fraction']:.0%}"),
        ("end-to-end s per processed mm²", "n/a" if per_mm2 is None else f"{per_mm2:.1f}"),
        ("predictor busy during inference", "n/a" if busy is None else f"{busy:.0%}"),
    ]


def breakdown_rows(breakdown: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Rows of the end-to-end run's time breakdown (none for figures without one)."""
    from hoverdask.pipeline.breakdown import POSTPROCESS_STAGES

    if not breakdown:
        return []
    per_mm2 = breakdown.get("s_per_mm2")
    rows = [("end-to-end s per tissue mm²", "n/a" if per_mm2 is None else f"{per_mm2:.1f}")]
    shares = breakdown.get("shares")
    if not shares:
        return rows
    threads = breakdown.get("worker_threads")
    groups = [
        ("inference", ("inference",)),
        ("post-processing (passes 1-3, refit, their map reads)", POSTPROCESS_STAGES),
        ("features", ("features",)),
        ("writing the files", ("writing",)),
        ("overhead (scheduling, waiting)", ("overhead",)),
    ]
    for label, stages in groups:
        share = sum(shares.get(stage, 0.0) for stage in stages)
        rows.append((f"share of wall x {threads} threads: {label}", f"{share:.1%}"))
    return rows


def benchmark_mpix_per_s(seconds: float = 3.0, size: int = 2048) -> float:
    """Megapixels per second of ``process(..., method="fast")`` on a synthetic ``size``² map.

    Runs at least once and until ``seconds`` have passed; map building is not timed.
    """
    from hoverdask.nuclei.postproc import process
    from hoverdask.slide.synthetic import synthetic_pred_map

    pred_map = synthetic_pred_map(size, size, nr_types=6, seed=0)
    runs, elapsed = 0, 0.0
    while runs == 0 or elapsed < seconds:
        start = time.perf_counter()
        process(pred_map, nr_types=6, method="fast")
        elapsed += time.perf_counter() - start
        runs += 1
    return runs * size * size / 1e6 / elapsed
