"""Synthetic slides: the ground truth must describe what the file shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2hed
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.slide import open_slide
from hoverdask.slide import synthetic as synth
from hoverdask.slide.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory) -> synth.SyntheticTruth:
    path = tmp_path_factory.mktemp("synth") / "s.svs"
    return write_synthetic_slide(path, 1024, 768, seed=7, compression="lossless")


def test_every_instance_is_one_connected_nucleus_of_realistic_size(
    lossless: synth.SyntheticTruth,
) -> None:
    labels = lossless.instances
    assert labels is not None
    assert labels.dtype == np.int32
    assert labels.shape == (768, 1024)
    assert set(np.unique(labels)) == set(range(lossless.n_instances + 1))
    areas = np.bincount(labels.ravel())[1:]
    slices = ndimage.find_objects(labels)
    inner = []
    for index, box in enumerate(slices, start=1):
        _, count = ndimage.label(labels[box] == index, structure=np.ones((3, 3)))
        assert count == 1, f"instance {index} is in {count} pieces"
        touches_edge = box[0].start == 0 or box[1].start == 0 or box[0].stop == 768 or box[1].stop == 1024
        if not touches_edge:
            inner.append(areas[index - 1])
    diameters_um = 2 * np.sqrt(np.array(inner) / np.pi) * lossless.mpp
    assert diameters_um.min() >= 5.0
    assert diameters_um.max() <= 13.0
    assert 6.0 <= np.median(diameters_um) <= 12.0


def test_some_nuclei_touch(lossless: synth.SyntheticTruth) -> None:
    labels = lossless.instances
    assert labels is not None
    right = (labels[:, :-1] > 0) & (labels[:, 1:] > 0) & (labels[:, :-1] != labels[:, 1:])
    down = (labels[:-1] > 0) & (labels[1:] > 0) & (labels[:-1] != labels[1:])
    touching = set(labels[:, :-1][right]) | set(labels[:-1][down])
    assert 0.05 * lossless.n_instances < len(touching) < 0.8 * lossless.n_instances


def test_types_cover_all_kinds_and_background_is_zero(lossless: synth.SyntheticTruth) -> None:
    assert lossless.types[0] == 0
    assert lossless.types.shape == (lossless.n_instances + 1,)
    assert set(lossless.types[1:]) == {1, 2, 3, 4}
    type_map = lossless.type_map()
    assert (type_map[lossless.instances == 0] == 0).all()


def test_colour_deconvolution_separates_nuclei_from_stroma(lossless: synth.SyntheticTruth) -> None:
    with open_slide(lossless.path) as slide:
        rgb = slide.read_region((0, 0), 0, (1024, 768))
    hed = rgb2hed(rgb)
    labels = lossless.instances
    assert labels is not None
    nuclei = labels > 0
    ys, xs = np.arange(768) + 0.5, np.arange(1024) + 0.5
    stroma = ~nuclei & ~lossless.glass(ys, xs)
    glass = ~nuclei & lossless.glass(ys, xs)
    assert hed[..., 0][nuclei].mean() > 5 * hed[..., 0][stroma].mean()
    assert hed[..., 1][stroma].mean() > 1.5 * hed[..., 1][nuclei].mean()
    assert rgb[glass].mean() > 235
    assert rgb[stroma].mean() < 220


def test_band_rendering_equals_one_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lossless: synth.SyntheticTruth
) -> None:
    monkeypatch.setattr(synth, "BAND", 256)
    again = write_synthetic_slide(tmp_path / "b.svs", 1024, 768, seed=7, compression="lossless")
    np.testing.assert_array_equal(again.instances, lossless.instances)
    with open_slide(again.path) as a, open_slide(lossless.path) as b:
        np.testing.assert_array_equal(a.level_array(0).compute(), b.level_array(0).compute())


def test_seed_decides_the_slide(tmp_path: Path, lossless: synth.SyntheticTruth) -> None:
    other = write_synthetic_slide(tmp_path / "o.svs", 1024, 768, seed=8, compression="lossless")
    assert not np.array_equal(other.instances, lossless.instances)


@pytest.mark.parametrize("flavour", ["aperio", "ome"])
def test_pyramid_and_pixel_size(tmp_path: Path, flavour: str) -> None:
    path = tmp_path / ("p.svs" if flavour == "aperio" else "p.ome.tiff")
    write_synthetic_slide(path, 2100, 1100, mpp=0.5, flavour=flavour, compression="lossless")  # type: ignore[arg-type]
    with open_slide(path) as slide:
        assert slide.level_dimensions == ((2100, 1100), (525, 275))
        assert slide.mpp == pytest.approx(0.5)
        small = slide.level_array(1).compute().astype(float)
        large = slide.level_array(0).compute().astype(float)
    reduced = large[:1100, :2100].reshape(275, 4, 525, 4, 3).mean(axis=(1, 3))
    assert np.abs(reduced - small).max() <= 1.0  # INTER_AREA rounding


def test_cli_synth(tmp_path: Path) -> None:
    out = tmp_path / "demo.svs"
    result = CliRunner().invoke(app, ["synth", str(out), "--width", "512", "--height", "512"])
    assert result.exit_code == 0, result.output
    with open_slide(out) as slide:
        assert slide.dimensions == (512, 512)
        assert slide.mpp == 0.25
