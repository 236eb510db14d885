"""The map cache: a slide's network output as quantised Zarr arrays at processing resolution.

Layout (a Zarr v3 group, one array per map, chunked in map tiles): ``np`` uint8 =
``round(p*255)``, ``h`` and ``v`` int16 = ``round(x*32767)``, ``tp`` uint8 (class id, only with a
type branch). Fill value 0 is background, so tiles without tissue are never written. Quantising
costs 6 bytes per pixel instead of 16 and is what the parity fixture does; post-processing
always reads the dequantised values, whether a block was computed now or read back on resume.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

NP_SCALE = 255.0
HV_SCALE = 32767.0
DTYPES = {"tp": np.uint8, "np": np.uint8, "h": np.int16, "v": np.int16}


def channel_names(nr_types: int | None) -> tuple[str, ...]:
    """Map names in the predictor's channel order."""
    return ("tp", "np", "h", "v") if nr_types else ("np", "h", "v")


def quantise(name: str, values: np.ndarray) -> np.ndarray:
    """The stored integers of one float32 map (clip, scale, round half to even), computed in
    one float32 buffer: the same values as ``rint(clip(x) * scale)`` without its temporaries."""
    if name in ("np", "h", "v"):
        lo, scale = (0.0, NP_SCALE) if name == "np" else (-1.0, HV_SCALE)
        buffer = np.clip(values, lo, 1.0, dtype=np.float32)
        buffer *= np.float32(scale)
        np.rint(buffer, out=buffer)
        return buffer.astype(DTYPES[name])
    return np.rint(values).astype(np.uint8)


def dequantise(name: str, stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 values of stored integers (``out``, e.g. one channel of a window, is filled)."""
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if name in ("np", "h", "v"):
        scale = NP_SCALE if name == "np" else HV_SCALE
        return np.divide(stored, np.float32(scale), out=out, dtype=np.float32)
    out[...] = stored
    return out


def stored_stats(stored: dict[str, np.ndarray]) -> dict[str, float | int]:
    """A tile's foreground pixels and per-map ranges, as its dequantised maps would give them.

    Dequantising is monotone, so a map's range is the dequantised range of its integers, and
    the foreground (dequantised ``np >= 0.5``) is the integers from the first one that reaches
    0.5: no float copy of the tile is made.
    """
    foreground = np.flatnonzero(dequantise("np", np.arange(256, dtype=np.uint8)) >= 0.5)[0]
    stats: dict[str, float | int] = {
        "foreground_px": int(np.count_nonzero(stored["np"] >= foreground))
    }
    for name, values in stored.items():
        low, high = (values.min(), values.max()) if values.size else (0, 0)
        ends = dequantise(name, np.array([low, high], dtype=values.dtype))
        stats[f"{name}_min"], stats[f"{name}_max"] = float(ends[0]), float(ends[1])
    return stats


def create_store(path: Path, shape: tuple[int, int], tile: int, nr_types: int | None) -> None:
    """Create the empty arrays (a no-op when they already exist with this shape and tiling)."""
    import zarr

    group = zarr.open_group(str(path), mode="a")
    for name in channel_names(nr_types):
        if name in group:
            existing = group[name]
            if existing.shape == shape and existing.chunks == (tile, tile):
                continue
            del group[name]
        group.create_array(name, shape=shape, chunks=(tile, tile), dtype=DTYPES[name],
                           fill_value=0)


def write_tile(
    path: Path, y0: int, x0: int, maps: np.ndarray, nr_types: int | None
) -> dict[str, np.ndarray]:
    """Write one tile's float maps (h, w, C) at ``(y0, x0)``; one whole chunk per array.

    Returns the stored integers by map name (:func:`stored_stats` summarises them).
    """
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    h, w = maps.shape[:2]
    stored = {}
    for index, name in enumerate(channel_names(nr_types)):
        stored[name] = quantise(name, maps[..., index])
        group[name][y0 : y0 + h, x0 : x0 + w] = stored[name]
    return stored


def read_window(
    path: Path, y0: int, x0: int, y1: int, x1: int, nr_types: int | None,
    channels: tuple[str, ...] | None = None,
) -> np.ndarray:
    """Dequantised maps (h, w, C) float32 of a rectangle, in the predictor's channel order, or
    only ``channels`` in that order (read what is used).

    The window is put together from whole decoded tiles, kept in :data:`DECODED`: post-processing
    windows overlap their neighbours' tiles (a pass-3 window meets up to 3 x 3 tiles, the refit
    windows of one task many times the same ones), so a worker decodes each tile about once
    instead of once per window. The values are those of slicing the Zarr arrays directly.
    """
    import zarr

    group = zarr.open_group(str(path), mode="r")
    names = channels or channel_names(nr_types)
    window = np.empty((y1 - y0, x1 - x0, len(names)), dtype=np.float32)
    for index, name in enumerate(names):
        dequantise(name, _assembled(group, path, name, y0, x0, y1, x1), out=window[..., index])
    return window


def _assembled(group: Any, path: Path, name: str, y0: int, x0: int, y1: int, x1: int
               ) -> np.ndarray:
    array = group[name]
    th, tw = array.chunks
    out = np.zeros((y1 - y0, x1 - x0), dtype=array.dtype)  # fill value 0: tiles never written
    for row in range(y0 // th, (y1 - 1) // th + 1):
        for col in range(x0 // tw, (x1 - 1) // tw + 1):
            tile = DECODED.get(array, path / name, row, col)
            if tile is None:
                continue
            ty, tx = row * th, col * tw
            a, b = max(y0, ty), min(y1, ty + tile.shape[0])
            c, d = max(x0, tx), min(x1, tx + tile.shape[1])
            out[a - y0 : b - y0, c - x0 : d - x0] = tile[a - ty : b - ty, c - tx : d - tx]
    return out


class DecodedTiles:
    """A worker's least-recently-used stored (quantised) map tiles, up to ``budget`` bytes.

    Keyed by the chunk file and its modification time and size, so a tile written again (a
    rerun into the same folder on a long-lived cluster) is never served stale. A tile that was
    never written (no file) is background and is not kept.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.tiles: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, array: Any, folder: Path, row: int, col: int) -> np.ndarray | None:
        chunk = folder / array.metadata.encode_chunk_key((row, col))
        try:
            stat = chunk.stat()
        except FileNotFoundError:
            return None
        key = (str(chunk), stat.st_mtime_ns, stat.st_size)
        with self.lock:
            tile = self.tiles.get(key)
            if tile is not None:
                self.tiles.move_to_end(key)
                return tile
        th, tw = array.chunks
        tile = array[row * th : (row + 1) * th, col * tw : (col + 1) * tw]
        with self.lock:
            if key not in self.tiles:
                self.tiles[key] = tile
                self.size += tile.nbytes
            while self.size > self.budget and len(self.tiles) > 1:
                _, dropped = self.tiles.popitem(last=False)
                self.size -= dropped.nbytes
        return tile


DECODED = DecodedTiles(budget=256 * 2**20)
"""Per worker process: ~13 tiles of 1792 px with their four maps (6 bytes a pixel)."""


def as_dask(path: Path, nr_types: int | None) -> da.Array:
    """The whole cache as a lazy dequantised (H, W, C) float32 dask array, one chunk per tile."""
    import dask.array as da

    channels = [
        da.from_zarr(str(path), component=name).map_blocks(
            lambda block, name=name: dequantise(name, block), dtype=np.float32
        )
        for name in channel_names(nr_types)
    ]
    return da.stack(channels, axis=-1).rechunk({2: -1})
