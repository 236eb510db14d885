"""The light network: HoVer-Net's outputs, its FLOP budget, its checkpoints and inference path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hoverdask.bench import conv_gflop, mflop_per_output_pixel
from hoverdask.model import LiteHoVerNet, build_network, patch_geometry
from hoverdask.model.checkpoints import infer_layout, load_model, save_checkpoint
from hoverdask.model.fused import fused_ops_available
from hoverdask.model.fused_lite import FusedLiteHoVerNet, upsample_concat
from hoverdask.model.infer import cpu_inference_model, predict_image, predict_patches
from hoverdask.model.lite import LiteShape, shape_of_state
from hoverdask.model.network import HoVerNet
from hoverdask.train.loop import _crop_to_targets
from hoverdask.train.losses import hovernet_loss


def _with_running_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm statistics, so that folding them into the convolutions matters."""
    torch.manual_seed(3)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("nr_types", [5, None])
def test_lite_outputs_are_hovernets(nr_types: int | None) -> None:
    model = LiteHoVerNet(nr_types).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 96) * 255)
    assert list(out) == (["tp", "np", "hv"] if nr_types else ["np", "hv"])
    assert out["np"].shape == (2, 2, 64, 96)
    assert out["hv"].shape == (2, 2, 64, 96)
    if nr_types:
        assert out["tp"].shape == (2, nr_types, 64, 96)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 3, 60, 64))


def test_lite_flop_count_and_budget() -> None:
    model = LiteHoVerNet(5)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 128, 128))
    counted = counter.get_total_flops()
    assert conv_gflop(size=128, network=model) == pytest.approx(counted / 1e9, rel=1e-9)
    # the budget: <= 0.4 MFLOP per output pixel (margin included), >= 25x less than fast
    lite = mflop_per_output_pixel(model)
    fast = mflop_per_output_pixel(HoVerNet("fast", 6))
    assert lite <= 0.4
    assert fast / lite >= 25


def test_lite_checkpoint_round_trip_reads_its_own_shape(tmp_path: Path) -> None:
    shape = LiteShape((8, 16, 24), blocks=1)
    model = _with_running_stats(LiteHoVerNet(4, shape))
    path = save_checkpoint(model, tmp_path / "lite.tar", extra={"hoverdask": {"x": 1}})
    state = torch.load(path, weights_only=True)["desc"]
    assert infer_layout(state) == ("lite", 4)
    assert shape_of_state(state) == (shape, 4)
    loaded = load_model(path)
    assert isinstance(loaded, LiteHoVerNet)
    assert (loaded.mode, loaded.nr_types, loaded.shape) == ("lite", 4, shape)
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        want, got = model(x), loaded(x)
    for head in want:
        torch.testing.assert_close(got[head], want[head])


def test_fp16_weights_load_into_fp32(tmp_path: Path) -> None:
    model = _with_running_stats(LiteHoVerNet(3, LiteShape((8, 16), 1)))
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"desc": half}, tmp_path / "half.tar")
    loaded = load_model(tmp_path / "half.tar")
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 16, 16) * 255
    with torch.no_grad():
        diff = (loaded(x)["np"] - model(x)["np"]).abs().max()
    assert 0 < diff < 0.05  # rounded to half precision, nothing else


def test_inference_copy_folds_batchnorm_and_crops_the_margin() -> None:
    model = _with_running_stats(LiteHoVerNet(5))
    geometry = patch_geometry("lite")
    patches = np.random.default_rng(0).integers(0, 256, (1, geometry.input, geometry.input, 3))
    maps = predict_patches(model, patches.astype(np.uint8), device="cpu")
    assert maps.shape == (1, geometry.output, geometry.output, 4)
    inference = cpu_inference_model(model)
    if fused_ops_available():  # oneDNN: BatchNorm folded, ReLU and residual sums as post-ops
        assert isinstance(inference, FusedLiteHoVerNet)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inference.modules())
    else:
        assert inference.inner.stem.conv1.bn.__class__ is torch.nn.Identity
    with torch.no_grad():
        logits = model(torch.from_numpy(patches).permute(0, 3, 1, 2).float())
    m = geometry.margin
    np_prob = torch.softmax(logits["np"], 1)[0, 1, m:-m, m:-m].numpy()
    hv = logits["hv"][0, :, m:-m, m:-m].permute(1, 2, 0).numpy()
    tp = logits["tp"][0, :, m:-m, m:-m].argmax(0).numpy()
    np.testing.assert_allclose(maps[0, ..., 1], np_prob, atol=1e-4)
    np.testing.assert_allclose(maps[0, ..., 2:], hv, atol=1e-3)
    assert (maps[0, ..., 0] == tp).mean() > 0.999


@pytest.mark.skipif(not fused_ops_available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize("blocks", [0, 2])
def test_fused_form_computes_the_models_logits(blocks: int) -> None:
    model = _with_running_stats(LiteHoVerNet(5, LiteShape((8, 16, 24), blocks)))
    images = torch.rand(2, 3, 64, 96) * 255
    with torch.inference_mode():
        expected = model(images)
        fused = FusedLiteHoVerNet(model)(images.contiguous(memory_format=torch.channels_last))
        model_after = model(images)
    assert set(fused) == set(expected)
    for name, logits in expected.items():
        torch.testing.assert_close(fused[name], logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(model_after[name], logits)  # the model itself is left as it was
    with pytest.raises(ValueError, match="multiples of 4"):
        FusedLiteHoVerNet(model)(torch.zeros(1, 3, 64, 90))


def test_upsample_concat_equals_interpolate_then_cat() -> None:
    small = torch.rand(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    skip = torch.rand(2, 3, 12, 14).contiguous(memory_format=torch.channels_last)
    joined = upsample_concat(small, skip)
    expected = torch.cat([torch.nn.functional.interpolate(small, scale_factor=2.0), skip], 1)
    assert torch.equal(joined, expected)
    assert joined.is_contiguous(memory_format=torch.channels_last)


def test_predict_image_covers_any_image_size() -> None:
    model = LiteHoVerNet(None, LiteShape((8, 16), 1)).eval()
    image = np.random.default_rng(1).integers(0, 256, (300, 530, 3)).astype(np.uint8)
    assert predict_image(model, image, device="cpu").shape == (300, 530, 3)


def test_a_few_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = build_network("lite", 3)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0, 255, (2, 3, 64, 64)).astype(np.float32))
    nuclei = (image[:, 0] < 128).long()[:, 16:48, 16:48]
    batch = {
        "image": image,
        "np": nuclei,
        "hv": torch.zeros(2, 2, 32, 32),
        "tp": nuclei * 2,
        "has_types": torch.tensor([True, False]),
    }
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        model.train()
        loss, _ = hovernet_loss(_crop_to_targets(model(batch["image"]), batch), batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_bundle_writes_fp16_weights_with_the_card(tmp_path: Path) -> None:
    from hoverdask.model.bundle import bundle_checkpoint
    from hoverdask.model.catalog import model_card

    model = _with_running_stats(LiteHoVerNet(5, LiteShape((8, 16), 1)))
    source = save_checkpoint(model, tmp_path / "trained.tar",
                             extra={"hoverdask": {"type_table": "consep"}})
    card = {"name": "tiny", "licence": "CC0"}
    target = bundle_checkpoint(source, tmp_path / "bundled.tar", card)
    stored = torch.load(target, weights_only=True)
    assert all(v.dtype == torch.float16 for v in stored["desc"].values() if v.is_floating_point())
    assert target.stat().st_size < source.stat().st_size
    loaded = load_model(target)
    assert model_card(loaded.metadata) == card
    assert loaded.metadata["hoverdask"]["type_table"] == "consep"  # training metadata kept
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        diff = (loaded(x)["hv"] - model(x)["hv"]).abs().max()
    assert 0 < diff < 0.05
