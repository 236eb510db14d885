"""Tissue mask: against the synthetic slide's known glass, pen marks and debris, box queries,
thumbnail pooling against a numpy oracle, save/load."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.slide import open_slide
from hoverdask.slide.synthetic import SyntheticTruth, write_synthetic_slide
from hoverdask.slide.tissue import TissueMask, detect_tissue, thumbnail, tissue_mask, tissue_path
from tests.conftest import CMU_SLIDE


@pytest.fixture(scope="module")
def glassy(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTruth:
    """2 x 2 mm at 1 µm/px, a third glass, few nuclei (they do not matter here, and cost time)."""
    path = tmp_path_factory.mktemp("tissue") / "g.svs"
    return write_synthetic_slide(
        path, 2048, 2048, mpp=1.0, seed=4, background_fraction=0.35, nucleus_fraction=0.03
    )


def _truth_tissue(truth: SyntheticTruth, mask: TissueMask) -> np.ndarray:
    rows, cols = mask.mask.shape
    ys = (np.arange(rows) + 0.5) * mask.downsample
    xs = (np.arange(cols) + 0.5) * mask.downsample
    return ~truth.glass(ys, xs)


def test_mask_matches_the_known_glass(glassy: SyntheticTruth) -> None:
    with open_slide(glassy.path) as slide:
        mask = tissue_mask(slide)
    assert mask.downsample == 8.0  # 8 µm/px at 1 µm/px
    truth = _truth_tissue(glassy, mask)
    assert (mask.mask == truth).mean() > 0.95
    assert mask.area_mm2 == pytest.approx(truth.mean() * 2.048**2, rel=0.1)


def _paint_artefacts(image: np.ndarray) -> dict[str, np.ndarray]:
    """Blue and green pen strokes and a black blob, painted over whatever is there."""
    h, w = image.shape[:2]
    marks = {name: np.zeros((h, w), np.uint8) for name in ("blue", "green", "debris")}
    cv2.line(marks["blue"], (10, h // 3), (w - 10, h // 3 + 20), 1, thickness=6)
    cv2.line(marks["green"], (w // 4, 10), (w // 4 + 15, h - 10), 1, thickness=6)
    cv2.circle(marks["debris"], (3 * w // 4, 3 * h // 4), 12, 1, thickness=-1)
    image[marks["blue"] > 0] = (40, 70, 160)
    image[marks["green"] > 0] = (40, 140, 60)
    image[marks["debris"] > 0] = (25, 20, 25)
    return {name: m > 0 for name, m in marks.items()}


def test_pen_marks_and_dark_debris_are_not_tissue(glassy: SyntheticTruth) -> None:
    with open_slide(glassy.path) as slide:
        image, downsample = thumbnail(slide)
    marks = _paint_artefacts(image)
    mask = detect_tissue(image, downsample * glassy.mpp)
    for name, painted in marks.items():
        core = cv2.erode(painted.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert mask[core].mean() < 0.05, name
    truth = _truth_tissue(glassy, TissueMask(mask, downsample, glassy.mpp))
    clean = ~np.logical_or.reduce(
        [cv2.dilate(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0 for m in marks.values()]
    )
    assert (mask == truth)[clean].mean() > 0.95


def test_all_tissue_is_not_split_by_otsu() -> None:
    rng = np.random.default_rng(0)
    pink = np.clip(rng.normal((225, 150, 200), 12, (120, 160, 3)), 0, 255).astype(np.uint8)
    pink[30:60, 40:90] = (150, 90, 170)  # a denser, more purple region
    assert detect_tissue(pink, 8.0).mean() > 0.99


def test_bare_glass_has_no_tissue() -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(rng.normal(242, 3, (100, 100, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(glass, 8.0).any()


def test_thumbnail_is_a_mean_pool_of_level0() -> None:
    with open_slide(CMU_SLIDE) as slide:
        image, downsample = thumbnail(slide)
        level0 = slide.level_array(0).compute().astype(float)
    assert downsample == 16.0  # 8 µm / 0.499 µm -> 16x from the only level
    rows, cols = 2967 // 16, 2220 // 16
    expected = level0[: rows * 16, : cols * 16].reshape(rows, 16, cols, 16, 3).mean(axis=(1, 3))
    assert image.shape == (-(-2967 // 16), -(-2220 // 16), 3)
    assert np.abs(image[:rows, :cols] - expected).max() <= 0.5


def test_box_queries_in_level0_pixels() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:4, 5:8] = True  # level-0 x [80, 128), y [32, 64) at 16x
    tissue = TissueMask(mask, 16.0, 0.5)
    assert tissue.any_in_box(100, 40, 110, 50)
    assert tissue.any_in_box(0, 0, 81, 33)  # touches one mask pixel
    assert not tissue.any_in_box(0, 0, 80, 32)
    assert tissue.fraction_in_box(80, 32, 128, 64) == 1.0
    assert tissue.fraction_in_box(80, 32, 160, 64) == pytest.approx(0.6)
    assert tissue.fraction_in_box(500, 500, 600, 600) == 0.0
    assert tissue.area_mm2 == pytest.approx(6 * (16 * 0.5) ** 2 / 1e6)


def test_save_load_and_png(tmp_path: Path, glassy: SyntheticTruth) -> None:
    with open_slide(glassy.path) as slide:
        mask = tissue_mask(slide)
    mask.save(tmp_path / "m.npz")
    loaded = TissueMask.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.mask, mask.mask)
    assert (loaded.downsample, loaded.mpp) == (mask.downsample, mask.mpp)
    loaded.to_png(tmp_path / "mask.png")
    picture = cv2.imread(str(tmp_path / "mask.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(picture > 0, mask.mask)
    mask.to_png(tmp_path / "overlay.png")
    overlay = cv2.imread(str(tmp_path / "overlay.png"))
    assert overlay.shape == (*mask.mask.shape, 3)
    assert overlay[~mask.mask].mean() < overlay[mask.mask].mean()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz", "mask.png", "overlay.png"]


def test_tissue_path_sits_next_to_the_store() -> None:
    assert tissue_path("/data/out/S1.zarr") == Path("/data/out/S1.tissue.npz")


def test_cli_tissue(tmp_path: Path, glassy: SyntheticTruth) -> None:
    png = tmp_path / "t.png"
    result = CliRunner().invoke(app, ["tissue", str(glassy.path), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "mm²" in result.output
    assert png.is_file()
