"""Opening slides (tiffslide is the oracle for pixels), mpp rules, broken inputs, resampling."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from tiffslide import TiffSlide
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.core.errors import SlideError
from hoverdask.core.schema import to_level0
from hoverdask.slide import Slide, open_slide, sanitize_slide_id, slide_stem
from hoverdask.slide.resample import choose_level, processing_array
from hoverdask.slide.synthetic import write_synthetic_slide
from tests.conftest import CMU_SLIDE, SHARED_DATA

TCGA_SLIDE = SHARED_DATA / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


def _tcga() -> Path:
    if not TCGA_SLIDE.is_file():
        pytest.skip(f"{TCGA_SLIDE} is not available")
    return TCGA_SLIDE


def test_cmu_metadata_and_pixels_match_tiffslide() -> None:
    with open_slide(CMU_SLIDE) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.level_dimensions == ((2220, 2967),)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20.0
        assert slide.slide_id == "cmu-1-small-region"
        reference = TiffSlide(CMU_SLIDE).read_region((0, 0), 0, (2220, 2967), as_array=True)
        np.testing.assert_array_equal(slide.level_array(0).compute(), reference)
        region = slide.read_region((1000, 700), 0, (300, 200))
        np.testing.assert_array_equal(region, reference[700:900, 1000:1300])


def test_region_beyond_the_edge_reads_white() -> None:
    with open_slide(CMU_SLIDE) as slide:
        region = slide.read_region((2200, 2950), 0, (40, 30))
    reference = TiffSlide(CMU_SLIDE).read_region((2200, 2950), 0, (20, 17), as_array=True)
    np.testing.assert_array_equal(region[:17, :20], reference)
    assert (region[17:] == 255).all()
    assert (region[:, 20:] == 255).all()


def test_tcga_without_mpp_is_refused_and_opens_with_override() -> None:
    path = _tcga()
    with pytest.raises(SlideError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5
        assert slide.properties["hoverdask.mpp-source"] == "override"
        assert slide.level_dimensions == ((4443, 3567), (2221, 1783))
        reference = TiffSlide(path).read_region((0, 0), 1, (2221, 1783), as_array=True)
        np.testing.assert_array_equal(slide.level_array(1).compute(), reference)


def test_level_array_survives_pickling(tmp_path: Path) -> None:
    write_synthetic_slide(tmp_path / "s.svs", 700, 500, seed=3, compression="lossless")
    slide = open_slide(tmp_path / "s.svs")
    array = slide.level_array(0, chunk=256)
    restored = pickle.loads(pickle.dumps(array))
    np.testing.assert_array_equal(restored.compute(), array.compute())


@pytest.mark.parametrize(("flavour", "source"), [("aperio", "aperio"), ("ome", "ome")])
def test_mpp_from_vendor_and_ome_metadata(tmp_path: Path, flavour: str, source: str) -> None:
    path = tmp_path / ("s.svs" if flavour == "aperio" else "s.ome.tiff")
    write_synthetic_slide(path, 600, 400, mpp=0.3, flavour=flavour)  # type: ignore[arg-type]
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.3)
        assert slide.properties["hoverdask.mpp-source"] == source
        assert slide.slide_id == "s"
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def _plain_tiff(path: Path, image: np.ndarray, **kwargs: object) -> Path:
    kwargs.setdefault("photometric", "rgb")
    tifffile.imwrite(path, image, tile=(64, 64), metadata=None, **kwargs)  # type: ignore[call-overload]
    return path


def test_mpp_from_tiff_resolution_tags(tmp_path: Path) -> None:
    image = np.full((128, 128, 3), 200, np.uint8)
    path = _plain_tiff(
        tmp_path / "r.tif", image, resolution=(1e4 / 0.46, 1e4 / 0.46), resolutionunit="CENTIMETER"
    )
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.46)
        assert slide.properties["hoverdask.mpp-source"] == "tiff"


def test_screen_resolution_is_not_taken_for_a_pixel_size(tmp_path: Path) -> None:
    image = np.full((128, 128, 3), 200, np.uint8)
    path = _plain_tiff(tmp_path / "r.tif", image, resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(SlideError, match=r"not plausible.*--mpp"):
        open_slide(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("TCGA-01.svs", "TCGA-01"),
        ("..secret.svs", "secret"),
        ("a..b.svs", "a.b"),
        ("x y#z.svs", "x_y_z"),
        ("slide.ome.tiff", "slide"),
        ("store.zarr", "store"),
        (".hidden.svs", "hidden"),
        ("...svs", "slide"),
    ],
)
def test_slide_id_cannot_escape_an_output_folder(name: str, expected: str) -> None:
    cleaned = sanitize_slide_id(slide_stem(Path(name)))
    assert cleaned == expected
    assert sanitize_slide_id("../a/b\\c") == "_a_b_c"


def _broken_inputs(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    png = tmp_path / "picture.tif"
    cv2.imwrite(str(tmp_path / "picture.png"), np.zeros((8, 8, 3), np.uint8))
    png.write_bytes((tmp_path / "picture.png").read_bytes())
    head = tmp_path / "head.svs"  # Aperio keeps its directories at the end: they are gone
    head.write_bytes(CMU_SLIDE.read_bytes()[:1_000_000])
    write_synthetic_slide(tmp_path / "full.ome.tiff", 1024, 1024, flavour="ome")
    data = (tmp_path / "full.ome.tiff").read_bytes()
    cut = tmp_path / "cut.ome.tiff"  # directories intact, tile data missing
    cut.write_bytes(data[: len(data) * 2 // 3])
    grey = _plain_tiff(tmp_path / "grey.tif", np.zeros((64, 64), np.uint8), photometric="minisblack")
    folder = tmp_path / "folder.zarr"
    folder.mkdir()
    return {
        "missing": tmp_path / "nope.svs",
        "empty": empty,
        "text": text,
        "png": png,
        "truncated-head": head,
        "truncated-data": cut,
        "greyscale": grey,
        "not-a-zarr": folder,
    }


BROKEN_MESSAGES = {
    "missing": "no such file",
    "empty": "empty",
    "text": "not a readable slide",
    "png": "not a readable slide",
    "truncated-head": "truncated or damaged",
    "truncated-data": "truncated or incomplete",
    "greyscale": "expected an RGB",
    "not-a-zarr": "not an OME-Zarr",
}


def test_broken_inputs_raise_slide_errors(tmp_path: Path) -> None:
    for kind, path in _broken_inputs(tmp_path).items():
        with pytest.raises(SlideError, match=BROKEN_MESSAGES[kind]):
            open_slide(path, mpp=0.25)


def test_broken_inputs_exit_2_at_the_cli_and_leave_nothing(tmp_path: Path) -> None:
    runner = CliRunner()
    for kind, path in _broken_inputs(tmp_path).items():
        out = tmp_path / f"{kind}-out.zarr"
        result = runner.invoke(app, ["convert", str(path), "--out", str(out), "--mpp", "0.25"])
        assert result.exit_code == 2, (kind, result.output)
        assert "Traceback" not in result.output
        assert not out.exists()
        assert not out.with_name(out.name + ".partial").exists()


# --- resampling ---------------------------------------------------------------------------


def test_cmu_processing_view_upsamples_about_two_times() -> None:
    with open_slide(CMU_SLIDE) as slide:
        view = processing_array(slide, 0.25)
    assert view.scale == pytest.approx(0.25 / 0.499)
    assert view.source_level == 0
    assert view.resampled
    assert view.array.shape == (round(2967 * 0.499 / 0.25), round(2220 * 0.499 / 0.25), 3)


def test_exact_2x_upsampling_matches_opencv_bilinear(tmp_path: Path) -> None:
    path = tmp_path / "half.svs"
    write_synthetic_slide(path, 512, 384, mpp=0.5, compression="lossless", seed=5)
    with open_slide(path) as slide:
        view = processing_array(slide, 0.25, chunk=200)  # chunks that cut the grid oddly
        source = slide.level_array(0).compute()
    assert view.scale == 2.0 / 4  # 0.25 / 0.5
    ours = view.array.compute()
    reference = cv2.resize(source, (1024, 768), interpolation=cv2.INTER_LINEAR)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_resampling_does_not_depend_on_chunking() -> None:
    with open_slide(CMU_SLIDE) as slide:
        small = processing_array(slide, 0.25, chunk=333).array[:1500, :1200].compute()
        large = processing_array(slide, 0.25, chunk=4096).array[:1500, :1200].compute()
    np.testing.assert_array_equal(small, large)


def test_processing_coordinates_map_back_to_level0(tmp_path: Path) -> None:
    """A bright square's centroid, measured at 0.25 µm/px, lands on its level-0 centroid."""
    image = np.zeros((200, 300, 3), np.uint8)
    image[50:61, 120:137] = 255  # x [120, 137), y [50, 61) -> centre (128.5, 55.5)
    path = _plain_tiff(
        tmp_path / "dot.tif", image, resolution=(1e4 / 0.7, 1e4 / 0.7), resolutionunit="CENTIMETER"
    )
    with open_slide(path) as slide:
        view = processing_array(slide, 0.25)
        weights = view.array.compute()[..., 0].astype(float)
    rows, cols = np.indices(weights.shape)
    centroid = np.array([(cols * weights).sum(), (rows * weights).sum()]) / weights.sum()
    np.testing.assert_allclose(to_level0(centroid, view.scale), [128.5, 55.5], atol=0.05)


def _fake_slide(mpp: float, dims: tuple[tuple[int, int], ...]) -> Slide:
    return Slide(Path("x.svs"), "x", dims, mpp, None, {}, reader=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mpp", "dims", "expected"),
    [
        (0.252, ((4000, 4000),), (0, False)),  # within 2 %: as is
        (0.5, ((4000, 4000), (1000, 1000)), (0, True)),  # 20x: enlarge level 0
        (0.0625, ((8000, 8000), (2000, 2000), (500, 500)), (1, False)),  # level 1 is 0.25
        (0.1, ((8000, 8000), (4000, 4000), (1000, 1000)), (1, True)),  # 0.2 is the finest below
    ],
)
def test_level_choice(
    mpp: float, dims: tuple[tuple[int, int], ...], expected: tuple[int, bool]
) -> None:
    assert choose_level(_fake_slide(mpp, dims), 0.25) == expected


def test_no_resampling_within_two_percent_keeps_level0_pixels(tmp_path: Path) -> None:
    path = tmp_path / "s.svs"
    write_synthetic_slide(path, 300, 200, mpp=0.252, compression="lossless")
    with open_slide(path) as slide:
        view = processing_array(slide, 0.25)
        assert not view.resampled
        assert view.scale == 1.0
        assert view.mpp == pytest.approx(0.252)
        np.testing.assert_array_equal(view.array.compute(), slide.level_array(0).compute())
