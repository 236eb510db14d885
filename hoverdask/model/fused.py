"""HoVer-Net's CPU inference form: BatchNorm folded into the convolutions, oneDNN fused post-ops.

On CPU the plain network spends about a third of its time outside the convolutions, in
memory-bound passes over large feature maps (BatchNorm, ReLU, residual sums, padding, the
upsampling and its sum) and in allocating their outputs. This form computes the same function
with fewer passes:

- every BatchNorm that directly follows a convolution is folded into its weights and a bias,
  and the ReLU after it runs as the convolution's oneDNN post-op;
- each residual sum is accumulated by the unit's last convolution into the running sum
  (oneDNN binary-add post-op, in place), so there is no separate add and no new tensor;
- TensorFlow "SAME" padding becomes the convolution's own padding where it is symmetric;
- the input scaling (x / 255) is folded into the first convolution;
- the pre-activation BatchNorm + ReLU that cannot be folded (their input is also needed raw)
  run as an affine pass and an in-place ReLU, the affine pass in place too where the raw
  values are not needed again;
- ``up(small) + skip`` is one broadcast sum, computed once for the three branches' shared input.

It is built from a :class:`~hoverdask.model.network.HoVerNet` (a separate copy of the weights;
the model is not changed) and is only valid in eval mode: the folding uses running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hoverdask.model.network import (
    _SKIP_CROP,
    DenseBlock,
    HoVerNet,
    ResidualBlock,
    _crop_by,
    centre_crop,
    tf_same_pad,
)

_LAYOUT = torch.channels_last


def _conv(*args: object) -> torch.Tensor:  # looked up on call: builds without oneDNN lack it
    return torch.ops.mkldnn._convolution_pointwise(*args)


def _conv_add_(*args: object) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise_.binary(*args)


def fused_ops_available() -> bool:
    """Whether this PyTorch build has oneDNN and its fused convolution operators."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def can_fuse(model: nn.Module) -> bool:
    """A HoVer-Net with the all-ones ``unpool_mat`` (every checkpoint's), on a oneDNN build."""
    return (
        isinstance(model, HoVerNet)
        and bool((model.upsample2x.unpool_mat == 1).all())
        and fused_ops_available()
    )


def _bn_scale_shift(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (float64, for folding)."""
    var = norm.running_var.detach().double()
    scale = norm.weight.detach().double() / torch.sqrt(var + norm.eps)
    shift = norm.bias.detach().double() - norm.running_mean.detach().double() * scale
    return scale, shift


class FusedConv(nn.Module):
    """A convolution with an optional following BatchNorm folded in and ReLU as post-op.

    ``same`` pads like :class:`TFSamePad` (through the convolution's padding when symmetric);
    ``input_scale`` multiplies the input (folded into the weights).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        norm: nn.BatchNorm2d | None = None,
        *,
        relu: bool = False,
        same: bool = False,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        weight = conv.weight.detach().double() * input_scale
        bias = (
            conv.bias.detach().double()
            if conv.bias is not None
            else torch.zeros(conv.out_channels, dtype=torch.float64)
        )
        if norm is not None:
            scale, shift = _bn_scale_shift(norm)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = bias * scale + shift
        dtype = conv.weight.dtype
        self.register_buffer("weight", weight.to(dtype).contiguous(memory_format=_LAYOUT))
        self.register_buffer("bias", bias.to(dtype))
        self.ksize = conv.kernel_size[0]
        self.padding = [int(side) for side in conv.padding]  # type: ignore[union-attr]
        self.stride = list(conv.stride)
        self.groups = conv.groups
        self.same = same
        self.attr = "relu" if relu else "none"

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        if not self.same:
            return x, self.padding
        before, after = tf_same_pad(self.ksize, self.stride[0], x.shape[2])
        if before == after:
            return x, [before, before]
        return F.pad(x, (before, after, before, after)).contiguous(memory_format=_LAYOUT), [0, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._padded(x)
        return _conv(
            x, self.weight, self.bias, padding, self.stride, [1, 1], self.groups, self.attr, [], ""
        )

    def add_into(self, x: torch.Tensor, total: torch.Tensor, *, relu: bool = False) -> torch.Tensor:
        """``total += conv(x)`` in place, then ``relu_(total)`` when ``relu``; returns ``total``."""
        x, padding = self._padded(x)
        return _conv_add_(
            total, x, self.weight, self.bias, padding, self.stride, [1, 1], self.groups,
            "add", None, "relu" if relu else None, [], None,
        )


class AffineReLU(nn.Module):
    """Eval-mode BatchNorm + ReLU: an affine pass (into ``x`` itself when ``in_place``), then
    an in-place ReLU."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        scale, shift = _bn_scale_shift(norm)
        dtype = norm.weight.dtype
        self.register_buffer("scale", scale.to(dtype).view(1, -1, 1, 1))
        self.register_buffer("shift", shift.to(dtype).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
        if in_place:
            return torch.addcmul(self.shift, x, self.scale, out=x).relu_()
        return torch.addcmul(self.shift, x, self.scale).relu_()


class FusedResidualBlock(nn.Module):
    def __init__(self, block: ResidualBlock) -> None:
        super().__init__()
        self.shortcut = FusedConv(block.shortcut)
        self.preacts = nn.ModuleList()
        self.convs = nn.ModuleList()
        for index, unit in enumerate(block.units):
            layers = unit._modules
            if index > 0:
                self.preacts.append(AffineReLU(layers["preact/bn"]))
            self.convs.append(
                nn.ModuleList(
                    [
                        FusedConv(layers["conv1"], layers["conv1/bn"], relu=True),
                        FusedConv(layers["conv2"], layers["conv2/bn"], relu=True, same=True),
                        FusedConv(layers["conv3"]),
                    ]
                )
            )
        self.out = AffineReLU(block.blk_bna.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = self.shortcut(x)
        for index, (conv1, conv2, conv3) in enumerate(self.convs):
            unit_in = x if index == 0 else self.preacts[index - 1](total)
            conv3.add_into(conv2(conv1(unit_in)), total)
        return self.out(total, in_place=True)


class FusedDenseBlock(nn.Module):
    def __init__(self, block: DenseBlock) -> None:
        super().__init__()
        self.preacts = nn.ModuleList()
        self.convs = nn.ModuleList()
        for unit in block.units:
            layers = unit._modules
            self.preacts.append(AffineReLU(layers["preact_bna/bn"]))
            self.convs.append(
                nn.ModuleList(
                    [
                        FusedConv(layers["conv1"], layers["conv1/bn"], relu=True),
                        FusedConv(layers["conv2"]),
                    ]
                )
            )
        self.out = AffineReLU(block.blk_bna.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (a preallocated buffer that the units write into, instead of torch.cat, was measured:
        # no faster, since the pre-activation pass reads the features anyway)
        for preact, (conv1, conv2) in zip(self.preacts, self.convs, strict=True):
            new = conv2(conv1(preact(x)))
            x = torch.cat([centre_crop(x, new.shape[2], new.shape[3]), new], dim=1)
        return self.out(x, in_place=True)


class NearestUpSample2x(nn.Module):
    """``UpSample2x`` with an all-ones ``unpool_mat`` (every checkpoint's) as nearest-neighbour
    interpolation: the same values (x * 1 == x), but it keeps the channels_last layout, where the
    reference's view-multiply-reshape returns NCHW and makes the following adds and convs copy.
    :meth:`add_to` also does the sum that always follows it, in the same pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def add_to(self, small: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``skip + self(small)`` as one broadcast sum; channels_last out."""
        n, c, h, w = skip.shape
        out = torch.empty((n, h, w, c), dtype=skip.dtype, device=skip.device)
        torch.add(
            skip.permute(0, 2, 3, 1).unflatten(1, (h // 2, 2)).unflatten(3, (w // 2, 2)),
            small.permute(0, 2, 3, 1).view(n, h // 2, 1, w // 2, 1, c),
            out=out.view(n, h // 2, 2, w // 2, 2, c),
        )
        return out.permute(0, 3, 1, 2)


class FusedBranch(nn.Module):
    """One decoder branch; ``u1`` is followed by ``u0``'s BatchNorm + ReLU, folded into it."""

    def __init__(self, branch: nn.Sequential) -> None:
        super().__init__()
        u3, u2, u1, u0 = (branch._modules[name] for name in ("u3", "u2", "u1", "u0"))
        self.u3, self.u2 = _fused_stage(u3), _fused_stage(u2)
        self.head = nn.Sequential(
            FusedConv(u1.conva, u0.bn, relu=True, same=True), FusedConv(u0.conv)
        )


def _fused_stage(stage: nn.Module) -> nn.Sequential:
    """A decoder stage: conv, dense block, conv."""
    return nn.Sequential(FusedConv(stage.conva), FusedDenseBlock(stage.dense), FusedConv(stage.convf))


class FusedHoVerNet(nn.Module):
    """The eval-mode function of ``model`` with the fused CPU operators (see module docs)."""

    def __init__(self, model: HoVerNet) -> None:
        super().__init__()
        if not can_fuse(model):
            raise ValueError(
                "the fused CPU form needs a HoVerNet with an all-ones unpool_mat and oneDNN"
            )
        self.mode, self.nr_types, self.geometry = model.mode, model.nr_types, model.geometry
        conv0 = model.conv0._modules
        self.conv0 = FusedConv(
            conv0["/"], conv0["bn"], relu=True, same="pad" in conv0, input_scale=1 / 255.0
        )
        self.blocks = nn.ModuleList(
            FusedResidualBlock(block) for block in (model.d0, model.d1, model.d2, model.d3)
        )
        self.conv_bot = FusedConv(model.conv_bot)
        self.decoder = nn.ModuleDict(
            (name, FusedBranch(branch)) for name, branch in model.decoder.items()
        )
        self.upsample2x = NearestUpSample2x()
        self.eval()

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        d0 = self.blocks[0](self.conv0(imgs.contiguous(memory_format=_LAYOUT)))
        d1 = self.blocks[1](d0)
        d2 = self.blocks[2](d1)
        d3 = self.conv_bot(self.blocks[3](d2))
        crop0, crop1 = _SKIP_CROP[self.mode]
        d0, d1 = _crop_by(d0, crop0), _crop_by(d1, crop1)
        up = self.upsample2x
        u3_in = up.add_to(d3, d2)  # the same for every branch: computed once
        logits: dict[str, torch.Tensor] = {}
        for name, branch in self.decoder.items():
            u2 = branch.u2(up.add_to(branch.u3(u3_in), d1))
            logits[name] = branch.head(up.add_to(u2, d0))
        return logits


__all__ = ["FusedHoVerNet", "NearestUpSample2x", "can_fuse", "fused_ops_available"]
