"""Device-side inference helpers: batch size from free memory, staged batches, precision drift.

:class:`StagedPatchRunner` splits a batch into submit (stage on the host, upload, launch the
network, start the download) and collect (wait, hand back the maps), so a caller that submits batch
i+1 before collecting batch i keeps the GPU busy while the host stages and unpacks. On CUDA the
uploads and downloads run on their own streams through reused pinned buffers; on CPU the very same
steps run in order, which is what makes the staging testable without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hoverdask.model.infer import (
    _check_patches,
    autocast_dtype_on,
    forward_maps,
    inference_network,
    layout_network,
    network_input,
    parse_autocast_dtype,
    ready_on,
    resolve_device,
)

log = logging.getLogger(__name__)

# On CPU one patch per network call is fastest: its feature maps stay in cache. Measured on a
# 2-core Xeon, one 1792 px tile on one thread: lite 0.354 Mpx/s at batch 1 against 0.303 at 8
# (bfloat16 0.97 against 0.76); fast HoVer-Net 0.0136 against 0.0125.
CPU_BATCH_SIZE = 1


# --- batch size from free memory -----------------------------------------------------------------


def choose_batch_size(
    free_bytes: float, bytes_per_patch: float, *, reserve_fraction: float = 0.2, max_batch: int = 64
) -> int:
    """The largest batch whose patches fit in ``free_bytes`` less a reserve, within 1..max_batch.

    The reserve absorbs what one probe cannot see: allocator fragmentation, workspaces that grow
    with the batch, other processes on the same GPU. Out-of-memory halving remains the safety net.
    """
    if not 0 <= reserve_fraction < 1:
        raise ValueError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    if bytes_per_patch <= 0 or max_batch < 1:
        raise ValueError(f"need bytes_per_patch > 0 and max_batch >= 1, got "
                         f"{bytes_per_patch}, {max_batch}")
    usable = max(0.0, free_bytes) * (1 - reserve_fraction)
    return int(min(max_batch, max(1, math.floor(usable / bytes_per_patch))))


def memory_per_patch(small: tuple[int, int], large: tuple[int, int]) -> tuple[float, float]:
    """(fixed bytes, bytes per patch) from two ``(batch, peak bytes above baseline)`` probes.

    Two points separate what grows with the batch from what does not (workspaces, rounding); if the
    peaks do not grow (a cache hit, say) the whole larger peak is charged to its patches instead.
    """
    (n_small, peak_small), (n_large, peak_large) = small, large
    if n_large <= n_small:
        raise ValueError(f"the second probe must be larger: {n_small} then {n_large}")
    slope = (peak_large - peak_small) / (n_large - n_small)
    if slope <= 0:
        return 0.0, peak_large / n_large
    return max(0.0, peak_small - slope * n_small), slope


def probe_batch_size(
    run_batch: Callable[[int], None],
    device: torch.device,
    *,
    reserve_fraction: float = 0.2,
    max_batch: int = 64,
    probes: tuple[int, int] = (1, 3),
) -> int:
    """Measure the peak memory of two small batches on ``device`` and fit the largest batch.

    Free memory is what the driver reports plus what PyTorch's allocator holds but does not use.
    """
    peaks = []
    for size in probes:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run_batch(size)
        torch.cuda.synchronize(device)
        peaks.append((size, torch.cuda.max_memory_allocated(device) - baseline))
    fixed, per_patch = memory_per_patch(peaks[0], peaks[1])
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return choose_batch_size(free + cached - fixed, per_patch, reserve_fraction=reserve_fraction,
                             max_batch=max_batch)


# --- staged batches ------------------------------------------------------------------------------


@dataclass
class PendingBatch:
    """A submitted batch: its buffers stay out of the pool until it is collected."""

    staged: torch.Tensor
    maps: torch.Tensor
    rows: int
    done: torch.cuda.Event | None


class _BufferPool:
    """Host buffers reused across batches (pinned on CUDA, since pinning memory is slow).

    Locked: a worker with several threads may run two tiles through one runner at once.
    """

    def __init__(self, pin: bool, keep: int) -> None:
        self.pin, self.keep = pin, keep
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self.lock:
            for index, buffer in enumerate(self.free):
                if buffer.dtype == dtype and buffer.shape[1:] == shape and buffer.shape[0] >= rows:
                    return self.free.pop(index)
        return torch.empty((rows, *shape), dtype=dtype, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        with self.lock:
            self.free.append(buffer)
            self.free.sort(key=lambda b: b.shape[0])  # smallest fitting buffer first
            del self.free[: max(0, len(self.free) - self.keep)]


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _recorded(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


class StagedPatchRunner:
    """Runs uint8 NHWC patch batches through a HoVer-Net, one stage per stream on CUDA.

    ``submit`` copies the batch into a pinned buffer, uploads it on the upload stream, queues the
    network on the compute stream after the upload, and queues the download of the maps into a
    pinned buffer on the download stream after the network; it returns without waiting. ``collect``
    waits for that download and returns the maps as a new float32 array. Batch i+1's upload thus
    overlaps batch i's compute, and batch i-1's download overlaps both. On CPU the streams are
    absent and the same steps run in order, giving exactly :func:`predict_patches`'s maps.

    ``compile`` wraps the network in ``torch.compile`` on CUDA only. On CPU it was measured on the
    plain network (2 cores): ~3 min of start-up for each new batch shape against ~10 % per batch,
    and the fused CPU form (oneDNN operators called per layer shape) exceeds dynamo's recompile
    limit. On CUDA the first batch shape compiles, the next one recompiles with a dynamic batch
    dimension (batch 1 is specialised); ``benchmarks/gpu_inference.py --compile`` measures both.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "auto",
        *,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        keep_buffers: int = 3,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = autocast_dtype_on(self.device, dtype)  # as predict_patches does
        self.eager = inference_network(ready_on(model, self.device), self.device, self.dtype)
        cuda = self.device.type == "cuda"
        if compile and not cuda:  # results are the same either way
            log.warning("torch.compile is used on CUDA only: the CPU inference form runs eager")
        self.network = torch.compile(self.eager) if compile and cuda else self.eager
        self.upload_stream = torch.cuda.Stream(self.device) if cuda else None
        self.download_stream = torch.cuda.Stream(self.device) if cuda else None
        self.inputs = _BufferPool(cuda, keep_buffers)
        self.outputs = _BufferPool(cuda, keep_buffers)

    def submit(self, patches: np.ndarray) -> PendingBatch:
        _check_patches(patches)
        rows = len(patches)
        staged = self.inputs.take(rows, patches.shape[1:], torch.uint8)
        try:
            np.copyto(staged[:rows].numpy(), patches)  # read-only inputs are fine: no tensor view
            with _on(self.upload_stream):
                x = staged[:rows].to(self.device, non_blocking=True)
            compute = torch.cuda.current_stream(self.device) if self.upload_stream else None
            self._wait(compute, self.upload_stream, x)
            with torch.inference_mode():
                maps = forward_maps(self.network, x, dtype=self.dtype)
            out = self.outputs.take(rows, tuple(maps.shape[1:]), torch.float32)
        except BaseException:
            if self.upload_stream is not None:
                self.upload_stream.synchronize()  # the upload may still be reading ``staged``
            self.inputs.give(staged)
            raise
        self._wait(self.download_stream, compute, maps)
        with _on(self.download_stream):
            out[:rows].copy_(maps, non_blocking=True)
        return PendingBatch(staged, out, rows, _recorded(self.download_stream))

    def collect(self, pending: PendingBatch) -> np.ndarray:
        if pending.done is not None:
            pending.done.synchronize()
        maps = pending.maps[: pending.rows].numpy().copy()
        self.inputs.give(pending.staged)
        self.outputs.give(pending.maps)
        return maps

    def auto_batch_size(self, patch_size: int, **limits: Any) -> int | None:
        """On CUDA the batch that fits in free memory (:func:`probe_batch_size`, measured with
        the eager network at this precision); on CPU :data:`CPU_BATCH_SIZE`."""
        if self.device.type == "cpu":
            return CPU_BATCH_SIZE
        if self.device.type != "cuda":
            return None

        def run(rows: int) -> None:
            x = torch.zeros((rows, patch_size, patch_size, 3), dtype=torch.uint8,
                            device=self.device)
            with torch.inference_mode():
                forward_maps(self.eager, x, dtype=self.dtype)

        try:
            return probe_batch_size(run, self.device, **limits)
        except torch.cuda.OutOfMemoryError:  # not even the probe fits: start small, halving stays
            torch.cuda.empty_cache()
            log.warning("GPU out of memory while measuring the batch size: starting at 1")
            return 1

    @staticmethod
    def _wait(
        stream: torch.cuda.Stream | None, after: torch.cuda.Stream | None, tensor: torch.Tensor
    ) -> None:
        """Order ``stream`` after the work queued so far on ``after``; keep ``tensor``'s memory
        (allocated on ``after``) from being reused before ``stream`` is done with it."""
        if stream is None or after is None:
            return
        stream.wait_stream(after)
        tensor.record_stream(stream)


# --- precision drift -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionDrift:
    """How far reduced-precision outputs are from fp32 on the same patches.

    ``*_max``/``*_mean`` are |difference| of the np foreground probability, the raw hv maps and the
    tp class probabilities; ``*_changed`` the fraction of pixels whose np >= 0.5 decision or tp
    argmax differs; ``nonfinite`` counts reduced-precision values that are inf or NaN (float16
    overflow). The tp fields are None for a network without a type branch.
    """

    dtype: str
    device: str
    pixels: int
    np_max: float
    np_mean: float
    hv_max: float
    hv_mean: float
    np_changed: float
    tp_max: float | None = None
    tp_mean: float | None = None
    tp_changed: float | None = None
    nonfinite: int = 0


def head_probabilities(logits: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float64 NCHW ``np`` (foreground probability), ``hv`` (raw) and ``tp`` (class probabilities)."""
    heads = {"np": torch.softmax(logits["np"].double(), dim=1)[:, 1],
             "hv": logits["hv"].double()}
    if "tp" in logits:
        heads["tp"] = torch.softmax(logits["tp"].double(), dim=1)
    return {name: value.cpu().numpy() for name, value in heads.items()}


def compare_heads(
    reference: dict[str, np.ndarray], reduced: dict[str, np.ndarray], *, dtype: str, device: str
) -> PrecisionDrift:
    """The drift of ``reduced`` from ``reference`` (both as from :func:`head_probabilities`)."""
    diff = {name: np.abs(reduced[name] - reference[name]) for name in reference}
    typed = {}
    if "tp" in reference:
        flips = reference["tp"].argmax(axis=1) != reduced["tp"].argmax(axis=1)
        typed = {"tp_max": float(diff["tp"].max()), "tp_mean": float(diff["tp"].mean()),
                 "tp_changed": float(flips.mean())}
    np_flips = (reference["np"] >= 0.5) != (reduced["np"] >= 0.5)
    return PrecisionDrift(
        dtype=dtype, device=device, pixels=int(reference["np"].size),
        np_max=float(diff["np"].max()), np_mean=float(diff["np"].mean()),
        hv_max=float(diff["hv"].max()), hv_mean=float(diff["hv"].mean()),
        np_changed=float(np_flips.mean()), **typed,
        nonfinite=sum(int((~np.isfinite(value)).sum()) for value in reduced.values()),
    )


def precision_drift(
    model: torch.nn.Module,
    patches: np.ndarray,
    *,
    device: str | torch.device = "auto",
    dtype: str = "bfloat16",
    batch_size: int = 8,
) -> PrecisionDrift:
    """Run uint8 NHWC ``patches`` at fp32 and under ``dtype`` autocast on ``device`` and measure
    the drift of the reduced-precision outputs.

    The network is the form CUDA runs (:func:`layout_network`; ``model`` is left as it is) on every
    device, so that CPU autocast (bfloat16) can exercise it; CPU inference proper runs fp32 in a
    fused form that autocast does not reach.
    """
    _check_patches(patches)
    target = resolve_device(device)
    low = parse_autocast_dtype(dtype)
    network = layout_network(ready_on(model, target))
    reference: list[dict[str, np.ndarray]] = []
    reduced: list[dict[str, np.ndarray]] = []
    for batch in _chunks(patches, batch_size):
        x = network_input(torch.from_numpy(np.require(batch, requirements=("C", "W"))).to(target))
        with torch.inference_mode():
            reference.append(head_probabilities(network(x)))
            with torch.autocast(target.type, dtype=low):
                reduced.append(head_probabilities(network(x)))
    return compare_heads(_joined(reference), _joined(reduced), dtype=dtype, device=str(target))


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _chunks(items: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]
