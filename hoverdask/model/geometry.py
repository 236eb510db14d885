"""Patch geometry of each network mode: the input side and the centred output window it predicts."""

from __future__ import annotations

from dataclasses import dataclass

MODES: tuple[str, ...] = ("fast", "original", "lite")


@dataclass(frozen=True)
class PatchGeometry:
    """Input and output patch sizes of one network mode; the output is the input's centre."""

    input: int
    output: int
    margin: int  # pixels between the input border and the output window on each side

    def __post_init__(self) -> None:
        if self.margin != (self.input - self.output) // 2:
            raise ValueError(f"margin must be (input - output) // 2, got {self}")


_GEOMETRY = {
    "fast": PatchGeometry(input=256, output=164, margin=46),
    "original": PatchGeometry(input=270, output=80, margin=95),
    # padded convolutions: the margin is context, not a shrinking border; 32 px (8 µm, about a
    # nucleus) on every side, multiples of the lite network's stride 8 so patches stay aligned
    "lite": PatchGeometry(input=512, output=448, margin=32),
}


def patch_geometry(mode: str) -> PatchGeometry:
    """Patch sizes for ``mode``: fast 256 -> 164 (margin 46), original 270 -> 80 (margin 95),
    lite 512 -> 448 (margin 32)."""
    return _GEOMETRY[check_mode(mode)]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode
