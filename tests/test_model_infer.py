"""Inference helpers against the reference: infer_step output, tile-mode geometry and assembly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.core.errors import HoverdaskError
from hoverdask.model import (
    HoVerNet,
    patch_geometry,
    predict_image,
    predict_patches,
    resolve_device,
    save_checkpoint,
    tile_layout,
)
from hoverdask.model.fused import FusedConv, FusedHoVerNet, NearestUpSample2x, can_fuse
from hoverdask.model.infer import cpu_inference_model, logits_to_maps
from hoverdask.model.network import TFSamePad, UpSample2x
from tests.conftest import PARITY, parity_json, parity_npz
from tests.parity_weights import parity_model

INFER_CONFIGS = {
    "fast_t6": "input_fast_256.npy",
    "original_t5": "input_original_270.npy",
    "original_tnone": "input_original_270.npy",
}


def _softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_type_map_takes_the_first_of_tied_maxima() -> None:
    rng = np.random.default_rng(2)
    tp = rng.integers(0, 3, (2, 5, 9, 11)).astype(np.float32)  # integer logits: many ties
    logits = {"tp": torch.from_numpy(tp).contiguous(memory_format=torch.channels_last),
              "np": torch.zeros(2, 2, 9, 11), "hv": torch.zeros(2, 2, 9, 11)}
    maps = logits_to_maps(logits).numpy()
    expected = np.argmax(_softmax(tp, axis=1), axis=1)  # numpy: the first maximum
    np.testing.assert_array_equal(maps[..., 0], expected)


@pytest.mark.parametrize("config", INFER_CONFIGS)
def test_predict_patches_equals_reference_infer_step(config: str) -> None:
    model = parity_model(config)
    out = predict_patches(model, np.load(PARITY / INFER_CONFIGS[config]))
    reference = parity_npz(f"forward_{config}.npz")
    expected = reference["infer_step_out"]
    assert out.dtype == np.float32
    assert out.shape == expected.shape
    typed = "logits_tp" in reference
    np.testing.assert_allclose(out[..., int(typed) :], expected[..., int(typed) :], atol=1e-4)
    if typed:
        prob = np.sort(_softmax(reference["logits_tp"].astype(np.float64), axis=1), axis=1)
        clear = (prob[:, -1] - prob[:, -2]) > 1e-4
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(out[..., 0][clear], expected[..., 0][clear])


@pytest.mark.parametrize("case", parity_json("tiling_geometry.json")["tile_mode_prepare_patching"])
def test_tile_layout_equals_reference_patching(case: dict) -> None:
    mode = {256: "fast", 270: "original"}[case["window"]]
    height, width = case["image_hw"]
    layout = tile_layout(height, width, patch_geometry(mode))
    (top, bottom), (left, right) = layout.pad
    assert [top, left] == case["src_top_left_in_padded"]
    assert [height + top + bottom, width + left + right] == case["padded_hw"]
    assert len(layout.top_lefts) == case["num_patches"]
    rows = case["patch_info_rows_[y,x,row,col]"]  # may be abbreviated: compare what is listed
    step = case["mask_step"]
    listed = [(y, x, y // step, x // step) for y, x in layout.top_lefts[: len(rows)]]
    assert listed == [tuple(r) for r in rows]


class _ContextModel(torch.nn.Module):
    """A stand-in network whose outputs are known functions of the input, for tiling tests.

    np logits [0, R/64] at the output pixel, h = G at the output pixel, v = B seven pixels up
    and left of it (so reflect padding shows), tp = argmax target (R // 64).
    """

    def __init__(self, mode: str, nr_types: int | None) -> None:
        super().__init__()
        self.mode, self.nr_types, self.geometry = mode, nr_types, patch_geometry(mode)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m, o = self.geometry.margin, self.geometry.output
        centre = x[:, :, m : m + o, m : m + o]
        shifted = x[:, 2:3, m - 7 : m - 7 + o, m - 7 : m - 7 + o]
        out = {}
        if self.nr_types is not None:
            target = (centre[:, 0] // 64).long().clamp(max=self.nr_types - 1)
            out["tp"] = torch.nn.functional.one_hot(target, self.nr_types).permute(0, 3, 1, 2) * 5.0
        out["np"] = torch.cat([torch.zeros_like(centre[:, :1]), centre[:, :1] / 64], dim=1)
        out["hv"] = torch.cat([centre[:, 1:2], shifted], dim=1)
        return out


@pytest.mark.parametrize(
    ("mode", "nr_types", "shape"), [("fast", 5, (300, 500)), ("original", None, (173, 91))]
)
def test_predict_image_assembles_like_manual_padding(
    mode: str, nr_types: int | None, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    model = _ContextModel(mode, nr_types)
    out = predict_image(model, image, batch_size=3)
    assert out.shape == (*shape, 4 if nr_types else 3)
    # manual oracle: reflect padding by the reference margin, then pixel-wise formulas
    margin = patch_geometry(mode).margin
    padded = np.pad(image, ((margin, 300), (margin, 300), (0, 0)), mode="reflect").astype(float)
    r, g = image[..., 0].astype(np.float64), image[..., 1].astype(np.float64)
    b_shifted = padded[margin - 7 : margin - 7 + shape[0], margin - 7 : margin - 7 + shape[1], 2]
    expected = [1 / (1 + np.exp(-r / 64)), g, b_shifted]
    if nr_types:
        expected.insert(0, np.minimum(image[..., 0] // 64, nr_types - 1))
    np.testing.assert_allclose(out, np.stack(expected, -1), rtol=1e-6, atol=1e-6)


def test_input_checks() -> None:
    model = HoVerNet("fast", None)
    with pytest.raises(ValueError, match="uint8"):
        predict_patches(model, np.zeros((1, 96, 96, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        predict_patches(model, np.zeros((96, 96, 3), np.uint8))
    if not torch.cuda.is_available():
        with pytest.raises(HoverdaskError, match="CUDA"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.slow
def test_segment_command_writes_reference_tile_outputs(tmp_path: Path) -> None:
    import cv2

    from hoverdask.nuclei.postproc import inst_info_to_json, process

    model = parity_model("original_t5")
    checkpoint = save_checkpoint(model, tmp_path / "consep.tar")
    image = np.load(PARITY / "input_original_270.npy")[0, 95:175, 95:175]  # 80 x 80: one patch
    cv2.imwrite(str(tmp_path / "tile.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    out_dir = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "segment",
            str(tmp_path / "tile.png"),
            "--model",
            str(checkpoint),
            "--out",
            str(out_dir),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "CoNSeP" in result.output
    inst_map, inst_info = process(predict_image(model, image), 5)
    print(f"{len(inst_info)} nuclei")
    doc = json.loads((out_dir / "tile.json").read_text())
    assert doc == {"mag": None, "nuc": json.loads(json.dumps(inst_info_to_json(inst_info)))}
    np.testing.assert_array_equal(np.load(out_dir / "tile_inst.npy"), inst_map)
    assert np.load(out_dir / "tile_inst.npy").dtype == np.int32
    overlay = cv2.imread(str(out_dir / "tile.png"))
    assert overlay.shape == (80, 80, 3)
    assert sorted(p.name for p in out_dir.iterdir()) == ["tile.json", "tile.png", "tile_inst.npy"]


@pytest.mark.gpu
def test_cuda_matches_reference_without_tf32() -> None:
    model = parity_model("fast_t6")
    images = np.load(PARITY / "input_fast_256.npy")
    expected = parity_npz("forward_fast_t6.npz")["infer_step_out"]
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out = predict_patches(model, images, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    np.testing.assert_allclose(out[..., 1:], expected[..., 1:], atol=5e-4)
    fast = predict_patches(model, images, device="cuda", autocast=True)  # bf16: approximate
    assert fast.shape == expected.shape
    assert np.abs(fast[..., 1] - expected[..., 1]).mean() < 0.05


# --- the fused CPU form (hoverdask.model.fused) against the plain network ------------------------


@pytest.mark.parametrize("config", INFER_CONFIGS)
def test_fused_cpu_form_matches_the_model_and_the_reference(config: str) -> None:
    model = parity_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = cpu_inference_model(model)
    assert isinstance(fused, FusedHoVerNet)  # what predict_patches runs on CPU
    images = torch.from_numpy(np.load(PARITY / INFER_CONFIGS[config])).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        got, plain = fused(images), model(images)
    reference = parity_npz(f"forward_{config}.npz")
    assert list(got) == list(plain)
    for head in plain:
        drift = float((got[head] - plain[head]).abs().max())
        error = float(np.abs(got[head].numpy() - reference[f"logits_{head}"]).max())
        print(f"{config} {head}: max abs difference to the model {drift:.2e}, reference {error:.2e}")
        assert drift < 1e-4, (head, drift)
        assert error < 1e-4, (head, error)
    after = model.state_dict()  # the checkpoint layout and values are untouched
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _random_norm(channels: int) -> torch.nn.BatchNorm2d:
    norm = torch.nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.3, 2.0)
    return norm


@pytest.mark.parametrize(
    ("ksize", "stride", "size"), [(3, 2, 16), (3, 2, 15), (3, 1, 9), (5, 1, 12), (7, 1, 10)]
)
def test_fused_conv_equals_pad_conv_batchnorm_relu(ksize: int, stride: int, size: int) -> None:
    torch.manual_seed(ksize * 100 + size)
    conv = torch.nn.Conv2d(6, 8, ksize, stride=stride, bias=False)
    norm = _random_norm(8)
    x = torch.randn(2, 6, size, size).contiguous(memory_format=torch.channels_last)
    fused = FusedConv(conv, norm, relu=True, same=True)
    total = torch.randn(2, 8, *conv(TFSamePad(ksize, stride)(x)).shape[2:])
    total = total.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        convolved = conv(TFSamePad(ksize, stride)(x))
        want = torch.relu(norm(convolved))
        got = fused(x)
        want_sum = total + FusedConv(conv, same=True)(x)
        summed = FusedConv(conv, same=True).add_into(x, total)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert summed.data_ptr() == total.data_ptr()  # accumulated in place
    torch.testing.assert_close(summed, want_sum, atol=1e-5, rtol=1e-5)


def test_upsample_add_equals_reference_unpooling_plus_skip() -> None:
    small = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    big = torch.randn(2, 5, 20, 22).contiguous(memory_format=torch.channels_last)
    skip = big[:, :, 3:15, 4:18]  # a centre crop: a strided view, as the skip features are
    got = NearestUpSample2x().add_to(small, skip)
    assert torch.equal(got, UpSample2x()(small) + skip)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_fused_form_uses_running_statistics_and_leaves_the_model_alone() -> None:
    torch.manual_seed(1)
    model = HoVerNet("fast", 3).train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.load_state_dict(_random_norm(module.num_features).state_dict())
    fused = FusedHoVerNet(model)
    assert model.training  # building the fused form does not switch the model to eval
    x = torch.rand(1, 3, 96, 96) * 255
    with torch.inference_mode():
        got, want = fused(x), model.eval()(x)
    for head in want:
        torch.testing.assert_close(got[head], want[head], atol=1e-4, rtol=1e-4)


def test_unusual_unpooling_is_not_fused() -> None:
    torch.manual_seed(2)
    model = HoVerNet("fast", None).eval()
    with torch.no_grad():
        model.upsample2x.unpool_mat.fill_(0.5)  # not the nearest upsampling any more
    assert not can_fuse(model)
    with pytest.raises(ValueError, match="unpool_mat"):
        FusedHoVerNet(model)
    used = cpu_inference_model(model)
    assert isinstance(used, HoVerNet)
    assert used is not model
    x = torch.rand(1, 3, 96, 96) * 255
    with torch.inference_mode():
        got, want = used(x), model(x)
    for head in want:
        torch.testing.assert_close(got[head], want[head])
