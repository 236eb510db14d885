"""Reading tile windows ahead of their inference tasks must never change what a task sees.

Oracle: the window read on the spot (``read_window``) and maps predicted from it; the predictor
here is a function of the pixels, so a wrong or stale window would show in the maps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hoverdask.pipeline import maps_store, tasks
from hoverdask.pipeline.grid import TileGrid
from hoverdask.pipeline.ledger import SlideLedger
from hoverdask.slide.synthetic import write_synthetic_slide

MARGIN, OUTPUT = 46, 164


class PixelPredictor:
    """Maps that depend on the window's pixels: np = red channel of the tile, h/v = green/blue."""

    margin, output, nr_types = MARGIN, OUTPUT, None

    def predict_tile(self, window: np.ndarray, tile_origin_yx: tuple[int, int]) -> np.ndarray:
        tile = window[MARGIN:-MARGIN, MARGIN:-MARGIN].astype(np.float32) / 255.0
        return np.stack([tile[..., 0], tile[..., 1] * 2 - 1, tile[..., 2] * 2 - 1], axis=-1)


@dataclass(frozen=True)
class PixelFactory:
    def __call__(self) -> PixelPredictor:
        return PixelPredictor()


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ahead") / "s.svs"
    write_synthetic_slide(path, 700, 500, mpp=0.25, seed=4, compression="lossless",
                          keep_instances=False)
    return path


def _run_tiles(slide: Path, out: Path, ahead: int) -> dict[tuple[int, int], np.ndarray]:
    source = tasks.SlideSource(str(slide), None, 0.25)
    grid = TileGrid.for_chunk_size(500, 700, OUTPUT, OUTPUT, MARGIN)
    ledger = SlideLedger(out)
    maps_store.create_store(ledger.maps_store, (grid.height, grid.width), grid.tile, None)
    order = list(grid.tiles())
    for index, (row, col) in enumerate(order):
        tasks.infer_tile(source, grid, str(out), row, col, PixelFactory(), None,
                         tuple(order[index + 1 : index + 1 + ahead]))
    maps = maps_store.read_window(ledger.maps_store, 0, 0, grid.height, grid.width, None)
    return {t: maps[t[0] * OUTPUT:(t[0] + 1) * OUTPUT, t[1] * OUTPUT:(t[1] + 1) * OUTPUT]
            for t in order}


def test_tiles_read_ahead_give_the_maps_of_windows_read_on_the_spot(slide, tmp_path) -> None:
    plain = _run_tiles(slide, tmp_path / "plain", ahead=0)
    tasks.WINDOWS.hits = tasks.WINDOWS.misses = 0
    ahead = _run_tiles(slide, tmp_path / "ahead", ahead=2)
    assert tasks.WINDOWS.hits == len(plain) - 1  # every tile but the first was read ahead
    assert tasks.WINDOWS.misses == 1
    for tile, maps in plain.items():
        np.testing.assert_array_equal(ahead[tile], maps)
    assert np.ptp(plain[(0, 0)][..., 0]) > 0  # the oracle depends on the pixels


def test_read_ahead_holds_at_most_its_depth_and_reads_a_dropped_window_again() -> None:
    reads: list[str] = []
    lock = threading.Lock()

    def loader(name: str):
        def load() -> np.ndarray:
            with lock:
                reads.append(name)
            return np.full(1, ord(name[0]))
        return load

    ahead = tasks.ReadAhead(depth=2)
    for name in ("a", "b", "c"):  # "a" is pushed out by "c"
        ahead.start(name, loader(name))
    assert len(ahead._pending) == 2
    assert ahead.take("b", loader("b")).tolist() == [ord("b")]
    assert ahead.take("a", loader("a")).tolist() == [ord("a")]
    assert (ahead.hits, ahead.misses) == (1, 1)
    ahead.start("c", loader("c"))  # already on its way: not read twice
    ahead.take("c", loader("c"))
    assert sorted(reads).count("c") == 1


def test_a_read_ahead_error_surfaces_in_the_task_that_takes_it() -> None:
    def broken() -> np.ndarray:
        raise OSError("truncated tile")

    ahead = tasks.ReadAhead(depth=2)
    ahead.start("x", broken)
    with pytest.raises(OSError, match="truncated"):
        ahead.take("x", broken)


def test_committed_tiles_are_not_read_ahead(slide, tmp_path) -> None:
    """On a resumed run the next tile may already be in the cache: reading it would be waste."""
    source = tasks.SlideSource(str(slide), None, 0.25)
    grid = TileGrid.for_chunk_size(500, 700, OUTPUT, OUTPUT, MARGIN)
    ledger = SlideLedger(tmp_path)
    maps_store.create_store(ledger.maps_store, (grid.height, grid.width), grid.tile, None)
    first, done, fresh = list(grid.tiles())[:3]
    tasks.infer_tile(source, grid, str(tmp_path), *done, PixelFactory(), None)
    tasks.infer_tile(source, grid, str(tmp_path), *first, PixelFactory(), None, (done, fresh))
    assert (source, grid, *done) not in tasks.WINDOWS._pending
    assert (source, grid, *fresh) in tasks.WINDOWS._pending
