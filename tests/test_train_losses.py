"""Each loss term against a hand computation; MSGE differentiates x along columns (the paper)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hoverdask.train.losses import (
    LossWeights,
    cross_entropy,
    dice_loss,
    hovernet_loss,
    hv_gradients,
    mse,
    msge,
)


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    # one image, 2 classes, 1x2 pixels
    logits = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])
    target = torch.tensor([[[1, 1]]])
    return logits, target


def test_cross_entropy_by_hand() -> None:
    logits, target = _logits()
    p_hi = math.exp(1) / (1 + math.exp(1))
    expected = -(math.log(p_hi) + math.log(1 - p_hi)) / 2
    assert float(cross_entropy(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_dice_by_hand() -> None:
    logits, target = _logits()
    s = 1e-3
    # class 0: probs (1-p, p) vs target 0 -> inter 0; class 1: probs (p, 1-p) vs target 1
    class0 = 1 - s / (1.0 + 0 + s)
    class1 = 1 - (2 * 1.0 + s) / (1.0 + 2 + s)
    assert float(dice_loss(logits, target)) == pytest.approx(class0 + class1, rel=1e-6)


def test_mse_by_hand() -> None:
    pred = torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])
    true = torch.zeros_like(pred)
    assert float(mse(pred, true)) == pytest.approx((1 + 4 + 0 + 1) / 4)


def _numpy_gradient(image: np.ndarray, along_columns: bool) -> np.ndarray:
    """Cross-correlation with k[dy, dx] = d/(dx²+dy²), written out loop by loop."""
    padded = np.pad(image, 2)
    out = np.zeros_like(image, dtype=np.float64)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if dx == dy == 0:
                continue
            weight = (dx if along_columns else dy) / (dx * dx + dy * dy)
            out += weight * padded[2 + dy : 2 + dy + image.shape[0], 2 + dx : 2 + dx + image.shape[1]]
    return out


def test_msge_by_hand() -> None:
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(1, 2, 9, 11)).astype(np.float32)
    true = rng.normal(size=(1, 2, 9, 11)).astype(np.float32)
    nuclei = (rng.random((1, 9, 11)) < 0.4).astype(np.int64)
    dx = _numpy_gradient(pred[0, 0], True) - _numpy_gradient(true[0, 0], True)
    dy = _numpy_gradient(pred[0, 1], False) - _numpy_gradient(true[0, 1], False)
    focus = nuclei[0].astype(bool)
    expected = ((dx[focus] ** 2).sum() + (dy[focus] ** 2).sum()) / (2 * focus.sum())
    got = msge(torch.from_numpy(pred), torch.from_numpy(true), torch.from_numpy(nuclei))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_horizontal_map_is_differentiated_along_x() -> None:
    ramp = torch.arange(12.0).repeat(12, 1)  # grows along columns (x)
    grads = hv_gradients(torch.stack([ramp, ramp.T])[None])
    assert float(grads[0, 0, 6, 6]) > 0  # d(x map)/dx
    assert float(grads[0, 1, 6, 6]) > 0  # d(y map)/dy
    swapped = hv_gradients(torch.stack([ramp.T, ramp])[None])
    assert float(swapped[0, :, 6, 6].abs().max()) < 1e-5


def test_total_uses_paper_weights_and_skips_untyped_samples() -> None:
    torch.manual_seed(0)
    logits = {
        "tp": torch.randn(2, 3, 6, 6),
        "np": torch.randn(2, 2, 6, 6),
        "hv": torch.randn(2, 2, 6, 6),
    }
    targets = {
        "np": torch.randint(0, 2, (2, 6, 6)),
        "hv": torch.rand(2, 2, 6, 6) * 2 - 1,
        "tp": torch.randint(0, 3, (2, 6, 6)),
        "has_types": torch.tensor([True, False]),
    }
    total, terms = hovernet_loss(logits, targets)
    assert terms["tp_ce"] == pytest.approx(float(cross_entropy(logits["tp"][:1], targets["tp"][:1])))
    assert terms["tp_dice"] == pytest.approx(float(dice_loss(logits["tp"][:1], targets["tp"][:1])))
    w = LossWeights()
    assert w.hv_msge == 2.0
    expected = sum(getattr(w, name) * value for name, value in terms.items())
    assert float(total) == pytest.approx(expected, rel=1e-6)
    targets["has_types"] = torch.tensor([False, False])
    _, untyped = hovernet_loss(logits, targets)
    assert "tp_ce" not in untyped


def test_parse_loss_weights() -> None:
    from hoverdask.core.errors import HoverdaskError
    from hoverdask.train.losses import LossWeights, parse_loss_weights

    weights = parse_loss_weights(["hv_mse=2", "hv_msge=4"])
    assert weights == LossWeights(hv_mse=2.0, hv_msge=4.0)
    for bad in ("hv=2", "hv_mse=-1", "hv_mse", "np_ce=x"):
        with pytest.raises(HoverdaskError, match="--loss-weight"):
            parse_loss_weights([bad])
