"""Pieces of the pipeline on their own: tile grid, reflection, patching, quantisation, ledger."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hoverdask.core.atomic import atomic_write_text
from hoverdask.pipeline import maps_store
from hoverdask.pipeline.grid import TileGrid, reflect_indices, window_indices
from hoverdask.pipeline.ledger import SlideLedger
from hoverdask.pipeline.predictors import (
    ArrayPredictor,
    PatchPredictor,
    join_patches,
    split_patches,
)


@pytest.mark.parametrize(("start", "stop", "size"), [(-46, 300, 256), (-95, 500, 7), (-3, 9, 2)])
def test_reflect_indices_equal_numpy_reflect_padding(start: int, stop: int, size: int) -> None:
    values = np.arange(size) * 10
    padded = np.pad(values, (-start, stop - size), mode="reflect")
    np.testing.assert_array_equal(values[reflect_indices(start, stop, size)], padded)


def test_tiles_cover_the_image_once_and_follow_the_reference_patch_grid() -> None:
    grid = TileGrid.for_chunk_size(700, 1000, chunk_size=400, output=164, margin=46)
    assert grid.tile == 328
    cover = np.zeros((700, 1000), int)
    for row, col in grid.tiles():
        y0, x0, y1, x1 = grid.extent(row, col)
        cover[y0:y1, x0:x1] += 1
        assert y0 % 164 == 0
        assert x0 % 164 == 0
    assert (cover == 1).all()
    # the window of the last tile: patches continue the global grid into the reflected border
    rows, cols = window_indices(grid, 2, 3)
    assert len(rows) == grid.padded_size(2, 3)[0] + 2 * 46
    np.testing.assert_array_equal(rows, reflect_indices(656 - 46, 656 + 164 + 46, 700))
    np.testing.assert_array_equal(cols[:46], np.arange(984 - 46, 984))


def test_tile_size_must_be_whole_patches() -> None:
    with pytest.raises(ValueError, match="multiple"):
        TileGrid(100, 100, tile=200, output=164, margin=46)


def _patch_function(margin: int, output: int):
    """A 'network' whose output depends on its whole input patch, not just the centre."""

    def predict(patches: np.ndarray) -> np.ndarray:
        centre = patches[:, margin : margin + output, margin : margin + output].astype(np.float32)
        mean = patches.astype(np.float32).mean(axis=(1, 2, 3))[:, None, None, None]
        spread = np.broadcast_to(mean / 255.0, (*centre.shape[:3], 1))
        return np.concatenate([centre / 255.0, spread], axis=-1)

    return predict


def test_tiled_prediction_equals_untiled_reference_tile_mode() -> None:
    """Any tile size gives exactly what one pass over the reflect-padded image gives."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    margin, output = 5, 16
    predictor = PatchPredictor(_patch_function(margin, output), margin=margin, output=output,
                               nr_types=1, batch_size=3)
    # oracle: reference tile mode on the whole image
    rows = -(-150 // output)
    cols = -(-230 // output)
    padded = np.pad(image, ((margin, rows * output - 150 + margin),
                            (margin, cols * output - 230 + margin), (0, 0)), mode="reflect")
    expected = predictor.predict_tile(padded, (0, 0))[:150, :230]
    for tile in (16, 48, 112):
        grid = TileGrid(150, 230, tile, output, margin)
        got = np.zeros_like(expected)
        for row, col in grid.tiles():
            r, c = window_indices(grid, row, col)
            y0, x0, y1, x1 = grid.extent(row, col)
            got[y0:y1, x0:x1] = predictor.predict_tile(image[np.ix_(r, c)], (y0, x0))[
                : y1 - y0, : x1 - x0
            ]
        np.testing.assert_array_equal(got, expected)


def test_split_and_join_patches_are_inverse_on_the_centres() -> None:
    window = np.arange(2 * 10 + 4 * 3, dtype=np.uint8)[:, None, None].repeat(3 * 4 + 2 * 10,
                                                                              1).repeat(3, 2)
    patches = split_patches(window, margin=10, output=4)
    assert patches.shape == (3 * 3, 24, 24, 3)
    centres = patches[:, 10:14, 10:14, :1]
    np.testing.assert_array_equal(join_patches(centres, 3, 3)[..., 0], window[10:-10, 10:-10, 0])


def test_array_predictor_slices_by_position_and_pads_with_background() -> None:
    maps = np.random.default_rng(1).random((50, 60, 3)).astype(np.float32)
    predictor = ArrayPredictor(maps, margin=2, output=8, nr_types=None)
    out = predictor.predict_tile(np.zeros((16 + 4, 24 + 4, 3), np.uint8), (40, 48))
    np.testing.assert_array_equal(out[:10, :12], maps[40:50, 48:60])
    assert not out[10:].any()
    assert not out[:, 12:].any()


def test_quantised_store_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(2)
    maps = np.stack([rng.integers(0, 6, (40, 50)).astype(np.float32), rng.random((40, 50)),
                     rng.uniform(-1, 1, (40, 50)), rng.uniform(-1, 1, (40, 50))], -1)
    store = tmp_path / "maps.zarr"
    maps_store.create_store(store, (100, 120), 32, nr_types=6)
    maps_store.write_tile(store, 32, 64, maps[:32, :32], nr_types=6)
    back = maps_store.read_window(store, 32, 64, 64, 96, nr_types=6)
    np.testing.assert_array_equal(back[..., 0], maps[:32, :32, 0])
    np.testing.assert_allclose(back[..., 1], maps[:32, :32, 1], atol=0.5 / 255 + 1e-7)
    np.testing.assert_allclose(back[..., 2:], maps[:32, :32, 2:], atol=0.5 / 32767 + 1e-7)
    whole = maps_store.as_dask(store, nr_types=6).compute()
    np.testing.assert_array_equal(whole[32:64, 64:96], back)
    assert not whole[:32].any()  # never written: background


def test_quantise_and_stored_stats_equal_the_plain_formulas() -> None:
    """Oracle: ``rint(clip(x) * scale)`` and the ranges / foreground of the dequantised maps."""
    rng = np.random.default_rng(5)
    maps = np.stack([rng.integers(0, 6, (64, 70)), rng.uniform(-0.2, 1.2, (64, 70)),
                     rng.uniform(-1.5, 1.5, (64, 70)), rng.uniform(-1.5, 1.5, (64, 70))],
                    -1).astype(np.float32)
    maps[0, :4, 1] = [0.5, 127.5 / 255, 128.5 / 255, 0.5 - 1e-7]  # rounding and threshold edges
    plain = {"tp": np.rint(maps[..., 0]).astype(np.uint8),
             "np": np.rint(np.clip(maps[..., 1], 0.0, 1.0) * 255.0).astype(np.uint8),
             "h": np.rint(np.clip(maps[..., 2], -1.0, 1.0) * 32767.0).astype(np.int16),
             "v": np.rint(np.clip(maps[..., 3], -1.0, 1.0) * 32767.0).astype(np.int16)}
    stored = {name: maps_store.quantise(name, maps[..., i]) for i, name in enumerate(plain)}
    for name, want in plain.items():
        np.testing.assert_array_equal(stored[name], want)
        assert stored[name].dtype == want.dtype
    floats = {name: values.astype(np.float32) / np.float32(maps_store.NP_SCALE if name == "np"
                                                         else maps_store.HV_SCALE)
              for name, values in plain.items()}
    floats["tp"] = plain["tp"].astype(np.float32)
    want = {"foreground_px": int((floats["np"] >= 0.5).sum())}
    for name, values in floats.items():
        want[f"{name}_min"], want[f"{name}_max"] = float(values.min()), float(values.max())
    assert maps_store.stored_stats(stored) == want


def test_ledger_discards_parts_of_other_parameters(tmp_path) -> None:
    ledger = SlideLedger(tmp_path / "slide")
    assert ledger.prepare({"tile": 328}, overwrite=False) is False
    atomic_write_text(ledger.tile_marker(0, 0), json.dumps({"row": 0}))
    assert ledger.prepare({"tile": 328}, overwrite=False) is True
    assert ledger.read_marker(ledger.tile_marker(0, 0)) == {"row": 0}
    assert ledger.prepare({"tile": 492}, overwrite=False) is False
    assert ledger.read_marker(ledger.tile_marker(0, 0)) is None
    assert not list(ledger.work.rglob("*.tmp"))


def test_out_of_memory_halves_the_batch_and_keeps_the_result() -> None:
    import torch

    margin, output = 5, 16
    reference = _patch_function(margin, output)
    calls = []

    def small_gpu(patches: np.ndarray) -> np.ndarray:
        calls.append(len(patches))
        if len(patches) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return reference(patches)

    image = np.random.default_rng(3).integers(0, 256, (3 * 16 + 10, 3 * 16 + 10, 3), np.uint8)
    predictor = PatchPredictor(small_gpu, margin=margin, output=output, nr_types=1, batch_size=8)
    expected = PatchPredictor(reference, margin=margin, output=output, nr_types=1).predict_tile(
        image, (0, 0))
    np.testing.assert_array_equal(predictor.predict_tile(image, (0, 0)), expected)
    assert predictor.batch_size == 2
    assert max(calls[calls.index(2):]) <= 2  # once lowered, the batch stays small


def test_other_errors_are_not_retried() -> None:
    def broken(patches: np.ndarray) -> np.ndarray:
        raise ValueError("bad weights")

    predictor = PatchPredictor(broken, margin=1, output=2, nr_types=None, batch_size=4)
    with pytest.raises(ValueError, match="bad weights"):
        predictor.predict_tile(np.zeros((6, 6, 3), np.uint8), (0, 0))


@pytest.mark.parametrize(
    ("worker_name", "devices", "expected"),
    [
        (0, 2, 0),
        (3, 2, 1),  # LocalCluster names workers 0..N-1
        ("SLURMCluster-12-1", 4, 1),  # dask-jobqueue: <cluster>-<job>-<process in job>
        ("SLURMCluster-12-5", 4, 1),
        ("tcp://10.0.0.1:4000-worker", 2, 0),  # no trailing number: the only choice is device 0
        (7, 0, 0),
    ],
)
def test_gpu_index_from_worker_name(worker_name: object, devices: int, expected: int) -> None:
    from hoverdask.pipeline.predictors import gpu_index

    assert gpu_index(worker_name, devices) == expected


def test_inference_busy_fraction_from_the_tile_markers(tmp_path) -> None:
    from types import SimpleNamespace

    from hoverdask.core.atomic import atomic_write_json
    from hoverdask.pipeline.postprocess import inference_busy_fraction, tile_markers

    ledger = SlideLedger(tmp_path)
    intervals = {  # worker "0": busy 3 of 4 s (a 1 s gap); worker "1": busy 2 of 2 s
        (0, 0): ("0", 100.0, 101.0), (0, 1): ("0", 101.0, 102.0), (0, 2): ("0", 103.0, 104.0),
        (1, 0): ("1", 100.5, 102.5),
        (1, 1): ("0", 10.0, 11.0),  # from an earlier run: resumed, not counted
    }
    for (row, col), (worker, start, end) in intervals.items():
        atomic_write_json(ledger.tile_marker(row, col),
                          {"worker": worker, "predict_start": start, "predict_end": end})
    plan = SimpleNamespace(ledger=ledger, tissue_tiles=(*intervals, (5, 5)))  # (5, 5): not done
    markers = tile_markers(plan)
    assert len(markers) == len(intervals)
    assert inference_busy_fraction(markers, since=50.0) == pytest.approx(5.0 / 6.0)
    assert inference_busy_fraction(markers, since=200.0) is None


def test_only_active_patches_are_predicted_the_rest_is_background() -> None:
    from hoverdask.pipeline.tasks import patch_runs, predict_active

    margin, output = 3, 8
    maps = np.random.default_rng(0).random((4 * output, 5 * output, 4)).astype(np.float32) + 0.1
    calls = []

    class Counting(ArrayPredictor):
        def predict_tile(self, window, tile_origin_yx):
            calls.append(window.shape)
            return super().predict_tile(window, tile_origin_yx)

    predictor = Counting(maps, margin=margin, output=output, nr_types=5)
    window = np.zeros((4 * output + 2 * margin, 5 * output + 2 * margin, 3), np.uint8)
    active = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 1]], bool)
    assert patch_runs(active) == [(0, 0, 2), (0, 3, 4), (2, 0, 5), (3, 1, 2), (3, 4, 5)]
    got = predict_active(predictor, window, (0, 0), active, nr_types=5)
    assert len(calls) == 5
    assert calls[2] == (output + 2 * margin, 5 * output + 2 * margin, 3)
    expected = np.where(np.kron(active, np.ones((output, output), bool))[..., None], maps, 0)
    np.testing.assert_array_equal(got, expected)
    calls.clear()
    np.testing.assert_array_equal(predict_active(predictor, window, (0, 0), None, 5), maps)
    assert len(calls) == 1


def test_breakdown_shares_of_the_wall_time_of_every_thread() -> None:
    from hoverdask.pipeline.breakdown import STAGES, breakdown

    stages = {"plan": 1.0, "inference": 10.0, "pass2_read": 2.0, "pass3_segment": 3.0,
              "writing": 4.0}
    got = breakdown(stages, wall_s=10.0, worker_threads=4, tissue_mm2=2.5, processed_mm2=3.0)
    assert got["wall_s"] == 10.0
    assert got["s_per_mm2"] == pytest.approx(4.0)
    assert (got["tissue_mm2"], got["processed_mm2"], got["worker_threads"]) == (2.5, 3.0, 4)
    assert list(got["stages_s"]) == list(STAGES)
    assert got["stages_s"]["read"] == 0.0  # a stage not given took no time
    assert got["shares"]["inference"] == pytest.approx(10.0 / 40.0)
    assert got["shares"]["writing"] == pytest.approx(4.0 / 40.0)
    assert got["shares"]["overhead"] == pytest.approx(1.0 - 20.0 / 40.0)
    assert sum(got["shares"].values()) == pytest.approx(1.0, abs=1e-9)
    assert set(got["shares"]) == {*STAGES, "overhead"}


def test_breakdown_clips_the_overhead_and_needs_a_tissue_mask_for_seconds_per_mm2() -> None:
    from hoverdask.pipeline.breakdown import breakdown

    # more task seconds than wall x threads (workers joined later): no overhead
    got = breakdown({"inference": 30.0}, wall_s=10.0, worker_threads=2, tissue_mm2=None,
                    processed_mm2=1.0)
    assert got["shares"]["overhead"] == 0.0
    assert got["shares"]["inference"] == pytest.approx(1.5)
    assert got["s_per_mm2"] is None
    assert breakdown({}, wall_s=5.0, worker_threads=None, tissue_mm2=0.0,
                     processed_mm2=0.0)["shares"] is None
    assert breakdown({"plan": -0.5}, wall_s=5.0, worker_threads=1, tissue_mm2=1.0,
                     processed_mm2=1.0)["stages_s"]["plan"] == 0.0
    with pytest.raises(ValueError, match="unknown stages"):
        breakdown({"sobel": 1.0}, wall_s=1.0, worker_threads=1, tissue_mm2=1.0, processed_mm2=1.0)


def _sobel_plan(tmp_path):
    from types import SimpleNamespace

    grid = TileGrid(64, 96, 32, 16, 8)
    ledger = SlideLedger(tmp_path / "slide")
    rng = np.random.default_rng(5)
    maps = np.stack([rng.random((64, 96)), rng.uniform(-1, 1, (64, 96)),
                     rng.uniform(-1, 1, (64, 96))], -1).astype(np.float32)
    maps_store.create_store(ledger.maps_store, (64, 96), 32, nr_types=None)
    maps_store.write_tile(ledger.maps_store, 0, 0, maps, nr_types=None)
    return SimpleNamespace(ledger=ledger, grid=grid)


def test_sobel_markers_keep_their_seconds_and_old_markers_still_resume(tmp_path) -> None:
    from hoverdask.core.atomic import atomic_write_json
    from hoverdask.pipeline.postprocess import HvRanges, sobel_block

    plan = _sobel_plan(tmp_path)
    hv = HvRanges((-1.0, 1.0), (-1.0, 1.0), 0.001)
    computed = sobel_block(plan, (1, 1), hv, None)
    marker = plan.ledger.read_marker(plan.ledger.stage_part("sobel", 1, 1))
    assert marker["ranges"] == [list(r) for r in computed]
    assert 0.0 <= marker["read_s"] <= marker["seconds"]
    assert sobel_block(plan, (1, 1), ((-1.0, 1.0), (-1.0, 1.0)), None) == computed  # committed
    # a marker of an earlier version: the ranges alone, as a list; not recomputed
    old = [[-0.5, 0.25], [-0.75, 0.5]]
    atomic_write_json(plan.ledger.stage_part("sobel", 0, 2), old)
    assert sobel_block(plan, (0, 2), hv, None) == ((-0.5, 0.25), (-0.75, 0.5))
    assert plan.ledger.read_marker(plan.ledger.stage_part("sobel", 0, 2)) == old


def test_stage_seconds_count_only_the_units_of_this_run(tmp_path) -> None:
    from hoverdask.core.atomic import atomic_write_json
    from hoverdask.pipeline.postprocess import stage_seconds

    plan = _sobel_plan(tmp_path)
    plan.plan_s = 0.5
    ledger = plan.ledger
    tiles = [{"read_s": 1.0, "predict_s": 2.0, "write_s": 0.25, "predict_end": 110.0},
             {"read_s": 8.0, "predict_s": 8.0, "write_s": 8.0, "predict_end": 90.0},  # resumed
             {"read_s": 8.0, "predict_s": 8.0, "write_s": 8.0}]  # older still: no clock
    atomic_write_json(ledger.stage_part("sobel", 0, 0),
                      {"ranges": [[0, 1], [0, 1]], "seconds": 3.0, "read_s": 1.0,
                       "ended_at": 120.0})
    atomic_write_json(ledger.stage_part("sobel", 0, 1), [[0, 1], [0, 1]])  # old format
    atomic_write_json(ledger.stage_part("sobel", 1, 0),
                      {"ranges": [[0, 1], [0, 1]], "seconds": 9.0, "read_s": 9.0,
                       "ended_at": 50.0})  # resumed
    atomic_write_json(ledger.stage_part("blocks", 0, 0),
                      {"map_read_s": 0.5, "segment_s": 1.5, "features_s": 2.0,
                       "ended_at": 130.0})
    atomic_write_json(ledger.stage_part("blocks", 0, 1), {"postprocess_s": 9.0})  # old
    atomic_write_json(ledger.work / "oversized.json", {"seconds": 0.75, "ended_at": 140.0})
    got = stage_seconds(plan, tiles, since=100.0)
    assert got == {"plan": 0.5, "read": 1.0, "inference": 2.0, "maps_write": 0.25,
                   "pass2_read": 1.0, "pass2_sobel": 2.0, "pass3_read": 0.5,
                   "pass3_segment": 1.5, "features": 2.0, "oversized": 0.75}
    assert stage_seconds(plan, tiles, since=200.0) == dict.fromkeys(got, 0.0) | {"plan": 0.5}


def test_windows_from_decoded_tiles_equal_direct_reads_and_follow_rewrites(tmp_path) -> None:
    import zarr

    path, tile, rng = tmp_path / "maps.zarr", 64, np.random.default_rng(7)
    shape = (150, 230)  # edge tiles are partial
    maps_store.create_store(path, shape, tile, 5)
    for y0, x0 in ((0, 0), (0, 128), (64, 64), (128, 192)):  # the other tiles stay unwritten
        h, w = min(tile, shape[0] - y0), min(tile, shape[1] - x0)
        maps = np.concatenate([rng.integers(0, 5, (h, w, 1)), rng.random((h, w, 1)),
                               rng.uniform(-1, 1, (h, w, 2))], axis=-1).astype(np.float32)
        maps_store.write_tile(path, y0, x0, maps, 5)

    def direct(y0, x0, y1, x1):
        group = zarr.open_group(str(path), mode="r")
        return np.stack([maps_store.dequantise(n, group[n][y0:y1, x0:x1])
                         for n in maps_store.channel_names(5)], axis=-1)

    for _ in range(30):
        y0, x0 = int(rng.integers(0, shape[0] - 1)), int(rng.integers(0, shape[1] - 1))
        y1, x1 = int(rng.integers(y0 + 1, shape[0] + 1)), int(rng.integers(x0 + 1, shape[1] + 1))
        np.testing.assert_array_equal(maps_store.read_window(path, y0, x0, y1, x1, 5),
                                      direct(y0, x0, y1, x1))
    np.testing.assert_array_equal(
        maps_store.read_window(path, 10, 10, 140, 220, 5, channels=("h", "v")),
        direct(10, 10, 140, 220)[..., 2:])
    maps_store.read_window(path, 64, 64, 128, 128, 5)  # now kept decoded
    rewritten = np.full((64, 64, 4), 0.5, np.float32)
    maps_store.write_tile(path, 64, 64, rewritten, 5)
    np.testing.assert_array_equal(maps_store.read_window(path, 64, 64, 128, 128, 5),
                                  direct(64, 64, 128, 128))
    assert np.allclose(maps_store.read_window(path, 64, 64, 128, 128, 5)[..., 2], 0.5, atol=1e-4)
