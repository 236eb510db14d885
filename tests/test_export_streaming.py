"""A slide's files written from its block parts, one row group at a time, against the files the
whole-table path writes from the concatenated parts (the oracle: cell by cell, byte by byte)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_features import TYPES, synthetic_block
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.export import summary, write_geoparquet, write_qc_picture, write_slide_outputs
from hoverdask.export.parts import index_parts
from hoverdask.export.qc import QcDots, write_qc_picture_dots
from hoverdask.export.summary import write_slide_outputs_from_parts
from hoverdask.nuclei.features import FEATURE_COLUMNS, measure
from hoverdask.pipeline.outputs import finish_slide, finish_slide_parts, slide_rows

SIDE = 600
EXTENT = (0.0, 0.0, float(SIDE), float(SIDE))


@pytest.fixture(scope="module")
def measured() -> gpd.GeoDataFrame:
    nuclei, image, _ = synthetic_block(seed=5, shape=(SIDE, SIDE), count=900, slide_id="x")
    table = measure(nuclei, image, 0.25, type_table=TYPES).drop(columns=["slide_id"])
    # seam-rule-like ids (row-major position), unrelated to the order rows are stored in
    table["nucleus_id"] = (
        np.floor(table["centroid_y"]) * SIDE + np.floor(table["centroid_x"])
    ).astype(np.int64)
    return table


def _write_parts(table: gpd.GeoDataFrame, folder: Path, blocks: int = 3) -> list[Path]:
    """Block parts (rows of the block its centroid falls in, shuffled) plus an "oversized" part."""
    rng = np.random.default_rng(1)
    size = SIDE / blocks
    oversized = rng.random(len(table)) < 0.05
    block = (table["centroid_y"] // size).astype(int) * blocks + table["centroid_x"] // size
    paths = []
    for index in range(blocks * blocks):
        rows = np.flatnonzero((block.to_numpy() == index) & ~oversized)
        paths.append(folder / f"{index // blocks}_{index % blocks}.parquet")
        table.iloc[rng.permutation(rows)].to_parquet(paths[-1], index=False)
    paths.append(folder / "oversized.parquet")
    table[oversized].to_parquet(paths[-1], index=False)
    return paths


def _whole_table(paths: list[Path], slide_id: str) -> gpd.GeoDataFrame:
    """What assemble_slide built before: the parts concatenated, sorted, slide rows."""
    tables = [gpd.read_parquet(p) for p in paths]
    table = gpd.GeoDataFrame(pd.concat([t for t in tables if len(t)], ignore_index=True))
    table = table.sort_values("nucleus_id", kind="stable").reset_index(drop=True)
    return slide_rows(table, slide_id)


def _assert_same_parquet(old: Path, new: Path) -> None:
    a, b = pq.read_table(old), pq.read_table(new)
    assert a.schema.equals(b.schema, check_metadata=True)
    assert a.equals(b)
    meta_a, meta_b = pq.read_metadata(old), pq.read_metadata(new)
    assert json.loads(meta_a.metadata[b"geo"]) == json.loads(meta_b.metadata[b"geo"])
    assert meta_a.metadata == meta_b.metadata
    groups = [meta.row_group(i).num_rows for meta in (meta_a,) for i in range(meta.num_row_groups)]
    assert groups == [meta_b.row_group(i).num_rows for i in range(meta_b.num_row_groups)]


def _features(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        return json.load(stream)["features"]


@pytest.mark.parametrize(("row_group_size", "gather_rows"), [(100_000, 10_000), (70, 16)])
def test_parquet_qupath_and_stats_equal_the_whole_table_files(
    measured, tmp_path, monkeypatch, row_group_size, gather_rows
):
    """Row groups made of several gathered chunks, and chunks cut across row groups."""
    monkeypatch.setattr(summary, "GATHER_ROWS", gather_rows)
    paths = _write_parts(measured, tmp_path)
    whole = _whole_table(paths, "S-1")
    old, new = tmp_path / "old", tmp_path / "new"
    write_slide_outputs(whole, old, slide_id="S-1", type_table=TYPES, tissue_mm2=0.02,
                        extent=EXTENT, metadata={"mpp": 0.25})  # fmt: skip
    if row_group_size != 100_000:  # the whole-table Parquet writer with the same row groups
        write_geoparquet(whole, old / "nuclei.parquet", slide_id="S-1", extent=EXTENT,
                         metadata={"mpp": 0.25}, row_group_size=row_group_size)  # fmt: skip
    parts = index_parts(paths, extent=EXTENT)
    written = write_slide_outputs_from_parts(
        parts, new, slide_id="S-1", type_table=TYPES, tissue_mm2=0.02, metadata={"mpp": 0.25},
        prepare=lambda chunk: slide_rows(chunk, "S-1"), row_group_size=row_group_size,
    )  # fmt: skip
    assert set(written) == {"parquet", "qupath", "stats"}
    assert pq.read_metadata(new / "nuclei.parquet").num_row_groups == -(-len(whole) // row_group_size)
    _assert_same_parquet(old / "nuclei.parquet", new / "nuclei.parquet")

    old_features, new_features = _features(old / "nuclei.geojson.gz"), _features(new / "nuclei.geojson.gz")
    assert len(new_features) == len(whole)
    assert sorted(old_features, key=lambda f: f["id"]) == sorted(new_features, key=lambda f: f["id"])
    # the GeoJSON follows the Parquet file's rows
    file_ids = pq.read_table(new / "nuclei.parquet", columns=["nucleus_uuid"])["nucleus_uuid"]
    assert [f["id"] for f in new_features] == file_ids.to_pylist()
    result = CliRunner().invoke(app, ["validate-qupath", str(new / "nuclei.geojson.gz")])
    assert result.exit_code == 0, result.output

    old_stats = json.loads((old / "stats.json").read_text())
    new_stats = json.loads((new / "stats.json").read_text())
    means_old, means_new = old_stats.pop("means"), new_stats.pop("means")
    assert new_stats == old_stats
    assert list(means_new) == list(means_old)
    assert len(means_old) == len(FEATURE_COLUMNS)
    for column, value in means_old.items():
        assert means_new[column] == pytest.approx(value, rel=1e-12), column


def test_ties_on_the_curve_keep_nucleus_id_then_part_order(measured, tmp_path):
    """A coarse curve (huge extent) puts many nuclei on one cell; duplicate ids in two parts."""
    table = measured.copy()
    table.loc[table.index[::7], "nucleus_id"] = 42  # same id in many parts and positions
    paths = _write_parts(table, tmp_path)
    extent = (0.0, 0.0, 1e9, 1e9)
    whole = _whole_table(paths, "T")
    write_geoparquet(whole, tmp_path / "old.parquet", slide_id="T", extent=extent)
    parts = index_parts(paths, extent=extent)
    write_slide_outputs_from_parts(parts, tmp_path / "new", slide_id="T", formats=["parquet"],
                                   prepare=lambda chunk: slide_rows(chunk, "T"))  # fmt: skip
    _assert_same_parquet(tmp_path / "old.parquet", tmp_path / "new" / "nuclei.parquet")


def test_default_extent_is_the_data_bounds_as_in_the_whole_table_path(measured, tmp_path):
    paths = _write_parts(measured, tmp_path)
    whole = _whole_table(paths, "D")
    write_geoparquet(whole, tmp_path / "old.parquet", slide_id="D")
    parts = index_parts(paths)
    write_slide_outputs_from_parts(parts, tmp_path / "new", slide_id="D", formats=["parquet"],
                                   prepare=lambda chunk: slide_rows(chunk, "D"))  # fmt: skip
    _assert_same_parquet(tmp_path / "old.parquet", tmp_path / "new" / "nuclei.parquet")


@pytest.mark.parametrize("cache_rows", [1, 10**6])
def test_chunks_gather_the_ordered_rows_whatever_the_cache(measured, tmp_path, cache_rows):
    paths = _write_parts(measured, tmp_path)
    whole = _whole_table(paths, "C").drop(columns=["slide_id"])
    order = np.argsort(whole.geometry.hilbert_distance(total_bounds=EXTENT).to_numpy(), kind="stable")
    expected = whole.iloc[order].reset_index(drop=True)
    parts = index_parts(paths, extent=EXTENT)
    chunks = list(parts.chunks(size=50, cache_rows=cache_rows))
    assert [len(c) for c in chunks[:-1]] == [50] * (len(chunks) - 1)
    got = pd.concat(chunks, ignore_index=True)[list(expected.columns)]
    pd.testing.assert_frame_equal(pd.DataFrame(got), pd.DataFrame(expected))
    assert parts.median_area == np.median(whole.geometry.area)


@pytest.mark.parametrize("downsample", [2.0, 40.0])  # dots of several pixels, and single pixels
def test_qc_dots_drawn_by_chunks_match_the_whole_table_picture(measured, tmp_path, downsample):
    size = int(SIDE / downsample)
    rng = np.random.default_rng(3)
    thumbnail = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((60, 60), bool)
    mask[10:50, 5:40] = True
    table = measured.copy()
    table["type"] = np.int16(rng.integers(0, 3, len(table)))
    write_qc_picture(thumbnail, mask, table, tmp_path / "old.png", downsample=downsample,
                     type_table=TYPES)  # fmt: skip
    dots = QcDots((size, size), downsample=downsample,
                  median_area=float(np.median(table.geometry.area)))  # fmt: skip
    for start in range(0, len(table), 37):  # reversed chunks: the order must not matter
        dots.add(table.iloc[::-1].iloc[start : start + 37])
    write_qc_picture_dots(thumbnail, mask, dots, tmp_path / "new.png", type_table=TYPES)
    write_qc_picture(thumbnail, mask, table.iloc[:0], tmp_path / "bare.png", downsample=downsample,
                     type_table=TYPES)  # fmt: skip
    old, new = cv2.imread(str(tmp_path / "old.png")), cv2.imread(str(tmp_path / "new.png"))
    assert (old != cv2.imread(str(tmp_path / "bare.png"))).any()  # dots, not just the outline
    np.testing.assert_array_equal(new, old)


def _plan(tmp_path: Path, name: str) -> SimpleNamespace:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return SimpleNamespace(
        slide_id="P-1", slide_dir=tmp_path / name, type_table=TYPES, tissue_mm2=0.05,
        extent=EXTENT, slide_mpp=0.25, scale=1.0, slide_path="/slides/P-1.svs",
        ledger=SimpleNamespace(work=work),
    )  # fmt: skip


def test_pipeline_finish_from_parts_writes_the_whole_table_files(measured, tmp_path):
    paths = _write_parts(measured, tmp_path)
    old_plan, new_plan = _plan(tmp_path, "old"), _plan(tmp_path, "new")
    rng = np.random.default_rng(4)
    mask = np.zeros((30, 30), bool)
    mask[3:25, 4:28] = True
    np.savez_compressed(old_plan.ledger.work / "tissue.npz", mask=mask, thumbnail_downsample=4.0,
                        thumbnail=rng.integers(0, 256, (150, 150, 3), dtype=np.uint8))  # fmt: skip
    whole = gpd.GeoDataFrame(pd.concat([gpd.read_parquet(p) for p in paths], ignore_index=True))
    old = finish_slide(old_plan, whole, ("parquet", "qupath"), oversized=[[1, 2, 3, 4]])
    new = finish_slide_parts(new_plan, index_parts(paths, extent=EXTENT), ("parquet", "qupath"),
                             oversized=[[1, 2, 3, 4]])  # fmt: skip
    assert new["nuclei"] == old["nuclei"] == len(measured)
    assert new["counts"] == old["counts"]
    assert {k: Path(v).name for k, v in new["files"].items()} == {
        k: Path(v).name for k, v in old["files"].items()
    }
    assert set(new["files"]) == {"parquet", "qupath", "stats", "qc"}
    _assert_same_parquet(Path(old["files"]["parquet"]), Path(new["files"]["parquet"]))
    np.testing.assert_array_equal(cv2.imread(new["files"]["qc"]), cv2.imread(old["files"]["qc"]))
    old_features = _features(Path(old["files"]["qupath"]))
    assert sorted(_features(Path(new["files"]["qupath"])), key=lambda f: f["id"]) == sorted(
        old_features, key=lambda f: f["id"]
    )


def test_parts_that_cannot_be_streamed_are_reported(measured, tmp_path):
    empty = tmp_path / "empty.parquet"
    measured.iloc[:0].to_parquet(empty, index=False)
    assert index_parts([empty, empty]) is None
    other = tmp_path / "other.parquet"
    measured.iloc[:5].assign(extra=1.0).to_parquet(other, index=False)
    first = tmp_path / "first.parquet"
    measured.iloc[5:9].to_parquet(first, index=False)
    assert index_parts([first, other]) is None  # columns differ: concatenation aligns them
    no_ids = tmp_path / "no_ids.parquet"
    measured.iloc[:3].drop(columns=["nucleus_id"]).to_parquet(no_ids, index=False)
    assert index_parts([no_ids]) is None  # the whole-table writer explains what is missing
    parts = index_parts([empty, first, empty])
    assert parts is not None
    assert len(parts) == 4
    assert parts.paths == (first,)


def test_a_failing_stream_leaves_no_files(measured, tmp_path):
    path = tmp_path / "bad.parquet"
    measured.iloc[:20].assign(bbox=1.0).to_parquet(path, index=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="bbox"):
        write_slide_outputs_from_parts(index_parts([path]), out, slide_id="B")
    assert list(out.iterdir()) == []
