"""QuPath GeoJSON writer and the validator of QuPath's import rules."""

from __future__ import annotations

import copy
import gzip
import json

import geopandas as gpd
import numpy as np
import pytest
import shapely
from test_features import TYPES, synthetic_block
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.export import validate_qupath, write_qupath
from hoverdask.export.qupath import MEASUREMENT_NAMES, nucleus_uuids
from hoverdask.export.validate import UnreadableGeoJSON
from hoverdask.nuclei.features import measure


@pytest.fixture(scope="module")
def measured() -> gpd.GeoDataFrame:
    nuclei, image, _ = synthetic_block(seed=5, scale=2.0, offset=(100, 300), slide_id="S-01")
    return measure(nuclei, image, 0.25, origin=(200.0, 600.0), scale=2.0, type_table=TYPES)


def _load(path):
    with gzip.open(path, "rt") as stream:
        return json.load(stream)


def test_written_file_matches_table_and_passes_validator(measured, tmp_path):
    path = tmp_path / "nuclei.geojson.gz"
    assert write_qupath(measured, path, type_table=TYPES) == len(measured)
    report = validate_qupath(path)
    assert report.ok, report.problems
    assert report.count == len(measured)
    features = _load(path)["features"]
    assert [f["id"] for f in features] == nucleus_uuids(
        measured["slide_id"], measured["nucleus_id"]
    )
    for feature, (_, row) in zip(features, measured.iterrows(), strict=True):
        props = feature["properties"]
        assert props["objectType"] == "detection"
        if row["type"] == 0:
            assert "classification" not in props
        else:
            name, color = TYPES[int(row["type"])]
            assert props["classification"] == {"name": name, "color": list(color)}
        for column, name in MEASUREMENT_NAMES.items():
            assert props["measurements"][name] == pytest.approx(row[column], abs=1e-4)
        written = shapely.geometry.shape(feature["geometry"])
        coords = shapely.get_coordinates(written)
        np.testing.assert_allclose(coords * 100, np.round(coords * 100), atol=1e-6)
        # Table coordinates are already QuPath's (pixel edges): no half-pixel shift on writing.
        assert written.symmetric_difference(row.geometry).area < 0.02 * row.geometry.length
        assert written.is_valid


def test_offset_is_subtracted(measured, tmp_path):
    path = tmp_path / "shifted.geojson"
    write_qupath(measured.iloc[:3], path, offset=(100.0, 50.0))
    features = json.loads(path.read_text())["features"]
    for feature, geometry in zip(features, measured.geometry.iloc[:3], strict=True):
        bounds = shapely.geometry.shape(feature["geometry"]).bounds
        expected = np.array(geometry.bounds) - [100, 50, 100, 50]
        np.testing.assert_allclose(bounds, expected, atol=0.006)


def test_output_does_not_depend_on_chunk_size(measured, tmp_path):
    small, large = tmp_path / "a.geojson", tmp_path / "b.geojson"
    write_qupath(measured, small, chunk_size=7, type_table=TYPES)
    write_qupath(measured, large, chunk_size=100_000, type_table=TYPES)
    assert small.read_bytes() == large.read_bytes()


def test_rounding_keeps_polygons_valid_and_drops_collapsed_ones(tmp_path):
    spike = shapely.Polygon([(0, 0), (10, 0), (10, 10), (5, 0.004), (0, 10)])
    assert spike.is_valid
    rounded = shapely.transform(spike, lambda xy: np.round(xy, 2))
    assert not rounded.is_valid  # naive rounding would break the whole QuPath import
    tiny = shapely.Polygon([(50, 50), (50.004, 50), (50, 50.004)])
    bowtie = shapely.Polygon([(30, 30), (34, 34), (34, 30), (30, 35)])  # invalid input
    table = gpd.GeoDataFrame(
        {"nucleus_id": [1, 2, 3, 4], "type": [1, 1, 2, 0], "slide_id": "s"},
        geometry=[spike, tiny, shapely.box(20, 20, 25, 26), bowtie],
    )
    path = tmp_path / "edge.geojson"
    with pytest.warns(UserWarning, match="1 nuclei vanished"):
        assert write_qupath(table, path) == 3
    assert validate_qupath(path).ok
    written = json.loads(path.read_text())["features"]
    assert shapely.geometry.shape(written[0]["geometry"]).area == pytest.approx(spike.area, 0.01)
    repaired = shapely.geometry.shape(written[2]["geometry"])
    assert repaired.geom_type == "MultiPolygon"
    assert repaired.symmetric_difference(shapely.make_valid(bowtie)).area < 0.05


def test_cells_carry_nucleus_geometry(measured, tmp_path):
    path = tmp_path / "cells.geojson.gz"
    write_qupath(measured, path, as_cells=True, cell_expansion_px=6.0, type_table=TYPES)
    assert validate_qupath(path).ok
    for feature, nucleus in zip(_load(path)["features"], measured.geometry, strict=True):
        assert feature["properties"]["objectType"] == "cell"
        cell = shapely.geometry.shape(feature["geometry"])
        kept = shapely.geometry.shape(feature["nucleusGeometry"])
        assert kept.symmetric_difference(nucleus).area < 0.02 * nucleus.length
        assert cell.buffer(0.02).contains(kept)
        assert cell.area > nucleus.area


GOOD = {
    "type": "Feature",
    "id": "5f0c8c2e-1b7e-5d43-9a0e-3f1f6a2b9c11",
    "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 3], [0, 0]]]},
    "properties": {
        "objectType": "detection",
        "classification": {"name": "Neoplastic", "color": [255, 0, 0]},
        "measurements": {"Nucleus: Area µm^2": 6.0},
        "metadata": {"hoverdask_id": "s/1"},
    },
}


def _mutate(path: str, value):
    feature = copy.deepcopy(GOOD)
    feature["id"] = "5f0c8c2e-1b7e-5d43-9a0e-3f1f6a2b9c12"
    *parents, last = path.split(".")
    target = feature
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return feature


BAD_FEATURES = [
    (_mutate("type", "feature"), "not a GeoJSON Feature"),
    (_mutate("id", "nucleus-1"), "not a UUID"),
    (_mutate("id", KeyError), "no 'id'"),
    (_mutate("properties.objectType", "Detection"), "unknown (case-sensitive)"),
    (_mutate("properties.objectType", KeyError), "imports it as an annotation"),
    (_mutate("properties.classification", {"name": "Tumor"}), "without 'color'"),
    (_mutate("properties.classification", {"color": [1, 2, 3]}), "needs 'name'"),
    (_mutate("properties.classification", {"name": "T", "color": [1, 2, 300]}), "0-255"),
    (_mutate("properties.measurements", {"Area": "NaN"}), "not a number"),
    (_mutate("properties.measurements", {"Area": float("nan")}), "NaN, not valid JSON"),
    (_mutate("properties.measurements", [1, 2]), "need 'name' and 'value'"),
    (_mutate("properties.metadata", {"a": {"b": 1}}), "not a primitive"),
    (_mutate("properties.isLocked", "yes"), "isLocked"),
    (_mutate("geometry", None), "geometry is missing"),
    (_mutate("geometry.type", "Circle"), "unsupported geometry type"),
    (_mutate("geometry.coordinates", [[[0, 0], [4, 0], [4, 3], [0, 1]]]), "not closed"),
    (_mutate("geometry.coordinates", [[[0, 0], [4, 0], [0, 0]]]), "needs at least 4"),
    (_mutate("geometry.coordinates", [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]), "invalid"),
    (_mutate("geometry.coordinates", [[[0, 0], [0.004, 0], [0, 0.004], [0, 0]]]), "empty after"),
    (_mutate("geometry.coordinates", [[[0, 0], [4, "x"], [4, 3], [0, 0]]]), "bad position"),
    (_mutate("nucleusGeometry", GOOD["geometry"]), "only read for objectType 'cell'"),
    (_mutate("properties.nucleusGeometry", GOOD["geometry"]), "at feature top level"),
    (_mutate("objectType", "detection"), "at feature top level is ignored"),
]


@pytest.mark.parametrize(("feature", "message"), BAD_FEATURES)
def test_validator_reports_each_rule(tmp_path, feature, message):
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [GOOD, feature]}))
    report = validate_qupath(path)
    assert not report.ok
    assert any(p.index == 1 and message in p.message for p in report.problems), report.problems
    assert all(p.index == 1 for p in report.problems)


@pytest.mark.parametrize("read_size", [1, 7, 1000])
def test_streamed_reading_across_chunk_boundaries(measured, tmp_path, monkeypatch, read_size):
    from hoverdask.export import validate

    path = tmp_path / "n.geojson"
    write_qupath(measured.iloc[:20], path)
    bad = tmp_path / "bad.geojson"
    features = json.loads(path.read_text())["features"]
    features[3]["properties"]["objectType"] = "Detection"
    features[5]["id"] = features[1]["id"]
    # keys in an unusual order, whitespace and numbers that straddle reads
    bad.write_text('{ "features" :\n [' + ",\n".join(json.dumps(f) for f in features)
                   + '] , "type": "FeatureCollection", "x": 1.5e3 }')  # fmt: skip
    monkeypatch.setattr(validate, "READ_SIZE", read_size)
    assert validate_qupath(path).ok
    report = validate_qupath(bad)
    assert report.count == 20
    assert [(p.index, p.message[:20]) for p in report.problems] == [
        (3, "objectType 'Detectio"),
        (5, "duplicate id (same a"),
    ]
    bad.write_text(bad.read_text()[:-3])
    with pytest.raises(UnreadableGeoJSON):
        validate_qupath(bad)


def test_validator_accepts_qupath_top_level_shapes_and_flags_others(tmp_path):
    other = dict(GOOD, id="5f0c8c2e-1b7e-5d43-9a0e-3f1f6a2b9c12")
    for document in (GOOD, [GOOD, other]):
        path = tmp_path / "ok.json"
        path.write_text(json.dumps(document))
        assert validate_qupath(path).ok
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [GOOD, GOOD]}))
    assert "duplicate id" in validate_qupath(path).problems[0].message
    path.write_text(json.dumps(GOOD["geometry"]))
    assert "annotation" in validate_qupath(path).problems[0].message


def test_cli_exit_codes(measured, tmp_path):
    runner = CliRunner()
    good = tmp_path / "good.geojson.gz"
    write_qupath(measured, good)
    result = runner.invoke(app, ["validate-qupath", str(good)])
    assert result.exit_code == 0, result.output
    assert f"{len(measured)} features" in result.output
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps([GOOD, BAD_FEATURES[1][0]]))
    result = runner.invoke(app, ["validate-qupath", str(bad)])
    assert result.exit_code == 1
    assert "feature 1: id 'nucleus-1' is not a UUID" in result.output
    broken = tmp_path / "broken.geojson"
    broken.write_text('{"type": "FeatureCollection", "features": [')
    result = runner.invoke(app, ["validate-qupath", str(broken)])
    assert result.exit_code == 2
    with pytest.raises(UnreadableGeoJSON):
        validate_qupath(tmp_path / "missing.geojson")
