"""``run_cohort`` on a real LocalCluster (processes) with a stub predictor of known maps.

Oracle: :func:`hoverdask.pipeline.nuclei_from_maps` on the whole (quantised) map at once. The
pipeline must give exactly the same nuclei, whatever the tile size, and again after a resume.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest

from hoverdask.pipeline import maps_store, nuclei_from_maps
from hoverdask.pipeline.predictors import ArrayPredictorFactory
from hoverdask.pipeline.run import RunOptions, run_cohort
from hoverdask.slide.synthetic import synthetic_pred_map, write_synthetic_slide
from tests.conftest import cpu_client

WIDTH, HEIGHT = 800, 600
NR_TYPES = 6


@pytest.fixture(scope="module")
def client():
    with cpu_client(workers=2, threads=1) as client:
        yield client


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cohort")
    slides = {}
    for name, seed in (("alpha", 1), ("beta", 2)):
        slides[name] = folder / f"{name}.svs"
        write_synthetic_slide(slides[name], WIDTH, HEIGHT, mpp=0.25, seed=seed,
                              compression="lossless", keep_instances=False)
    maps = synthetic_pred_map(HEIGHT, WIDTH, NR_TYPES, seed=3)
    np.save(folder / "maps.npy", maps)
    slides["maps"] = folder / "maps.npy"
    return slides


def _factory(cohort: dict[str, Path]) -> ArrayPredictorFactory:
    return ArrayPredictorFactory(str(cohort["maps"]), margin=46, output=164, nr_types=NR_TYPES)


def _stored(maps: np.ndarray) -> np.ndarray:
    names = maps_store.channel_names(NR_TYPES)
    return np.stack([maps_store.dequantise(n, maps_store.quantise(n, maps[..., i]))
                     for i, n in enumerate(names)], axis=-1)


@pytest.fixture(scope="module")
def expected(cohort) -> gpd.GeoDataFrame:
    return nuclei_from_maps(_stored(np.load(cohort["maps"])), 1024, NR_TYPES)


def _assert_same_nuclei(got: gpd.GeoDataFrame, want: gpd.GeoDataFrame) -> None:
    assert len(want) > 100
    # the Parquet file is in Hilbert order (spatial reads); compare by id
    got = got.sort_values("nucleus_id").reset_index(drop=True)
    want = want.sort_values("nucleus_id").reset_index(drop=True)
    np.testing.assert_array_equal(got["nucleus_id"].to_numpy(), want["nucleus_id"].to_numpy())
    for column in ("centroid_x", "centroid_y", "area_px", "type", "type_prob"):
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
    assert all(a.equals_exact(b, 0) for a, b in zip(got.geometry, want.geometry, strict=True))


@pytest.mark.slow
def test_chunked_cluster_run_equals_untiled_post_processing(client, cohort, expected, tmp_path,
                                                            monkeypatch):
    import hoverdask.deploy.figures

    figures = {
        "model": {"device": "cpu", "gflop_per_s": 12.5, "peak_gflop_per_s": 50.0, "mpix_per_s": 0.1},
        "postproc": {"mpix_per_s": 9.0},
    }
    monkeypatch.setattr(hoverdask.deploy.figures, "latest_figures_path", lambda: tmp_path / "bench.json")
    hoverdask.deploy.figures.remember_figures(figures)
    out = tmp_path / "out"
    result = run_cohort(
        [cohort["alpha"], cohort["beta"]], out, predictor_factory=_factory(cohort),
        client=client, options=RunOptions(chunk_size=164, tissue_mask=False), progress=False,
    )
    assert result.exit_code == 0
    assert [s.status for s in result.slides] == ["ok", "ok"]
    for name in ("alpha", "beta"):
        table = gpd.read_parquet(out / name / "nuclei.parquet")
        _assert_same_nuclei(table, expected)
        assert set(table["slide_id"]) == {name}
        assert "area_um2" in table.columns  # features were measured per block
        record = json.loads((out / name / "run.json").read_text())
        assert record["status"] == "ok"
        assert record["counts"]["nuclei"] == len(expected)
        assert record["counts"]["map_tiles"] == 4 * 5
        assert record["bench"]["model_gflop_per_s"] == 12.5  # the machine's last bench figures
        assert not (out / name / ".work").exists()
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(r["slide"], r["status"], int(r["nuclei"])) for r in rows] == [
        ("alpha", "ok", len(expected)), ("beta", "ok", len(expected))]


@pytest.mark.slow
def test_resume_redoes_only_missing_parts_and_gives_identical_output(client, cohort, expected,
                                                                    tmp_path):
    out = tmp_path / "out"
    options = RunOptions(chunk_size=328, tissue_mask=False, keep_work=True)
    run_cohort([cohort["alpha"]], out, predictor_factory=_factory(cohort), client=client,
               options=options, progress=False)
    slide = out / "alpha"
    first = (slide / "nuclei.parquet").read_bytes()
    tiles = {p.name: json.loads(p.read_text()) for p in (slide / ".work/tiles").glob("*.json")}
    breakdown = _checked_breakdown(slide)
    assert breakdown["stages_s"]["inference"] == pytest.approx(
        sum(m["predict_s"] for m in tiles.values()), abs=1e-3)
    assert breakdown["stages_s"]["pass3_segment"] == pytest.approx(sum(
        json.loads(p.read_text())["segment_s"] for p in (slide / ".work/blocks").glob("*.json")
    ), abs=1e-3)
    # a crash after some units were committed: outputs gone, some tiles and blocks missing
    (slide / "run.json").unlink()
    (slide / "nuclei.parquet").unlink()
    for marker in [slide / ".work/tiles/0_1.json", slide / ".work/blocks/1_0.json"]:
        marker.unlink()
    kept = (slide / ".work/tiles/1_1.json").stat().st_mtime_ns
    result = run_cohort([cohort["alpha"]], out, predictor_factory=_factory(cohort),
                        client=client, options=options, progress=False)
    assert result.slides[0].status == "ok"
    assert (slide / ".work/tiles/1_1.json").stat().st_mtime_ns == kept  # not redone
    assert (slide / ".work/tiles/0_1.json").exists()
    assert (slide / "nuclei.parquet").read_bytes() == first
    _assert_same_nuclei(gpd.read_parquet(slide / "nuclei.parquet"), expected)
    # the resumed run's breakdown counts only what it did: one tile, one block, no pass 2
    redone = json.loads((slide / ".work/tiles/0_1.json").read_text())
    block = json.loads((slide / ".work/blocks/1_0.json").read_text())
    breakdown = _checked_breakdown(slide)
    assert breakdown["stages_s"]["inference"] == pytest.approx(redone["predict_s"], abs=1e-3)
    assert breakdown["stages_s"]["pass3_segment"] == pytest.approx(block["segment_s"], abs=1e-3)
    assert breakdown["stages_s"]["pass2_read"] == breakdown["stages_s"]["pass2_sobel"] == 0.0
    # a finished slide is skipped unless --overwrite
    again = run_cohort([cohort["alpha"]], out, predictor_factory=_factory(cohort),
                       client=client, options=options, progress=False)
    assert again.slides[0].status == "skipped"
    assert again.exit_code == 0


def _checked_breakdown(slide: Path) -> dict:
    """run.json's breakdown of a slide run on the 2 x 1 thread cluster without a tissue mask."""
    from hoverdask.pipeline.breakdown import STAGES

    record = json.loads((slide / "run.json").read_text())
    assert set(record["timings_s"]) >= {"wall", "read_s", "predict_s", "write_s",
                                        "postprocess_s", "features_s"}
    breakdown = record["breakdown"]
    assert set(breakdown["stages_s"]) == set(STAGES)  # run.json sorts its keys
    assert all(seconds >= 0.0 for seconds in breakdown["stages_s"].values())
    assert set(breakdown["shares"]) == {*STAGES, "overhead"}
    assert all(share >= 0.0 for share in breakdown["shares"].values())
    assert sum(breakdown["shares"].values()) == pytest.approx(1.0, abs=1e-6)
    assert breakdown["worker_threads"] == 2
    assert breakdown["wall_s"] == pytest.approx(record["timings_s"]["wall"], abs=1e-3)
    assert breakdown["tissue_mm2"] is None
    assert breakdown["s_per_mm2"] is None  # no tissue mask
    assert breakdown["processed_mm2"] == pytest.approx(WIDTH * HEIGHT * 0.25**2 / 1e6)
    return breakdown


def _damaged_slide(path: Path) -> Path:
    """A slide that opens (metadata intact) but whose first tile cannot be decoded."""
    import tifffile

    write_synthetic_slide(path, 400, 300, mpp=0.25, seed=9, compression="lossless",
                          keep_instances=False)
    with tifffile.TiffFile(path) as tiff:
        offset, size = tiff.pages[0].dataoffsets[0], tiff.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = bytes(size)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
def test_a_bad_slide_fails_alone(client, cohort, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a tiff at all")
    damaged = _damaged_slide(tmp_path / "damaged.svs")  # fails inside a worker task
    out = tmp_path / "out"
    result = run_cohort(
        [broken, damaged, cohort["alpha"], tmp_path / "missing.svs"], out,
        predictor_factory=_factory(cohort), client=client,
        options=RunOptions(chunk_size=656, tissue_mask=False), progress=False,
    )
    assert [s.status for s in result.slides] == ["failed", "failed", "ok", "failed"]
    assert result.exit_code == 1
    assert "SlideError" in result.slides[0].error
    assert "damaged" in result.slides[1].error
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed", "ok", "failed"]
    assert rows[3]["error"]
    assert (out / "alpha" / "nuclei.parquet").exists()
    assert not (out / "damaged" / "run.json").exists()


@pytest.mark.slow
def test_slides_are_planned_on_workers_and_the_first_of_two_same_ids_wins(client, cohort,
                                                                          tmp_path):
    import shutil

    from distributed import get_task_stream

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(cohort["alpha"], tmp_path / folder / "alpha.svs")
    out = tmp_path / "out"
    with get_task_stream(client) as stream:
        result = run_cohort([tmp_path / "a" / "alpha.svs", tmp_path / "b" / "alpha.svs"], out,
                            predictor_factory=_factory(cohort), client=client,
                            options=RunOptions(chunk_size=656, tissue_mask=False),
                            progress=False)
    assert [s.status for s in result.slides] == ["ok", "failed"]
    assert result.slides[0].slide.endswith("a/alpha.svs")
    assert "also the id" in result.slides[1].error
    assert sum(r["key"].startswith("plan-") for r in stream.data) == 2  # planned by workers
    assert json.loads((out / "alpha" / "run.json").read_text())["slide"].endswith("a/alpha.svs")
    assert not list(out.glob(".plans-*"))  # the staged tissue masks are cleaned up


@pytest.mark.slow
def test_tiles_without_tissue_are_skipped_exactly(client, cohort, tmp_path):
    out = tmp_path / "out"
    run_cohort([cohort["beta"]], out, predictor_factory=_factory(cohort), client=client,
               options=RunOptions(chunk_size=164, keep_work=True), progress=False)
    done = [tuple(int(n) for n in p.stem.split("_"))
            for p in (out / "beta" / ".work" / "tiles").glob("*.json")]
    assert 0 < len(done) < 4 * 5  # the synthetic slide has glass: some tiles hold no tissue
    maps = np.zeros_like(_stored(np.load(cohort["maps"])))
    for row, col in done:
        maps[row * 164 : (row + 1) * 164, col * 164 : (col + 1) * 164] = _stored(
            np.load(cohort["maps"]))[row * 164 : (row + 1) * 164, col * 164 : (col + 1) * 164]
    _assert_same_nuclei(gpd.read_parquet(out / "beta" / "nuclei.parquet"),
                        nuclei_from_maps(maps, 1024, NR_TYPES))


@pytest.mark.slow
def test_a_slide_without_tissue_finishes_empty_with_a_warning(client, cohort, tmp_path):
    import tifffile

    blank = tmp_path / "blank.svs"
    tifffile.imwrite(blank, np.full((400, 500, 3), 242, np.uint8), tile=(256, 256),
                     photometric="rgb", description="Aperio Image Library |MPP = 0.25")
    out = tmp_path / "out"
    result = run_cohort([blank], out, predictor_factory=_factory(cohort), client=client,
                        options=RunOptions(chunk_size=328), progress=False)
    (slide,) = result.slides
    assert (slide.status, slide.nuclei) == ("ok", 0)
    assert "no tissue" in slide.error
    assert len(gpd.read_parquet(out / "blank" / "nuclei.parquet")) == 0
    row = next(csv.DictReader((out / "summary.csv").open()))
    assert float(row["tissue_mm2"]) == 0.0
    assert "no tissue" in row["error"]


@pytest.mark.slow
def test_inference_runs_only_on_gpu_workers_and_post_processing_anywhere(cohort, tmp_path):
    """A cluster with one worker advertising GPU=1 and one without: every inference task must
    land on the GPU worker, and the CPU passes must be free to use the other."""
    from distributed import Client, Nanny, Scheduler, SpecCluster, get_task_stream

    workers = {
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1",
                                          "resources": {"GPU": 1}}},
        "cpu": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1"}},
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1",
                                               "dashboard_address": "127.0.0.1:0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        with get_task_stream(client) as stream:
            result = run_cohort([cohort["alpha"]], tmp_path / "out",
                                predictor_factory=_factory(cohort), client=client,
                                options=RunOptions(chunk_size=164, tissue_mask=False),
                                progress=False)
    assert result.exit_code == 0
    placed = {}
    for record in stream.data:
        placed.setdefault(record["key"].split("-")[0], set()).add(record["worker"])
    assert placed["infer"] == {names["gpu"]}
    assert len(placed["nuclei"] | placed["sobel"]) == 2  # CPU passes used both workers


@pytest.mark.slow
def test_glass_patches_of_a_tissue_tile_are_background_and_never_predicted(client, tmp_path):
    from hoverdask.pipeline.plan import plan_slide

    slide, maps_path = tmp_path / "glassy.svs", tmp_path / "maps.npy"
    write_synthetic_slide(slide, 1200, 900, mpp=0.25, seed=2, compression="lossless",
                          keep_instances=False, background_fraction=0.4)
    np.save(maps_path, synthetic_pred_map(900, 1200, NR_TYPES, seed=5))
    plan, _ = plan_slide(str(slide), tmp_path / "plan", mpp=None, target_mpp=0.25,
                         chunk_size=656, output=164, margin=46)
    assert plan.tissue_patches, "the synthetic slide's glass should leave patches without tissue"
    assert plan.processed_pixels < plan.grid.pixels(plan.tissue_tiles)
    # inference is submitted longest tile first: most patches first, raster order among equals
    # (on 492 px tiles the raster order is 9, 9, 6, 9 patches)
    small, _ = plan_slide(str(slide), tmp_path / "plan-492", mpp=None, target_mpp=0.25,
                          chunk_size=492, output=164, margin=46)
    order = small.tiles_longest_first()
    counts = [small.patches_to_run(*t) for t in order]
    assert sorted(order) == sorted(small.tissue_tiles)
    assert sum(counts) == small.params["patches_run"]
    assert counts != [small.patches_to_run(*t) for t in small.tissue_tiles]
    assert all((-a, small.tissue_tiles.index(s)) < (-b, small.tissue_tiles.index(t))
               for (a, s), (b, t) in itertools.pairwise(zip(counts, order, strict=True)))
    # post-processing blocks (one per map tile) in the same order, blocks without tissue last
    blocks = list(small.grid.blocks.blocks())
    busy = small.busiest_first(blocks)
    assert sorted(busy) == sorted(blocks)
    assert len(blocks) > len(order)
    assert busy[: len(order)] == order
    out = tmp_path / "out"
    factory = ArrayPredictorFactory(str(maps_path), margin=46, output=164, nr_types=NR_TYPES)
    run_cohort([slide], out, predictor_factory=factory, client=client,
               options=RunOptions(chunk_size=656, keep_work=True), progress=False)
    stored = _stored(np.load(maps_path))
    maps = np.zeros_like(stored)
    predicted = 0
    for row, col in plan.tissue_tiles:
        active = plan.active_patches(row, col)
        rows, cols = plan.grid.patch_shape(row, col)
        for i, j in np.ndindex(rows, cols):
            if active is None or active[i, j]:
                y0, x0, y1, x1 = plan.grid.patch_extent(row, col, i, j)
                maps[y0:y1, x0:x1] = stored[y0:y1, x0:x1]
                predicted += 1
        marker = json.loads((out / "glassy" / ".work" / "tiles" / f"{row}_{col}.json").read_text())
        assert marker["patches_run"] == (rows * cols if active is None else active.sum())
    assert predicted == plan.params["patches_run"] < plan.params["patches_total"]
    _assert_same_nuclei(gpd.read_parquet(out / "glassy" / "nuclei.parquet"),
                        nuclei_from_maps(maps, 1024, NR_TYPES))


@pytest.mark.slow
def test_report_pictures_are_drawn_on_the_workers(client, cohort, tmp_path, monkeypatch):
    from hoverdask.export import report

    drawn = []
    monkeypatch.setattr(report, "_draw_slide", lambda *a: drawn.append(a))  # this process only
    out = tmp_path / "out"
    result = run_cohort([cohort["alpha"]], out, predictor_factory=_factory(cohort), client=client,
                        options=RunOptions(chunk_size=328), progress=False)
    assert result.slides[0].status == "ok"
    assert drawn == []  # the client reused what the worker drew
    pictures = json.loads((out / "alpha" / "report" / "pictures.json").read_text())
    assert pictures["fingerprint"] == report._fingerprint(out / "alpha")
    assert "data-kind=" in (out / "report.html").read_text()
