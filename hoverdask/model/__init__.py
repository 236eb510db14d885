"""HoVer-Net: the network, safe checkpoint loading, nucleus type tables and tile inference."""

from __future__ import annotations

from hoverdask.model.network import HoVerNet, PatchGeometry, patch_geometry

__all__ = ["HoVerNet", "PatchGeometry", "patch_geometry"]
