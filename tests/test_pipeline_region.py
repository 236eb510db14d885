"""``--region``: a rectangle of a slide processed as if it were the slide, in the slide's coordinates.

Oracles: the same pipeline on a slide whose pixels are only the crop (everything equal, the
coordinates shifted by the region's offset), ``np.pad(crop, mode="reflect")`` for the windows the
tasks read, and :func:`hoverdask.model.predict_image` on the cropped image for the cached maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import test_pipeline_run
import tifffile
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.core.errors import HoverdaskError
from hoverdask.pipeline import maps_store, nuclei_from_maps
from hoverdask.pipeline.grid import TileGrid, window_indices
from hoverdask.pipeline.predictors import ArrayPredictorFactory
from hoverdask.pipeline.run import RunOptions, run_cohort
from hoverdask.pipeline.spec import Region
from hoverdask.pipeline.tasks import SlideSource, read_rgb
from hoverdask.slide import open_slide
from hoverdask.slide.resample import processing_array
from hoverdask.slide.synthetic import synthetic_pred_map, write_synthetic_slide

WIDTH, HEIGHT = 800, 600
NR_TYPES = 6
REGION = Region(x=150, y=110, width=500, height=380)  # not aligned to tiles or patches

OFFSET = np.array([REGION.x, REGION.y], dtype=np.float64)

runner = CliRunner()
client = test_pipeline_run.client  # the same module-scoped LocalCluster fixture


def _pixels(path: Path) -> np.ndarray:
    slide = open_slide(path)
    try:
        return np.asarray(processing_array(slide).array.compute())
    finally:
        slide.close()


def _write_image_slide(path: Path, image: np.ndarray) -> Path:
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib",
                     description="Aperio Image Library |MPP = 0.25")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("region")
    slide = folder / "whole.svs"
    write_synthetic_slide(slide, WIDTH, HEIGHT, mpp=0.25, seed=5, compression="lossless",
                          keep_instances=False)
    r = REGION
    crop = _pixels(slide)[r.y : r.y + r.height, r.x : r.x + r.width]
    maps = synthetic_pred_map(HEIGHT, WIDTH, NR_TYPES, seed=7)
    np.save(folder / "maps.npy", maps)
    return {"slide": slide, "crop": _write_image_slide(folder / "crop.svs", crop),
            "maps": folder / "maps.npy"}


def _factory(data: dict[str, Path]) -> ArrayPredictorFactory:
    """Maps replayed by position in the processed image: the same for the region and the crop."""
    return ArrayPredictorFactory(str(data["maps"]), margin=46, output=164, nr_types=NR_TYPES)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,4,5", "a,0,5,5", "-1,0,5,5", "0,0,0,5",
                                  "0,0,5,0", "1.5,0,5,5", ""])
def test_malformed_regions_are_usage_errors(text) -> None:
    with pytest.raises(HoverdaskError, match="--region takes X,Y,W,H"):
        Region.parse(text)


@pytest.mark.parametrize(
    ("region", "why"),
    [("0,0,5,5,", "--region takes X,Y,W,H"), ("-5,0,5,5", "--region takes X,Y,W,H"),
     ("700,0,101,50", "outside"), ("0,590,10,11", "outside"), ("800,0,1,1", "outside")],
)
def test_cli_region_errors_exit_2_with_one_line(data, tmp_path, region, why) -> None:
    result = runner.invoke(app, ["run", str(data["slide"]), "--out", str(tmp_path / "o"),
                                 "--model", str(tmp_path / "m.tar"), f"--region={region}"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert why in lines[0]
    assert not (tmp_path / "o").exists()  # rejected before anything was written


def test_a_region_takes_exactly_one_slide(data, tmp_path) -> None:
    result = runner.invoke(app, ["run", str(data["slide"]), str(data["crop"]), "--out",
                                 str(tmp_path / "o"), "--model", "m.tar", "--region", "0,0,9,9"])
    assert result.exit_code == 2
    assert "exactly one slide" in result.output


def test_processing_box_follows_the_resolution() -> None:
    region = Region(100, 40, 301, 200)
    assert region.processing_box(1.0, (600, 800)) == (40, 100, 240, 401)
    assert region.processing_box(0.5, (1200, 1600)) == (80, 200, 480, 802)  # upsampled ×2
    assert region.processing_box(0.5, (400, 700)) == (80, 200, 400, 700)  # kept inside the view


# --- what the tasks read ----------------------------------------------------------------------


def test_region_windows_are_the_crop_padded_by_reflection(data) -> None:
    r = REGION
    crop = _pixels(data["slide"])[r.y : r.y + r.height, r.x : r.x + r.width]
    source = SlideSource(str(data["slide"]), None, 0.25, origin=(r.y, r.x))
    grid = TileGrid.for_chunk_size(r.height, r.width, 328, output=164, margin=46)
    padded = np.pad(crop, ((46, 46 + 328), (46, 46 + 328), (0, 0)), mode="reflect")
    for row, col in grid.tiles():
        rows, cols = window_indices(grid, row, col)
        y0, x0, _, _ = grid.extent(row, col)
        want = padded[y0 : y0 + len(rows), x0 : x0 + len(cols)]
        np.testing.assert_array_equal(read_rgb(source, rows, cols), want)


# --- end to end -------------------------------------------------------------------------------


def _sorted(table: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    return table.sort_values("nucleus_id").reset_index(drop=True)


@pytest.mark.slow
def test_region_equals_the_cropped_slide_shifted_by_the_offset(client, data, tmp_path) -> None:
    options = RunOptions(chunk_size=164, tissue_mask=False)
    out = tmp_path / "out"
    region_run = run_cohort([data["slide"]], out, predictor_factory=_factory(data), client=client,
                            options=RunOptions(chunk_size=164, tissue_mask=False, region=REGION),
                            progress=False)
    crop_run = run_cohort([data["crop"]], out, predictor_factory=_factory(data), client=client,
                          options=options, progress=False)
    assert region_run.exit_code == crop_run.exit_code == 0
    folder = out / "whole-region-150-110-500-380"
    got = _sorted(gpd.read_parquet(folder / "nuclei.parquet"))
    want = _sorted(gpd.read_parquet(out / "crop" / "nuclei.parquet"))
    assert len(want) > 50
    np.testing.assert_array_equal(got["nucleus_id"], want["nucleus_id"])
    np.testing.assert_array_equal(got["centroid_x"], want["centroid_x"] + REGION.x)
    np.testing.assert_array_equal(got["centroid_y"], want["centroid_y"] + REGION.y)
    shifted = shapely.transform(want.geometry.to_numpy(), lambda xy: xy + OFFSET)
    assert all(a.equals_exact(b, 0) for a, b in zip(got.geometry, shifted, strict=True))
    np.testing.assert_allclose(got["centroid_x_um"], want["centroid_x_um"] + REGION.x * 0.25)
    ignore = {"geometry", "centroid_x", "centroid_y", "centroid_x_um", "centroid_y_um",
              "slide_id", "nucleus_uuid"}  # the uuid is derived from the slide id
    assert set(got.columns) == set(want.columns)
    for column in sorted(set(want.columns) - ignore):
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy(),
                                      err_msg=column)
    assert got.geometry.total_bounds[0] >= REGION.x
    assert got.geometry.total_bounds[2] <= REGION.x + REGION.width
    record = json.loads((folder / "run.json").read_text())
    assert record["parameters"]["region"] == [150, 110, 500, 380]
    assert record["parameters"]["processing_size_hw"] == [380, 500]


def _nuclei_of_map_crop(data: dict[str, Path]) -> gpd.GeoDataFrame:
    maps = np.load(data["maps"])[: REGION.height, : REGION.width]
    names = maps_store.channel_names(NR_TYPES)
    stored = np.stack([maps_store.dequantise(n, maps_store.quantise(n, maps[..., i]))
                       for i, n in enumerate(names)], axis=-1)
    return nuclei_from_maps(stored, 1024, NR_TYPES)


@pytest.mark.slow
def test_regions_have_their_own_cache_and_resume(client, data, tmp_path) -> None:
    out = tmp_path / "out"
    other = Region(0, 0, 400, 300)

    def run(region: Region) -> None:
        result = run_cohort([data["slide"]], out, predictor_factory=_factory(data),
                            client=client, progress=False,
                            options=RunOptions(chunk_size=328, tissue_mask=False,
                                               keep_work=True, region=region))
        assert result.exit_code == 0

    run(REGION)
    first = out / "whole-region-150-110-500-380"
    markers = sorted((first / ".work" / "tiles").glob("*.json"))
    assert len(markers) == 4
    stamps = [m.stat().st_mtime_ns for m in markers]
    run(other)
    second = out / "whole-region-0-0-400-300"
    params = json.loads((second / ".work" / "params.json").read_text())
    assert params["plan"]["region"] == [0, 0, 400, 300]
    assert [m.stat().st_mtime_ns for m in markers] == stamps  # the first region's parts stay
    # the same region again, after a crash that lost one tile and the outputs: resumes
    (first / "run.json").unlink()
    (first / "nuclei.parquet").unlink()
    markers[0].unlink()
    run(REGION)
    assert markers[0].exists()
    assert [m.stat().st_mtime_ns for m in markers[1:]] == stamps[1:]
    got = _sorted(gpd.read_parquet(first / "nuclei.parquet"))
    want = _nuclei_of_map_crop(data)
    np.testing.assert_array_equal(got["nucleus_id"], want["nucleus_id"])
    np.testing.assert_array_equal(got["centroid_x"], want["centroid_x"] + REGION.x)
    np.testing.assert_array_equal(got["area_px"], want["area_px"])


@pytest.mark.slow
def test_region_maps_equal_the_network_on_the_cropped_image(client, data, tmp_path) -> None:
    """Real HoVer-Net (random weights, CPU): the cached maps of a region are the reference tile
    mode on the crop alone, so context at the region's edges is the crop reflected."""
    import torch

    from hoverdask.model import HoVerNet, predict_image, save_checkpoint

    torch.manual_seed(0)
    model = HoVerNet(mode="fast", nr_types=NR_TYPES).eval()
    checkpoint = save_checkpoint(model, tmp_path / "net.tar")
    region = Region(x=310, y=205, width=200, height=120)  # two 164 px map tiles side by side
    result = run_cohort([data["slide"]], tmp_path / "out", model=checkpoint, client=client,
                        options=RunOptions(chunk_size=164, batch_size=2, device="cpu",
                                           tissue_mask=False, keep_work=True, region=region),
                        progress=False)
    assert result.exit_code == 0, result.slides[0].error
    crop = _pixels(data["slide"])[205:325, 310:510]
    expected = predict_image(model, crop, batch_size=2, device="cpu")
    work = tmp_path / "out" / "whole-region-310-205-200-120" / ".work"
    cached = maps_store.as_dask(work / "maps.zarr", nr_types=NR_TYPES).compute()
    assert cached.shape[:2] == (120, 200)
    for index, name in enumerate(maps_store.channel_names(NR_TYPES)):
        want = maps_store.dequantise(name, maps_store.quantise(name, expected[..., index]))
        if name == "tp":  # argmax may flip where two classes tie within float noise
            assert (cached[..., index] == want).mean() > 0.999
        else:
            np.testing.assert_allclose(cached[..., index], want,
                                       atol=1.01 / (255 if name == "np" else 32767))
