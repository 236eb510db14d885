"""HoVer-Net network against the reference: state-dict layout, logits, padding, freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hoverdask.model import HoVerNet, patch_geometry
from hoverdask.model.network import TFSamePad
from tests.conftest import PARITY, parity_npz
from tests.parity_weights import (
    CONFIGS,
    config_model_args,
    fill,
    manifest,
    parity_model,
    splitmix_uniform,
)

FORWARD_CONFIGS = {
    "fast_t6": "input_fast_256.npy",
    "original_t5": "input_original_270.npy",
    "original_tnone": "input_original_270.npy",
}


def test_splitmix_known_values() -> None:
    # the published first outputs of SplitMix64 seeded with 0 (state += gamma before mixing)
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    np.testing.assert_array_equal(splitmix_uniform(0, 3), [(v >> 11) * 2.0**-53 for v in expected])


@pytest.mark.parametrize("config", CONFIGS)
def test_weight_generator_matches_fill_checks(config: str) -> None:
    for entry in manifest(config)["keys"]:
        values = fill(entry["index"], entry["key"], entry["shape"]).astype(np.float64).ravel()
        check = entry["fill_check"]
        assert values.sum() == pytest.approx(check["sum"], rel=1e-6, abs=1e-6), entry["key"]
        assert np.abs(values).sum() == pytest.approx(check["abs_sum"], rel=1e-6), entry["key"]
        np.testing.assert_array_equal(values[: len(check["first"])], check["first"])
        assert values[-1] == check["last"], entry["key"]


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_keys_shapes_and_order(config: str) -> None:
    mode, nr_types = config_model_args(config)
    expected = manifest(config)
    state = HoVerNet(mode=mode, nr_types=nr_types).state_dict()
    assert list(state) == [e["key"] for e in expected["keys"]]
    assert [list(v.shape) for v in state.values()] == [e["shape"] for e in expected["keys"]]
    parameters = HoVerNet(mode=mode, nr_types=nr_types).parameters()
    assert sum(p.numel() for p in parameters) == expected["num_parameters"]


@pytest.mark.parametrize("config", FORWARD_CONFIGS)
def test_logits_match_reference(config: str) -> None:
    model = parity_model(config)
    images = np.load(PARITY / FORWARD_CONFIGS[config])
    with torch.inference_mode():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    reference = parity_npz(f"forward_{config}.npz")
    expected_heads = ["np", "hv"] if config.endswith("tnone") else ["tp", "np", "hv"]
    assert list(logits) == expected_heads
    for head, value in logits.items():
        error = float(np.abs(value.numpy() - reference[f"logits_{head}"]).max())
        print(f"{config} {head}: max abs error {error:.2e}")
        assert error < 1e-4, (config, head, error)


def test_stride_two_padding_is_tensorflow_same() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    padded = TFSamePad(3, 2)(x)
    assert padded.shape == (1, 1, 5, 5)
    torch.testing.assert_close(padded[0, 0, :4, :4], x[0, 0])  # nothing before: (0, 1)
    assert padded[0, 0, 4].abs().sum() == 0
    assert padded[0, 0, :, 4].abs().sum() == 0
    assert TFSamePad(7, 1)(x).shape == (1, 1, 10, 10)  # 3 on every side


@pytest.mark.parametrize(
    ("mode", "size", "out", "margin"), [("fast", 256, 164, 46), ("original", 270, 80, 95)]
)
def test_patch_geometry(mode: str, size: int, out: int, margin: int) -> None:
    geometry = patch_geometry(mode)
    assert (geometry.input, geometry.output, geometry.margin) == (size, out, margin)
    with pytest.raises(ValueError, match="mode"):
        patch_geometry("medium")


def test_output_size_matches_geometry_on_small_model_inputs() -> None:
    # fast mode works on any size divisible by 8 whose decoder fits: 96 in -> 4 out (96 - 92)
    model = HoVerNet("fast", 3).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, 96, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "tp": (1, 3, 4, 4),
        "np": (1, 2, 4, 4),
        "hv": (1, 2, 4, 4),
    }


def _grads_after_step(freeze: bool) -> dict[str, bool]:
    torch.manual_seed(0)
    model = HoVerNet("fast", 3).set_freeze(freeze).train()
    out = model(torch.rand(1, 3, 96, 96) * 255)
    sum(v.square().mean() for v in out.values()).backward()
    groups = {
        "conv0": model.conv0,
        "d0.units": model.d0.units,
        "d0.shortcut": model.d0.shortcut,
        "d0.blk_bna": model.d0.blk_bna,
        "d1": model.d1,
        "d3": model.d3,
        "conv_bot": model.conv_bot,
        "decoder": model.decoder,
    }
    return {
        name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        for name, module in groups.items()
    }


def test_freeze_keeps_the_encoder_fixed_like_the_reference() -> None:
    frozen = _grads_after_step(freeze=True)
    assert frozen == {
        "conv0": True,
        "d0.units": False,
        "d0.shortcut": True,
        "d0.blk_bna": True,
        "d1": False,
        "d3": False,
        "conv_bot": True,
        "decoder": True,
    }
    assert all(_grads_after_step(freeze=False).values())


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        HoVerNet("slow", 6)
    with pytest.raises(ValueError, match="nr_types"):
        HoVerNet("fast", 0)


@pytest.mark.parametrize(("config", "size"), [("fast_t6", 256), ("original_tnone", 270)])
def test_bench_flop_count_equals_torch_flop_counter(config: str, size: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from hoverdask.bench import conv_gflop

    mode, nr_types = config_model_args(config)
    with torch.device("meta"):
        model = HoVerNet(mode, nr_types).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    assert conv_gflop(mode, nr_types) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-12)
    if config == "fast_t6":
        assert conv_gflop(mode, nr_types) == pytest.approx(297.87, abs=0.01)  # "~298 GFLOP"
