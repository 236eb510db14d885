"""The light network's CPU inference form: the same function in fewer passes over memory.

The lite network is small enough that a sixth of its CPU time went to memory-bound work between
the convolutions: ReLUs, residual sums, nearest upsampling and the concatenation with the skip.
Here, with the oneDNN operators of :mod:`hoverdask.model.fused`:

- BatchNorm is folded into the convolution before it (in float64, then cast), and ReLU runs
  as the convolution's post-op;
- a residual block's second convolution accumulates into its input in place, ReLU included;
- the input scaling (x / 255) is folded into the first convolution;
- upsampling and concatenation write the decoder's input once, into one channels_last buffer.

Logits agree with :class:`~hoverdask.model.lite.LiteHoVerNet` in eval mode to float32
rounding. Built from a copy of the weights; the model is left as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from hoverdask.model.fused import FusedConv
from hoverdask.model.lite import ConvBNReLU, LiteHoVerNet, check_sides, decode

_LAYOUT = torch.channels_last


def _fused(layer: ConvBNReLU, *, input_scale: float = 1.0) -> FusedConv:
    return FusedConv(layer.conv, layer.bn, relu=True, input_scale=input_scale)


def upsample_concat(small: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``cat([nearest_upsample_2x(small), skip], dim=1)`` written once, channels_last."""
    n, c_small, h, w = small.shape
    c_skip = skip.shape[1]
    out = torch.empty((n, 2 * h, 2 * w, c_small + c_skip), dtype=skip.dtype, device=skip.device)
    out[..., :c_small].view(n, h, 2, w, 2, c_small).copy_(
        small.permute(0, 2, 3, 1).view(n, h, 1, w, 1, c_small)
    )
    out[..., c_small:].copy_(skip.permute(0, 2, 3, 1))
    return out.permute(0, 3, 1, 2)


class FusedBasicBlock(nn.Module):
    def __init__(self, first: FusedConv, second: FusedConv) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(second(first(x)) + x)``, accumulated into ``x`` (a tensor of this stage)."""
        return self.second.add_into(self.first(x), x, relu=True)


class FusedLiteHoVerNet(nn.Module):
    """The eval-mode function of a :class:`LiteHoVerNet` with oneDNN fused operators."""

    def __init__(self, model: LiteHoVerNet) -> None:
        super().__init__()
        self.mode, self.nr_types, self.geometry = model.mode, model.nr_types, model.geometry
        self.stride = model.shape.stride
        stem = model.stem
        self.stem = nn.Sequential(_fused(stem.conv1, input_scale=1 / 255.0), _fused(stem.conv2))
        self.encoder = nn.ModuleList()
        for stage in model.encoder:
            layers: list[nn.Module] = [_fused(stage.down)]
            for name, block in stage.named_children():
                if name != "down":
                    layers.append(FusedBasicBlock(
                        _fused(block.conv1), FusedConv(block.conv2, block.bn2)))
            self.encoder.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(_fused(step) for step in model.decoder)
        self.mask, self.hv = _fused(model.last["mask"]), _fused(model.last["hv"])
        self.heads = nn.ModuleDict((name, FusedConv(head)) for name, head in model.heads.items())
        self.eval()

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_sides(imgs, self.stride)
        skips = [self.stem(imgs.contiguous(memory_format=_LAYOUT))]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        joined = decode(skips, self.decoder, upsample_concat)
        mask, hv = self.mask(joined), self.hv(joined)
        return {name: head(hv if name == "hv" else mask) for name, head in self.heads.items()}
