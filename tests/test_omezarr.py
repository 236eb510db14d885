"""OME-Zarr conversion: lossless against tiffslide, NGFF metadata read by ome-zarr-py,
pyramid levels against a numpy oracle, atomic and resumable writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiffslide import TiffSlide
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.core.errors import SlideError
from hoverdask.slide import convert, open_slide
from hoverdask.slide.convert import convert_to_omezarr
from hoverdask.slide.resample import processing_array
from hoverdask.slide.synthetic import write_synthetic_slide
from hoverdask.slide.tissue import TissueMask, tissue_path
from tests.conftest import CMU_SLIDE, SHARED_DATA

TCGA_SLIDE = SHARED_DATA / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


def _assert_levels_equal_tiffslide(store: Path, source: Path) -> None:
    reference = TiffSlide(source)
    with open_slide(store) as converted:
        for level, (w, h) in enumerate(reference.level_dimensions):
            expected = reference.read_region((0, 0), level, (w, h), as_array=True)
            np.testing.assert_array_equal(converted.level_array(level).compute(), expected)


def _oracle_halve(image: np.ndarray) -> np.ndarray:
    """2x2 mean with round-half-up, odd edges averaged over the pixels that exist."""
    h, w = image.shape[:2]
    padded = np.full((h + h % 2, w + w % 2, 3), np.nan)
    padded[:h, :w] = image
    cells = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, 3)
    return np.floor(np.nanmean(cells, axis=(1, 3)) + 0.5).astype(np.uint8)


def test_cmu_round_trips_losslessly_with_ngff_metadata(tmp_path: Path) -> None:
    out = tmp_path / "cmu.zarr"
    result = convert_to_omezarr(CMU_SLIDE, out, chunk=512)
    assert not out.with_name("cmu.zarr.partial").exists()
    _assert_levels_equal_tiffslide(out, CMU_SLIDE)
    attrs = json.loads((out / ".zattrs").read_text())
    (image,) = attrs["multiscales"]
    assert image["version"] == "0.4"
    assert [a["name"] for a in image["axes"]] == ["c", "y", "x"]
    assert image["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 0.499, 0.499]}
    ]
    assert [(p.width, p.height) for p in result.levels] == [
        (2220, 2967), (1110, 1484), (555, 742), (278, 371),
    ]  # fmt: skip
    with open_slide(out) as converted:
        assert converted.mpp == pytest.approx(0.499)
        assert converted.objective_power == 20.0
        assert converted.slide_id == "cmu-1-small-region"
        level1 = converted.level_array(1).compute()
        np.testing.assert_array_equal(level1, _oracle_halve(converted.level_array(0).compute()))
    assert TissueMask.load(tissue_path(out)).mask.any()
    with open_slide(out) as converted, open_slide(CMU_SLIDE) as original:
        from_store = processing_array(converted, 0.25, chunk=700)
        from_svs = processing_array(original, 0.25, chunk=700)
        assert from_store.scale == from_svs.scale
        np.testing.assert_array_equal(
            from_store.array[1000:2400, 500:1900].compute(),
            from_svs.array[1000:2400, 500:1900].compute(),
        )


@pytest.mark.slow
def test_tcga_round_trips_with_mpp_override(tmp_path: Path) -> None:
    if not TCGA_SLIDE.is_file():
        pytest.skip(f"{TCGA_SLIDE} is not available")
    out = tmp_path / "tcga.zarr"
    with pytest.raises(SlideError, match="--mpp"):
        convert_to_omezarr(TCGA_SLIDE, out)
    assert not out.exists()
    convert_to_omezarr(TCGA_SLIDE, out, mpp=0.5, tissue=False)
    _assert_levels_equal_tiffslide(out, TCGA_SLIDE)
    with open_slide(out) as converted:
        assert converted.mpp == 0.5
        assert converted.level_dimensions[:2] == ((4443, 3567), (2221, 1783))


def test_ome_zarr_py_reads_the_pyramid(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    source = tmp_path / "s.svs"
    write_synthetic_slide(source, 1500, 1100, mpp=0.25, compression="lossless")
    out = tmp_path / "s.zarr"
    convert_to_omezarr(source, out, chunk=256, tissue=False)
    nodes = list(Reader(parse_url(str(out)))())
    image = next(n for n in nodes if Multiscales.matches(n.zarr))
    assert [d.shape for d in image.data] == [(3, 1100, 1500), (3, 275, 375)]
    assert image.metadata["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    level0 = np.moveaxis(np.asarray(image.data[0]), 0, -1)
    np.testing.assert_array_equal(level0, TiffSlide(source).read_region((0, 0), 0, (1500, 1100), as_array=True))


def test_existing_store_is_kept_refused_or_replaced(tmp_path: Path) -> None:
    source = tmp_path / "s.svs"
    write_synthetic_slide(source, 600, 400)
    out = tmp_path / "s.zarr"
    convert_to_omezarr(source, out, tissue=False)
    assert convert_to_omezarr(source, out, tissue=False).up_to_date
    with pytest.raises(SlideError, match="--overwrite"):
        convert_to_omezarr(source, out, mpp=0.3, tissue=False)
    convert_to_omezarr(source, out, mpp=0.3, overwrite=True, tissue=False)
    with open_slide(out) as converted:
        assert converted.mpp == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.svs", "s.zarr"]


class _Interrupted(Exception):
    pass


def test_interrupted_conversion_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "s.svs"
    write_synthetic_slide(source, 1000, 700, compression="lossless")
    out = tmp_path / "s.zarr"
    original = convert._write_unit
    calls = {"n": 0}

    def flaky(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise _Interrupted
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(convert, "_write_unit", flaky)
    with pytest.raises(_Interrupted):
        convert_to_omezarr(source, out, chunk=128, tissue=False, scheduler="sync")
    assert not out.exists()
    assert out.with_name("s.zarr.partial").is_dir()
    monkeypatch.setattr(convert, "_write_unit", original)
    result = convert_to_omezarr(source, out, chunk=128, tissue=False)
    assert result.chunks_resumed == 5
    assert not out.with_name("s.zarr.partial").exists()
    assert not (out / convert.LEDGER).exists()
    _assert_levels_equal_tiffslide(out, source)


def test_damage_found_mid_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "s.svs"
    write_synthetic_slide(source, 600, 400)
    out = tmp_path / "s.zarr"

    def broken(*args: object) -> None:
        raise SlideError("cannot decode level 0 pixels")

    monkeypatch.setattr(convert, "_write_unit", broken)
    with pytest.raises(SlideError, match="decode"):
        convert_to_omezarr(source, out, tissue=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.svs"]


def test_cli_convert_then_open(tmp_path: Path) -> None:
    source = tmp_path / "s.ome.tiff"
    write_synthetic_slide(source, 800, 600, flavour="ome", mpp=0.5)
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["convert", str(source), "--out", str(out), "--chunk", "256"])
    assert result.exit_code == 0, result.output
    assert tissue_path(out).is_file()
    with open_slide(out) as converted:
        assert converted.mpp == 0.5
        assert converted.properties["hoverdask.mpp-source"] == "ome-zarr"
    rerun = CliRunner().invoke(app, ["convert", str(source), "--out", str(out), "--chunk", "256"])
    assert "up to date" in rerun.output


def test_bad_chunk_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="--chunk"):
        convert_to_omezarr(CMU_SLIDE, tmp_path / "x.zarr", chunk=100)
    assert list(tmp_path.iterdir()) == []
