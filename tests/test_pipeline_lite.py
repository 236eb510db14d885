"""The bundled lite model through the whole pipeline, against the same model run untiled.

Oracle: the map of :func:`predict_image` (the reference tile mode, one image) post-processed at
once by :func:`nuclei_from_maps`; the pipeline must find exactly those nuclei whatever the map
tile size, and name the model and its licence in run.json, the Parquet and the GeoJSON files.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest

from hoverdask.export.validate import validate_qupath
from hoverdask.model.catalog import DEFAULT_MODEL_NAME, default_model_path
from hoverdask.model.checkpoints import load_model
from hoverdask.model.infer import predict_image
from hoverdask.pipeline import maps_store, nuclei_from_maps
from hoverdask.pipeline.run import RunOptions, run_cohort
from hoverdask.slide import open_slide
from hoverdask.slide.synthetic import write_synthetic_slide
from tests.conftest import cpu_client

WIDTH, HEIGHT = 1000, 700


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lite") / "synthetic.svs"
    write_synthetic_slide(path, WIDTH, HEIGHT, mpp=0.25, seed=5, compression="lossless",
                          keep_instances=False)
    return path


def _stored(maps: np.ndarray, nr_types: int | None) -> np.ndarray:
    names = maps_store.channel_names(nr_types)
    return np.stack([maps_store.dequantise(n, maps_store.quantise(n, maps[..., i]))
                     for i, n in enumerate(names)], axis=-1)


@pytest.mark.slow
def test_bundled_model_run_equals_untiled_prediction(slide: Path, tmp_path: Path) -> None:
    model = load_model(default_model_path())
    assert model.mode == "lite"
    with open_slide(slide) as opened:
        image = np.asarray(opened.read_region((0, 0), 0, (WIDTH, HEIGHT)))[..., :3]
    maps = predict_image(model, image, device="cpu")
    want = nuclei_from_maps(_stored(maps, model.nr_types), 4096, model.nr_types)
    assert len(want) > 50  # the synthetic nuclei are found
    with cpu_client(workers=2, threads=1) as client:
        tables = {}
        for chunk in (448, 896):
            out = tmp_path / f"out{chunk}"
            options = RunOptions(chunk_size=chunk, tissue_mask=False, device="cpu")
            result = run_cohort([slide], out, client=client, options=options, progress=False)
            assert [s.status for s in result.slides] == ["ok"]
            tables[chunk] = gpd.read_parquet(out / "synthetic" / "nuclei.parquet")
    for table in tables.values():
        got = table.sort_values("nucleus_id").reset_index(drop=True)
        np.testing.assert_array_equal(got["nucleus_id"], want["nucleus_id"])
        for column in ("centroid_x", "centroid_y", "area_px", "type"):
            np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
        assert all(a.equals_exact(b, 0) for a, b in zip(got.geometry, want.geometry, strict=True))

    folder = tmp_path / "out448" / "synthetic"
    record = json.loads((folder / "run.json").read_text())
    assert record["model"]["name"] == DEFAULT_MODEL_NAME
    assert "NC" in record["model"]["licence"]  # trained on non-commercial data
    parquet_meta = json.loads(pq.read_schema(folder / "nuclei.parquet").metadata[b"hoverdask"])
    assert parquet_meta["model"]["name"] == DEFAULT_MODEL_NAME
    assert parquet_meta["model"]["sha256"] == record["model"]["sha256"]
    with gzip.open(folder / "nuclei.geojson.gz", "rt") as handle:
        collection = json.load(handle)
    assert collection["hoverdask"]["model"]["licence"] == record["model"]["licence"]
    assert len(collection["features"]) == len(want)
    assert validate_qupath(folder / "nuclei.geojson.gz").ok
