"""The Python API (``hoverdask.run``, ``read_nuclei``, ``load_model``, ``segment``) and a quiet
terminal: ``hoverdask run`` prints no Dask INFO lines and writes ``OUT/hoverdask.log``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch

import hoverdask
from hoverdask.core.errors import HoverdaskError
from hoverdask.export.geoparquet import add_to_dataset, write_geoparquet
from hoverdask.model import LiteHoVerNet, save_checkpoint
from hoverdask.model.lite import LiteShape
from hoverdask.slide.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(LiteHoVerNet(5, LiteShape((8, 16), 1)), path)


def squares(n: int, seed: int) -> gpd.GeoDataFrame:
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 1000, n), rng.uniform(0, 1000, n)
    return gpd.GeoDataFrame({
        "geometry": shapely.box(x, y, x + 8, y + 8),
        "centroid_x": x + 4, "centroid_y": y + 4,
        "type": rng.integers(0, 5, n).astype(np.int16),
        "nucleus_id": np.arange(n, dtype=np.int64),
    }, geometry="geometry")


def test_import_is_light_and_names_the_api() -> None:
    code = ("import sys, hoverdask; assert 'torch' not in sys.modules and 'distributed' not in "
            "sys.modules, sorted(sys.modules); print(sorted(hoverdask.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert "read_nuclei" in out.stdout
    assert callable(hoverdask.run)
    assert callable(hoverdask.segment)


def test_read_nuclei_bbox_equals_a_read_filtered_by_hand(tmp_path) -> None:
    out = tmp_path / "out"
    for slide, seed in (("a", 1), ("b b", 2)):
        part = write_geoparquet(squares(300, seed), tmp_path / f"{seed}.parquet", slide_id=slide,
                                row_group_size=40)
        add_to_dataset(part, out / "nuclei", slide)
    box = (200.0, 300.0, 450.0, 600.0)
    got = hoverdask.read_nuclei(out, bbox=box)
    everything = gpd.read_parquet(out / "nuclei")
    bounds = everything.geometry.bounds
    keep = ((bounds.minx <= box[2]) & (bounds.maxx >= box[0]) & (bounds.miny <= box[3])
            & (bounds.maxy >= box[1]))
    expected = everything[keep].copy()
    expected["slide"] = expected["slide"].astype(str)
    key = ["slide", "nucleus_id"]
    got = got.sort_values(key).reset_index(drop=True)
    expected = expected.sort_values(key).reset_index(drop=True)
    assert 0 < len(got) < len(everything)
    assert list(got.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(pd.DataFrame(got.drop(columns="geometry")),
                                  pd.DataFrame(expected.drop(columns="geometry")))
    assert got.geometry.equals(expected.geometry)
    assert set(got["slide"]) == {"a", "b b"}
    # slides and columns
    only = hoverdask.read_nuclei(out, slides=["b b"], columns=["type"])
    assert set(only["slide"]) == {"b b"}
    assert list(only.columns) == ["geometry", "type", "slide"]
    assert len(only) == 300
    with pytest.raises(HoverdaskError, match="no cohort table"):
        hoverdask.read_nuclei(tmp_path / "nowhere")


def test_load_model_and_segment_an_array(tmp_path) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.tar")
    net = hoverdask.load_model(ckpt)
    assert (net.mode, net.nr_types) == ("lite", 5)
    rgb = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    found = hoverdask.segment(rgb, net, device="cpu")
    assert isinstance(found, gpd.GeoDataFrame)
    assert {"geometry", "centroid_x", "type", "type_name", "area_px"} <= set(found.columns)
    again = hoverdask.segment(rgb, str(ckpt), device="cpu")
    assert found.geometry.equals(again.geometry)
    with pytest.raises(HoverdaskError, match="uint8"):
        hoverdask.segment(rgb.astype(np.float32), net)
    with pytest.raises(HoverdaskError, match="unknown run option"):
        hoverdask.run(["x.svs"], tmp_path / "o", ckpt, chunk=3)


@pytest.mark.slow
def test_run_from_python_equals_the_cli_and_the_terminal_is_quiet(tmp_path) -> None:
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 320, 320, mpp=0.25, seed=3, compression="lossless",
                          keep_instances=False)
    ckpt = tiny_checkpoint(tmp_path / "tiny.tar")
    common = ["--workers", "1", "--threads-per-worker", "1", "--device", "cpu",
              "--no-tissue-mask"]
    cli_out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "hoverdask", "run", str(slide), "--out", str(cli_out),
         "--model", str(ckpt), *common],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
    )
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal
    assert " INFO " not in terminal
    assert "Traceback" not in terminal
    assert "Dask dashboard" in terminal
    log = (cli_out / "hoverdask.log").read_text()
    assert "distributed" in log
    assert "INFO" in log

    py_out = tmp_path / "py"
    result = hoverdask.run([slide], py_out, ckpt, workers=1, threads_per_worker=1, device="cpu",
                           tissue_mask=False, progress=False)
    assert result.exit_code == 0
    assert [s.status for s in result.slides] == ["ok"]
    assert (py_out / "hoverdask.log").is_file()
    from_cli = hoverdask.read_nuclei(cli_out)
    from_py = hoverdask.read_nuclei(py_out)
    assert result.slides[0].nuclei == len(from_cli)
    pd.testing.assert_frame_equal(pd.DataFrame(from_cli.drop(columns="geometry")),
                                  pd.DataFrame(from_py.drop(columns="geometry")))
    assert from_cli.geometry.equals(from_py.geometry)
