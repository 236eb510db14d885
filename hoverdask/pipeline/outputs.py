"""The files a run leaves: per slide ``nuclei.parquet`` (+ QuPath, stats, QC), ``run.json``;
``summary.csv`` for the cohort. The file formats are :mod:`hoverdask.export`'s.

Nucleus ids are the seam rule's (``y * W + x`` of the nucleus's first pixel at processing
resolution) and rows are sorted by them, so the table does not depend on the number of workers
or the order tasks finished in.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoverdask.core.atomic import atomic_write_json
from hoverdask.core.schema import PIPELINE_COLUMNS
from hoverdask.export import write_qc_picture, write_slide_outputs
from hoverdask.export.parts import SlideParts
from hoverdask.export.qc import QcDots, write_qc_picture_dots
from hoverdask.export.summary import (
    summary_row,
    write_slide_outputs_from_parts,
    write_summary_files,
)
from hoverdask.nuclei.features import type_info
from hoverdask.pipeline.ledger import saved_tissue

if TYPE_CHECKING:
    import geopandas as gpd

    from hoverdask.pipeline.plan import SlidePlan
    from hoverdask.pipeline.spec import RunOptions



def finish_slide(
    plan: SlidePlan, table: gpd.GeoDataFrame, formats: tuple[str, ...], *, oversized: list[Any],
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Order the slide's nuclei, write its files (Parquet, QuPath, stats, QC picture).

    The whole table in memory: :func:`finish_slide_parts` writes the same files from the parts.
    """
    table = table.sort_values("nucleus_id", kind="stable").reset_index(drop=True)
    table = slide_rows(table, plan.slide_id)
    written = write_slide_outputs(
        table, plan.slide_dir, slide_id=plan.slide_id, formats=formats,
        type_table=plan.type_table, tissue_mm2=plan.tissue_mm2, extent=plan.extent,
        metadata=_file_metadata(plan, model),
    )
    files = {key: str(path) for key, path in written.items()}
    tissue = saved_tissue(plan.ledger)
    if tissue is not None:
        qc = write_qc_picture(tissue["thumbnail"], tissue["mask"], table, _qc_path(plan),
                              downsample=float(tissue["thumbnail_downsample"]),
                              type_table=plan.type_table)  # fmt: skip
        files["qc"] = str(qc)
    return _outcome(len(table), files, oversized)


def finish_slide_parts(
    plan: SlidePlan, parts: SlideParts, formats: tuple[str, ...], *, oversized: list[Any],
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`finish_slide` from the slide's block parts, one row group in memory at a time.

    ``parts`` comes from :func:`hoverdask.export.parts.index_parts` with the plan's extent. The
    Parquet file, ``stats.json`` and ``qc.png`` are those of :func:`finish_slide`; the QuPath
    file has the same features in the Parquet file's row order.
    """
    tissue = saved_tissue(plan.ledger)
    dots = None
    if tissue is not None:
        dots = QcDots(tissue["thumbnail"].shape[:2], median_area=parts.median_area,
                      downsample=float(tissue["thumbnail_downsample"]))  # fmt: skip
    written = write_slide_outputs_from_parts(
        parts, plan.slide_dir, slide_id=plan.slide_id, formats=formats,
        type_table=plan.type_table, tissue_mm2=plan.tissue_mm2,
        metadata=_file_metadata(plan, model), prepare=functools.partial(slide_rows, slide_id=plan.slide_id),
        also=[dots.add] if dots is not None else [],
    )
    files = {key: str(path) for key, path in written.items()}
    if dots is not None:
        qc = write_qc_picture_dots(tissue["thumbnail"], tissue["mask"], dots, _qc_path(plan),
                                   type_table=plan.type_table)  # fmt: skip
        files["qc"] = str(qc)
    return _outcome(len(parts), files, oversized)


def slide_rows(table: gpd.GeoDataFrame, slide_id: str) -> gpd.GeoDataFrame:
    """The slide's id on every row, the pipeline's columns first (rows as they are)."""
    table["slide_id"] = pd_string(slide_id, len(table))
    front = [c for c in PIPELINE_COLUMNS if c in table.columns]
    return table[front + [c for c in table.columns if c not in front]]


def _qc_path(plan: SlidePlan) -> Path:
    return Path(plan.slide_dir) / "qc.png"


def _outcome(nuclei: int, files: dict[str, str], oversized: list[Any]) -> dict[str, Any]:
    return {"nuclei": nuclei, "files": files, "counts": {"oversized_clusters": len(oversized)}}


def _file_metadata(plan: SlidePlan, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the Parquet and GeoJSON files say about where their nuclei come from: the slide, its
    pixel size and the model (name, sha256, licence: a model's licence binds its outputs' use)."""
    metadata: dict[str, Any] = {"mpp": plan.slide_mpp, "scale": plan.scale,
                                "slide": plan.slide_path}
    if model is not None:
        metadata["model"] = {k: model.get(k) for k in MODEL_FIELDS if k in model}
    return metadata


MODEL_FIELDS = ("name", "sha256", "mode", "nr_types", "licence")


def pd_string(value: str, n: int) -> Any:
    import pandas as pd

    return pd.array([value] * n, dtype="string")


def write_run_record(
    plan: SlidePlan,
    model: dict[str, Any],
    options: RunOptions,
    outcome: dict[str, Any],
    seconds: float,
    *,
    bench: dict[str, Any] | None = None,
) -> None:
    """run.json, written last: its ``"status": "ok"`` is what marks the slide finished."""
    from dataclasses import asdict

    record = {
        "status": "ok",
        "slide": plan.slide_path,
        "slide_id": plan.slide_id,
        "model": model,
        "parameters": {**asdict(options), **plan.params},
        "versions": dict(versions()),
        "timings_s": {key: round(float(value), 3) for key, value in
                      {"wall": seconds, **outcome.get("timings_s", {})}.items()},
        "counts": {
            "nuclei": int(outcome["nuclei"]),
            "map_tiles": plan.grid.shape[0] * plan.grid.shape[1],
            "tissue_tiles": len(plan.tissue_tiles),
            **outcome.get("counts", {}),
        },
        "inference_busy_fraction": outcome.get("inference_busy_fraction"),
        "breakdown": outcome.get("breakdown"),  # see hoverdask.pipeline.breakdown
        "types": _types_json(plan.type_table),  # names and colours, for the report
        "files": outcome.get("files", []),
        "bench": bench,
    }
    atomic_write_json(plan.ledger.run_path, record)


def _types_json(type_table: Any) -> dict[str, Any] | None:
    """``{"<id>": {"name": ..., "color": [r, g, b]}}`` of the run's type table (None: none)."""
    if type_table is None:
        return None
    return {str(k): {"name": name, "color": list(color)}
            for k, (name, color) in sorted(type_info(type_table).items())}


@functools.cache
def versions() -> dict[str, str]:
    """Versions of the packages that shape results (looked up once: metadata scans are slow)."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("hoverdask", "torch", "dask", "distributed", "zarr", "tiffslide", "numpy",
                 "scikit-image", "opencv-python-headless", "geopandas", "shapely"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


class CohortSummary:
    """``summary.csv`` and ``report.html``, rewritten atomically as slides finish.

    Each slide's row is made once (reading its stats, publishing its Parquet file into the hive
    dataset), so a rewrite costs the same for the thousandth slide as for the first.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows: dict[str, Any] = {}

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite the files for ``rows`` (one per slide with a result, in cohort order)."""
        table = []
        for row in rows:
            key = f"{row['slide']}\0{row['status']}"
            if key not in self.rows:
                self.rows[key] = summary_row(row, self.out_dir)
            table.append(self.rows[key])
        write_summary_files(table, self.out_dir)
