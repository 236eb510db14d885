"""The map-tile grid: one global patch grid per slide, anchored at the slide origin.

HoVer-Net predicts ``output`` x ``output`` pixels from a patch ``2*margin`` pixels larger. The
reference tile mode pads the image by ``margin`` with reflection and steps patches by
``output``; map tile ``(r, c)`` here is a block of whole patches of that same grid, so every map
pixel comes from the same patch input whatever the tile size, and tiles never overlap (each is
written by exactly one task). Context outside the slide is the reflection of the slide, exactly
``np.pad(image, margin, mode="reflect")`` extended as far as needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from hoverdask.nuclei.seams import BlockGrid


@dataclass(frozen=True)
class TileGrid:
    """Map tiles of ``tile`` x ``tile`` pixels over a (height, width) image at processing mpp."""

    height: int
    width: int
    tile: int
    output: int
    margin: int

    def __post_init__(self) -> None:
        if self.tile <= 0 or self.tile % self.output:
            raise ValueError(f"tile size {self.tile} is not a multiple of the patch output")

    @classmethod
    def for_chunk_size(
        cls, height: int, width: int, chunk_size: int, output: int, margin: int
    ) -> TileGrid:
        """Round ``chunk_size`` down to whole patch outputs (at least one patch)."""
        tile = max(1, chunk_size // output) * output
        return cls(height, width, tile, output, margin)

    @property
    def blocks(self) -> BlockGrid:
        """The same cells as post-processing blocks: map tile (r, c) is block (r, c)'s core."""
        return BlockGrid(self.height, self.width, self.tile)

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape

    def tiles(self) -> Iterator[tuple[int, int]]:
        return self.blocks.blocks()

    def extent(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of the tile inside the image (half-open)."""
        return self.blocks.core(row, col)

    def pixels(self, tiles: Iterable[tuple[int, int]]) -> int:
        """How many image pixels the ``tiles`` cover (what the network is run on)."""
        return sum((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in (self.extent(*t) for t in tiles))

    def padded_size(self, row: int, col: int) -> tuple[int, int]:
        """The tile's size rounded up to whole patches (what the predictor computes)."""
        y0, x0, y1, x1 = self.extent(row, col)
        return _round_up(y1 - y0, self.output), _round_up(x1 - x0, self.output)

    def patch_shape(self, row: int, col: int) -> tuple[int, int]:
        """Patches of the tile, (rows, cols)."""
        height, width = self.padded_size(row, col)
        return height // self.output, width // self.output

    def patches_to_run(self, row: int, col: int, active: np.ndarray | None) -> int:
        """Patches the network runs on in tile ``(row, col)``: the ``active`` ones (bool, the
        tile's patch grid), or all of them when None."""
        return int(active.sum()) if active is not None else math.prod(self.patch_shape(row, col))

    def patch_extent(self, row: int, col: int, i: int, j: int) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of patch ``(i, j)``'s output inside the image (clipped; empty for
        a patch wholly in the tile's padding past the image edge)."""
        ty, tx = self.extent(row, col)[:2]
        y0, x0 = ty + i * self.output, tx + j * self.output
        y1, x1 = min(y0 + self.output, self.height), min(x0 + self.output, self.width)
        return y0, x0, max(y0, y1), max(x0, x1)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices of ``range(start, stop)`` mapped into ``[0, size)`` as ``np.pad`` 'reflect' does."""
    idx = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= size, period - idx, idx)


def window_indices(grid: TileGrid, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the predictor window of tile ``(row, col)``."""
    y0, x0, _, _ = grid.extent(row, col)
    ph, pw = grid.padded_size(row, col)
    m = grid.margin
    return (reflect_indices(y0 - m, y0 + ph + m, grid.height),
            reflect_indices(x0 - m, x0 + pw + m, grid.width))
