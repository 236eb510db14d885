"""GeoParquet 1.1 files and the hive-partitioned cohort dataset."""

from __future__ import annotations

import json

import duckdb
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from test_features import TYPES, synthetic_block

from hoverdask.export import write_cohort_summary, write_geoparquet, write_slide_outputs
from hoverdask.export.qupath import nucleus_uuids
from hoverdask.nuclei.features import measure


def _slide(seed: int, slide_id: str) -> gpd.GeoDataFrame:
    nuclei, image, _ = synthetic_block(seed=seed, shape=(400, 400), count=250, slide_id=slide_id)
    return measure(nuclei, image, 0.25, type_table=TYPES)


@pytest.fixture(scope="module")
def slide_a() -> gpd.GeoDataFrame:
    return _slide(10, "A-01")


@pytest.fixture(scope="module")
def slide_b() -> gpd.GeoDataFrame:
    return _slide(11, "B 02")


def test_file_metadata_follows_geoparquet_1_1(slide_a, tmp_path):
    path = write_geoparquet(slide_a, tmp_path / "n.parquet", row_group_size=40,
                            metadata={"mpp": 0.25})  # fmt: skip
    meta = pq.read_metadata(path)
    geo = json.loads(meta.metadata[b"geo"])
    column = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0"
    assert geo["primary_column"] == "geometry"
    assert column["encoding"] == "WKB"
    assert column["geometry_types"] == ["Polygon"]
    assert "crs" in column
    assert column["crs"] is None  # pixel space, not lon/lat
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    np.testing.assert_allclose(column["bbox"], slide_a.total_bounds)
    extra = json.loads(meta.metadata[b"hoverdask"])
    assert extra["id_column"] == "nucleus_uuid"
    assert extra["mpp"] == 0.25
    assert meta.num_row_groups == -(-len(slide_a) // 40)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    schema = pq.read_schema(path)
    bbox_type = schema.field("bbox").type
    assert [bbox_type.field(i).name for i in range(4)] == ["xmin", "ymin", "xmax", "ymax"]


def test_round_trip_and_spatial_order(slide_a, tmp_path):
    path = write_geoparquet(slide_a, tmp_path / "n.parquet", row_group_size=40)
    back = gpd.read_parquet(path)
    assert back.crs is None
    assert "bbox" not in back.columns
    by_id = back.set_index("nucleus_id").loc[slide_a["nucleus_id"]]
    assert shapely.equals_exact(by_id.geometry.values, slide_a.geometry.values, 0).all()
    np.testing.assert_array_equal(by_id["area_um2"], slide_a["area_um2"])
    assert by_id["nucleus_uuid"].tolist() == nucleus_uuids(["A-01"] * len(slide_a),
                                                           slide_a["nucleus_id"])  # fmt: skip
    assert (back["slide_id"] == "A-01").all()
    # Hilbert order: row groups cover compact regions, much smaller than the whole slide.
    meta = pq.read_metadata(path)
    fields = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    areas = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stat = {k: group.column(fields[f"bbox.{k}"]).statistics for k in ("xmin", "ymin")}
        x = (stat["xmin"].min, group.column(fields["bbox.xmax"]).statistics.max)
        y = (stat["ymin"].min, group.column(fields["bbox.ymax"]).statistics.max)
        areas.append((x[1] - x[0]) * (y[1] - y[0]))
    full = np.prod(slide_a.total_bounds[2:] - slide_a.total_bounds[:2])
    assert np.mean(areas) < 0.5 * full


def test_bbox_read_returns_the_intersecting_nuclei(slide_a, tmp_path):
    path = write_geoparquet(slide_a, tmp_path / "n.parquet", row_group_size=40)
    query = (100.0, 80.0, 220.0, 190.0)
    got = gpd.read_parquet(path, bbox=query)
    bounds = slide_a.geometry.bounds
    expected = slide_a[
        (bounds.minx <= query[2]) & (bounds.maxx >= query[0])
        & (bounds.miny <= query[3]) & (bounds.maxy >= query[1])
    ]  # fmt: skip
    assert 0 < len(got) < len(slide_a)
    assert sorted(got["nucleus_id"]) == sorted(expected["nucleus_id"])
    sql = (
        f"SELECT nucleus_id FROM read_parquet('{path}') WHERE bbox.xmin <= {query[2]} "
        f"AND bbox.xmax >= {query[0]} AND bbox.ymin <= {query[3]} AND bbox.ymax >= {query[1]}"
    )
    assert sorted(r[0] for r in duckdb.sql(sql).fetchall()) == sorted(expected["nucleus_id"])


def test_hive_dataset_reads_as_one_table(slide_a, slide_b, tmp_path):
    rows = []
    for table in (slide_a, slide_b):
        slide = table["slide_id"].iloc[0]
        outputs = write_slide_outputs(table, tmp_path / slide, slide_id=slide, formats=("parquet",))
        rows.append({"slide": slide, "status": "ok", "nuclei": len(table), "seconds": 1.0,
                     "error": None, "outputs": outputs})  # fmt: skip
    written = write_cohort_summary(rows, tmp_path)
    dataset = written["dataset"]
    assert (dataset / "slide=B%2002" / "part-0.parquet").exists()
    both = gpd.read_parquet(dataset)
    assert both.groupby("slide_id").size().to_dict() == {"A-01": len(slide_a), "B 02": len(slide_b)}
    assert (both["slide"].astype(str) == both["slide_id"]).all()
    query = (0.0, 0.0, 150.0, 150.0)
    one = gpd.read_parquet(dataset, bbox=query, filters=[("slide", "==", "B 02")])
    bounds = slide_b.geometry.bounds
    expected = (bounds.minx <= 150) & (bounds.miny <= 150)
    assert sorted(one["nucleus_id"]) == sorted(slide_b.loc[expected, "nucleus_id"])
    sql = (
        f"SELECT slide, count(*) FROM read_parquet('{dataset}/*/*.parquet', "
        "hive_partitioning = true) GROUP BY slide ORDER BY slide"
    )
    assert duckdb.sql(sql).fetchall() == [("A-01", len(slide_a)), ("B 02", len(slide_b))]


def test_bad_tables_raise_and_leave_nothing(slide_a, tmp_path):
    path = tmp_path / "n.parquet"
    with pytest.raises(ValueError, match="bbox"):
        write_geoparquet(slide_a.assign(bbox=1), path)
    with pytest.raises(ValueError, match="nucleus_id"):
        write_geoparquet(slide_a.drop(columns="nucleus_id"), path)
    assert list(tmp_path.iterdir()) == []
    empty = write_geoparquet(slide_a.iloc[:0], path)
    assert len(pd.read_parquet(empty)) == 0
