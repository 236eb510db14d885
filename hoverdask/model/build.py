"""One constructor for every network mode, so callers never branch on the class."""

from __future__ import annotations

from hoverdask.model.geometry import check_mode
from hoverdask.model.lite import LITE_MODE, LiteHoVerNet
from hoverdask.model.network import HoVerNet

Network = HoVerNet | LiteHoVerNet


def build_network(mode: str, nr_types: int | None = None) -> Network:
    """A freshly initialised network of ``mode`` (fast, original or lite)."""
    if check_mode(mode) == LITE_MODE:
        return LiteHoVerNet(nr_types)
    return HoVerNet(mode, nr_types)
