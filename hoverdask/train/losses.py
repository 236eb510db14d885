"""The HoVer-Net loss, equations (1)-(5) of Graham et al. (2019).

``L = λa·MSE(hv) + λb·MSGE(hv) + λc·CE(np) + λd·Dice(np) + λe·CE(tp) + λf·Dice(tp)`` with
λb = 2 and every other weight 1, as the paper states (the reference code uses λb = 1).

MSGE compares the horizontal gradient of the horizontal map and the vertical gradient of the
vertical map, using 5x5 Sobel-like kernels, over nucleus pixels only. **The paper is followed
here, not the reference PyTorch code**: the reference builds its kernels with an 'ij' meshgrid,
so it differentiates the horizontal (x) map along y and the vertical map along x. (The original
TensorFlow code used 'xy' and agrees with the paper.)

Cross-entropy and Dice are the reference's: CE averaged over pixels, Dice with smoothing 1e-3
summed over all channels (background included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from hoverdask.core.errors import HoverdaskError
from hoverdask.train.options import name_and_number

DICE_SMOOTH = 1e-3
SOBEL_RADIUS = 2


@dataclass(frozen=True)
class LossWeights:
    """λa..λf of equation (1); the defaults are the paper's."""

    hv_mse: float = 1.0
    hv_msge: float = 2.0
    np_ce: float = 1.0
    np_dice: float = 1.0
    tp_ce: float = 1.0
    tp_dice: float = 1.0


def parse_loss_weights(items: Sequence[str]) -> LossWeights:
    """``["hv_msge=4", ...]`` -> :class:`LossWeights` with those weights changed."""
    names = {f.name for f in fields(LossWeights)}
    changes: dict[str, float] = {}
    for item in items:
        name, number = name_and_number(item)
        if name not in names or not number >= 0:
            raise HoverdaskError(
                f"--loss-weight {item!r}: expected NAME=VALUE with NAME one of "
                f"{', '.join(sorted(names))} and VALUE >= 0"
            )
        changes[name] = number
    return replace(LossWeights(), **changes)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pixel cross-entropy of NCHW ``logits`` against an NHW class map."""
    return F.cross_entropy(logits.float(), target.long())


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Sum over classes of ``1 - (2·Σ p·t + s) / (Σ p + Σ t + s)``, sums over batch and pixels."""
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return (1.0 - (2.0 * inter + smooth) / (total + smooth)).sum()


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels and both hv channels."""
    return ((pred.float() - target) ** 2).mean()


def sobel_kernels(radius: int = SOBEL_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dx, d/dy) kernels: offset / squared distance, 0 at the centre. x runs along columns."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    norm = dx**2 + dy**2 + 1e-15
    return dx / norm, dy / norm


def hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """N2HW: d(channel 0)/dx and d(channel 1)/dy (cross-correlation, zero padding)."""
    kx, ky = sobel_kernels()
    weight = torch.stack([kx, ky]).unsqueeze(1).to(hv.device, hv.dtype)
    return F.conv2d(hv, weight, padding=SOBEL_RADIUS, groups=2)


def msge(pred: torch.Tensor, target: torch.Tensor, nuclei: torch.Tensor) -> torch.Tensor:
    """Mean squared gradient error over nucleus pixels (both channels count, as in the reference)."""
    diff = hv_gradients(pred.float()) - hv_gradients(target.float())
    focus = nuclei.unsqueeze(1).to(diff.dtype).expand_as(diff)
    return (focus * diff**2).sum() / (focus.sum() + 1e-8)


def hovernet_loss(
    logits: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    weights: LossWeights | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms (unweighted, as floats) for one batch.

    ``targets`` holds ``np`` (NHW), ``hv`` (N2HW) and, for typed models, ``tp`` (NHW) with
    ``has_types`` (N bool): samples from segmentation-only datasets do not enter the tp terms.
    """
    w = weights or LossWeights()
    nuclei = targets["np"]
    terms = {
        "hv_mse": mse(logits["hv"], targets["hv"]),
        "hv_msge": msge(logits["hv"], targets["hv"], nuclei),
        "np_ce": cross_entropy(logits["np"], nuclei),
        "np_dice": dice_loss(logits["np"], nuclei),
    }
    if "tp" in logits:
        typed = targets["has_types"]
        if bool(typed.any()):
            terms["tp_ce"] = cross_entropy(logits["tp"][typed], targets["tp"][typed])
            terms["tp_dice"] = dice_loss(logits["tp"][typed], targets["tp"][typed])
    total = sum(getattr(w, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}
