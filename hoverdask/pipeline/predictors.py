"""Predictors: turn an RGB window into HoVer-Net maps for one map tile.

A predictor sees a window that is its tile plus ``margin`` pixels of context on every side and
returns the maps of the tile, ``[tp, np, h, v]`` (or ``[np, h, v]`` without a type branch), as
float32. The tile is a whole number of patch outputs and the window is cut from the one global
patch grid, so a pixel's value never depends on how the slide was chunked.

:class:`PatchPredictor` runs the network (or any patch function); :class:`ArrayPredictor` replays maps computed
elsewhere (tests use it as a stub with known maps, and it lets external maps be post-processed
by the same pipeline). Workers hold one predictor each through :class:`PredictorPlugin`, which
receives a small picklable *factory* (a checkpoint path and options, never the weights).
"""

from __future__ import annotations

import collections
import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hoverdask.core.errors import HoverdaskError
from hoverdask.pipeline.spec import PredictorFactory, TilePredictor

PLUGIN_NAME = "hoverdask-predictor"
DEFAULT_BATCH_SIZE = 8  # patches per network call on CPU, and without a way to measure memory
AUTO_BATCH_SIZE = 0  # batch_size meaning "as many as fit in free GPU memory"
log = logging.getLogger(__name__)


def split_patches(window: np.ndarray, margin: int, output: int) -> np.ndarray:
    """Cut a window into the patches of its grid: (N, output+2m, output+2m, 3), row-major."""
    size = output + 2 * margin
    rows = (window.shape[0] - 2 * margin) // output
    cols = (window.shape[1] - 2 * margin) // output
    views = np.lib.stride_tricks.sliding_window_view(window, (size, size), axis=(0, 1))
    patches = views[: rows * output : output, : cols * output : output]
    return np.ascontiguousarray(patches.transpose(0, 1, 3, 4, 2).reshape(-1, size, size, 3))


def join_patches(outputs: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of :func:`split_patches` for the patch outputs: edge to edge, no blending."""
    out, channels = outputs.shape[1], outputs.shape[3]
    grid = outputs.reshape(rows, cols, out, out, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * out, cols * out, channels)


class PatchRunner(Protocol):
    """Runs patch batches in two steps, so that a caller can queue one batch before it waits for
    the previous one (:class:`hoverdask.model.gpu.StagedPatchRunner` overlaps them on CUDA)."""

    def submit(self, patches: np.ndarray) -> Any: ...

    def collect(self, pending: Any) -> np.ndarray: ...


class CallRunner:
    """A plain patch function as a runner: the work happens in ``submit``, in order."""

    def __init__(self, predict_patches: Callable[[np.ndarray], np.ndarray]) -> None:
        self.predict_patches = predict_patches

    def submit(self, patches: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict_patches(patches))

    def collect(self, pending: np.ndarray) -> np.ndarray:
        return pending


class PatchPredictor:
    """Cuts the window into patches, predicts them in batches, joins the outputs edge to edge.

    ``predict_patches`` maps (N, in, in, 3) uint8 to (N, out, out, C) float32; it is a function or
    a :class:`PatchRunner`, which gets batch i+1 submitted before batch i is collected
    (``in_flight`` batches at most). ``batch_size`` 0 asks the runner's ``auto_batch_size``
    (free GPU memory) once, on the first tile, or is :data:`DEFAULT_BATCH_SIZE` without one. On
    CUDA out of memory the batch is halved (and stays halved) instead of failing the tile.
    """

    def __init__(
        self,
        predict_patches: Callable[[np.ndarray], np.ndarray] | PatchRunner,
        *,
        margin: int,
        output: int,
        nr_types: int | None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        in_flight: int = 2,
    ) -> None:
        if batch_size < 0 or in_flight < 1:
            raise ValueError(f"batch_size must be >= 0 (0: auto) and in_flight >= 1, got "
                             f"{batch_size}, {in_flight}")
        is_runner = hasattr(predict_patches, "submit") and hasattr(predict_patches, "collect")
        self.runner: PatchRunner = (predict_patches if is_runner  # type: ignore[assignment]
                                    else CallRunner(predict_patches))
        self.margin = margin
        self.output = output
        self.nr_types = nr_types
        self.batch_size = batch_size
        self.in_flight = in_flight

    def predict_tile(self, window: np.ndarray, tile_origin_yx: tuple[int, int]) -> np.ndarray:
        rows = (window.shape[0] - 2 * self.margin) // self.output
        cols = (window.shape[1] - 2 * self.margin) // self.output
        patches = split_patches(window, self.margin, self.output)
        if self.batch_size == AUTO_BATCH_SIZE:
            self.batch_size = self._auto_batch_size(patches.shape[1])
        return join_patches(self._predict_all(patches), rows, cols).astype(np.float32, copy=False)

    def _auto_batch_size(self, patch_size: int) -> int:
        choose = getattr(self.runner, "auto_batch_size", None)
        size = choose(patch_size) if choose is not None else None
        log.info("batch size %s (auto)", size or f"{DEFAULT_BATCH_SIZE}, the default")
        return int(size or DEFAULT_BATCH_SIZE)

    def _predict_all(self, patches: np.ndarray) -> np.ndarray:
        outputs: list[np.ndarray] = []
        pending: collections.deque[Any] = collections.deque()
        start = 0
        while start < len(patches):  # the batch size may drop on the way
            batch = patches[start : start + self.batch_size]
            try:
                pending.append(self.runner.submit(batch))
            except Exception as err:
                if not _is_cuda_oom(err) or len(batch) == 1:
                    raise
                while pending:  # what is in flight is fine, and holds memory: finish it first
                    outputs.append(self.runner.collect(pending.popleft()))
                self._lower_batch_size(len(batch))
                continue
            start += len(batch)
            if len(pending) >= self.in_flight:
                outputs.append(self.runner.collect(pending.popleft()))
        outputs.extend(self.runner.collect(p) for p in pending)
        return np.concatenate(outputs)

    def _lower_batch_size(self, failed: int) -> None:
        import torch

        torch.cuda.empty_cache()
        self.batch_size = max(1, min(self.batch_size, failed // 2))
        log.warning("GPU out of memory: batch size lowered to %d", self.batch_size)


def _is_cuda_oom(err: Exception) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(err, torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class TorchPredictorFactory:
    """Everything a worker needs to load the network itself: a path, not the weights.

    ``batch_size`` 0 fits the batch to the worker's free GPU memory (measured once per worker;
    :data:`DEFAULT_BATCH_SIZE` on CPU). ``autocast`` runs the network in ``autocast_dtype``
    (bfloat16 or float16) on CUDA. ``compile`` wraps the network in ``torch.compile`` (slower
    start-up; off unless measured to help on the hardware at hand).
    """

    model_path: str
    device: str = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    autocast: bool = False
    autocast_dtype: str = "bfloat16"
    compile: bool = False

    def __post_init__(self) -> None:
        from hoverdask.model.infer import parse_autocast_dtype

        if self.batch_size < 0:
            raise HoverdaskError(f"batch size must be >= 1, or 0 for auto, not {self.batch_size}")
        parse_autocast_dtype(self.autocast_dtype)  # a clear error on the client, not on every worker

    def __call__(self) -> PatchPredictor:
        from hoverdask.model import load_model, patch_geometry, resolve_device
        from hoverdask.model.gpu import StagedPatchRunner
        from hoverdask.model.infer import parse_autocast_dtype

        device = resolve_device(self.device)  # "auto": this worker's GPU if it has one
        model = load_model(self.model_path, device)
        geometry = patch_geometry(model.mode)
        dtype = parse_autocast_dtype(self.autocast_dtype) if self.autocast else None
        runner = StagedPatchRunner(model, device, dtype=dtype, compile=self.compile)
        return PatchPredictor(runner, margin=geometry.margin, output=geometry.output,
                              nr_types=model.nr_types, batch_size=self.batch_size)


class ArrayPredictor:
    """Replays known maps by position: maps[y:y+h, x:x+w] of a (H, W, C) float array.

    Beyond the array's extent it returns zeros (background), which is what the pipeline crops
    away anyway. The window's pixels are ignored; only its position and size matter.
    """

    def __init__(self, maps: np.ndarray, *, margin: int, output: int, nr_types: int | None):
        self.maps = maps
        self.margin = margin
        self.output = output
        self.nr_types = nr_types

    def predict_tile(self, window: np.ndarray, tile_origin_yx: tuple[int, int]) -> np.ndarray:
        height = window.shape[0] - 2 * self.margin
        width = window.shape[1] - 2 * self.margin
        y, x = tile_origin_yx
        out = np.zeros((height, width, self.maps.shape[2]), np.float32)
        part = self.maps[y : y + height, x : x + width]
        out[: part.shape[0], : part.shape[1]] = np.asarray(part, dtype=np.float32)
        return out


@dataclass(frozen=True)
class ArrayPredictorFactory:
    """Maps saved as a ``.npy`` file (H, W, C) float, memory-mapped by each worker."""

    maps_path: str
    margin: int
    output: int
    nr_types: int | None

    def __call__(self) -> ArrayPredictor:
        maps = np.load(self.maps_path, mmap_mode="r")
        return ArrayPredictor(maps, margin=self.margin, output=self.output,
                              nr_types=self.nr_types)


def _plugin_base() -> type:
    from distributed import WorkerPlugin

    return WorkerPlugin


class PredictorPlugin(_plugin_base()):  # type: ignore[misc]
    """Holds one predictor per worker process, built once in ``setup``.

    On CUDA workers it pins the worker to GPU ``name % device_count`` (local clusters name workers
    0..N-1); on CPU workers it gives torch the worker's threads back, since the nanny sets
    ``OMP_NUM_THREADS=1``. When the cluster has GPU workers (``gpu_cluster``), workers without
    the ``GPU`` resource never run inference: they neither load the network nor touch CUDA.
    ``prepare`` runs first on every worker (the pipeline's imports and kernels), so that the
    workers do it all at once, during registration, rather than inside their first tasks.
    """

    idempotent = False

    def __init__(self, factory: PredictorFactory, *, torch_threads: int | None = None,
                 gpu_cluster: bool = False, prepare: Callable[[], None] | None = None) -> None:
        self.factory = factory
        self.prepare = prepare
        self.torch_threads = torch_threads
        self.gpu_cluster = gpu_cluster
        self.predictor: TilePredictor | None = None

    def setup(self, worker: Any) -> None:
        if self.prepare is not None:
            self.prepare()
        state = getattr(worker, "state", None)
        task_threads = getattr(state, "nthreads", None) or getattr(worker, "nthreads", 1)
        limit_opencv_threads(min(task_threads, self.torch_threads or task_threads))
        resources = getattr(state, "total_resources", None) or {}
        if self.gpu_cluster and resources.get("GPU", 0) < 1:
            return  # a CPU worker beside GPU workers: post-processing only
        configure_torch(getattr(self.factory, "device", "cpu"), self.torch_threads,
                        worker_name=worker.name)
        self.predictor = self.factory()

    def teardown(self, worker: Any) -> None:
        self.predictor = None


def gpu_index(worker_name: Any, device_count: int) -> int:
    """The GPU a worker process should use: its number modulo the visible devices.

    Local clusters name workers 0..N-1; dask-jobqueue names them ``<Cluster>-<job>-<i>`` with ``i``
    the process within the job. A worker whose GPU is chosen for it (one visible device, as with
    dask-cuda or ``CUDA_VISIBLE_DEVICES``) always gets device 0.
    """
    match = re.search(r"(\d+)$", str(worker_name))
    return int(match.group(1)) % device_count if match and device_count > 0 else 0


def limit_opencv_threads(threads: int) -> None:
    """OpenCV's own thread pool to ``threads`` (at least 1) in this worker process.

    OpenCV starts one thread per core in every process; a worker already runs as many tasks as
    it has threads, beside other workers on the other cores, so its OpenCV calls (resampling,
    labelling, contours) would otherwise compete with the other workers' networks. Results do
    not depend on it."""
    import cv2

    cv2.setNumThreads(max(1, int(threads)))


def configure_torch(device: str, threads: int | None, *, worker_name: Any = 0) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(gpu_index(worker_name, torch.cuda.device_count()))
        torch.backends.cudnn.benchmark = True  # patch shapes never change: tune convs once
    elif threads:
        torch.set_num_threads(threads)


def current_predictor(factory: PredictorFactory) -> TilePredictor:
    """The worker's predictor from the plugin, or a per-process cached one outside a cluster."""
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except (ImportError, ValueError):
        plugin = None
    if plugin is not None and plugin.predictor is not None:
        return plugin.predictor
    return _cached_predictor(factory)


@functools.lru_cache(maxsize=2)
def _cached_predictor(factory: PredictorFactory) -> TilePredictor:
    return factory()
