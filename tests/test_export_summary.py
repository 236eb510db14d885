"""Per-slide outputs, cohort summary, QC picture and HTML report."""

from __future__ import annotations

import base64

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from test_features import TYPES, synthetic_block

from hoverdask.core.errors import HoverdaskError
from hoverdask.export import (
    validate_qupath,
    write_cohort_summary,
    write_qc_picture,
    write_slide_outputs,
)
from hoverdask.export.qc import OUTLINE_COLOR, UNCLASSIFIED_COLOR
from hoverdask.export.summary import parse_formats
from hoverdask.nuclei.features import measure


@pytest.fixture(scope="module")
def measured() -> gpd.GeoDataFrame:
    nuclei, image, _ = synthetic_block(seed=21, shape=(300, 300), count=150, slide_id="S1")
    return measure(nuclei, image, 0.5, type_table=TYPES)


def test_summary_counts_densities_and_means(measured, tmp_path):
    outputs = write_slide_outputs(
        measured, tmp_path / "S1", slide_id="S1", type_table=TYPES, tissue_mm2=0.02
    )
    assert validate_qupath(outputs["qupath"]).count == len(measured)
    assert sorted(p.name for p in (tmp_path / "S1").iterdir()) == [
        "nuclei.geojson.gz", "nuclei.parquet", "stats.json"]  # no temporary files left
    rows = [
        {"slide": "S1", "status": "ok", "nuclei": len(measured), "seconds": 12.5, "error": None,
         "outputs": outputs},
        {"slide": "S2", "status": "failed", "nuclei": 0, "seconds": 0.3,
         "error": "SlideError: no mpp"},
    ]  # fmt: skip
    written = write_cohort_summary(rows, tmp_path, timings={"inference": 10.0})
    summary = pd.read_csv(written["summary"])
    assert list(summary.columns[:5]) == ["slide", "status", "nuclei", "seconds", "error"]
    ok, failed = summary.iloc[0], summary.iloc[1]
    counts = measured["type"].value_counts()
    assert ok["count_neoplastic"] == counts.get(1, 0)
    assert ok["count_inflammatory"] == counts.get(2, 0)
    assert ok["count_unclassified"] == counts.get(0, 0)
    assert ok["density_neoplastic_per_mm2"] == pytest.approx(counts.get(1, 0) / 0.02, rel=1e-5)
    assert ok["tissue_mm2"] == pytest.approx(0.02)
    for column in ("area_um2", "solidity", "h_od_mean"):
        assert ok[f"mean_{column}"] == pytest.approx(measured[column].mean(), rel=1e-5)
    assert failed["error"] == "SlideError: no mpp"
    assert pd.isna(failed["count_neoplastic"])
    report = written["report"].read_text()
    assert "S1" in report
    assert "SlideError: no mpp" in report
    assert "inference" in report


def test_qc_picture_colours_nuclei_by_type_and_outlines_tissue(measured, tmp_path):
    thumbnail = np.full((150, 150, 3), 240, np.uint8)
    tissue = np.zeros((75, 75), bool)  # half the thumbnail's resolution: gets resized
    tissue[10:60, 10:60] = True
    path = write_qc_picture(thumbnail, tissue, measured, tmp_path / "S1" / "qc.png",
                            downsample=2.0, type_table=TYPES)  # fmt: skip
    picture = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert picture.shape == (150, 150, 3)
    assert tuple(picture[20, 20]) == OUTLINE_COLOR  # tissue box edge, mask pixel (10, 10) x 2
    assert tuple(picture[0, 149]) == (240, 240, 240)
    alone = measured[measured.geometry.apply(
        lambda g: measured.distance(g).sort_values().iloc[1] > 12)]  # fmt: skip
    assert len(alone) > 5
    for _, row in alone.iterrows():
        x, y = int(row.centroid_x // 2), int(row.centroid_y // 2)
        expected = UNCLASSIFIED_COLOR if row.type == 0 else TYPES[int(row.type)][1]
        assert tuple(picture[y, x]) == expected
    written = write_cohort_summary([{"slide": "S1", "status": "ok"}], tmp_path)
    embedded = base64.b64encode(path.read_bytes()).decode("ascii")
    assert f"src='data:image/png;base64,{embedded}'" in written["report"].read_text()


def test_formats_are_checked(measured, tmp_path):
    assert parse_formats("parquet, QuPath") == ("parquet", "qupath")
    with pytest.raises(HoverdaskError, match="unknown output format"):
        parse_formats("parquet,shapefile")
    outputs = write_slide_outputs(measured, tmp_path, slide_id="S1", formats=("qupath",))
    assert set(outputs) == {"qupath", "stats"}
    assert not (tmp_path / "nuclei.parquet").exists()


def test_qc_picture_rejects_bad_input(measured, tmp_path):
    with pytest.raises(ValueError, match="RGB"):
        write_qc_picture(np.zeros((5, 5)), None, measured, tmp_path / "q.png", downsample=1.0)
    empty = measured.iloc[:0]
    path = write_qc_picture(np.zeros((5, 5, 3), np.uint8), None, empty, tmp_path / "q.png",
                            downsample=1.0)  # fmt: skip
    assert cv2.imread(str(path)).sum() == 0
