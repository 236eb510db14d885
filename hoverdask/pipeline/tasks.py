"""Task functions that run on Dask workers: one call = one committed unit of work.

Every task takes small picklable arguments (paths, integers, frozen dataclasses), does its work
with plain numpy, commits its result through the ledger (temporary name, then rename) and returns
only a small summary. A task whose part already exists returns the committed summary without
recomputing, so resubmitting a whole slide after a crash redoes only what is missing.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.atomic import atomic_write_json
from hoverdask.pipeline import maps_store
from hoverdask.pipeline.grid import TileGrid, window_indices
from hoverdask.pipeline.ledger import SlideLedger
from hoverdask.pipeline.predictors import PredictorFactory, current_predictor


@dataclass(frozen=True)
class SlideSource:
    """How a worker opens the slide's processing-resolution view itself.

    ``origin`` is the processing-pixel ``(y, x)`` where the processed image starts in the view
    (a ``--region``'s top-left; ``(0, 0)`` for the whole slide): tasks index the processed image.
    """

    path: str
    mpp: float | None
    target_mpp: float
    origin: tuple[int, int] = (0, 0)


@functools.lru_cache(maxsize=8)
def processing_view(source: SlideSource) -> Any:
    """The slide's lazy processing view, opened once per worker process."""
    from hoverdask.resample import processing_array
    from hoverdask.slide import open_slide

    slide = open_slide(source.path, source.mpp)
    return processing_array(slide, target_mpp=source.target_mpp)


def read_rgb(source: SlideSource, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pixels ``image[rows][:, cols]`` of the processed image, reading only their bounding box."""
    image = processing_view(source).array
    rows, cols = rows + source.origin[0], cols + source.origin[1]
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    box = np.asarray(image[r0:r1, c0:c1, :3].compute(scheduler="synchronous"))
    return np.ascontiguousarray(box[np.ix_(rows - r0, cols - c0)])


def tile_stats(maps: np.ndarray, nr_types: int | None) -> dict[str, Any]:
    """Per-tile summary kept in the tile's marker: map ranges and foreground pixels."""
    names = maps_store.channel_names(nr_types)
    stats: dict[str, Any] = {"foreground_px": int((maps[..., names.index("np")] >= 0.5).sum())}
    for index, name in enumerate(names):
        channel = maps[..., index]
        stats[f"{name}_min"] = float(channel.min()) if channel.size else 0.0
        stats[f"{name}_max"] = float(channel.max()) if channel.size else 0.0
    return stats


def infer_tile(
    source: SlideSource,
    grid: TileGrid,
    slide_dir: str,
    row: int,
    col: int,
    factory: PredictorFactory,
    nr_types: int | None,
) -> dict[str, Any]:
    """Predict map tile ``(row, col)``, write it to the cache and commit its marker."""
    ledger = SlideLedger(Path(slide_dir))
    marker = ledger.tile_marker(row, col)
    committed = ledger.read_marker(marker)
    if committed is not None:
        return committed
    predictor = current_predictor(factory)
    if (predictor.margin, predictor.output) != (grid.margin, grid.output):
        raise RuntimeError("the worker's predictor does not use the slide's patch geometry")
    started = time.perf_counter()
    rows, cols = window_indices(grid, row, col)
    window = read_rgb(source, rows, cols)
    read = time.perf_counter()
    y0, x0, y1, x1 = grid.extent(row, col)
    maps = predictor.predict_tile(window, (y0, x0))[: y1 - y0, : x1 - x0]
    predicted = time.perf_counter()
    stored = maps_store.write_tile(ledger.maps_store, y0, x0, maps, nr_types)
    seconds = {"read_s": read - started, "predict_s": predicted - read,
               "write_s": time.perf_counter() - predicted}
    stats = {"row": row, "col": col, **tile_stats(stored, nr_types), **seconds}
    atomic_write_json(marker, stats)
    return stats
