"""Per-slide output files and the cohort summary (CSV, hive dataset, HTML report).

Layout (``OUT`` is the cohort output folder, one sub-folder per slide)::

    OUT/<slide>/nuclei.parquet        GeoParquet 1.1 (write_slide_outputs)
    OUT/<slide>/nuclei.geojson.gz     QuPath detections (write_slide_outputs)
    OUT/<slide>/stats.json            counts, densities, feature means (write_slide_outputs)
    OUT/<slide>/qc.png                QC picture (write_qc_picture)
    OUT/nuclei/slide=<id>/part-0.parquet   hive dataset (write_cohort_summary links the files)
    OUT/summary.csv, OUT/report.html  (write_cohort_summary)

The summary step, not each slide, publishes files into the hive dataset: it runs once, after
every slide is final, so a reader never sees a slide that is still being rewritten, and a
hard link costs no extra disk.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np

from hoverdask.core.atomic import atomic_path, atomic_write_text
from hoverdask.core.errors import HoverdaskError
from hoverdask.core.types import TypeTableLike
from hoverdask.export.geoparquet import (
    ROW_GROUP_SIZE,
    GeoParquetStream,
    add_to_dataset,
    check_columns,
    write_geoparquet,
)
from hoverdask.export.parts import SlideParts
from hoverdask.export.qupath import QuPathStream, write_qupath
from hoverdask.export.report import write_report
from hoverdask.nuclei.features import FEATURE_COLUMNS, type_info, type_name_and_color

FORMATS = ("parquet", "qupath")
_FILES = {"parquet": "nuclei.parquet", "qupath": "nuclei.geojson.gz"}  # per format, in a slide
PIPELINE_COLUMNS = ("slide", "status", "nuclei", "seconds", "error")
UNCLASSIFIED = "unclassified"
GATHER_ROWS = 10_000  # rows of a slide in pandas/shapely form at a time when streaming


class OutputFormatError(HoverdaskError):
    """An unknown output format was asked for."""


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"parquet,qupath"`` -> ``("parquet", "qupath")``, rejecting unknown names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = tuple(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise OutputFormatError(
            f"unknown output format {unknown}; choose from {', '.join(FORMATS)}"
        )
    return formats


def write_slide_outputs(
    nuclei: gpd.GeoDataFrame,
    out_dir: str | os.PathLike[str],
    *,
    slide_id: str,
    formats: Sequence[str] = FORMATS,
    type_table: TypeTableLike | None = None,
    tissue_mm2: float | None = None,
    extent: tuple[float, float, float, float] | None = None,
    metadata: dict[str, Any] | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    as_cells: bool = False,
    cell_expansion_px: float = 0.0,
) -> dict[str, Path]:
    """Write one slide's files into ``out_dir``; returns ``{"parquet"|"qupath"|"stats": path}``.

    ``extent`` (the slide's level-0 bounds) fixes the Parquet row order; ``metadata`` (mpp,
    model, ...) is stored in the Parquet file; ``offset`` is subtracted in the GeoJSON only.
    """
    formats = parse_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "parquet" in formats:
        written["parquet"] = write_geoparquet(
            nuclei, out_dir / _FILES["parquet"], slide_id=slide_id, extent=extent, metadata=metadata
        )
    if "qupath" in formats:
        path = out_dir / _FILES["qupath"]
        write_qupath(
            nuclei,
            path,
            slide_id=slide_id,
            type_table=type_table,
            offset=offset,
            as_cells=as_cells,
            cell_expansion_px=cell_expansion_px,
            metadata=metadata,
        )
        written["qupath"] = path
    stats = slide_stats(nuclei, slide_id=slide_id, tissue_mm2=tissue_mm2, type_table=type_table)
    written["stats"] = atomic_write_text(out_dir / "stats.json", json.dumps(stats, indent=1))
    return written


def write_slide_outputs_from_parts(
    parts: SlideParts,
    out_dir: str | os.PathLike[str],
    *,
    slide_id: str,
    formats: Sequence[str] = FORMATS,
    type_table: TypeTableLike | None = None,
    tissue_mm2: float | None = None,
    metadata: dict[str, Any] | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    prepare: Callable[[gpd.GeoDataFrame], gpd.GeoDataFrame] | None = None,
    also: Sequence[Callable[[gpd.GeoDataFrame], None]] = (),
    row_group_size: int = ROW_GROUP_SIZE,
) -> dict[str, Path]:
    """:func:`write_slide_outputs` for a slide kept as parts, one row group in memory at a time.

    The Parquet file and ``stats.json`` are those of the whole table (the parts were ordered
    with the slide extent by :func:`~hoverdask.export.parts.index_parts`); the GeoJSON holds the
    same features in the Parquet file's row order. ``prepare`` turns each row group into the rows
    the whole table would have (the pipeline adds ``slide_id`` and orders columns); ``also`` are
    called with every prepared row group (the QC picture's dots). Cell objects need every
    nucleus's neighbours, so ``as_cells`` stays with :func:`write_slide_outputs`.
    """
    formats = parse_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = SlideStats()
    with ExitStack() as stack:
        sinks: list[Callable[[gpd.GeoDataFrame], None]] = [stats.add, *also]
        if "parquet" in formats:
            parquet = stack.enter_context(GeoParquetStream(
                out_dir / _FILES["parquet"], geo=parts.geo_metadata(), slide_id=slide_id,
                metadata=metadata, row_group_size=row_group_size,
            ))  # fmt: skip
            sinks.append(parquet.write)
        if "qupath" in formats:
            qupath = stack.enter_context(QuPathStream(
                out_dir / _FILES["qupath"], slide_id=slide_id, type_table=type_table,
                offset=offset, metadata=metadata,
            ))  # fmt: skip
            sinks.append(qupath.write)
        for chunk in parts.chunks(GATHER_ROWS):
            chunk = prepare(chunk) if prepare is not None else chunk
            if not stats.count:  # the first row group shows the columns
                check_columns(chunk.columns, slide_id)
            for sink in sinks:
                sink(chunk)
    written = {name: out_dir / file for name, file in _FILES.items() if name in formats}
    summary = stats.result(slide_id=slide_id, tissue_mm2=tissue_mm2, type_table=type_table)
    written["stats"] = atomic_write_text(out_dir / "stats.json", json.dumps(summary, indent=1))
    return written


def slide_stats(
    nuclei: gpd.GeoDataFrame,
    *,
    slide_id: str,
    tissue_mm2: float | None = None,
    type_table: TypeTableLike | None = None,
) -> dict[str, Any]:
    """Counts and densities per type (per mm² of tissue) and mean features of one slide."""
    stats = SlideStats()
    stats.add(nuclei)
    return stats.result(slide_id=slide_id, tissue_mm2=tissue_mm2, type_table=type_table)


class SlideStats:
    """What :func:`slide_stats` reports, summed chunk by chunk: counts per type, and per feature
    column the sum and count of its non-NaN values (a mean of one chunk is numpy's nanmean)."""

    def __init__(self) -> None:
        self.count = 0
        self.type_counts: dict[int, int] = {}
        self.sums: dict[str, float] = {}
        self.finite: dict[str, int] = {}

    def add(self, nuclei: gpd.GeoDataFrame) -> None:
        self.count += len(nuclei)
        types = nuclei["type"].to_numpy() if "type" in nuclei else np.zeros(len(nuclei), int)
        for type_id, n in zip(*np.unique(types, return_counts=True), strict=True):
            self.type_counts[int(type_id)] = self.type_counts.get(int(type_id), 0) + int(n)
        for column in FEATURE_COLUMNS:
            if column not in nuclei:
                continue
            values = nuclei[column].to_numpy(dtype=float)
            present = ~np.isnan(values)
            total = np.sum(np.where(present, values, 0.0))  # numpy's nanmean sums the same way
            self.sums[column] = self.sums.get(column, 0.0) + total
            self.finite[column] = self.finite.get(column, 0) + int(present.sum())

    def result(
        self, *, slide_id: str, tissue_mm2: float | None = None, type_table: TypeTableLike | None = None
    ) -> dict[str, Any]:
        info = type_info(type_table)
        counts: dict[str, int] = {}
        for type_id in sorted(info):
            if type_id != 0:
                counts[info[type_id][0]] = 0
        for type_id in sorted(self.type_counts):
            name = UNCLASSIFIED if type_id == 0 else type_name_and_color(type_id, info)[0]
            counts[name] = counts.get(name, 0) + self.type_counts[type_id]
        area = tissue_mm2 if tissue_mm2 and tissue_mm2 > 0 else None
        means = {
            column: _finite_or_none(float(self.sums[column] / self.finite[column]))
            for column in FEATURE_COLUMNS
            if self.finite.get(column)
        }
        return {
            "slide": slide_id,
            "nuclei": self.count,
            "tissue_mm2": tissue_mm2,
            "counts": counts,
            "density_per_mm2": {k: (v / area if area else None) for k, v in counts.items()},
            "means": means,
        }


SummaryRow = tuple[dict[str, Any], Path | None]  # (flat CSV row, QC picture)


def write_cohort_summary(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    timings: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write ``summary.csv``, the hive dataset ``nuclei/`` and ``report.html`` for a cohort.

    Each row has the pipeline's keys (slide, status, nuclei, seconds, error) and optionally
    ``outputs``: the dict returned by :func:`write_slide_outputs` (plus ``"qc"``). Without it the
    default layout ``out_dir/<slide>/`` is used. ``timings`` (stage -> seconds) go to the report.
    """
    out_dir = Path(out_dir)
    table = [summary_row(row, out_dir) for row in rows]
    return write_summary_files(table, out_dir, timings=timings)


def summary_row(row: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> SummaryRow:
    """One slide's summary row; publishes its Parquet file into the hive dataset ``nuclei/``.

    A run calls this once per finished slide and keeps the row, so that rewriting the summary
    after every slide stays cheap however long the cohort is.
    """
    out_dir = Path(out_dir)
    slide = str(row["slide"])
    outputs = {
        k: Path(v) for k, v in (row.get("outputs") or {}).items() if isinstance(v, str | Path)
    }
    slide_dir = out_dir / _safe_name(slide)
    for key, name in (("parquet", _FILES["parquet"]), ("stats", "stats.json"), ("qc", "qc.png")):
        if key not in outputs and (slide_dir / name).exists():
            outputs[key] = slide_dir / name
    stats = json.loads(outputs["stats"].read_text()) if "stats" in outputs else {}
    if "parquet" in outputs and outputs["parquet"].exists():
        add_to_dataset(outputs["parquet"], out_dir / "nuclei", slide)
    flat = {column: row.get(column) for column in PIPELINE_COLUMNS}
    flat["tissue_mm2"] = stats.get("tissue_mm2")
    for name, n in stats.get("counts", {}).items():
        flat[f"count_{_slug(name)}"] = n
    for name, density in stats.get("density_per_mm2", {}).items():
        flat[f"density_{_slug(name)}_per_mm2"] = density
    for name, mean in stats.get("means", {}).items():
        flat[f"mean_{name}"] = mean
    return flat, outputs.get("qc")


def write_summary_files(
    table: Sequence[SummaryRow],
    out_dir: str | os.PathLike[str],
    *,
    timings: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """``summary.csv`` and ``report.html`` from rows made by :func:`summary_row`."""
    out_dir = Path(out_dir)
    columns = list(dict.fromkeys(c for flat, _ in table for c in flat))
    columns = [*PIPELINE_COLUMNS, *(c for c in columns if c not in PIPELINE_COLUMNS)]
    summary = out_dir / "summary.csv"
    with atomic_path(summary) as tmp, open(tmp, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        for flat, _ in table:
            writer.writerow({k: _csv_value(v) for k, v in flat.items()})
    report = write_report(table, out_dir, timings=timings)
    return {"summary": summary, "dataset": out_dir / "nuclei", "report": report}


def _csv_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "type"


def _safe_name(slide: str) -> str:
    return slide.replace(os.sep, "_")
