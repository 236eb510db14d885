"""GeoParquet 1.1 nuclei tables: one file per slide, and the cohort's hive-partitioned dataset.

The file is written row group by row group with ``pyarrow.parquet.ParquetWriter`` so that only
one row group (~100k rows) is converted to Arrow at a time, and the ``geo`` metadata is built here
rather than by ``GeoDataFrame.to_parquet``, whose default still says version 1.0.0. Rows are
sorted along a Hilbert curve so each row group covers a compact region, which makes the ``bbox``
covering statistics prune row groups for ``geopandas.read_parquet(path, bbox=...)`` and DuckDB
``bbox.xmin <= ...`` predicates. Coordinates are level-0 pixels: ``"crs": null`` says so (a
missing ``crs`` would mean longitude/latitude).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from hoverdask import __version__
from hoverdask.atomic import atomic_path
from hoverdask.export.qupath import nucleus_uuids

ROW_GROUP_SIZE = 100_000
PARTITION_KEY = "slide"
ID_COLUMN = "nucleus_uuid"
_COVERING = {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
             "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}  # fmt: skip


def write_geoparquet(
    nuclei: gpd.GeoDataFrame,
    path: str | os.PathLike[str],
    *,
    slide_id: str | None = None,
    extent: tuple[float, float, float, float] | None = None,
    metadata: dict[str, Any] | None = None,
    row_group_size: int = ROW_GROUP_SIZE,
    compression_level: int = 6,
) -> Path:
    """Write one slide's nuclei as a GeoParquet 1.1.0 file (temp name, then rename).

    Parameters
    ----------
    nuclei
        Nuclei table; needs ``nucleus_id`` and either a ``slide_id`` column or ``slide_id``.
    slide_id
        Overrides/sets the ``slide_id`` column.
    extent
        ``(xmin, ymin, xmax, ymax)`` the Hilbert order spans (the slide's level-0 size is best:
        the order then does not depend on which nuclei were found); default: the data's bounds.
    metadata
        Extra JSON-able values stored under the file's ``hoverdask`` key (mpp, model, ...).
    """
    path = Path(path)
    if "bbox" in nuclei.columns:
        raise ValueError("a column named 'bbox' would clash with the GeoParquet covering column")
    if "nucleus_id" not in nuclei.columns:
        raise ValueError("nuclei table needs a 'nucleus_id' column for deterministic ids")
    if slide_id is None and "slide_id" not in nuclei.columns:
        raise ValueError("pass slide_id= or give the table a 'slide_id' column")
    columns = [c for c in nuclei.columns if c != nuclei.geometry.name]
    geometry = np.asarray(nuclei.geometry.values, dtype=object)

    order = _hilbert_order(geometry, extent)
    geo = _geo_metadata(geometry)
    file_meta = {
        "id_column": ID_COLUMN,
        "coordinates": "level-0 pixels, origin top-left of the top-left pixel, y down",
        "hoverdask_version": __version__,
        **(metadata or {}),
    }
    writer: pq.ParquetWriter | None = None
    with atomic_path(path) as tmp:
        try:
            for start in range(0, max(len(order), 1), row_group_size):
                rows = order[start : start + row_group_size]
                table = _arrow_chunk(nuclei.iloc[rows][columns], geometry[rows], slide_id)
                if writer is None:
                    schema = table.schema.with_metadata({
                        b"geo": json.dumps(geo).encode(),
                        b"hoverdask": json.dumps(file_meta).encode(),
                    })
                    writer = pq.ParquetWriter(
                        tmp, schema, compression="zstd", compression_level=compression_level
                    )
                writer.write_table(table.cast(writer.schema), row_group_size=row_group_size)
        finally:
            if writer is not None and writer.is_open:
                writer.close()  # before the rename: the footer must be on disk
    return path


def _hilbert_order(geometry: np.ndarray, extent: tuple[float, ...] | None) -> np.ndarray:
    if len(geometry) == 0:
        return np.arange(0)
    series = gpd.GeoSeries(geometry, crs=None)
    bounds = extent if extent is not None else tuple(series.total_bounds)
    return np.argsort(series.hilbert_distance(total_bounds=bounds).to_numpy(), kind="stable")


def _geo_metadata(geometry: np.ndarray) -> dict[str, Any]:
    type_ids = set(shapely.get_type_id(geometry).tolist()) - {-1}
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted(_GEOMETRY_NAMES[t] for t in type_ids),
        "crs": None,
        "edges": "planar",
        "covering": {"bbox": _COVERING},
    }
    if len(geometry):
        column["bbox"] = [float(v) for v in shapely.total_bounds(geometry)]
    return {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {"geometry": column},
        "creator": {"library": "hoverdask", "version": __version__},
    }


_GEOMETRY_NAMES = {0: "Point", 1: "LineString", 2: "LineString", 3: "Polygon", 4: "MultiPoint",
                   5: "MultiLineString", 6: "MultiPolygon", 7: "GeometryCollection"}  # fmt: skip


def _arrow_chunk(frame: Any, geometry: np.ndarray, slide_id: str | None) -> pa.Table:
    """One row group: the table's columns, ``nucleus_uuid``, WKB geometry and bbox covering.

    Converting chunk by chunk keeps the writer's extra memory at one row group."""
    frame = pd.DataFrame(frame)
    if slide_id is not None:
        frame["slide_id"] = slide_id
    frame["slide_id"] = frame["slide_id"].astype("string")
    frame[ID_COLUMN] = pd.array(nucleus_uuids(frame["slide_id"], frame["nucleus_id"]), "string")
    table = pa.Table.from_pandas(frame, preserve_index=False)
    bounds = shapely.bounds(geometry)
    bbox = pa.StructArray.from_arrays(
        [pa.array(bounds[:, i], pa.float64()) for i in range(4)],
        names=["xmin", "ymin", "xmax", "ymax"],
    )
    wkb = pa.array(shapely.to_wkb(geometry, output_dimension=2), pa.binary())
    return table.append_column("geometry", wkb).append_column("bbox", bbox)


def partition_dir(dataset_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """``DATASET/slide=<id>``, the id percent-encoded as pyarrow's hive reader expects."""
    return Path(dataset_dir) / f"{PARTITION_KEY}={quote(str(slide_id), safe='')}"


def add_to_dataset(
    parquet: str | os.PathLike[str], dataset_dir: str | os.PathLike[str], slide_id: str
) -> Path:
    """Publish a slide's file as ``DATASET/slide=<id>/part-0.parquet`` (hard link, else copy)."""
    target = partition_dir(dataset_dir, slide_id) / "part-0.parquet"
    with atomic_path(target) as tmp:
        tmp.unlink()  # a hard link needs a free name
        try:
            os.link(parquet, tmp)
        except OSError:
            shutil.copyfile(parquet, tmp)
    return target
