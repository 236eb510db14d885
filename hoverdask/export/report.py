"""``OUT/report.html``: the cohort report people look at, one file that opens from disk.

Three parts, written with no JavaScript:

* **the run**: every slide ok/failed (with the reason), tissue mm², nuclei, seconds, s/mm²,
  inference busy fraction, the model (name, sha256, licence) and hoverdask version, all read
  from the slides' ``run.json``;
* **the cohort**: densities per type per slide side by side, and slides flagged as outliers
  (median nucleus area or density far from the cohort's, measured robustly: median and MAD);
* **per slide**: the tissue with a nucleus-density heat map, three full-resolution crops (about
  512x512 px at 0.25 µm/px, from dense, typical and sparse tissue) with the nucleus outlines
  drawn in their type colours over the slide's own pixels, a legend with the type mix, and
  area and circularity histograms.

A slide's pictures are drawn once, into ``OUT/<slide>/report/`` (with ``pictures.json``, which
says what they were drawn from), and reused while the slide's files stay the same, so
rewriting the report as slides finish costs little. The HTML embeds the pictures as ``data:``
URIs, so the file can be mailed or archived alone; past :data:`EMBED_LIMIT` bytes of pictures
the rest are linked (relative paths next to the report) instead of embedded. A slide whose
pixels cannot be read again still gets its section, with the reason.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hoverdask.core.atomic import atomic_write, atomic_write_text
from hoverdask.core.errors import one_line
from hoverdask.core.types import KNOWN_TABLES
from hoverdask.core.version import __version__
from hoverdask.export import plots
from hoverdask.nuclei.features import type_name_and_color
from hoverdask.slide import open_slide
from hoverdask.slide.tissue import detect_tissue

CROP_PX = 512  # crop side in pixels
CROP_MPP = 0.25  # µm per crop pixel: HoVer-Net's resolution
OVERVIEW_PX = 900  # longest side of the overview thumbnail
HEAT_BIN_UM = 50.0  # smallest heat-map cell (µm); larger for big slides (about 60 cells across)
EMBED_LIMIT = 64 * 2**20  # bytes of pictures embedded in the HTML; later ones are linked
REPORT_DIR = "report"
PICTURES_VERSION = 2  # bump when the pictures change, so cached ones are redrawn
CROP_KINDS = ("dense", "typical", "sparse")
DENSE_TRIES = 8  # densest windows tried in turn until the three crops fit without overlapping
UNCLASSIFIED_COLOR = (160, 160, 160)  # as in qc.png
OUTLIER_Z = 3.5  # robust z-score (median, 1.4826 MAD) beyond which a slide is flagged
MIN_MAD_FRACTION = 0.05  # MAD floor, as a fraction of the median (identical slides flag nothing)


@dataclass
class Crop:
    """One crop: the level-0 window it shows and the picture file."""

    kind: str
    file: str  # name inside the slide's report folder
    x0: int  # level-0 window [x0, x0 + size0) x [y0, y0 + size0)
    y0: int
    size0: int
    scale: float  # crop pixels per level-0 pixel
    nuclei: int  # nuclei whose centroid lies in the window
    tissue_fraction: float
    width_um: float


@dataclass
class SlidePictures:
    """What :func:`slide_pictures` drew for a slide, and the facts the cohort part needs."""

    overview: str | None = None
    plots: str | None = None
    crops: list[Crop] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    types: list[tuple[int, str, tuple[int, int, int], int]] = field(default_factory=list)
    median_area_um2: float | None = None
    fingerprint: str = ""
    complete: bool = False  # drawn from the slide's pixels (otherwise retried next time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlidePictures:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["crops"] = [Crop(**c) for c in known.get("crops", [])]
        known["types"] = [(int(i), str(n), tuple(c), int(k)) for i, n, c, k in known.get("types", [])]
        return cls(**known)


# ---------------------------------------------------------------- per-slide pictures


def slide_pictures(slide_dir: str | os.PathLike[str]) -> SlidePictures:
    """Draw (or reuse) a finished slide's report pictures in ``slide_dir/report/``."""
    slide_dir = Path(slide_dir)
    folder = slide_dir / REPORT_DIR
    fingerprint = _fingerprint(slide_dir)
    cached = folder / "pictures.json"
    if cached.exists():
        try:
            pictures = SlidePictures.from_json(json.loads(cached.read_text()))
        except (ValueError, TypeError, KeyError):
            pictures = None
        if pictures is not None and pictures.fingerprint == fingerprint and pictures.complete:
            return pictures
    pictures = _draw_slide(slide_dir, folder)
    pictures.fingerprint = fingerprint
    atomic_write_text(cached, json.dumps(pictures.to_json(), indent=1))
    return pictures


def _fingerprint(slide_dir: Path) -> str:
    parts = [f"v{PICTURES_VERSION}"]
    for name in ("nuclei.parquet", "run.json", "stats.json"):
        path = slide_dir / name
        if path.exists():
            stat = path.stat()
            parts.append(f"{name}:{stat.st_mtime_ns}:{stat.st_size}")
    return "|".join(parts)


def read_run_record(slide_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(slide_dir) / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _draw_slide(slide_dir: Path, folder: Path) -> SlidePictures:
    pictures = SlidePictures()
    run = read_run_record(slide_dir)
    parquet = slide_dir / "nuclei.parquet"
    if not parquet.exists():
        pictures.notes.append("no nuclei.parquet in the slide folder (the run wrote no "
                              "Parquet file: --format parquet), so no pictures")  # fmt: skip
        return pictures
    table, metadata = _read_columns(parquet)
    info = _type_colors(run, table)
    pictures.types = _type_counts(table, info)
    areas = table.get("area_um2")
    if areas is not None and np.isfinite(areas).any():
        pictures.median_area_um2 = float(np.nanmedian(areas))
    _save_png(folder / "plots.png", plots.slide_plots_png(
        [(name, color, n) for _, name, color, n in pictures.types],
        _by_type(table, "area_um2", info), _by_type(table, "circularity", info)))  # fmt: skip
    pictures.plots = "plots.png"
    mpp = _mpp(run, metadata)
    slide_path = run.get("slide") or metadata.get("slide")
    box = _extent(run)
    try:
        slide = _open(slide_path, run)
    except Exception as err:  # noqa: BLE001 - any reason to not read the pixels is reported
        pictures.notes.append(f"the slide's pixels could not be read again ({slide_path}): "
                              f"{one_line(err)}; no tissue picture or crops")  # fmt: skip
        if mpp is not None and box is not None:
            density, grid = _density(table, box, mpp, None)
            _save_png(folder / "overview.png",
                      plots.overview_png(None, density, _um(box, mpp), _um(grid, mpp)))
            pictures.overview = "overview.png"
        return pictures
    with slide:
        mpp = slide.mpp
        if box is None:
            box = (0, 0, *slide.dimensions)
        thumb, downsample = _overview_pixels(slide, box)
        tissue = detect_tissue(thumb, downsample * mpp)
        density, grid = _density(table, box, mpp, (tissue, downsample))
        windows = choose_crops(table, box, mpp, tissue, downsample)
        for kind, (x0, y0, size0, count, fraction) in windows:
            crop, scale = render_crop(slide, parquet, (x0, y0, size0), info)
            name = f"crop_{kind}.png"
            _save_png(folder / name, _encode_png(crop))
            pictures.crops.append(Crop(kind, name, x0, y0, size0, scale, count, fraction,
                                       size0 * mpp))
        if len(windows) < len(CROP_KINDS):
            pictures.notes.append(f"{len(windows)} crop(s): the tissue holds no more "
                                  "non-overlapping crop windows")  # fmt: skip
        boxes = [(c.kind, _um((c.x0, c.y0, c.x0 + c.size0, c.y0 + c.size0), mpp))
                 for c in pictures.crops]  # fmt: skip
        _save_png(folder / "overview.png",
                  plots.overview_png(thumb, density, _um(box, mpp), _um(grid, mpp), boxes))
        pictures.overview = "overview.png"
    pictures.complete = True
    return pictures


def _open(path: str | None, run: Mapping[str, Any]) -> Any:
    if not path:
        raise FileNotFoundError("run.json names no slide")
    mpp = (run.get("parameters") or {}).get("mpp")
    return open_slide(path, mpp)


def _read_columns(parquet: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The columns the pictures need (no geometry) and the file's ``hoverdask`` metadata."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(parquet)
    wanted = ["centroid_x", "centroid_y", "type", "type_name", "area_um2", "circularity"]
    present = [c for c in wanted if c in schema.names]
    table = pq.read_table(parquet, columns=present)
    columns = {}
    for name in present:
        column = table.column(name)
        columns[name] = (column.to_numpy(zero_copy_only=False) if name != "type_name"
                         else np.array(column.to_pylist(), dtype=object))  # fmt: skip
    metadata = {}
    raw = (schema.metadata or {}).get(b"hoverdask")
    if raw:
        try:
            metadata = json.loads(raw)
        except ValueError:
            metadata = {}
    n = table.num_rows
    columns.setdefault("type", np.zeros(n, np.int64))
    return columns, metadata


def _type_colors(run: Mapping[str, Any], table: Mapping[str, np.ndarray]) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """``{type id: (name, colour)}``: run.json's table; else the names in the file matched to a
    known table (same ids and names), else those names with the fallback palette."""
    info: dict[int, tuple[str, tuple[int, int, int]]] = {}
    recorded = run.get("types")
    if isinstance(recorded, Mapping):
        for key, entry in recorded.items():
            info[int(key)] = (str(entry["name"]), tuple(int(v) for v in entry["color"]))  # type: ignore[misc]
    else:
        names: dict[int, str] = {}
        if "type_name" in table:
            ids, first = np.unique(table["type"], return_index=True)
            names = {int(i): str(table["type_name"][k]) for i, k in zip(ids, first, strict=True)}
        for known in KNOWN_TABLES.values():
            if names and all(known.types.get(i) and known.types[i].name == n
                             for i, n in names.items() if i != 0):  # fmt: skip
                info = {i: (t.name, t.color) for i, t in known.types.items()}
                break
        else:
            info = {i: (name, type_name_and_color(i, {})[1]) for i, name in names.items()}
    info[0] = ("unclassified", UNCLASSIFIED_COLOR)
    for type_id in np.unique(table["type"]).tolist():
        if int(type_id) not in info:
            info[int(type_id)] = type_name_and_color(int(type_id), {})
    return info


def _type_counts(table: Mapping[str, np.ndarray], info: Mapping[int, Any]) -> list[Any]:
    ids, counts = np.unique(table["type"], return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    rows = []
    for type_id in [*sorted(i for i in info if i != 0), 0]:
        n = int(found.get(type_id, 0))
        if type_id == 0 and n == 0:
            continue
        name, color = info[type_id]
        rows.append((int(type_id), name, tuple(color), n))
    return rows


def _by_type(table: Mapping[str, np.ndarray], column: str, info: Mapping[int, Any]) -> dict[str, np.ndarray]:
    if column not in table:
        return {}
    values = table[column].astype(float)
    return {info[t][0]: values[table["type"] == t] for t in sorted(info)
            if (table["type"] == t).any()}  # fmt: skip


def _mpp(run: Mapping[str, Any], metadata: Mapping[str, Any]) -> float | None:
    for value in ((run.get("parameters") or {}).get("mpp"), metadata.get("mpp")):
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return None


def _extent(run: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """The level-0 box the run covered: its ``--region``, else None (the whole slide)."""
    region = (run.get("parameters") or {}).get("region")
    if isinstance(region, Mapping) and {"x", "y", "width", "height"} <= set(region):
        x, y = int(region["x"]), int(region["y"])
        return x, y, x + int(region["width"]), y + int(region["height"])
    return None


def _um(box: Sequence[float], mpp: float) -> tuple[float, float, float, float]:
    return tuple(float(v) * mpp for v in box)  # type: ignore[return-value]


def _overview_pixels(slide: Any, box: Sequence[int]) -> tuple[np.ndarray, float]:
    """RGB of the level-0 ``box`` with its longest side near :data:`OVERVIEW_PX`, and its
    downsample (level-0 px per pixel); read chunk by chunk from the best pyramid level."""
    import dask.array as da

    x0, y0, x1, y1 = box
    wanted = max(1.0, max(x1 - x0, y1 - y0) / OVERVIEW_PX)
    downsamples = slide.level_downsamples
    level = max((lvl for lvl, d in enumerate(downsamples) if d <= wanted * 1.01),
                key=lambda lvl: downsamples[lvl], default=0)  # fmt: skip
    d = downsamples[level]
    factor = max(1, math.floor(wanted / d + 1e-6))
    source = slide.level_array(level)
    r0, c0 = math.floor(y0 / d), math.floor(x0 / d)
    rows = max(factor, (math.floor(y1 / d) - r0) // factor * factor)
    cols = max(factor, (math.floor(x1 / d) - c0) // factor * factor)
    window = source[r0 : r0 + rows, c0 : c0 + cols]
    rows, cols = window.shape[:2]
    window = window[: rows // factor * factor, : cols // factor * factor]
    chunk = max(factor, 1024 // factor * factor)
    window = window.rechunk((chunk, chunk, 3))
    pooled = da.coarsen(np.mean, window, {0: factor, 1: factor}, trim_excess=True)
    # local threads: the report is drawn on the client, whatever cluster ran the slides
    return np.round(pooled.compute(scheduler="threads")).astype(np.uint8), d * factor


def _density(table: Mapping[str, np.ndarray], box: Sequence[int], mpp: float,
             tissue: tuple[np.ndarray, float] | None) -> tuple[np.ndarray, tuple[float, ...]]:
    """Nuclei per mm² on a grid from the top-left of ``box`` (NaN where a cell holds little
    tissue), and the grid's level-0 bounds (whole cells: it may reach past ``box``)."""
    x0, y0, x1, y1 = box
    bin_um = max(HEAT_BIN_UM, max(x1 - x0, y1 - y0) * mpp / 60)
    bin0 = bin_um / mpp
    nx, ny = max(1, math.ceil((x1 - x0) / bin0)), max(1, math.ceil((y1 - y0) / bin0))
    counts = _histogram(table, box, bin0, (ny, nx))
    density = counts / (bin_um / 1000) ** 2
    if tissue is not None:
        mask, downsample = tissue
        fraction = _cell_fractions(mask, downsample, bin0, (ny, nx))
        density[fraction < 0.25] = np.nan
    else:
        density[counts == 0] = np.nan
    return density, (x0, y0, x0 + nx * bin0, y0 + ny * bin0)


def _histogram(table: Mapping[str, np.ndarray], box: Sequence[int], cell: float,
               shape: tuple[int, int]) -> np.ndarray:
    x0, y0 = box[0], box[1]
    if "centroid_x" not in table or len(table["centroid_x"]) == 0:
        return np.zeros(shape)
    cols = np.floor((table["centroid_x"] - x0) / cell).astype(np.int64)
    rows = np.floor((table["centroid_y"] - y0) / cell).astype(np.int64)
    keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    counts = np.zeros(shape)
    np.add.at(counts, (rows[keep], cols[keep]), 1)
    return counts


def _cell_fractions(mask: np.ndarray, downsample: float, cell: float,
                    shape: tuple[int, int]) -> np.ndarray:
    """Tissue fraction of each grid cell (``cell`` level-0 px) from the overview's mask."""
    size = (max(1, round(shape[1] * cell / downsample)), max(1, round(shape[0] * cell / downsample)))
    padded = np.zeros((size[1], size[0]), np.float32)
    h, w = min(size[1], mask.shape[0]), min(size[0], mask.shape[1])
    padded[:h, :w] = mask[:h, :w]
    return cv2.resize(padded, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def choose_crops(
    table: Mapping[str, np.ndarray],
    box: Sequence[int],
    mpp: float,
    tissue: np.ndarray,
    downsample: float,
) -> list[tuple[str, tuple[int, int, int, int, float]]]:
    """Crop windows ``(kind, (x0, y0, size0, nuclei, tissue fraction))`` in level-0 px: the
    densest, the most typical (nearest the median count) and the sparsest of the windows that
    lie on tissue, on a half-window grid, none overlapping another."""
    size0 = max(1, round(CROP_PX * CROP_MPP / mpp))
    x0, y0, x1, y1 = box
    step = max(1, size0 // 2)
    xs = list(range(x0, max(x0, x1 - size0) + 1, step))
    ys = list(range(y0, max(y0, y1 - size0) + 1, step))
    cx = table.get("centroid_x", np.zeros(0))
    cy = table.get("centroid_y", np.zeros(0))
    candidates = []
    for wy in ys:
        for wx in xs:
            r0, r1 = math.floor((wy - y0) / downsample), math.ceil((wy - y0 + size0) / downsample)
            c0, c1 = math.floor((wx - x0) / downsample), math.ceil((wx - x0 + size0) / downsample)
            patch = tissue[r0:r1, c0:c1]
            fraction = float(patch.mean()) if patch.size else 0.0
            inside = (cx >= wx) & (cx < wx + size0) & (cy >= wy) & (cy < wy + size0)
            candidates.append((wx, wy, int(inside.sum()), fraction))
    for threshold in (0.9, 0.5, 0.0):
        eligible = [c for c in candidates if c[3] >= threshold and (threshold or c[2])]
        if len(eligible) >= len(CROP_KINDS) or threshold == 0.0:
            break
    if not eligible:
        return []
    counts = np.array([c[2] for c in eligible], float)
    median = float(np.median(counts))
    orders = {
        "dense": sorted(range(len(eligible)), key=lambda k: (-counts[k], k)),
        "sparse": sorted(range(len(eligible)), key=lambda k: (counts[k], k)),
        "typical": sorted(range(len(eligible)), key=lambda k: (abs(counts[k] - median), k)),
    }
    best: dict[str, tuple[int, int, int, float]] = {}
    for first in orders["dense"][:DENSE_TRIES]:  # a window in the middle may block the others
        chosen = {"dense": (*eligible[first][:3], round(eligible[first][3], 3))}
        for kind in ("sparse", "typical"):
            for k in orders[kind]:
                wx, wy, n, fraction = eligible[k]
                if all(abs(wx - o[0]) >= size0 or abs(wy - o[1]) >= size0
                       for o in chosen.values()):  # fmt: skip
                    chosen[kind] = (wx, wy, n, round(fraction, 3))
                    break
        if len(chosen) > len(best):
            best = chosen
        if len(best) == len(CROP_KINDS):
            break
    return [(kind, (best[kind][0], best[kind][1], size0, best[kind][2], best[kind][3]))
            for kind in CROP_KINDS if kind in best]  # fmt: skip


def render_crop(
    slide: Any,
    parquet: str | os.PathLike[str],
    window: tuple[int, int, int],
    info: Mapping[int, tuple[str, tuple[int, int, int]]],
    *,
    thickness: int = 1,
) -> tuple[np.ndarray, float]:
    """The slide's level-0 pixels of ``window`` ``(x0, y0, size0)`` resampled to
    :data:`CROP_PX` square, with every nucleus outline that meets the window drawn in its type
    colour; returns the RGB crop and its scale (crop px per level-0 px).

    Outline vertices are level-0 pixel-index coordinates; index ``u`` maps to crop index
    ``(u - x0 + 0.5) * scale - 0.5`` (the resampling's pixel-centre rule), so at 1:1 a vertex
    lands on its own pixel.
    """
    import geopandas as gpd
    import shapely

    x0, y0, size0 = window
    pixels = slide.read_region((x0, y0), 0, (size0, size0))
    scale = CROP_PX / size0
    if size0 != CROP_PX:
        method = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
        pixels = cv2.resize(pixels, (CROP_PX, CROP_PX), interpolation=method)
    crop = np.ascontiguousarray(pixels[..., :3])
    nuclei = gpd.read_parquet(parquet, columns=["geometry", "type"],
                              bbox=(x0, y0, x0 + size0, y0 + size0))  # fmt: skip
    if len(nuclei):
        nuclei = nuclei[nuclei.intersects(shapely.box(x0 - 1, y0 - 1, x0 + size0, y0 + size0))]
    order = np.argsort(nuclei["type"].to_numpy() != 0, kind="stable")  # typed ones on top
    shift = 4
    for geometry, type_id in zip(nuclei.geometry.to_numpy()[order],
                                 nuclei["type"].to_numpy()[order], strict=True):  # fmt: skip
        color = info.get(int(type_id), (None, UNCLASSIFIED_COLOR))[1]
        rings = []
        for polygon in shapely.get_parts(geometry):
            if polygon.is_empty:
                continue
            coords = np.asarray(polygon.exterior.coords)[:, :2]
            points = ((coords - (x0, y0) + 0.5) * scale - 0.5) * (1 << shift)
            rings.append(np.round(points).astype(np.int32).reshape(-1, 1, 2))
        if rings:
            cv2.polylines(crop, rings, True, tuple(int(c) for c in color), thickness,
                          cv2.LINE_8, shift)  # fmt: skip
    return crop, scale


def _encode_png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError("could not encode a PNG")
    return data.tobytes()


def _save_png(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


# ---------------------------------------------------------------- cohort facts


@dataclass
class Outlier:
    slide: str
    measure: str
    value: float
    cohort_median: float
    z: float
    message: str


def robust_outliers(values: Mapping[str, float | None], *, threshold: float = OUTLIER_Z) -> dict[str, float]:
    """Robust z-scores ``(x - median) / (1.4826 MAD)`` of the slides beyond ``threshold``.

    Needs three slides with a value; the MAD is floored at :data:`MIN_MAD_FRACTION` of the median
    so a cohort of near-identical slides flags nothing for tiny differences."""
    present = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    if len(present) < 3:
        return {}
    data = np.array(list(present.values()))
    median = float(np.median(data))
    mad = float(np.median(np.abs(data - median))) * 1.4826
    mad = max(mad, abs(median) * MIN_MAD_FRACTION, 1e-12)
    return {k: (v - median) / mad for k, v in present.items() if abs(v - median) / mad > threshold}


def cohort_outliers(facts: Mapping[str, Mapping[str, float | None]]) -> list[Outlier]:
    """Slides whose median nucleus area or nucleus density is far from the cohort's."""
    found = []
    areas = {slide: f.get("median_area_um2") for slide, f in facts.items()}
    cohort = _median(areas)
    for slide, z in robust_outliers(areas).items():
        value = float(areas[slide])  # type: ignore[arg-type]
        ratio = value / cohort if cohort else math.inf
        found.append(Outlier(slide, "median nucleus area (µm²)", value, cohort, z,
                             f"median nucleus area {value:.1f} µm² against the cohort's "
                             f"{cohort:.1f} µm² ({ratio:.2g}×): often a wrong mpp (pixel size "
                             f"off by 2× makes areas 4× off); check with hoverdask check"))  # fmt: skip
    densities = {slide: f.get("density_per_mm2") for slide, f in facts.items()}
    cohort = _median(densities)
    for slide, z in robust_outliers(densities).items():
        value = float(densities[slide])  # type: ignore[arg-type]
        found.append(Outlier(slide, "nuclei per mm²", value, cohort, z,
                             f"{value:,.0f} nuclei/mm² against the cohort's {cohort:,.0f}: check "
                             "the tissue mask, staining, focus or mpp"))  # fmt: skip
    return found


def _median(values: Mapping[str, float | None]) -> float:
    data = [float(v) for v in values.values() if v is not None and math.isfinite(v)]
    return float(np.median(data)) if data else math.nan


# ---------------------------------------------------------------- the HTML


class _Pictures:
    """Turns picture files into ``src`` values: data URIs up to a byte budget, then links."""

    def __init__(self, out_dir: Path, limit: int) -> None:
        self.out_dir = out_dir
        self.left = limit
        self.linked = 0

    def src(self, path: Path) -> str:
        data = path.read_bytes()
        if len(data) <= self.left:
            self.left -= len(data)
            return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        self.linked += 1
        return html.escape(Path(os.path.relpath(path, self.out_dir)).as_posix())

    def inline(self, data: bytes) -> str:
        self.left -= len(data)
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def write_report(
    table: Sequence[tuple[Mapping[str, Any], Any]],
    out_dir: str | os.PathLike[str],
    *,
    timings: Mapping[str, float] | None = None,
    embed_limit: int = EMBED_LIMIT,
) -> Path:
    """Write ``out_dir/report.html`` for the summary rows ``(flat row, qc path)``."""
    out_dir = Path(out_dir)
    return atomic_write_text(out_dir / "report.html",
                             report_html(table, out_dir, timings=timings, embed_limit=embed_limit))  # fmt: skip


def rebuild_report(out_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Redraw ``report.html`` from an existing output folder (its ``summary.csv``)."""
    import csv

    out_dir = Path(out_dir)
    with open(out_dir / "summary.csv", newline="", encoding="utf-8") as stream:
        rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(stream)]
    return write_report([(row, None) for row in rows], out_dir, **kwargs)


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return float(text) if any(c in text for c in ".eE") or not text.lstrip("-").isdigit() else int(text)
    except ValueError:
        return text


def report_html(
    table: Sequence[tuple[Mapping[str, Any], Any]],
    out_dir: Path,
    *,
    timings: Mapping[str, float] | None = None,
    embed_limit: int = EMBED_LIMIT,
) -> str:
    pictures = _Pictures(out_dir, embed_limit)
    slides = []
    for flat, qc in table:
        slide = str(flat.get("slide"))
        slide_dir = out_dir / slide.replace(os.sep, "_")
        run = read_run_record(slide_dir)
        drawn = None
        if flat.get("status") in ("ok", "skipped") and slide_dir.is_dir():
            try:
                drawn = slide_pictures(slide_dir)
            except Exception as err:  # noqa: BLE001 - the report must still be written
                drawn = SlidePictures(notes=[f"the report pictures failed: {one_line(err)}"])
        slides.append((flat, slide_dir, run, drawn, Path(qc) if qc else slide_dir / "qc.png"))
    body = [
        _run_part(slides, timings, __version__),
        _cohort_part(slides, pictures),
        *(_slide_part(flat, slide_dir, drawn, qc, pictures)
          for flat, slide_dir, _, drawn, qc in slides),
    ]
    note = ""
    if pictures.linked:
        note = (f"<p class='note'>{pictures.linked} pictures are linked, not embedded (over "
                f"{embed_limit / 2**20:.0f} MiB): keep this file next to the slide folders.</p>")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = " · ".join(f"<a href='#{_anchor(str(f.get('slide')))}'>{html.escape(str(f.get('slide')))}</a>"
                     for f, *_ in slides)  # fmt: skip
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>hoverdask report: {html.escape(out_dir.name)}</title><style>{_CSS}</style>"
        "</head><body>"
        f"<h1>hoverdask report <small>{html.escape(str(out_dir))}</small></h1>"
        f"<p class='meta'>written {stamp} by hoverdask {html.escape(__version__)} · slides: "
        f"{nav}</p>{note}{''.join(body)}</body></html>\n"
    )


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.2em 2em;color:#222;
max-width:1700px}
h1 small{font-size:55%;color:#777;font-weight:normal}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:13px;margin:.4em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f4f4f4}td.l,th.l{text-align:left}
tr.failed td{background:#fdecec}tr.flag td{background:#fff6dd}
.meta{color:#666;font-size:13px}.note{background:#fff6dd;border-left:4px solid #e0a800;
padding:.4em .8em}.bad{background:#fdecec;border-left:4px solid #c00;padding:.4em .8em}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #333;margin-right:5px;
vertical-align:-1px}
.crops{display:flex;flex-wrap:wrap;gap:14px}.crops figure{margin:0}
.crops img{width:512px;height:512px;image-rendering:pixelated;border:1px solid #999}
figcaption{font-size:12px;color:#444;max-width:512px}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
img.fig{max-width:100%;height:auto}
section.slide{border-top:1px solid #ccc;margin-top:2em}
code{font-size:12px}
"""


def _anchor(slide: str) -> str:
    return "slide-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in slide)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _run_part(slides: Sequence[Any], timings: Mapping[str, float] | None, version: str) -> str:
    rows = []
    models: dict[str, Mapping[str, Any]] = {}
    versions = set()
    ok = failed = 0
    for flat, _slide_dir, run, _, _ in slides:
        status = str(flat.get("status"))
        ok += status in ("ok", "skipped")
        failed += status == "failed"
        model = run.get("model") or {}
        if model:
            models[str(model.get("sha256") or model.get("name"))] = model
        if (run.get("versions") or {}).get("hoverdask"):
            versions.add(run["versions"]["hoverdask"])
        mm2 = flat.get("tissue_mm2")
        seconds = flat.get("seconds")
        if status == "skipped":
            seconds = (run.get("timings_s") or {}).get("wall", seconds)
        per_mm2 = seconds / mm2 if isinstance(seconds, int | float) and mm2 else None
        busy = run.get("inference_busy_fraction")
        error = str(flat.get("error") or "")
        slide = str(flat.get("slide"))
        rows.append(
            f"<tr class='{'failed' if status == 'failed' else ''}'>"
            f"<td class='l'><a href='#{_anchor(slide)}'>{html.escape(slide)}</a></td>"
            f"<td class='l'>{html.escape(status)}</td><td>{_fmt(mm2)}</td>"
            f"<td>{_fmt(flat.get('nuclei'))}</td><td>{_fmt(seconds)}</td><td>{_fmt(per_mm2)}</td>"
            f"<td>{_fmt(busy, 2)}</td><td class='l'>{html.escape(error)}</td></tr>"
        )
    model_rows = "".join(
        f"<tr><td class='l'>{html.escape(str(m.get('name')))}</td>"
        f"<td class='l'><code>{html.escape(str(m.get('sha256')))}</code></td>"
        f"<td class='l'>{html.escape(str(m.get('licence')))}</td>"
        f"<td class='l'>{html.escape(str(m.get('mode')))}, {_fmt(m.get('nr_types'))} types</td></tr>"
        for m in models.values()
    ) or "<tr><td class='l' colspan='4'>no slide recorded a model (no run.json)</td></tr>"
    timing_rows = "".join(f"<tr><td class='l'>{html.escape(str(k))}</td><td>{v:.1f}</td></tr>"
                          for k, v in (timings or {}).items())  # fmt: skip
    ran_with = ", ".join(sorted(versions)) or version
    return (
        "<h2>The run</h2>"
        f"<p><b>{ok}</b> slide(s) ok, <b>{failed}</b> failed, of {len(slides)}. "
        f"hoverdask {html.escape(ran_with)}.</p>"
        + (f"<p class='bad'>{failed} slide(s) failed: their reasons are in the table.</p>"
           if failed else "")
        + "<table><tr><th class='l'>slide</th><th class='l'>status</th><th>tissue mm²</th>"
        "<th>nuclei</th><th>seconds</th><th>s / mm²</th><th>inference busy</th>"
        f"<th class='l'>error / note</th></tr>{''.join(rows)}</table>"
        "<p class='meta'>seconds: from the slide's submission to its files; inference busy: the "
        "share of that time the model was predicting (below 1 it waited for reads or "
        "post-processing).</p>"
        "<table><tr><th class='l'>model</th><th class='l'>sha256</th><th class='l'>licence</th>"
        f"<th class='l'>mode</th></tr>{model_rows}</table>"
        + (f"<h3>Run timings (s)</h3><table>{timing_rows}</table>" if timing_rows else "")
    )


def _cohort_part(slides: Sequence[Any], pictures: _Pictures) -> str:
    type_names: dict[str, tuple[int, int, int]] = {}
    facts: dict[str, dict[str, float | None]] = {}
    per_slide: dict[str, dict[str, float | None]] = {}
    for flat, _dir, _run, drawn, _ in slides:
        if drawn is None:
            continue
        slide = str(flat.get("slide"))
        mm2 = flat.get("tissue_mm2")
        area = mm2 if isinstance(mm2, int | float) and mm2 > 0 else None
        per_slide[slide] = {}
        for _, name, color, n in drawn.types:
            type_names.setdefault(name, color)
            per_slide[slide][name] = n / area if area else None
        nuclei = flat.get("nuclei")
        facts[slide] = {"median_area_um2": drawn.median_area_um2,
                        "density_per_mm2": nuclei / area if area and isinstance(nuclei, int | float)
                        else None}  # fmt: skip
    if not per_slide:
        return "<h2>The cohort</h2><p>No finished slide yet.</p>"
    outliers = cohort_outliers(facts)
    flagged = {o.slide for o in outliers}
    names = list(type_names)
    order = list(per_slide)
    matrix = np.array([[per_slide[s].get(n) if per_slide[s].get(n) is not None else np.nan
                        for n in names] for s in order], float)  # fmt: skip
    chart = ""
    if np.isfinite(matrix).any():
        data = plots.cohort_densities_png(order, [(n, type_names[n]) for n in names], matrix,
                                          [s in flagged for s in order])  # fmt: skip
        chart = f"<img class='fig' alt='densities per type per slide' src='{pictures.inline(data)}'>"
    head = "".join(f"<th><span class='swatch' style='background:{_css(type_names[n])}'></span>"
                   f"{html.escape(n)}</th>" for n in names)  # fmt: skip
    rows = "".join(
        f"<tr class='{'flag' if s in flagged else ''}'><td class='l'>{html.escape(s)}</td>"
        + "".join(f"<td>{_fmt(v)}</td>" for v in matrix[k])
        + f"<td>{_fmt(facts[s]['density_per_mm2'])}</td><td>{_fmt(facts[s]['median_area_um2'])}</td></tr>"
        for k, s in enumerate(order)
    )
    flags = "".join(f"<li><b>{html.escape(o.slide)}</b>: {html.escape(o.message)} "
                    f"(robust z {o.z:+.1f})</li>" for o in outliers)  # fmt: skip
    if flags:
        flags = f"<div class='note'><b>Outliers</b><ul>{flags}</ul></div>"
    elif len(facts) >= 3:
        flags = "<p>No slide is far from the cohort (median nucleus area, density).</p>"
    else:
        flags = "<p class='meta'>Outliers are looked for from three finished slides on.</p>"
    return (
        "<h2>The cohort</h2><p>Nuclei per mm² of detected tissue, per type.</p>"
        f"{chart}{flags}<table><tr><th class='l'>slide</th>{head}<th>all</th>"
        f"<th>median area µm²</th></tr>{rows}</table>"
    )


def _resampled(scale: float) -> str:
    if abs(scale - 1) < 1e-6:
        return "shown 1:1"
    return f"{'enlarged' if scale > 1 else 'reduced'} ×{scale:.3g}"


def _css(color: Sequence[int]) -> str:
    return "rgb({},{},{})".format(*(int(c) for c in color))


def _slide_part(flat: Mapping[str, Any], slide_dir: Path, drawn: SlidePictures | None,
                qc: Path, pictures: _Pictures) -> str:
    slide = str(flat.get("slide"))
    status = str(flat.get("status"))
    head = f"<section class='slide' id='{_anchor(slide)}'><h2>{html.escape(slide)} " \
           f"<small>({html.escape(status)})</small></h2>"
    if status == "failed":
        return (head + f"<p class='bad'>failed: {html.escape(str(flat.get('error') or 'no reason recorded'))}"
                "</p></section>")
    if drawn is None:
        return head + "<p class='note'>no output folder for this slide</p></section>"
    folder = slide_dir / REPORT_DIR
    parts = [head]
    if flat.get("error"):
        parts.append(f"<p class='note'>{html.escape(str(flat['error']))}</p>")
    parts.extend(f"<p class='note'>{html.escape(n)}</p>" for n in drawn.notes)
    total = sum(n for *_, n in drawn.types)
    mm2 = flat.get("tissue_mm2")
    legend = "".join(
        f"<tr><td class='l'><span class='swatch' style='background:{_css(color)}'></span>"
        f"{html.escape(name)}</td><td>{n:,}</td><td>{(100 * n / total if total else 0):.1f}%</td>"
        f"<td>{_fmt(n / mm2 if isinstance(mm2, int | float) and mm2 else None)}</td></tr>"
        for _, name, color, n in drawn.types
    )
    legend_table = ("<table><tr><th class='l'>type (outline colour)</th><th>nuclei</th>"
                    f"<th>share</th><th>per mm²</th></tr>{legend}"
                    f"<tr><td class='l'><b>all</b></td><td>{total:,}</td><td></td>"
                    f"<td>{_fmt(total / mm2 if isinstance(mm2, int | float) and mm2 else None)}"
                    f"</td></tr></table><p class='meta'>tissue {_fmt(mm2)} mm²; median nucleus "
                    f"area {_fmt(drawn.median_area_um2)} µm²</p>")  # fmt: skip
    overview = ""
    if drawn.overview and (folder / drawn.overview).exists():
        overview = (f"<img class='fig' style='max-width:900px' alt='tissue and density' "
                    f"src='{pictures.src(folder / drawn.overview)}'>")  # fmt: skip
    if not drawn.complete and qc.exists():  # no slide pixels: the run's own QC picture
        overview += (f"<figure style='margin:0'><img class='fig' style='max-width:600px' "
                     f"alt='QC picture' src='{pictures.src(qc)}'><figcaption>qc.png: thumbnail, "
                     "tissue outline, one dot per nucleus</figcaption></figure>")  # fmt: skip
    parts.append(f"<div class='row'><div>{overview}</div><div>{legend_table}</div></div>")
    crops = []
    for crop in drawn.crops:
        path = folder / crop.file
        if not path.exists():
            continue
        um = crop.width_um
        crops.append(
            f"<figure><img alt='{crop.kind} crop' src='{pictures.src(path)}' data-kind='{crop.kind}' "
            f"data-x0='{crop.x0}' data-y0='{crop.y0}' data-size0='{crop.size0}' "
            f"data-scale='{crop.scale:.9g}' width='{CROP_PX}' height='{CROP_PX}'>"
            f"<figcaption><b>{crop.kind}</b>: {crop.nuclei} nuclei in {um:.0f}×{um:.0f} µm "
            f"({100 * crop.tissue_fraction:.0f}% tissue); level-0 x {crop.x0:,}, y {crop.y0:,}, "
            f"{crop.size0} slide pixels {_resampled(crop.scale)}</figcaption></figure>"
        )
    if crops:
        parts.append("<h3>Nuclei at full resolution</h3><p class='meta'>outlines in the type "
                     "colours of the legend, drawn over the slide's own pixels at "
                     f"{CROP_MPP} µm/px</p><div class='crops'>{''.join(crops)}</div>")  # fmt: skip
    if drawn.plots and (folder / drawn.plots).exists():
        parts.append(f"<h3>Type mix and shapes</h3><img class='fig' alt='type mix and histograms' "
                     f"src='{pictures.src(folder / drawn.plots)}'>")  # fmt: skip
    parts.append("</section>")
    return "".join(parts)
