"""HoVer-Net lite: a small residual U-Net with HoVer-Net's three outputs, cheap enough for a CPU.

Same contract as :class:`~hoverdask.model.network.HoVerNet` — float NCHW RGB in 0..255 in, a
dict of NCHW logits ``tp`` (when typed), ``np`` (2) and ``hv`` (2) out — so post-processing,
seams, features and exports are unchanged. Unlike HoVer-Net its convolutions are padded, so the
output has the input's size; its patch geometry (``patch_geometry("lite")``, 512 -> 448) still
drops a 32 px margin so that every kept pixel has context on all sides (training supervises all
but a 16 px border of its 256 px windows).

Shape: a full-resolution stem (two 3x3 convolutions), three stride-2 stages of residual basic
blocks, and a decoder of nearest upsampling, concatenated skips and one 3x3 convolution per
scale, then 1x1 heads. The ``np``/``tp`` and ``hv`` outputs get their own last full-resolution
convolution (the distance maps need sharper, differently shaped features than the masks).
Every size is read back from the weights, so a checkpoint describes its own architecture.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hoverdask.model.geometry import PatchGeometry, patch_geometry

LITE_MODE = "lite"
HEADS_KEY = "heads.np.weight"  # present in every lite state dict, absent from HoVer-Net's


@dataclass(frozen=True)
class LiteShape:
    """Channel widths (stem, then one per stride-2 stage) and residual blocks per stage."""

    widths: tuple[int, ...] = (24, 48, 96, 192)
    blocks: int = 2

    def __post_init__(self) -> None:
        if len(self.widths) < 2 or min(self.widths) < 1 or self.blocks < 0:
            raise ValueError(f"invalid lite shape {self}")

    @property
    def stride(self) -> int:
        """The input side must be a multiple of this (one halving per stage)."""
        return 2 ** (len(self.widths) - 1)


DEFAULT_SHAPE = LiteShape()


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv", nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)),
                    ("bn", nn.BatchNorm2d(out_ch)),
                    ("relu", nn.ReLU(inplace=True)),
                ]
            )
        )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity shortcut (post-activation, as in ResNet-18)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + x)


class Stage(nn.Sequential):
    """One halving of resolution (a stride-2 convolution) followed by residual blocks."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict([("down", ConvBNReLU(in_ch, out_ch, 2))])
        for index in range(blocks):
            layers[f"block{index}"] = BasicBlock(out_ch)
        super().__init__(layers)


def _upsample_cat(small: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.interpolate(small, scale_factor=2.0, mode="nearest"), skip], dim=1)


class LiteHoVerNet(nn.Module):
    """The light network of the HoVer-Net family (see the module docstring).

    Attributes shared with :class:`~hoverdask.model.network.HoVerNet`, which the rest of the
    package relies on: ``mode`` ("lite"), ``nr_types``, ``geometry``, ``metadata`` and
    ``set_freeze`` (a no-op: nothing here is pretrained, so nothing is frozen).
    """

    def __init__(self, nr_types: int | None = None, shape: LiteShape = DEFAULT_SHAPE) -> None:
        super().__init__()
        if nr_types is not None and nr_types < 1:
            raise ValueError(f"nr_types must be None or >= 1, got {nr_types}")
        self.mode = LITE_MODE
        self.nr_types = nr_types
        self.shape = shape
        self.freeze = False
        self.metadata: dict[str, object] = {}
        w = shape.widths
        self.stem = nn.Sequential(
            OrderedDict([("conv1", ConvBNReLU(3, w[0])), ("conv2", ConvBNReLU(w[0], w[0]))])
        )
        self.encoder = nn.ModuleList(
            Stage(w[i], w[i + 1], shape.blocks) for i in range(len(w) - 1)
        )
        # decoder step i joins the deeper features with encoder level i (deepest first)
        self.decoder = nn.ModuleList(
            ConvBNReLU(w[i + 1] + w[i], w[i]) for i in reversed(range(1, len(w) - 1))
        )
        self.last = nn.ModuleDict(
            {
                "mask": ConvBNReLU(w[1] + w[0], w[0]),  # feeds np and tp
                "hv": ConvBNReLU(w[1] + w[0], w[0]),
            }
        )
        heads: OrderedDict[str, nn.Module] = OrderedDict()
        if nr_types is not None:
            heads["tp"] = nn.Conv2d(w[0], nr_types, 1)
        heads["np"] = nn.Conv2d(w[0], 2, 1)
        heads["hv"] = nn.Conv2d(w[0], 2, 1)
        self.heads = nn.ModuleDict(heads)

    @property
    def geometry(self) -> PatchGeometry:
        return patch_geometry(LITE_MODE)

    def set_freeze(self, freeze: bool = True) -> LiteHoVerNet:
        return self

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_sides(imgs, self.shape.stride)
        skips = [self.stem(imgs / 255.0)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        joined = decode(skips, self.decoder, _upsample_cat)
        mask = self.last["mask"](joined)
        hv = self.last["hv"](joined)
        logits: dict[str, torch.Tensor] = {}
        if "tp" in self.heads:
            logits["tp"] = self.heads["tp"](mask)
        logits["np"] = self.heads["np"](mask)
        logits["hv"] = self.heads["hv"](hv)
        return logits


def check_sides(imgs: torch.Tensor, stride: int) -> None:
    if imgs.shape[2] % stride or imgs.shape[3] % stride:
        raise ValueError(f"lite input sides must be multiples of {stride}, got "
                         f"{tuple(imgs.shape[2:])}")


def decode(
    skips: list[torch.Tensor],
    steps: nn.ModuleList,
    join: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The decoder: from the deepest features up, ``step(join(x, skip))`` per scale; returns
    the full-resolution ``join`` that the last convolutions read."""
    x = skips[-1]
    for level, step in zip(reversed(range(1, len(skips) - 1)), steps, strict=True):
        x = step(join(x, skips[level]))
    return join(x, skips[0])


def is_lite_state(state: Mapping[str, object]) -> bool:
    return HEADS_KEY in state


def shape_of_state(state: Mapping[str, torch.Tensor]) -> tuple[LiteShape, int | None]:
    """The :class:`LiteShape` and ``nr_types`` that a lite state dict was saved from."""
    widths = [int(state["stem.conv1.conv.weight"].shape[0])]
    stage = 0
    while f"encoder.{stage}.down.conv.weight" in state:
        widths.append(int(state[f"encoder.{stage}.down.conv.weight"].shape[0]))
        stage += 1
    block_ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.0\.block(\d+)\.", k))}
    tp = state.get("heads.tp.weight")
    nr_types = None if tp is None else int(tp.shape[0])
    return LiteShape(tuple(widths), len(block_ids)), nr_types


class FusedLite(nn.Module):
    """Inference copy with every BatchNorm folded into the convolution before it (eval only)."""

    def __init__(self, model: LiteHoVerNet) -> None:
        super().__init__()
        self.inner = _fold_batchnorms(copy.deepcopy(model).eval())
        self.mode, self.nr_types, self.geometry = model.mode, model.nr_types, model.geometry

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.inner(imgs)


def _fold_batchnorms(module: nn.Module) -> nn.Module:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.modules():
        if isinstance(child, ConvBNReLU):
            child.conv = fuse_conv_bn_eval(child.conv, child.bn)
            child.bn = nn.Identity()
        elif isinstance(child, BasicBlock):
            child.conv2 = fuse_conv_bn_eval(child.conv2, child.bn2)
            child.bn2 = nn.Identity()
    return module
