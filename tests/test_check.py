"""`hoverdask check`: every broken input of the drills' bad cohort is named with its reason and
fix, good slides are described (levels, mpp and source, magnification, tiles decoded, tissue, map
tiles, estimate), and `run`'s plan step fails a slide with exactly the line `check` gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from hoverdask.core.errors import HoverdaskError
from hoverdask.pipeline.check import (
    BENCH_HINT,
    check_slide,
    model_geometry,
    seconds_per_megapixel,
)
from hoverdask.pipeline.plan import PlanFailure, plan_slide, plan_task
from hoverdask.slide.inspect import magnification_from_mpp, sample_boxes
from tests.conftest import CMU_SLIDE
from tests.test_drills import _bad_slides

LITE = {"output": 448, "margin": 32}  # the bundled model's patch geometry
SETTINGS = {"mpp": None, "target_mpp": 0.25, "chunk_size": 1968, **LITE}

# slide name -> (code, words of the reason (the drills' own first), words of the fix)
EXPECTED = {
    "empty": ("empty", ("empty", "0 bytes"), "copy the file again"),
    "truncated": ("truncated", ("truncated",), "copy the file again"),
    "notes": ("not-a-slide", ("not a readable slide",), "slide format hoverdask reads"),
    "nompp": ("no-mpp", ("--mpp", "no pixel size"), "pass --mpp"),
    "corrupt": ("damaged", ("do not decode", "level 0"), "copy the file again"),
    "dpi": ("bad-mpp", ("not plausible", "--mpp"), "pass --mpp"),
    "missing": ("not-found", ("no such file",), "check the path"),
}
SLIDE_KEYS = {
    "slide", "slide_id", "ok", "reason", "code", "fix", "format", "file_bytes", "levels", "width",
    "height", "mpp", "mpp_source", "mpp_missing", "magnification", "magnification_source",
    "tiles_decoded", "bad_tiles", "tissue_mm2", "map_tile_size", "map_tiles", "map_tiles_total",
    "processed_megapixels", "estimated_seconds", "warnings",
}
LEVEL_KEYS = {"level", "width", "height", "downsample", "mpp", "tile_width", "tile_height",
              "tiles", "tiles_decoded", "tiles_bad"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A good synthetic slide with tissue, the drills' bad cohort and three more broken inputs."""
    from hoverdask.slide.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("check-cohort")
    good = folder / "good.svs"
    write_synthetic_slide(good, 2048, 1536, mpp=0.25, seed=3, keep_instances=False)
    paths: dict[str, Any] = {"good": good, **{name: path for name, (path, _) in
                              _bad_slides(folder / "bad", good).items()}}  # fmt: skip
    with tifffile.TiffFile(good) as tiff:  # zero one level-0 tile inside the file: undecodable
        page = tiff.pages[0]
        index = len(page.dataoffsets) // 2
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        paths["corrupt_tile_xy"] = ((index % tiles_across) * page.tilewidth,
                                    (index // tiles_across) * page.tilelength)
    data = bytearray(good.read_bytes())
    data[offset : offset + count] = bytes(count)
    paths["corrupt"] = folder / "corrupt.svs"
    paths["corrupt"].write_bytes(bytes(data))
    paths["dpi"] = folder / "dpi.tif"  # 72 dpi screen resolution: 353 µm/px is no microscope
    tifffile.imwrite(paths["dpi"], np.full((300, 400, 3), 180, np.uint8), tile=(256, 256),
                     photometric="rgb", resolution=(72, 72), resolutionunit="INCH")  # fmt: skip
    paths["missing"] = folder / "missing.svs"
    return paths


def test_sample_boxes_spread_over_the_level_and_include_its_last_tile() -> None:
    boxes = sample_boxes(1000, 700, (256, 256), grid=4)
    assert len(boxes) == 12  # 4 x 3 tiles: all of them
    assert boxes[0] == (0, 0, 256, 256)
    assert boxes[-1] == (768, 512, 1000, 700)
    many = sample_boxes(10_000, 10_000, (256, 256), grid=4)
    assert len(many) == 16
    assert {b[0] for b in many} == {0, 3328, 6656, 9984}  # columns 0, 13, 26 and the last (39)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_broken_input_is_named_with_its_reason_and_fix(cohort, name, tmp_path) -> None:
    code, words, fix = EXPECTED[name]
    result = check_slide(cohort[name], **SETTINGS)
    assert not result.ok
    assert result.code == code, result.reason
    assert result.reason.startswith("SlideError: ")
    assert cohort[name].name in result.reason
    for word in words:
        assert word in result.reason
    assert fix in result.fix
    assert result.map_tiles is None
    assert result.estimated_seconds is None
    # run's plan step fails the slide with the very same line
    failure = plan_task(str(cohort[name]), str(tmp_path), str(tmp_path / "t.npz"), **SETTINGS)
    assert isinstance(failure, PlanFailure)
    assert failure.line == result.reason


def test_a_slide_without_mpp_is_still_described(cohort) -> None:
    result = check_slide(cohort["nompp"], **SETTINGS)
    assert result.mpp is None
    assert result.mpp_source is None
    assert "no pixel size" in result.mpp_missing
    assert result.format == "tiff"
    assert [(lv["width"], lv["height"]) for lv in result.levels] == [(400, 300)]
    assert result.tiles_decoded == 4
    assert result.bad_tiles == []
    fixed = check_slide(cohort["nompp"], **{**SETTINGS, "mpp": 0.5})
    assert fixed.ok, fixed.reason
    assert (fixed.mpp, fixed.mpp_source) == (0.5, "override")
    assert fixed.levels[0]["mpp"] == 0.5
    assert (fixed.magnification, fixed.magnification_source) == (20.0, "estimated from mpp")


def test_a_corrupt_tile_is_found_and_located(cohort) -> None:
    result = check_slide(cohort["corrupt"], **SETTINGS)
    x, y = cohort["corrupt_tile_xy"]
    assert [(t["level"], t["x"], t["y"]) for t in result.bad_tiles] == [(0, x, y)]
    assert "JPEG" in result.bad_tiles[0]["error"].upper()
    assert result.levels[0]["tiles_bad"] == 1
    assert f"1 of {result.tiles_decoded} sampled tiles" in result.reason
    assert result.mpp == 0.25  # everything else about it is fine


@pytest.mark.parametrize("name", ["good", "cmu"])
def test_a_good_slide_is_described_and_planned_as_run_plans_it(cohort, name, tmp_path) -> None:
    path = CMU_SLIDE if name == "cmu" else cohort["good"]
    result = check_slide(path, **SETTINGS)
    assert result.ok, result.reason
    assert (result.reason, result.code, result.fix, result.bad_tiles) == ("", "", "", [])
    assert set(result.to_json()) == SLIDE_KEYS
    assert all(set(level) == LEVEL_KEYS for level in result.levels)
    assert result.format == "aperio"
    assert result.tiles_decoded == sum(lv["tiles_decoded"] for lv in result.levels) > 0
    plan, _ = plan_slide(str(path), tmp_path, **SETTINGS)
    assert result.map_tiles == len(plan.tissue_tiles) > 0
    assert result.map_tiles_total == plan.grid.shape[0] * plan.grid.shape[1]
    assert result.map_tile_size == plan.grid.tile == 1792  # 1968 rounded down to 4 x 448
    assert result.tissue_mm2 == pytest.approx(plan.tissue_mm2, abs=1e-4)
    assert result.tissue_mm2 > 0
    expected = {"cmu": (0.499, 20.0, (2220, 2967), 1), "good": (0.25, 40.0, (2048, 1536), 2)}
    mpp, magnification, size, levels = expected[name]
    assert (result.mpp, result.mpp_source) == (mpp, "aperio")
    assert (result.magnification, result.magnification_source) == (magnification, "metadata")
    assert (result.width, result.height) == size
    assert len(result.levels) == levels


def test_an_ome_zarr_store_is_checked_like_its_slide(cohort, tmp_path) -> None:
    import shutil

    from hoverdask.slide.convert import convert_to_omezarr

    store = tmp_path / "good.zarr"
    convert_to_omezarr(cohort["good"], store, num_workers=1)
    slide, converted = check_slide(cohort["good"], **SETTINGS), check_slide(store, **SETTINGS)
    assert converted.ok, converted.reason
    assert (converted.format, converted.mpp, converted.mpp_source) == ("ome-zarr", 0.25, "ome-zarr")
    assert (converted.map_tiles, converted.tissue_mm2) == (slide.map_tiles, slide.tissue_mm2)
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    (damaged / "0" / "0" / "1" / "1").write_bytes(b"not a compressed chunk")
    result = check_slide(damaged, **SETTINGS)
    assert result.code == "damaged", result.reason
    assert [(t["level"], t["x"], t["y"]) for t in result.bad_tiles] == [(0, 1024, 1024)]


@pytest.mark.parametrize(("mpp", "power"), [(0.25, 40.0), (0.263, 40.0), (0.499, 20.0),
                                             (0.5, 20.0), (1.0, 10.0), (0.17, 60.0)])
def test_magnification_without_metadata_is_the_nearest_objective(mpp, power) -> None:
    assert magnification_from_mpp(mpp) == power


def test_map_tiles_follow_the_model_geometry(cohort) -> None:
    """2048 x 1536 px at 0.25 µm/px: map tiles are --chunk-size rounded down to whole outputs."""
    fast = check_slide(cohort["good"], **{**SETTINGS, "chunk_size": 700, "output": 164,
                                          "margin": 46})  # fmt: skip
    assert (fast.map_tile_size, fast.map_tiles_total) == (656, 4 * 3)
    lite = check_slide(cohort["good"], **{**SETTINGS, "chunk_size": 700})
    assert (lite.map_tile_size, lite.map_tiles_total) == (448, 5 * 4)


def test_model_geometry_reads_the_checkpoint_or_falls_back_to_lite(tmp_path,
                                                                   monkeypatch) -> None:
    from hoverdask.model import build_network, catalog
    from hoverdask.model.checkpoints import save_checkpoint

    monkeypatch.setattr(catalog, "WEIGHTS_DIR", tmp_path / "weights")
    absent = model_geometry(None)
    assert (absent.output, absent.margin, absent.mode, absent.path) == (448, 32, "lite", None)
    assert "absent" in absent.note
    assert "lite geometry" in absent.note
    path = save_checkpoint(build_network("lite", nr_types=6), tmp_path / "mine.tar")
    given = model_geometry(path)
    assert (given.output, given.margin, given.mode, given.note) == (448, 32, "lite", "")
    assert given.path == str(path.resolve())
    with pytest.raises(HoverdaskError, match="does not exist"):
        model_geometry(tmp_path / "nowhere.tar")


def test_estimate_comes_from_the_bench_figures_or_says_how_to_get_one() -> None:
    assert seconds_per_megapixel(None) == (None, BENCH_HINT)
    rate, basis = seconds_per_megapixel({"end_to_end_mpix_per_s": 0.5, "device": "cpu",
                                         "measured_at": "2026-12-01T00:00:00+00:00"})
    assert rate == 2.0
    assert "end-to-end" in basis
    assert "2026-12-01" in basis
    rate, basis = seconds_per_megapixel({"end_to_end_mpix_per_s": None, "model_mpix_per_s": 1.0,
                                         "postproc_mpix_per_s": 4.0})  # fmt: skip
    assert rate == 1.25
    assert "network + post-processing" in basis


@pytest.fixture(scope="module")
def client():
    from tests.conftest import cpu_client

    with cpu_client(workers=2, threads=1) as client:
        yield client


def _bench_figures(monkeypatch: pytest.MonkeyPatch, folder: Path, e2e_mpix_per_s: float | None):
    """This machine's latest `hoverdask bench` figures, as a file in ``folder`` (or none)."""
    from hoverdask.deploy import figures

    path = folder / "bench.json"
    if e2e_mpix_per_s is not None:
        path.write_text(json.dumps({
            "measured_at": "2026-12-01T00:00:00+00:00",
            "model": {"device": "cpu", "gflop_per_s": 10.0, "peak_gflop_per_s": 50.0,
                      "mpix_per_s": 3.0},
            "postproc": {"mpix_per_s": 20.0},
            "end_to_end": {"mpix_per_s": e2e_mpix_per_s},
        }))  # fmt: skip
    monkeypatch.setattr(figures, "latest_figures_path", lambda: path)


@pytest.mark.slow
def test_cli_names_every_bad_slide_and_exits_1(cohort, client, tmp_path, monkeypatch) -> None:
    from hoverdask import cli

    _bench_figures(monkeypatch, tmp_path, e2e_mpix_per_s=2.0)
    names = ["good", *(n for n in EXPECTED)]
    out = tmp_path / "check.json"
    result = CliRunner().invoke(cli.app, ["check", *(str(cohort[n]) for n in names),
                                          str(CMU_SLIDE), "--json", str(out),
                                          "--scheduler", client.scheduler.address])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    report = json.loads(out.read_text())
    assert set(report) == {"hoverdask_version", "checked_at", "ok", "settings", "model", "bench",
                           "estimate_basis", "totals", "slides"}  # fmt: skip
    assert report["ok"] is False
    assert report["bench"]["end_to_end_mpix_per_s"] == 2.0
    assert "end-to-end rate" in report["estimate_basis"]
    assert report["settings"]["chunk_size"] == 1968
    assert (report["model"]["output"], report["model"]["margin"]) == (448, 32)
    slides = {Path(s["slide"]).name: s for s in report["slides"]}
    assert [Path(s["slide"]).name for s in report["slides"]] == [
        *(cohort[n].name for n in names), CMU_SLIDE.name]  # in the order given
    for name, (code, words, fix) in EXPECTED.items():
        entry = slides[cohort[name].name]
        assert (entry["ok"], entry["code"]) == (False, code)
        assert all(word in entry["reason"] for word in words)
        assert f"FAIL {cohort[name]}: {entry['reason']}" in result.output
        assert fix in entry["fix"]
    good = [slides[cohort["good"].name], slides[CMU_SLIDE.name]]
    for entry in good:
        assert entry["ok"]
        assert set(entry) == SLIDE_KEYS
        assert entry["estimated_seconds"] == pytest.approx(entry["processed_megapixels"] / 2.0,
                                                           abs=0.06)  # fmt: skip
    totals = report["totals"]
    assert (totals["slides"], totals["passed"], totals["failed"]) == (len(names) + 1, 2, 7)
    assert totals["map_tiles"] == sum(e["map_tiles"] for e in good)
    assert "2 of 9 slides pass" in result.output


@pytest.mark.slow
def test_cli_on_its_own_local_cluster_exits_0_when_all_pass(cohort, tmp_path,
                                                            monkeypatch) -> None:
    from hoverdask import cli

    _bench_figures(monkeypatch, tmp_path, e2e_mpix_per_s=None)
    out = tmp_path / "check.json"
    result = CliRunner().invoke(cli.app, ["check", str(cohort["good"]), str(cohort["nompp"]),
                                          "--mpp", "0.25", "--workers", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["bench"] is None
    assert report["estimate_basis"] == BENCH_HINT
    assert all(s["ok"] and s["estimated_seconds"] is None for s in report["slides"])
    assert BENCH_HINT in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--mpp", "400"], "not plausible"), (["--model", "nowhere.tar"], "does not exist"), ([], "")],
)
def test_cli_usage_errors_exit_2(cohort, args, words) -> None:
    from hoverdask import cli

    slides = [str(cohort["good"])] if words else []
    result = CliRunner().invoke(cli.app, ["check", *slides, *args])
    assert result.exit_code == 2, result.output
    assert words in result.output
