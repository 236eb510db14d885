"""The cohort report: crops show the table's outlines on the slide's pixels, outliers are
flagged, failed slides are listed with their reason, and the file stands alone."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import pytest
import shapely
from scipy import ndimage

from hoverdask.export import write_cohort_summary, write_slide_outputs
from hoverdask.export.report import (
    CROP_KINDS,
    CROP_PX,
    cohort_outliers,
    rebuild_report,
    robust_outliers,
    slide_pictures,
)
from hoverdask.nuclei.features import measure
from hoverdask.slide import open_slide
from hoverdask.slide.synthetic import write_synthetic_slide

MPP = 0.25  # the crops' own resolution: one slide pixel is one crop pixel
TYPES = {1: ("Alpha", (255, 0, 0)), 2: ("Beta", (0, 255, 0)), 3: ("Gamma", (0, 0, 255)),
         4: ("Delta", (255, 0, 255))}  # fmt: skip
CHROMIUM = Path("/usr/bin/chromium")
FAILED = ("S2", "SlideError: no mpp in the file; pass --mpp")


def _run_json(slide_dir: Path, slide: str, *, busy: float = 0.8) -> None:
    record = {
        "status": "ok", "slide": slide, "slide_id": slide_dir.name,
        "parameters": {"mpp": None, "region": None, "target_mpp": 0.25},
        "model": {"name": "test-model", "sha256": "ab" * 32, "licence": "CC0", "mode": "fast",
                  "nr_types": 5},
        "types": {str(k): {"name": n, "color": list(c)} for k, (n, c) in TYPES.items()},
        "inference_busy_fraction": busy, "versions": {"hoverdask": "9.9.9"},
        "timings_s": {"wall": 12.0},
    }  # fmt: skip
    (slide_dir / "run.json").write_text(json.dumps(record))


def _nuclei_from_truth(truth) -> gpd.GeoDataFrame:
    """One row per synthetic nucleus: its mask's outline through pixel centres (integer
    vertices, every outline pixel a vertex), centroid and type."""
    labels = truth.instances
    rows = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = (labels[box] == label).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        ring = contours[0][:, 0, :] + (box[1].start, box[0].start)
        if len(ring) < 3 or len(contours) != 1:
            continue
        ys, xs = np.nonzero(mask)
        rows.append({"geometry": shapely.Polygon(ring), "type": np.int16(truth.types[label]),
                     "centroid_x": xs.mean() + box[1].start + 0.5,
                     "centroid_y": ys.mean() + box[0].start + 0.5,
                     "nucleus_id": np.int64(label), "label_id": label})  # fmt: skip
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """OUT with one finished synthetic slide (S1) and one failed slide (S2)."""
    root = tmp_path_factory.mktemp("report")
    truth = write_synthetic_slide(root / "s1.svs", 1600, 1300, mpp=MPP, seed=3, n_types=4,
                                  compression="lossless", background_fraction=0.2)  # fmt: skip
    with open_slide(truth.path) as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions)
    nuclei = measure(_nuclei_from_truth(truth), image, MPP, type_table=TYPES,
                     labels=truth.instances)  # fmt: skip
    out = root / "OUT"
    outputs = write_slide_outputs(nuclei, out / "S1", slide_id="S1", type_table=TYPES,
                                  tissue_mm2=0.1, extent=(0, 0, 1600, 1300))  # fmt: skip
    _run_json(out / "S1", str(truth.path))
    rows = [
        {"slide": "S1", "status": "ok", "nuclei": len(nuclei), "seconds": 12.5, "error": None,
         "outputs": outputs},
        {"slide": FAILED[0], "status": "failed", "nuclei": 0, "seconds": 0.3, "error": FAILED[1]},
    ]  # fmt: skip
    written = write_cohort_summary(rows, out)
    return {"out": out, "report": written["report"], "nuclei": nuclei, "image": image}


def _crops(text: str) -> list[tuple[dict[str, str], np.ndarray]]:
    found = []
    for tag in re.findall(r"<img [^>]*data-kind=[^>]*>", text):
        attrs = dict(re.findall(r"([\w-]+)='([^']*)'", tag))
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        data = np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8)
        found.append((attrs, cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)))
    return found


def test_crops_show_the_outlines_of_the_table_in_type_colours_on_the_slide_pixels(cohort):
    crops = _crops(cohort["report"].read_text())
    assert [a["data-kind"] for a, _ in crops] == list(CROP_KINDS)
    nuclei, image = cohort["nuclei"], cohort["image"]
    checked = 0
    for attrs, crop in crops:
        assert crop.shape == (CROP_PX, CROP_PX, 3)
        x0, y0, size0 = int(attrs["data-x0"]), int(attrs["data-y0"]), int(attrs["data-size0"])
        assert size0 == CROP_PX  # 0.25 µm/px slide: 1:1
        inside = nuclei[nuclei.within(shapely.box(x0, y0, x0 + size0 - 1, y0 + size0 - 1))]
        assert len(inside) > 0 or attrs["data-kind"] == "sparse"
        for geometry, type_id in zip(inside.geometry, inside["type"], strict=True):
            ring = np.asarray(geometry.exterior.coords, int)
            colour = np.array(TYPES[int(type_id)][1])
            on_outline = crop[ring[:, 1] - y0, ring[:, 0] - x0]
            assert (on_outline == colour).all(), f"outline of a type {type_id} nucleus"
            mask = np.zeros((size0, size0), np.uint8)
            cv2.fillPoly(mask, [ring.reshape(-1, 1, 2) - (x0, y0)], 1)
            inner = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT,
                              borderValue=0).astype(bool)
            window = image[y0 : y0 + size0, x0 : x0 + size0]
            assert (crop[inner] == window[inner]).all()  # the slide's own pixels inside
            checked += 1
        drawn = np.zeros((size0, size0), bool)
        for geometry in nuclei.geometry:
            ring = np.asarray(geometry.exterior.coords, int) - (x0, y0)
            ok = (ring >= 0).all(axis=1) & (ring < size0).all(axis=1)
            drawn[ring[ok, 1], ring[ok, 0]] = True
        assert (crop[~drawn] == image[y0 : y0 + size0, x0 : x0 + size0][~drawn]).all()
    assert checked > 50


def test_crops_come_from_dense_typical_and_sparse_tissue(cohort):
    pictures = json.loads((cohort["out"] / "S1" / "report" / "pictures.json").read_text())
    crops = {c["kind"]: c for c in pictures["crops"]}
    cx, cy = cohort["nuclei"]["centroid_x"], cohort["nuclei"]["centroid_y"]
    for crop in crops.values():
        x0, y0, size = crop["x0"], crop["y0"], crop["size0"]
        inside = (cx >= x0) & (cx < x0 + size) & (cy >= y0) & (cy < y0 + size)
        assert crop["nuclei"] == int(inside.sum())
    assert crops["dense"]["nuclei"] > crops["typical"]["nuclei"] > crops["sparse"]["nuclei"]
    for a, b in [("dense", "typical"), ("dense", "sparse"), ("typical", "sparse")]:
        assert (abs(crops[a]["x0"] - crops[b]["x0"]) >= crops[a]["size0"]
                or abs(crops[a]["y0"] - crops[b]["y0"]) >= crops[a]["size0"])  # fmt: skip


def test_report_lists_the_run_and_failed_slides_with_their_reason(cohort):
    text = cohort["report"].read_text()
    run = text.split("<h2>The cohort</h2>")[0]
    assert re.search(r"<tr class='failed'><td class='l'><a href='#slide-S2'>S2</a></td>"
                     r"<td class='l'>failed</td>.*?" + re.escape(FAILED[1]), run)  # fmt: skip
    assert "<b>1</b> slide(s) ok, <b>1</b> failed" in run
    for fact in ("test-model", "ab" * 32, "CC0", "9.9.9"):  # model name, sha256, licence, version
        assert fact in run
    assert "0.8" in run  # inference busy fraction
    section = text.split("id='slide-S2'")[1]
    assert "failed: " + FAILED[1] in section
    for name, _ in TYPES.values():
        assert name in text.split("id='slide-S1'")[1]  # the legend


def test_report_is_one_self_contained_file(cohort):
    text = cohort["report"].read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*['"]?([^'" >]+)""", text)
    assert links
    assert all(link.startswith(("data:", "#")) for link in links), links
    assert "<script" not in text.lower()
    assert "url(" not in text  # no stylesheet fetches either
    copy = cohort["out"].parent / "alone" / "report.html"  # still whole without its folder
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(cohort["report"], copy)
    assert len(_crops(copy.read_text())) == len(CROP_KINDS)


def test_pictures_are_drawn_once_and_the_report_rebuilds_from_the_folder(cohort):
    pictures = cohort["out"] / "S1" / "report" / "pictures.json"
    before = pictures.stat().st_mtime_ns
    rebuilt = rebuild_report(cohort["out"])
    assert pictures.stat().st_mtime_ns == before  # the slide's files did not change
    assert len(_crops(rebuilt.read_text())) == len(CROP_KINDS)
    assert FAILED[1] in rebuilt.read_text()


def test_links_instead_of_embedding_past_the_limit(cohort, tmp_path):
    out = tmp_path / "OUT"
    shutil.copytree(cohort["out"], out)
    report = rebuild_report(out, embed_limit=0)
    text = report.read_text()
    assert "src='S1/report/crop_dense.png'" in text
    assert "linked, not embedded" in text


def test_a_region_run_is_pictured_inside_its_region(cohort, tmp_path):
    slide_dir = tmp_path / "S1-region"
    shutil.copytree(cohort["out"] / "S1", slide_dir)
    shutil.rmtree(slide_dir / "report")
    record = json.loads((slide_dir / "run.json").read_text())
    region = {"x": 200, "y": 100, "width": 1400, "height": 1200}
    record["parameters"]["region"] = region
    (slide_dir / "run.json").write_text(json.dumps(record))
    drawn = slide_pictures(slide_dir)
    assert drawn.complete
    assert drawn.notes == []
    assert [c.kind for c in drawn.crops] == list(CROP_KINDS)
    for crop in drawn.crops:
        assert crop.x0 >= region["x"]
        assert crop.y0 >= region["y"]
        assert crop.x0 + crop.size0 <= region["x"] + region["width"]
        assert crop.y0 + crop.size0 <= region["y"] + region["height"]


def _cohort_slide(out: Path, name: str, area: float, rng) -> dict:
    n = 200
    side = np.sqrt(rng.normal(area, area * 0.1, n).clip(1)) / MPP  # px
    x = rng.uniform(0, 4000, n)
    y = rng.uniform(0, 4000, n)
    nuclei = gpd.GeoDataFrame({
        "geometry": [shapely.box(a, b, a + s, b + s) for a, b, s in zip(x, y, side, strict=True)],
        "centroid_x": x + side / 2, "centroid_y": y + side / 2,
        "type": rng.integers(1, 3, n).astype(np.int16), "nucleus_id": np.arange(n),
        "area_um2": (side * MPP) ** 2, "circularity": np.full(n, np.pi / 4),
    }, geometry="geometry", crs=None)  # fmt: skip
    outputs = write_slide_outputs(nuclei, out / name, slide_id=name, formats=("parquet",),
                                  type_table=TYPES, tissue_mm2=1.0)  # fmt: skip
    _run_json(out / name, str(out / "gone" / f"{name}.svs"))
    return {"slide": name, "status": "ok", "nuclei": n, "seconds": 5.0, "error": None,
            "outputs": outputs}


def test_a_slide_whose_nuclei_are_four_times_larger_is_flagged(tmp_path):
    rng = np.random.default_rng(5)
    areas = {"A": 30.0, "B": 33.0, "C": 28.0, "D": 31.0, "E": 120.0}  # E: mpp off by 2x
    rows = [_cohort_slide(tmp_path, name, area, rng) for name, area in areas.items()]
    text = write_cohort_summary(rows, tmp_path)["report"].read_text()
    cohort = text.split("<h2>The cohort</h2>")[1].split("<section")[0]
    flagged = re.findall(r"<li><b>(\w+)</b>: median nucleus area[^<]*often a wrong mpp", cohort)
    assert flagged == ["E"]
    assert "<tr class='flag'><td class='l'>E</td>" in cohort
    for name in areas:  # no pixels to read: each slide still has its section, with the reason
        section = text.split(f"id='slide-{name}'")[1].split("</section>")[0]
        assert "could not be read again" in section
        assert "plots" in section or "type mix" in section


def test_robust_outliers():
    spread = {f"s{k}": v for k, v in enumerate([10.0, 11, 9, 10.5, 9.5, 10.2])}
    assert robust_outliers(spread) == {}
    assert set(robust_outliers({**spread, "far": 30.0})) == {"far"}
    assert set(robust_outliers({**spread, "low": 2.0})) == {"low"}
    assert robust_outliers({"a": 1.0, "b": 100.0}) == {}  # two slides: no cohort to compare
    same = {f"s{k}": 10.0 for k in range(5)}
    assert robust_outliers({**same, "x": 10.2}) == {}  # MAD 0: floored at 5% of the median
    facts = {k: {"median_area_um2": v, "density_per_mm2": 1000.0} for k, v in spread.items()}
    facts["wrong"] = {"median_area_um2": 40.0, "density_per_mm2": 1000.0}
    found = cohort_outliers(facts)
    assert [o.slide for o in found] == ["wrong"]
    assert "often a wrong mpp" in found[0].message


@pytest.fixture
def chromium():
    """Playwright's Chromium driver for /usr/bin/chromium (no browser download), or skip."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.slow
def test_report_renders_in_chromium(chromium, cohort):
    """Chromium opens the report from disk: every picture decodes and the page is not blank."""
    page = chromium.new_page(viewport={"width": 1400, "height": 900})
    page.goto(cohort["report"].resolve().as_uri())
    page.wait_for_load_state("load")
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    kinds = page.eval_on_selector_all("img[data-kind]", "els => els.length")
    shot = page.screenshot(full_page=True)
    assert kinds == len(CROP_KINDS)
    assert len(widths) >= len(CROP_KINDS) + 2
    assert all(w > 0 for w in widths), widths
    picture = cv2.imdecode(np.frombuffer(shot, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[0] > 2000  # the sections are laid out, not collapsed
    colours = np.unique(picture.reshape(-1, 3) // 8, axis=0)
    assert len(colours) > 500  # tissue, outlines and plots, not a blank page
