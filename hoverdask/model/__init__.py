"""HoVer-Net and its light form: the networks, safe checkpoint loading, nucleus type tables and tile inference."""

from __future__ import annotations

from hoverdask.core.types import (
    CONSEP,
    KNOWN_TABLES,
    MONUSAC,
    PANNUKE,
    NucleusType,
    TypeTable,
    generic_table,
    load_type_table,
    select_type_table,
)
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
    "CONSEP",
    "KNOWN_TABLES",
    "MODES",
    "MONUSAC",
    "PANNUKE",
    "HoVerNet",
    "LiteHoVerNet",
    "Network",
    "NucleusType",
    "PatchGeometry",
    "TileLayout",
    "TypeTable",
    "build_network",
    "generic_table",
    "infer_layout",
    "load_model",
    "load_type_table",
    "logits_to_maps",
    "model_from_state_dict",
    "output_channels",
    "patch_geometry",
    "predict_image",
    "predict_patches",
    "resolve_device",
    "save_checkpoint",
    "select_type_table",
    "sha256_of",
    "tile_layout",
]
