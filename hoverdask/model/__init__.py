"""HoVer-Net and its light form: the networks, safe checkpoint loading and tile inference.

Pixels to maps. May import :mod:`hoverdask.core` only (the type tables live in
:mod:`hoverdask.core.types`, torch-free).
"""

from __future__ import annotations

from hoverdask.model.build import Network, build_network
from hoverdask.model.checkpoints import (
    infer_layout,
    load_model,
    model_from_state_dict,
    save_checkpoint,
    sha256_of,
)
from hoverdask.model.geometry import MODES, PatchGeometry, patch_geometry
from hoverdask.model.infer import (
    TileLayout,
    logits_to_maps,
    output_channels,
    predict_image,
    predict_patches,
    resolve_device,
    tile_layout,
)
from hoverdask.model.lite import LiteHoVerNet
from hoverdask.model.network import HoVerNet

__all__ = [
    "MODES",
    "HoVerNet",
    "LiteHoVerNet",
    "Network",
    "PatchGeometry",
    "TileLayout",
    "build_network",
    "infer_layout",
    "load_model",
    "logits_to_maps",
    "model_from_state_dict",
    "output_channels",
    "patch_geometry",
    "predict_image",
    "predict_patches",
    "resolve_device",
    "save_checkpoint",
    "sha256_of",
    "tile_layout",
]
