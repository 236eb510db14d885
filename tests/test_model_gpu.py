"""Device helpers: batch size from free memory, precision drift, and (CUDA only) staged batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hoverdask.core.errors import HoverdaskError
from hoverdask.model import HoVerNet, predict_patches
from hoverdask.model.gpu import (
    PrecisionDrift,
    StagedPatchRunner,
    choose_batch_size,
    compare_heads,
    head_probabilities,
    memory_per_patch,
    precision_drift,
    probe_batch_size,
)
from hoverdask.model.infer import inference_network
from tests.conftest import PARITY, parity_npz
from tests.parity_weights import parity_model

GIB = 2**30


def test_choose_batch_size_fits_what_is_left_after_the_reserve() -> None:
    assert choose_batch_size(10 * GIB, GIB, reserve_fraction=0.2, max_batch=64) == 8
    assert choose_batch_size(10 * GIB, GIB, reserve_fraction=0.0, max_batch=64) == 10
    assert choose_batch_size(100 * GIB, GIB, reserve_fraction=0.2, max_batch=32) == 32
    assert choose_batch_size(GIB / 2, GIB, reserve_fraction=0.2, max_batch=64) == 1  # try; OOM halves
    assert choose_batch_size(-GIB, GIB, reserve_fraction=0.2, max_batch=64) == 1
    with pytest.raises(ValueError, match="reserve_fraction"):
        choose_batch_size(GIB, GIB, reserve_fraction=1.0, max_batch=8)
    with pytest.raises(ValueError, match="bytes_per_patch"):
        choose_batch_size(GIB, 0, reserve_fraction=0.2, max_batch=8)


@given(
    free=st.integers(0, 200 * GIB),
    per_patch=st.integers(1, 4 * GIB),
    reserve=st.floats(0, 0.9),
    max_batch=st.integers(1, 512),
)
def test_choose_batch_size_is_the_largest_that_fits(
    free: int, per_patch: int, reserve: float, max_batch: int
) -> None:
    batch = choose_batch_size(free, per_patch, reserve_fraction=reserve, max_batch=max_batch)
    usable = free * (1 - reserve)
    assert 1 <= batch <= max_batch
    assert batch == 1 or batch * per_patch <= usable
    assert batch == max_batch or (batch + 1) * per_patch > usable


def test_memory_per_patch_separates_fixed_from_per_patch_bytes() -> None:
    fixed, per_patch = 300e6, 450e6
    assert memory_per_patch((1, fixed + per_patch), (3, fixed + 3 * per_patch)) == pytest.approx(
        (fixed, per_patch))
    # peaks that do not grow: charge the whole larger peak to its patches
    assert memory_per_patch((1, 900), (4, 800)) == (0.0, 200.0)
    with pytest.raises(ValueError, match="larger"):
        memory_per_patch((3, 1), (3, 2))


def test_probe_batch_size_reads_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake allocator: each batch of n peaks at fixed + n * per_patch above what is held."""
    fixed, per_patch, held, free, cached = 200e6, 1 * GIB, 5 * GIB, 30 * GIB, 2 * GIB
    state = {"peak": held}

    def run(rows: int) -> None:
        state["peak"] = max(state["peak"], held + fixed + rows * per_patch)

    fake = {
        "synchronize": lambda device=None: None,
        "reset_peak_memory_stats": lambda device=None: state.update(peak=held),
        "memory_allocated": lambda device=None: held,
        "max_memory_allocated": lambda device=None: state["peak"],
        "memory_reserved": lambda device=None: held + cached,
        "mem_get_info": lambda device=None: (free, 80 * GIB),
    }
    for name, function in fake.items():
        monkeypatch.setattr(torch.cuda, name, function)
    batch = probe_batch_size(run, torch.device("cuda"), reserve_fraction=0.25, max_batch=256)
    assert batch == int((free + cached - fixed) * 0.75 // per_patch)  # 23


def test_head_probabilities_equal_the_reference_softmax() -> None:
    reference = parity_npz("forward_original_t5.npz")
    logits = {head: torch.from_numpy(reference[f"logits_{head}"]) for head in ("tp", "np", "hv")}
    heads = head_probabilities(logits)
    np.testing.assert_allclose(heads["np"], reference["prob_np"][..., 1], atol=1e-6)
    np.testing.assert_allclose(heads["tp"], reference["prob_tp"].transpose(0, 3, 1, 2), atol=1e-6)
    np.testing.assert_array_equal(heads["hv"], reference["logits_hv"])


def test_compare_heads_on_known_differences() -> None:
    reference = {"np": np.array([[[0.2, 0.49], [0.6, 0.9]]]),
                 "hv": np.zeros((1, 2, 2, 2)),
                 "tp": np.array([[[[0.7, 0.4]], [[0.3, 0.6]]]])}  # (1, 2 classes, 1, 2)
    reduced = {"np": np.array([[[0.2, 0.51], [0.6, 0.8]]]),
               "hv": np.full((1, 2, 2, 2), -0.25),
               "tp": np.array([[[[0.45, 0.4]], [[0.55, 0.6]]]])}
    drift = compare_heads(reference, reduced, dtype="bfloat16", device="cpu")
    assert drift.pixels == 4
    assert (drift.np_max, drift.np_mean) == pytest.approx((0.1, 0.03))
    assert drift.np_changed == 0.25  # 0.49 -> 0.51 crosses 0.5
    assert (drift.hv_max, drift.hv_mean) == (0.25, 0.25)
    assert (drift.tp_max, drift.tp_mean) == pytest.approx((0.25, 0.125))
    assert drift.tp_changed == 0.5
    assert drift.nonfinite == 0
    reduced["hv"][0, 0, 0, 0] = np.inf
    reduced["np"][0, 0, 0] = np.nan
    assert compare_heads(reference, reduced, dtype="float16", device="cpu").nonfinite == 2
    untyped = compare_heads({k: reference[k] for k in ("np", "hv")},
                            {k: reduced[k] for k in ("np", "hv")}, dtype="float16", device="cpu")
    assert untyped.tp_max is untyped.tp_changed is None


def test_cpu_bfloat16_drift_on_the_parity_inputs_is_small_but_real() -> None:
    model = parity_model("fast_t6")
    patches = np.load(PARITY / "input_fast_256.npy")[:1]
    drift = precision_drift(model, patches, device="cpu", dtype="bfloat16")
    print(drift)
    assert drift.pixels == 164 * 164
    assert drift.nonfinite == 0
    assert 0 < drift.tp_mean < drift.tp_max < 0.25
    assert_small_but_real(drift)
    assert all(p.is_contiguous() for p in model.parameters())  # the model's layout is untouched


def assert_small_but_real(drift: PrecisionDrift) -> None:
    """Reduced precision changes the outputs a little (a drift of 0 means it did not run)."""
    assert 0 < drift.np_mean < drift.np_max < 0.25
    assert 0 < drift.hv_mean < drift.hv_max < 0.25
    # the synthetic weights leave many near-ties between classes (measured on CPU: 0.87 % of tp
    # argmax decisions and 0 % of np decisions change), so the bound is looser than for trained
    # weights
    assert drift.np_changed < 0.01
    assert drift.tp_changed is not None
    assert drift.tp_changed < 0.02


def test_drift_refuses_unknown_precisions() -> None:
    with pytest.raises(HoverdaskError, match="float8"):
        precision_drift(HoVerNet("fast", None), np.zeros((1, 96, 96, 3), np.uint8),
                        device="cpu", dtype="float8")


# --- CUDA only ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_staged_runner_on_cuda_equals_predict_patches(dtype: torch.dtype | None) -> None:
    model = parity_model("fast_t6").cuda()
    patches = np.load(PARITY / "input_fast_256.npy")
    patches = np.concatenate([patches, patches[::-1, ::-1], patches[:, :, ::-1]])  # 6 patches
    runner = StagedPatchRunner(model, "cuda", dtype=dtype)
    pending = [runner.submit(patches[:4]), runner.submit(patches[4:])]  # both in flight
    got = np.concatenate([runner.collect(p) for p in pending])
    name = {None: "bfloat16", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    expected = np.concatenate([
        predict_patches(model, patches[:4], autocast=dtype is not None, autocast_dtype=name),
        predict_patches(model, patches[4:], autocast=dtype is not None, autocast_dtype=name),
    ])
    # a stream ordering fault gives stale or unfinished maps: far beyond these tolerances
    np.testing.assert_allclose(got[..., 1:], expected[..., 1:], atol=1e-4 if dtype is None else 2e-3)
    assert (got[..., 0] != expected[..., 0]).mean() < 1e-3  # argmax ties may fall either way
    assert all(b.is_pinned() for b in runner.inputs.free + runner.outputs.free)


@pytest.mark.gpu
def test_auto_batch_size_on_cuda_fits_the_free_memory() -> None:
    model = parity_model("fast_t6").cuda()
    runner = StagedPatchRunner(model, "cuda", dtype=torch.bfloat16)
    batch = runner.auto_batch_size(256, max_batch=512)
    assert 1 <= batch <= 512
    patches = np.zeros((batch, 256, 256, 3), np.uint8)
    assert runner.collect(runner.submit(patches)).shape == (batch, 164, 164, 4)  # it fits


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_drift_on_the_parity_inputs_is_small_but_real(dtype: str) -> None:
    model = parity_model("original_t5").cuda()
    drift = precision_drift(model, np.load(PARITY / "input_original_270.npy"), device="cuda",
                            dtype=dtype)
    print(drift)
    assert_small_but_real(drift)


def test_cuda_network_form_keeps_channels_last_and_the_values() -> None:
    """Built without a GPU (building is device-free): the copy CUDA runs must equal the model and
    keep channels_last through the upsampling; the model itself is left as it was."""
    model = parity_model("fast_t6").eval()
    network = inference_network(model, torch.device("cuda"))
    assert network is not model
    assert inference_network(model, torch.device("cuda")) is network  # built once
    x = torch.from_numpy(np.load(PARITY / "input_fast_256.npy")[:1]).permute(0, 3, 1, 2).float()
    seen = []
    network.upsample2x.register_forward_hook(
        lambda _m, _i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        want = model(x)
        got = network(x.contiguous(memory_format=torch.channels_last))
    assert seen
    assert all(seen)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=0)
    assert "upsample2x.unpool_mat" in model.state_dict()  # the checkpoint layout is untouched
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert inference_network(model, torch.device("cuda")) is not network  # weights changed
