"""Speed figures for ``hoverdask bench``: network throughput against the machine's matmul peak.

The network's work is counted analytically (2 x multiply-adds of every convolution, from the
layer shapes, on a shape-only "meta" forward), so GFLOP/s and utilisation do not depend on a
profiler. The fast PanNuke layout is ~298 GFLOP per 256x256 patch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hoverdask.model.infer import INFERENCE_MEMORY_FORMAT, resolve_device
from hoverdask.model.network import HoVerNet, patch_geometry

BENCH_MODE = "fast"
BENCH_TYPES = 6  # the PanNuke layout


def conv_gflop(mode: str = BENCH_MODE, nr_types: int | None = BENCH_TYPES, size: int = 0) -> float:
    """GFLOP (2 x MACs of every convolution) of one ``size`` x ``size`` patch."""
    size = size or patch_geometry(mode).input
    with torch.device("meta"):
        model = HoVerNet(mode, nr_types).eval()
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


def _best_seconds(step: Callable[[], None], sync: Callable[[], None], budget_s: float) -> float:
    """Fastest of repeated calls after one warm-up (oneDNN/cuDNN pick kernels on the first)."""
    step()
    sync()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 2 or spent < budget_s:
        start = time.perf_counter()
        step()
        sync()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
        if runs >= 50:
            break
    return best


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def matmul_peak_gflop_per_s(device: torch.device, budget_s: float = 2.0) -> float:
    """Best large-matmul rate: fp32 on CPU, bf16 on CUDA (what the network runs in there)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    seconds = _best_seconds(lambda: torch.mm(a, b), _sync_for(device), budget_s)
    return 2 * n**3 / seconds / 1e9


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
    utilisation: float
    mpix_per_s: float
    tried: list[dict[str, Any]]


_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def bench_model(
    device: str | torch.device = "auto",
    *,
    seconds: float = 20.0,
    batch_sizes: tuple[int, ...] | None = None,
    input_size: int = 0,
) -> dict[str, Any]:
    """Network throughput (output pixels/s, GFLOP/s) at the best batch size and memory layout.

    Times the fast PanNuke-layout network (random weights: speed does not depend on them) as
    ``predict_patches`` runs it: fp32 on CPU with all cores, bf16 autocast on CUDA. First the
    two memory layouts are compared at one batch size, then batch sizes with the faster layout.
    ``input_size`` (default 256) exists so that tests can run a tiny version.
    """
    target = resolve_device(device)
    cuda = target.type == "cuda"
    input_size = input_size or patch_geometry(BENCH_MODE).input
    output_size = input_size - 2 * patch_geometry(BENCH_MODE).margin
    sizes = batch_sizes or ((8, 16, 32, 64) if cuda else (1, 2, 4))
    threads_before = torch.get_num_threads()
    threads = torch.get_num_threads() if cuda else len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = HoVerNet(BENCH_MODE, BENCH_TYPES).eval().to(target)
    sync = _sync_for(target)
    budget = seconds / (len(_FORMATS) + len(sizes))
    tried: list[dict[str, Any]] = []

    def run(batch: int, layout: str) -> float:
        model.to(memory_format=_FORMATS[layout])
        x = torch.rand(batch, 3, input_size, input_size, device=target) * 255
        x = x.contiguous(memory_format=_FORMATS[layout])

        def step() -> None:
            with (
                torch.inference_mode(),
                torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda),
            ):
                model(x)

        best = _best_seconds(step, sync, budget)
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
        peak = matmul_peak_gflop_per_s(target)
    finally:
        torch.set_num_threads(threads_before)
    gflop = conv_gflop(BENCH_MODE, BENCH_TYPES, input_size)
    rate = gflop * batch / seconds_per_batch
    result = ModelBench(
        device=str(target),
        threads=threads,
        batch_size=batch,
        memory_format=layout,
        autocast=cuda,
        gflop_per_patch=gflop,
        seconds_per_batch=seconds_per_batch,
        gflop_per_s=rate,
        peak_gflop_per_s=peak,
        utilisation=rate / peak,
        mpix_per_s=batch * output_size**2 / seconds_per_batch / 1e6,
        tried=tried,
    )
    if layout != _layout_name(INFERENCE_MEMORY_FORMAT):
        result.tried.append(
            {"note": f"predict_patches uses {_layout_name(INFERENCE_MEMORY_FORMAT)}"}
        )
    return asdict(result)


def _layout_name(memory_format: torch.memory_format) -> str:
    return next(name for name, fmt in _FORMATS.items() if fmt == memory_format)


def bench_postproc(seconds: float = 3.0) -> dict[str, Any]:
    """Post-processing throughput, measured by :mod:`hoverdask.postproc` on a synthetic map."""
    from hoverdask.postproc import benchmark_mpix_per_s

    return {"mpix_per_s": benchmark_mpix_per_s(seconds=seconds), "method": "fast"}


def bench_end_to_end(model_path: str | None, device: str, size: int) -> dict[str, Any]:
    """A whole pipeline run on a synthetic ``size`` x ``size`` slide (:mod:`hoverdask.pipeline`).

    Without a checkpoint, a randomly initialised fast network is saved to a temporary file: the
    speed is that of a real model, but almost no nuclei are found, so post-processing is light.
    """
    import tempfile
    from pathlib import Path

    from hoverdask.model.checkpoints import save_checkpoint
    from hoverdask.pipeline import time_pipeline
    from hoverdask.pipeline.run import RunOptions

    random_weights = model_path is None
    with tempfile.TemporaryDirectory(prefix="hoverdask-bench-model-") as scratch:
        if model_path is None:
            torch.manual_seed(0)
            network = HoVerNet(BENCH_MODE, BENCH_TYPES)
            model_path = str(save_checkpoint(network, Path(scratch) / "random.tar"))
        options = RunOptions(device=device, autocast=device == "cuda")
        timing = time_pipeline(model_path, width=size, height=size, options=options)
    return {
        "mpix_per_s": timing.mpix_per_s,
        "megapixels": timing.megapixels,
        "seconds": timing.seconds,
        "nuclei": timing.nuclei,
        "random_weights": random_weights,
    }


def bench_all(
    device: str = "auto",
    *,
    seconds: float = 20.0,
    model_path: str | None = None,
    end_to_end_size: int = 1024,
) -> dict[str, Any]:
    """``{"model": ..., "postproc": ..., "end_to_end": ...}`` for ``hoverdask bench``."""
    target = resolve_device(device)
    results: dict[str, Any] = {"model": bench_model(target, seconds=seconds)}
    results["postproc"] = bench_postproc()
    if end_to_end_size > 0:
        results["end_to_end"] = bench_end_to_end(model_path, target.type, end_to_end_size)
    else:
        results["end_to_end"] = {"mpix_per_s": None, "skipped": "end-to-end size 0"}
    return results
