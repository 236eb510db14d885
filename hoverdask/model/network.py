"""The HoVer-Net network with the reference module tree, so official checkpoints load as they are.

Module and parameter names (including the literal "/" in names such as ``conv0./.weight``) and
their registration order reproduce the reference ``state_dict()`` exactly; the parity manifests in
``tests/data/parity`` are the contract. Padding follows TensorFlow "SAME" (asymmetric for stride 2)
because the official weights were trained that way; PyTorch's symmetric padding shifts the output.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from hoverdask.model.geometry import PatchGeometry, check_mode, patch_geometry


class TFSamePad(nn.Module):
    """TensorFlow "SAME" padding computed from the height, as the reference does.

    For an even size and stride 2 this pads nothing before and one pixel after, so output pixel i
    is centred on input pixel 2i+1.
    """

    def __init__(self, ksize: int, stride: int) -> None:
        super().__init__()
        self.ksize = ksize
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = tf_same_pad(self.ksize, self.stride, x.shape[2])
        return F.pad(x, (before, after, before, after), "constant", 0.0)


def tf_same_pad(ksize: int, stride: int, size: int) -> tuple[int, int]:
    """Padding (before, after) of TensorFlow "SAME" for an input of ``size`` pixels."""
    rest = size % stride
    pad = max(ksize - (stride if rest == 0 else rest), 0)
    return pad // 2, pad - pad // 2


def centre_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the centre ``height x width``; an odd excess goes to the bottom/right."""
    top = (x.shape[2] - height) // 2
    left = (x.shape[3] - width) // 2
    return x[:, :, top : top + height, left : left + width]


def _crop_by(x: torch.Tensor, total: int) -> torch.Tensor:
    return centre_crop(x, x.shape[2] - total, x.shape[3] - total)


# total pixels cropped from the d0 and d1 skip features (fast 256 -> 164, 128 -> 92;
# original 264 -> 80, 132 -> 60); fixed amounts, as in the reference, whatever the input size
_SKIP_CROP = {"fast": (92, 36), "original": (184, 72)}


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict([("bn", nn.BatchNorm2d(channels, eps=1e-5)), ("relu", nn.ReLU(inplace=True))])
    )


class ResidualBlock(nn.Module):
    """Pre-activation bottleneck group (``d0``..``d3``) with a projection shortcut."""

    def __init__(self, in_ch: int, unit_ch: tuple[int, int, int], units: int, stride: int) -> None:
        super().__init__()
        mid_a, mid_b, out = unit_ch
        self.units = nn.ModuleList()
        unit_in = in_ch
        for index in range(units):
            unit_stride = stride if index == 0 else 1
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            if index > 0:  # unit 0 follows a BN+ReLU already
                layers["preact/bn"] = nn.BatchNorm2d(unit_in, eps=1e-5)
                layers["preact/relu"] = nn.ReLU(inplace=True)
            layers["conv1"] = nn.Conv2d(unit_in, mid_a, 1, bias=False)
            layers["conv1/bn"] = nn.BatchNorm2d(mid_a, eps=1e-5)
            layers["conv1/relu"] = nn.ReLU(inplace=True)
            layers["conv2/pad"] = TFSamePad(3, unit_stride)
            layers["conv2"] = nn.Conv2d(mid_a, mid_b, 3, stride=unit_stride, bias=False)
            layers["conv2/bn"] = nn.BatchNorm2d(mid_b, eps=1e-5)
            layers["conv2/relu"] = nn.ReLU(inplace=True)
            layers["conv3"] = nn.Conv2d(mid_b, out, 1, bias=False)
            self.units.append(nn.Sequential(layers))
            unit_in = out
        self.shortcut = nn.Conv2d(in_ch, out, 1, stride=stride, bias=False)
        self.blk_bna = _bn_relu(out)

    def forward(self, x: torch.Tensor, freeze_units: bool = False) -> torch.Tensor:
        # frozen units still pass gradients to the shortcut (and conv0) through the sums
        grad_in_units = torch.is_grad_enabled() and not freeze_units
        shortcut = self.shortcut(x)
        for unit in self.units:
            with torch.set_grad_enabled(grad_in_units):
                new = unit(x)
            x = new + shortcut
            shortcut = x
        return self.blk_bna(x)


class DenseBlock(nn.Module):
    """Decoder dense block: each unit adds 32 channels; old features are centre-cropped to fit."""

    def __init__(self, in_ch: int, ksize: int, units: int, split: int = 4) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        unit_in = in_ch
        for _ in range(units):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            layers["preact_bna/bn"] = nn.BatchNorm2d(unit_in, eps=1e-5)
            layers["preact_bna/relu"] = nn.ReLU(inplace=True)
            layers["conv1"] = nn.Conv2d(unit_in, 128, 1, bias=False)
            layers["conv1/bn"] = nn.BatchNorm2d(128, eps=1e-5)
            layers["conv1/relu"] = nn.ReLU(inplace=True)
            layers["conv2"] = nn.Conv2d(128, 32, ksize, groups=split, bias=False)
            self.units.append(nn.Sequential(layers))
            unit_in += 32
        self.blk_bna = _bn_relu(unit_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            new = unit(x)
            x = torch.cat([centre_crop(x, new.shape[2], new.shape[3]), new], dim=1)
        return self.blk_bna(x)


class UpSample2x(nn.Module):
    """Nearest 2x upsampling through the reference's ``unpool_mat`` buffer (ones in every file)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unpool_mat", torch.ones(2, 2, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        kernel = self.unpool_mat.to(x.dtype).view(1, 1, 1, 2, 1, 2)
        return (x.view(n, c, h, 1, w, 1) * kernel).reshape(n, c, 2 * h, 2 * w)


def _decoder_branch(ksize: int, out_ch: int) -> nn.Sequential:
    u3 = nn.Sequential(
        OrderedDict(
            [
                ("conva", nn.Conv2d(1024, 256, ksize, bias=False)),
                ("dense", DenseBlock(256, ksize, units=8)),
                ("convf", nn.Conv2d(512, 512, 1, bias=False)),
            ]
        )
    )
    u2 = nn.Sequential(
        OrderedDict(
            [
                ("conva", nn.Conv2d(512, 128, ksize, bias=False)),
                ("dense", DenseBlock(128, ksize, units=4)),
                ("convf", nn.Conv2d(256, 256, 1, bias=False)),
            ]
        )
    )
    u1 = nn.Sequential(
        OrderedDict(
            [("conva/pad", TFSamePad(ksize, 1)), ("conva", nn.Conv2d(256, 64, ksize, bias=False))]
        )
    )
    u0 = nn.Sequential(
        OrderedDict(
            [
                ("bn", nn.BatchNorm2d(64, eps=1e-5)),
                ("relu", nn.ReLU(inplace=True)),
                ("conv", nn.Conv2d(64, out_ch, 1, bias=True)),
            ]
        )
    )
    return nn.Sequential(OrderedDict([("u3", u3), ("u2", u2), ("u1", u1), ("u0", u0)]))


class HoVerNet(nn.Module):
    """HoVer-Net (Graham et al. 2019): Preact-ResNet50 encoder and tp/np/hv decoder branches.

    ``forward`` takes float NCHW RGB in 0..255 and returns a dict of NCHW logits, keyed
    ``tp, np, hv`` (``np, hv`` when ``nr_types`` is None), in the reference's order.
    ``freeze`` (training stage one) keeps the pretrained encoder fixed as the reference does.
    """

    def __init__(
        self, mode: str = "fast", nr_types: int | None = None, freeze: bool = False
    ) -> None:
        super().__init__()
        self.mode = check_mode(mode)
        if nr_types is not None and nr_types < 1:
            raise ValueError(f"nr_types must be None or >= 1, got {nr_types}")
        self.nr_types = nr_types
        self.freeze = freeze
        self.metadata: dict[str, object] = {}
        ksize = 3 if mode == "fast" else 5

        conv0: OrderedDict[str, nn.Module] = OrderedDict()
        if mode == "fast":
            conv0["pad"] = TFSamePad(7, 1)
        conv0["/"] = nn.Conv2d(3, 64, 7, bias=False)
        conv0["bn"] = nn.BatchNorm2d(64, eps=1e-5)
        conv0["relu"] = nn.ReLU(inplace=True)
        self.conv0 = nn.Sequential(conv0)
        self.d0 = ResidualBlock(64, (64, 64, 256), units=3, stride=1)
        self.d1 = ResidualBlock(256, (128, 128, 512), units=4, stride=2)
        self.d2 = ResidualBlock(512, (256, 256, 1024), units=6, stride=2)
        self.d3 = ResidualBlock(1024, (512, 512, 2048), units=3, stride=2)
        self.conv_bot = nn.Conv2d(2048, 1024, 1, bias=False)

        branches: OrderedDict[str, nn.Module] = OrderedDict()
        if nr_types is not None:
            branches["tp"] = _decoder_branch(ksize, nr_types)
        branches["np"] = _decoder_branch(ksize, 2)
        branches["hv"] = _decoder_branch(ksize, 2)
        self.decoder = nn.ModuleDict(branches)
        self.upsample2x = UpSample2x()

    @property
    def geometry(self) -> PatchGeometry:
        return patch_geometry(self.mode)

    def set_freeze(self, freeze: bool = True) -> HoVerNet:
        """Freeze the encoder (units of d0 and all of d1..d3) while training; returns self."""
        self.freeze = freeze
        return self

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        frozen = self.training and self.freeze
        d0 = self.d0(self.conv0(x / 255.0), freeze_units=frozen)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            d1 = self.d1(d0)
            d2 = self.d2(d1)
            d3 = self.d3(d2)
        d3 = self.conv_bot(d3)
        return [
            _crop_by(d0, _SKIP_CROP[self.mode][0]),
            _crop_by(d1, _SKIP_CROP[self.mode][1]),
            d2,
            d3,
        ]

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        d0, d1, d2, d3 = self._encode(imgs)
        up = self.upsample2x
        logits: dict[str, torch.Tensor] = {}
        for name, branch in self.decoder.items():
            u3 = branch.u3(up(d3) + d2)
            u2 = branch.u2(up(u3) + d1)
            u1 = branch.u1(up(u2) + d0)
            logits[name] = branch.u0(u1)
        return logits
