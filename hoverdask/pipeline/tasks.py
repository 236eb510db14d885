"""Task functions that run on Dask workers: one call = one committed unit of work.

Every task takes small picklable arguments (paths, integers, frozen dataclasses), does its work
with plain numpy, commits its result through the ledger (temporary name, then rename) and returns
only a small summary. A task whose part already exists returns the committed summary without
recomputing, so resubmitting a whole slide after a crash redoes only what is missing.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.atomic import atomic_write_json
from hoverdask.pipeline import maps_store
from hoverdask.pipeline.grid import TileGrid, window_indices
from hoverdask.pipeline.ledger import SlideLedger
from hoverdask.pipeline.predictors import current_predictor
from hoverdask.pipeline.spec import PredictorFactory
from hoverdask.slide import open_slide
from hoverdask.slide.resample import processing_array


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
    slide = open_slide(source.path, source.mpp)
    return processing_array(slide, target_mpp=source.target_mpp)


def read_rgb_box(source: SlideSource, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """Pixels ``[y0:y1, x0:x1]`` of the processed image (its coordinates, not the view's)."""
    r0, c0 = source.origin
    box = processing_view(source).array[r0 + y0 : r0 + y1, c0 + x0 : c0 + x1, :3]
    return np.ascontiguousarray(box.compute(scheduler="synchronous"))


def read_rgb(source: SlideSource, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pixels ``image[rows][:, cols]`` of the processed image, reading only their bounding box
    (rows and columns may repeat or step back: the reflected context at the slide border)."""
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    box = read_rgb_box(source, r0, c0, r1, c1)
    if np.array_equal(rows, np.arange(r0, r1)) and np.array_equal(cols, np.arange(c0, c1)):
        return box  # a plain rectangle: no gather copy
    return np.ascontiguousarray(box[np.ix_(rows - r0, cols - c0)])


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return "local"


class ReadAhead:
    """Windows read in background threads before their tasks run; at most ``depth`` are held.

    One per worker process. A window nobody takes (its tile went to another worker, or was
    already committed) is dropped when newer ones push it out, so memory stays bounded; a
    missed window is read on the spot, so results never depend on what was read ahead.
    """

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self._lock = threading.Lock()
        self._pending: OrderedDict[Hashable, Future[np.ndarray]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self.hits = 0
        self.misses = 0

    def start(self, key: Hashable, load: Callable[[], np.ndarray]) -> None:
        """Begin reading ``key`` in the background unless it is already held or on its way."""
        with self._lock:
            if key in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="read-ahead")
            self._pending[key] = self._pool.submit(load)
            while len(self._pending) > self.depth:
                _, dropped = self._pending.popitem(last=False)
                dropped.cancel()

    def take(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The window for ``key``: the one read ahead (its error, if reading failed) or a new read."""
        with self._lock:
            pending = self._pending.pop(key, None)
        if pending is None or pending.cancelled():
            self.misses += 1
            return load()
        self.hits += 1
        return pending.result()


WINDOWS = ReadAhead()


def read_window(source: SlideSource, grid: TileGrid, row: int, col: int) -> np.ndarray:
    """The RGB window map tile ``(row, col)`` is predicted from (tile + patch margin)."""
    rows, cols = window_indices(grid, row, col)
    return read_rgb(source, rows, cols)


def patch_runs(active: np.ndarray) -> list[tuple[int, int, int]]:
    """``(row, first, stop)`` of every run of consecutive active patches, row by row."""
    runs = []
    for i, line in enumerate(active):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], line.astype(np.int8), [0]))))
        runs.extend((i, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True))
    return runs


def predict_active(
    predictor: Any,
    window: np.ndarray,
    origin_yx: tuple[int, int],
    active: np.ndarray | None,
    nr_types: int | None,
) -> np.ndarray:
    """The tile's maps with only the ``active`` patches predicted, the rest background (0).

    Each run of active patches in a patch row is one ``predict_tile`` call on its own window,
    cut on the same global patch grid, so every predicted pixel equals the whole tile's.
    """
    if active is None or active.all():
        return predictor.predict_tile(window, origin_yx)
    out, m = predictor.output, predictor.margin
    rows, cols = active.shape
    maps = np.zeros((rows * out, cols * out, len(maps_store.channel_names(nr_types))), np.float32)
    for i, first, stop in patch_runs(active):
        sub = window[i * out : (i + 1) * out + 2 * m, first * out : stop * out + 2 * m]
        origin = (origin_yx[0] + i * out, origin_yx[1] + first * out)
        maps[i * out : (i + 1) * out, first * out : stop * out] = predictor.predict_tile(sub, origin)
    return maps


def infer_tile(
    source: SlideSource,
    grid: TileGrid,
    slide_dir: str,
    row: int,
    col: int,
    factory: PredictorFactory,
    nr_types: int | None,
    read_ahead: tuple[tuple[int, int], ...] = (),
    active: np.ndarray | None = None,
) -> dict[str, Any]:
    """Predict map tile ``(row, col)``, write it to the cache and commit its marker.

    ``read_ahead`` names the tiles likely to come next to this worker: their windows are read
    in the background while this tile is predicted, so a GPU does not wait for slide decoding.
    ``active`` (bool, the tile's patch grid) says which patches meet tissue; the others are
    background and are not predicted (None: all patches run).
    """
    ledger = SlideLedger(Path(slide_dir))
    marker = ledger.tile_marker(row, col)
    committed = ledger.read_marker(marker)
    if committed is not None:
        return committed
    predictor = current_predictor(factory)
    if (predictor.margin, predictor.output) != (grid.margin, grid.output):
        raise RuntimeError("the worker's predictor does not use the slide's patch geometry")
    started = time.perf_counter()
    reader = functools.partial(read_window, source, grid)
    window = WINDOWS.take((source, grid, row, col), lambda: reader(row, col))
    for ahead in read_ahead:
        if not ledger.tile_marker(*ahead).exists():  # a resumed run skips committed tiles
            WINDOWS.start((source, grid, *ahead), functools.partial(reader, *ahead))
    read = time.perf_counter()
    y0, x0, y1, x1 = grid.extent(row, col)
    maps = predict_active(predictor, window, (y0, x0), active, nr_types)[: y1 - y0, : x1 - x0]
    predicted, predicted_at = time.perf_counter(), time.time()
    stored = maps_store.write_tile(ledger.maps_store, y0, x0, maps, nr_types)
    summary = maps_store.stored_stats(stored)
    seconds = {"read_s": read - started, "predict_s": predicted - read,
               "write_s": time.perf_counter() - predicted}
    clock = {"worker": _worker_name(), "predict_start": predicted_at - seconds["predict_s"],
             "predict_end": predicted_at}  # for the busy fraction of the predictor
    stats = {"row": row, "col": col, **summary, **seconds, **clock,
             "patches_run": grid.patches_to_run(row, col, active)}
    atomic_write_json(marker, stats)
    return stats
