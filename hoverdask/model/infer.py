"""Batched HoVer-Net inference: patches -> ``[tp, np, h, v]`` maps, and whole images in tile mode.

``predict_patches`` returns exactly what the reference ``infer_step`` returns (the layout every
post-processing step expects). ``predict_image`` reproduces the reference tile mode
(``infer/tile.py::_prepare_patching``): reflect padding, patches stepped by the output size and
outputs pasted edge to edge, so a single image gives the reference's map.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hoverdask.core.errors import HoverdaskError
from hoverdask.model.build import Network
from hoverdask.model.fused import FusedHoVerNet, NearestUpSample2x, can_fuse, fused_ops_available
from hoverdask.model.fused_lite import FusedLiteHoVerNet
from hoverdask.model.geometry import PatchGeometry
from hoverdask.model.lite import FusedLite, LiteHoVerNet
from hoverdask.model.network import centre_crop

log = logging.getLogger(__name__)

# measured with `hoverdask bench` on CPU (oneDNN): channels_last weights and inputs ran the fast
# network ~25-35% faster than the default layout, with logits equal to within 2e-7
INFERENCE_MEMORY_FORMAT = torch.channels_last


def use_inference_layout(model: torch.nn.Module) -> None:
    """Store conv weights in :data:`INFERENCE_MEMORY_FORMAT` (once; values are unchanged)."""
    if getattr(model, "_inference_layout", None) != INFERENCE_MEMORY_FORMAT:
        model.to(memory_format=INFERENCE_MEMORY_FORMAT)
        model._inference_layout = INFERENCE_MEMORY_FORMAT


def _with_layout_preserving_upsample(model: torch.nn.Module) -> torch.nn.Module:
    upsample = getattr(model, "upsample2x", None)
    if upsample is not None and bool((upsample.unpool_mat == 1).all()):
        model.upsample2x = NearestUpSample2x()
    return model


# one inference copy per model, rebuilt when any of the model's tensors changes (training steps and
# load_state_dict write in place and bump the version counter; .to() replaces the storage)
_INFERENCE_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_LAYOUT_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_AUTOCAST_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]] = (
    weakref.WeakKeyDictionary()
)


def _tensors_key(model: torch.nn.Module) -> tuple:
    return tuple(
        (t.data_ptr(), t._version, t.device, t.dtype)
        for t in itertools.chain(model.parameters(), model.buffers())
    )


def cpu_inference_model(model: torch.nn.Module) -> torch.nn.Module:
    """What ``predict_patches`` runs on CPU, cached until ``model`` changes; ``model`` is left as
    it is (its state dict is the checkpoint format).

    A :class:`~hoverdask.model.fused.FusedHoVerNet` (BatchNorm folded into the convolutions,
    oneDNN fused ReLU and residual sums; logits within 1e-4 of the model's) where this PyTorch
    has oneDNN and ``model`` is a HoVer-Net with the usual all-ones ``unpool_mat``; otherwise
    :func:`layout_network` (same values). For the lite network, a
    :class:`~hoverdask.model.fused_lite.FusedLiteHoVerNet` where this PyTorch has oneDNN, else
    its BatchNorm-folded form (both equal the model's logits to float32 rounding).
    """
    return _cached_copy(_INFERENCE_COPIES, model, _inference_copy)


def layout_network(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``model`` in the inference layout whose upsampling keeps that layout
    (same values; the reference's returns NCHW, which makes every later conv convert back); what
    CUDA runs. Cached until ``model`` changes; ``model`` is left as it is."""
    return _cached_copy(_LAYOUT_COPIES, model, _layout_copy)


def _cached_copy(
    cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]],
    model: torch.nn.Module,
    build: Callable[[torch.nn.Module], torch.nn.Module],
) -> torch.nn.Module:
    key = _tensors_key(model)
    cached = cache.get(model)
    if cached is None or cached[0] != key:
        cached = (key, build(model))
        cache[model] = cached
    return cached[1]


def _inference_copy(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, LiteHoVerNet):
        return FusedLiteHoVerNet(model) if fused_ops_available() else _folded_lite(model)
    return FusedHoVerNet(model) if can_fuse(model) else _layout_copy(model)


def _folded_lite(model: LiteHoVerNet) -> torch.nn.Module:
    folded = FusedLite(model)
    use_inference_layout(folded)
    return folded


def _layout_copy(model: torch.nn.Module) -> torch.nn.Module:
    inference = _with_layout_preserving_upsample(copy.deepcopy(model).eval())
    use_inference_layout(inference)
    return inference


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise HoverdaskError(f"device {name!r} requested but CUDA is not available here")
    try:
        return torch.device(str(name))
    except RuntimeError:
        raise HoverdaskError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def ready_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` moved to ``device`` (where it is not already) and in eval mode, for inference."""
    if model_device(model) != device:
        model.to(device)
    return model.eval()


def output_channels(model: Network) -> int:
    """4 (``[tp, np, h, v]``) with a type branch, else 3 (``[np, h, v]``)."""
    return 4 if model.nr_types is not None else 3


def _check_patches(patches: np.ndarray) -> None:
    if not isinstance(patches, np.ndarray) or patches.ndim != 4 or patches.shape[-1] != 3:
        shape = getattr(patches, "shape", None)
        raise ValueError(f"patches must be a uint8 (N, H, W, 3) RGB array, got shape {shape}")
    if patches.dtype != np.uint8:
        raise ValueError(f"patches must be uint8 RGB 0..255, got {patches.dtype}")


def logits_to_maps(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference ``infer_step`` head: NHWC ``[tp_argmax, np_fg, h, v]`` (no tp without types)."""
    maps = []
    if "tp" in logits:
        tp_prob = torch.softmax(logits["tp"].float(), dim=1)
        # the first maximum, as argmax returns, at a seventh of CPU argmax's time
        maps.append(tp_prob.max(dim=1, keepdim=True).indices.float())
    maps.append(torch.softmax(logits["np"].float(), dim=1)[:, 1:])
    maps.append(logits["hv"].float())
    return torch.cat(maps, dim=1).permute(0, 2, 3, 1)


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_autocast_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` or ``"float16"`` as a torch dtype (bfloat16 keeps fp32's exponent range)."""
    try:
        return AUTOCAST_DTYPES[name]
    except KeyError:
        raise HoverdaskError(
            f"autocast dtype must be one of {', '.join(AUTOCAST_DTYPES)}, not {name!r}"
        ) from None


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX tiles or AVX512-BF16): where it does,
    oneDNN runs bfloat16 convolutions ~2-3x faster than fp32; elsewhere they are emulated."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def autocast_dtype_on(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The reduced precision that ``device`` actually runs for a requested autocast ``dtype``.

    CUDA runs either dtype. A CPU runs bfloat16 where it has it in hardware and otherwise keeps
    fp32 (float16, or emulated bfloat16, would be slower than fp32), with a warning: the request
    was not honoured. None (fp32) stays None.
    """
    if dtype is None or device.type == "cuda":
        return dtype
    if dtype == torch.bfloat16 and cpu_has_native_bfloat16():
        return dtype
    if dtype not in FP32_KEPT_WARNED:  # once per process: predict_patches asks for every batch
        FP32_KEPT_WARNED.add(dtype)
        log.warning("reduced-precision inference on this CPU would be slower than fp32 (%s is "
                    "not in hardware here): running fp32", str(dtype).removeprefix("torch."))
    return None


FP32_KEPT_WARNED: set[torch.dtype] = set()


def inference_network(
    model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """What runs on ``device`` (``model`` must already be there, in eval mode): on CPU the fused
    inference form (:func:`cpu_inference_model`), on CUDA :func:`layout_network`.

    Under CPU autocast (``dtype``) the fused forms would stay fp32 (autocast does not reach
    their oneDNN operators): full HoVer-Net runs the layout network, the lite network its
    BatchNorm-folded form of plain convolutions (:class:`~hoverdask.model.lite.FusedLite`).
    """
    if device.type != "cpu":
        return layout_network(model)
    if dtype is not None:
        if isinstance(model, LiteHoVerNet):
            return _cached_copy(_AUTOCAST_COPIES, model, _folded_lite)
        return layout_network(model)
    return cpu_inference_model(model)


def forward_maps(
    network: torch.nn.Module, patches: torch.Tensor, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """uint8 NHWC patches on the network's device -> float32 NHWC ``[tp, np, h, v]`` maps.

    ``dtype`` runs the network under autocast in that precision; None keeps fp32.
    """
    with torch.autocast(patches.device.type, dtype=dtype or torch.bfloat16,
                        enabled=dtype is not None):
        logits = network(network_input(patches))
    side = patches.shape[1] - 2 * network.geometry.margin
    return logits_to_maps(output_window(logits, side))


def output_window(logits: dict[str, torch.Tensor], side: int) -> dict[str, torch.Tensor]:
    """The centre ``side`` x ``side`` of each logit map. HoVer-Net's unpadded convolutions
    return just that (input less twice the margin); the lite network's padded ones return the
    input's size, and its border, which lacks context on one side, is dropped here."""
    return {name: value if value.shape[-1] == side else centre_crop(value, side, side)
            for name, value in logits.items()}


def network_input(patches: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in the inference layout (an NHWC tensor seen as NCHW is already
    channels_last in memory, so this is one dtype conversion)."""
    return patches.permute(0, 3, 1, 2).float().contiguous(memory_format=INFERENCE_MEMORY_FORMAT)


def predict_patches(
    model: Network,
    patches_nhwc_uint8: np.ndarray,
    *,
    device: str | torch.device | None = None,
    autocast: bool = False,
    autocast_dtype: str = "bfloat16",
) -> np.ndarray:
    """Run the network on uint8 NHWC RGB patches; float32 ``(N, out, out, 4 or 3)``.

    ``device`` None uses the model's device (the model is moved if another one is named).
    ``autocast`` runs the network in ``autocast_dtype`` (bfloat16 or float16) on CUDA, and in
    bfloat16 on a CPU that has it in hardware (:func:`autocast_dtype_on`); without it fp32 is
    kept, whose results equal the reference (up to fp rounding; see :func:`cpu_inference_model`). The pipeline runs the same steps staged over CUDA streams
    (:class:`hoverdask.model.gpu.StagedPatchRunner`).
    """
    _check_patches(patches_nhwc_uint8)
    target = model_device(model) if device is None else resolve_device(device)
    ready_on(model, target)
    requested = parse_autocast_dtype(autocast_dtype)
    dtype = autocast_dtype_on(target, requested if autocast else None)
    network = inference_network(model, target, dtype)
    with torch.inference_mode():
        x = torch.from_numpy(np.require(patches_nhwc_uint8, requirements=("C", "W"))).to(target)
        return forward_maps(network, x, dtype=dtype).cpu().numpy()


@dataclass(frozen=True)
class TileLayout:
    """Where the reference tile mode pads an image and where its patches start.

    ``pad`` is ``((top, bottom), (left, right))``; ``top_lefts`` are patch input corners in the
    padded image (y, x); ``covered`` is the (height, width) of the pasted output canvas.
    """

    pad: tuple[tuple[int, int], tuple[int, int]]
    top_lefts: tuple[tuple[int, int], ...]
    covered: tuple[int, int]


def tile_layout(height: int, width: int, geometry: PatchGeometry) -> TileLayout:
    """The reference ``_prepare_patching`` geometry (step = output size)."""
    win, step = geometry.input, geometry.output

    def axis(length: int) -> tuple[int, int]:
        nr_step = math.ceil((length - step) / step)
        last = (nr_step + 1) * step
        return last, last + win - length

    last_h, pad_b = axis(height)
    last_w, pad_r = axis(width)
    margin = geometry.margin
    corners = tuple((y, x) for x in range(0, last_w, step) for y in range(0, last_h, step))
    return TileLayout(((margin, pad_b), (margin, pad_r)), corners, (last_h, last_w))


def _batches(
    items: tuple[tuple[int, int], ...], size: int
) -> Iterator[tuple[tuple[int, int], ...]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_image(
    model: Network,
    image_hwc_uint8: np.ndarray,
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    autocast: bool = False,
) -> np.ndarray:
    """The whole-image ``(H, W, 4 or 3)`` map of the reference tile mode.

    The image is reflect-padded by the patch margin on the top/left and enough on the
    bottom/right to cover it with output windows; outputs are pasted edge to edge and cropped.
    """
    if image_hwc_uint8.ndim != 3:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image_hwc_uint8.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    height, width = image_hwc_uint8.shape[:2]
    geometry = model.geometry
    layout = tile_layout(height, width, geometry)
    padded = np.pad(image_hwc_uint8, (*layout.pad, (0, 0)), mode="reflect")
    win, out = geometry.input, geometry.output
    canvas = np.zeros((*layout.covered, output_channels(model)), dtype=np.float32)
    for batch in _batches(layout.top_lefts, batch_size):
        patches = np.stack([padded[y : y + win, x : x + win] for y, x in batch])
        maps = predict_patches(model, patches, device=device, autocast=autocast)
        for (y, x), patch_map in zip(batch, maps, strict=True):
            canvas[y : y + out, x : x + out] = patch_map
    return canvas[:height, :width]
