"""PatchPredictor with the staged runner: the same maps as predict_patches, batch by batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hoverdask.core.errors import HoverdaskError
from hoverdask.model import HoVerNet, predict_patches, save_checkpoint
from hoverdask.model.gpu import CPU_BATCH_SIZE, StagedPatchRunner
from hoverdask.pipeline.predictors import (
    DEFAULT_BATCH_SIZE,
    PatchPredictor,
    PredictorPlugin,
    TorchPredictorFactory,
    join_patches,
    split_patches,
)

# the fast network takes 96 px patches to 4 px outputs: small enough for many batches on CPU
MARGIN, OUTPUT = 46, 4


@pytest.fixture(scope="module")
def model() -> HoVerNet:
    torch.manual_seed(0)
    return HoVerNet("fast", 3).eval()


def _window(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    shape = (rows * OUTPUT + 2 * MARGIN, cols * OUTPUT + 2 * MARGIN, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class RecordingRunner:
    """Wraps a runner: logs each submitted batch size, and fails the submits listed in ``oom``
    with CUDA out of memory (counting every submit, failed or not, from 0)."""

    def __init__(self, inner: StagedPatchRunner, oom: tuple[int, ...] = ()) -> None:
        self.inner, self.oom = inner, oom
        self.sizes: list[int] = []
        self.submits = 0
        self.in_flight = 0
        self.most_in_flight = 0

    def submit(self, patches: np.ndarray) -> object:
        self.submits += 1
        if self.submits - 1 in self.oom:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        pending = self.inner.submit(patches)
        self.sizes.append(len(patches))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return pending

    def collect(self, pending: object) -> np.ndarray:
        self.in_flight -= 1
        return self.inner.collect(pending)


def _batch_by_batch(model: HoVerNet, window: np.ndarray, sizes: list[int]) -> np.ndarray:
    """The oracle: predict_patches on the same batches, joined."""
    patches = split_patches(window, MARGIN, OUTPUT)
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(patches)
    maps = [predict_patches(model, patches[a:b]) for a, b in itertools.pairwise(bounds)]
    rows = (window.shape[0] - 2 * MARGIN) // OUTPUT
    return join_patches(np.concatenate(maps), rows, len(patches) // rows)


def test_staged_batches_equal_predict_patches_with_a_ragged_last_batch(model: HoVerNet) -> None:
    runner = RecordingRunner(StagedPatchRunner(model, "cpu", keep_buffers=2))
    predictor = PatchPredictor(runner, margin=MARGIN, output=OUTPUT, nr_types=3, batch_size=4)
    window = _window(3, 3)
    got = predictor.predict_tile(window, (0, 0))
    assert runner.sizes == [4, 4, 1]
    assert runner.most_in_flight == 2  # batch i+1 was submitted before batch i was collected
    np.testing.assert_array_equal(got, _batch_by_batch(model, window, runner.sizes))


def test_out_of_memory_mid_tile_drains_in_flight_batches_and_halves(model: HoVerNet) -> None:
    runner = RecordingRunner(StagedPatchRunner(model, "cpu"), oom=(2,))
    predictor = PatchPredictor(runner, margin=MARGIN, output=OUTPUT, nr_types=3, batch_size=4)
    window = _window(4, 4, seed=1)
    got = predictor.predict_tile(window, (0, 0))
    assert runner.sizes == [4, 4, 2, 2, 2, 2]  # the third submit failed with batch 1 in flight
    assert predictor.batch_size == 2
    np.testing.assert_array_equal(got, _batch_by_batch(model, window, runner.sizes))


def test_host_buffers_are_reused_across_batches_and_tiles(model: HoVerNet) -> None:
    runner = StagedPatchRunner(model, "cpu", keep_buffers=2)
    predictor = PatchPredictor(runner, margin=MARGIN, output=OUTPUT, nr_types=3, batch_size=3)
    predictor.predict_tile(_window(2, 3), (0, 0))
    first = {b.data_ptr() for b in runner.inputs.free + runner.outputs.free}
    window = _window(3, 2, seed=2)
    got = predictor.predict_tile(window, (0, 0))
    assert {b.data_ptr() for b in runner.inputs.free + runner.outputs.free} == first
    assert len(runner.inputs.free) == len(runner.outputs.free) == 2
    # outputs are copies, never views of a buffer that the next batch overwrites
    np.testing.assert_array_equal(got, _batch_by_batch(model, window, [3, 3]))


class AutoRunner(RecordingRunner):
    def __init__(self, inner: StagedPatchRunner, size: int | None) -> None:
        super().__init__(inner)
        self.size = size
        self.asked: list[int] = []

    def auto_batch_size(self, patch_size: int) -> int | None:
        self.asked.append(patch_size)
        return self.size


@pytest.mark.parametrize(("measured", "expected"), [(5, 5), (None, DEFAULT_BATCH_SIZE)])
def test_batch_size_zero_asks_the_runner_once(
    model: HoVerNet, measured: int | None, expected: int
) -> None:
    runner = AutoRunner(StagedPatchRunner(model, "cpu"), measured)
    predictor = PatchPredictor(runner, margin=MARGIN, output=OUTPUT, nr_types=3, batch_size=0)
    predictor.predict_tile(_window(3, 4), (0, 0))
    predictor.predict_tile(_window(1, 2), (0, 0))
    assert runner.asked == [MARGIN * 2 + OUTPUT]
    assert predictor.batch_size == expected
    assert runner.sizes[0] == min(expected, 12)


def test_staged_runner_on_cpu_runs_one_patch_per_call(model: HoVerNet) -> None:
    assert StagedPatchRunner(model, "cpu").auto_batch_size(96) == CPU_BATCH_SIZE == 1
    plain = PatchPredictor(lambda p: np.zeros((len(p), OUTPUT, OUTPUT, 4), np.float32),
                           margin=MARGIN, output=OUTPUT, nr_types=3, batch_size=0)
    plain.predict_tile(_window(1, 1), (0, 0))
    assert plain.batch_size == DEFAULT_BATCH_SIZE


def test_negative_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        PatchPredictor(np.asarray, margin=1, output=2, nr_types=None, batch_size=-1)
    with pytest.raises(HoverdaskError, match="batch size"):
        TorchPredictorFactory("model.pt", batch_size=-2)
    with pytest.raises(HoverdaskError, match="bfloat16, float16"):
        TorchPredictorFactory("model.pt", autocast=True, autocast_dtype="float8")


def test_factory_builds_the_staged_predictor_with_auto_batch(tmp_path, model: HoVerNet) -> None:
    path = tmp_path / "fast.pt"
    save_checkpoint(model, path)
    factory = TorchPredictorFactory(str(path), device="cpu", batch_size=0, autocast=True,
                                    autocast_dtype="float16")
    predictor = factory()
    assert isinstance(predictor.runner, StagedPatchRunner)
    assert (predictor.margin, predictor.output) == (46, 164)
    window = np.random.default_rng(3).integers(0, 256, (164 + 92, 2 * 164 + 92, 3), np.uint8)
    got = predictor.predict_tile(window, (0, 0))
    assert predictor.batch_size == CPU_BATCH_SIZE  # auto on CPU: one patch per call
    # autocast has no effect on CPU: fp32, the maps of predict_patches
    expected = predict_patches(model, split_patches(window, 46, 164))
    np.testing.assert_array_equal(got, join_patches(expected, 1, 2))


def test_compile_is_for_cuda_only(model: HoVerNet, caplog: pytest.LogCaptureFixture) -> None:
    runner = StagedPatchRunner(model, "cpu", compile=True)
    assert runner.network is runner.eager
    assert "CUDA only" in caplog.text


def test_two_threads_share_one_staged_predictor(model: HoVerNet) -> None:
    """A worker with two threads may run two tiles through its one predictor at once."""
    from concurrent.futures import ThreadPoolExecutor

    runner = StagedPatchRunner(model, "cpu", keep_buffers=2)
    predictor = PatchPredictor(runner, margin=MARGIN, output=OUTPUT, nr_types=3, batch_size=2)
    windows = [_window(1, 3, seed=seed) for seed in range(4)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda w: predictor.predict_tile(w, (0, 0)), windows))
    for window, maps in zip(windows, got, strict=True):
        np.testing.assert_array_equal(maps, _batch_by_batch(model, window, [2, 1]))


def test_read_only_patches_are_staged_without_a_warning(model: HoVerNet) -> None:
    """Patches may come read-only (a memory map of saved patches): staging copies them."""
    import warnings

    patches = np.stack([_window(1, 1, seed=seed) for seed in range(3)])
    patches.setflags(write=False)
    runner = StagedPatchRunner(model, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = runner.collect(runner.submit(patches))
        want = predict_patches(model, patches, device="cpu")
    np.testing.assert_array_equal(got, want)


def test_cpu_autocast_runs_bfloat16_only_where_the_cpu_has_it(tmp_path, model: HoVerNet,
                                                              caplog: pytest.LogCaptureFixture):
    from hoverdask.model import infer
    from hoverdask.model.infer import autocast_dtype_on, cpu_has_native_bfloat16

    cpu = torch.device("cpu")
    infer.FP32_KEPT_WARNED.clear()  # other tests of this process may have been warned already
    assert autocast_dtype_on(cpu, None) is None
    assert autocast_dtype_on(cpu, torch.float16) is None  # slower than fp32 on any CPU
    assert "running fp32" in caplog.text
    caplog.clear()
    assert autocast_dtype_on(cpu, torch.float16) is None
    assert "running fp32" not in caplog.text  # said once, not for every batch
    patches = np.random.default_rng(4).integers(0, 256, (2, 256, 256, 3), np.uint8)
    fp32 = predict_patches(model, patches, device="cpu")
    low = predict_patches(model, patches, device="cpu", autocast=True)
    if not cpu_has_native_bfloat16():
        assert autocast_dtype_on(cpu, torch.bfloat16) is None
        np.testing.assert_array_equal(low, fp32)
        return
    assert autocast_dtype_on(cpu, torch.bfloat16) == torch.bfloat16
    # the network really ran in bfloat16 (also full HoVer-Net, whose fused CPU form autocast
    # would not reach), and stays close to fp32
    assert not np.array_equal(low[..., 1:], fp32[..., 1:])
    assert np.abs(low[..., 1:] - fp32[..., 1:]).max() < 0.1


def test_prepare_worker_is_a_coroutine_that_imports_the_task_stack() -> None:
    """``client.run(..., wait=False)`` only takes coroutine functions; in a fresh process the
    call must leave torch, the network and task code imported and the kernels loaded."""
    import inspect
    import subprocess
    import sys

    from hoverdask.pipeline.warmup import prepare_worker

    assert inspect.iscoroutinefunction(prepare_worker)
    code = (
        "import asyncio, sys\n"
        "from hoverdask.pipeline.warmup import prepare_worker\n"
        "assert 'torch' not in sys.modules and 'hoverdask.pipeline.tasks' not in sys.modules\n"
        "asyncio.run(prepare_worker())\n"
        "from hoverdask.nuclei import _flood, _hull, _sums\n"
        "kernels = [_flood._flood, _flood._growing_seeds, _hull._hull_pixel_counts,\n"
        "           _sums._instance_sums, _sums._pixel_sums, _sums._outline_sums]\n"
        "print(*(m in sys.modules for m in ('torch', 'hoverdask.model.infer',\n"
        "      'hoverdask.pipeline.tasks', 'hoverdask.pipeline.postprocess')),\n"
        "      all(f.signatures for f in kernels))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True"] * 5


def test_plugin_setup_prepares_and_gives_opencv_the_workers_threads() -> None:
    """A CPU worker beside GPU workers only prepares and limits OpenCV; it loads no network."""
    import types

    import cv2

    calls: list[str] = []

    def factory() -> None:
        raise AssertionError("a post-processing worker must not load the network")

    worker = types.SimpleNamespace(name=3, state=types.SimpleNamespace(nthreads=1,
                                                                       total_resources={}))
    plugin = PredictorPlugin(factory, torch_threads=2, gpu_cluster=True,  # type: ignore[arg-type]
                             prepare=lambda: calls.append("prepared"))
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        plugin.setup(worker)
        assert calls == ["prepared"]
        assert cv2.getNumThreads() == 1  # the worker's one task thread, not the cores
        assert plugin.predictor is None
    finally:
        cv2.setNumThreads(before)
