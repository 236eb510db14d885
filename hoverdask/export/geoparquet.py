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
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from hoverdask.core.atomic import atomic_path
from hoverdask.core.version import __version__
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
    check_columns(nuclei.columns, slide_id)
    geometry = np.asarray(nuclei.geometry.values, dtype=object)
    order = _hilbert_order(geometry, extent)
    geo = geo_metadata(
        set(shapely.get_type_id(geometry).tolist()),
        shapely.total_bounds(geometry) if len(geometry) else None,
    )
    with GeoParquetStream(path, geo=geo, slide_id=slide_id, metadata=metadata,
                          row_group_size=row_group_size,
                          compression_level=compression_level) as stream:  # fmt: skip
        for start in range(0, max(len(order), 1), row_group_size):
            stream.write(nuclei.iloc[order[start : start + row_group_size]])
    return Path(path)


def check_columns(columns: Any, slide_id: str | None) -> None:
    """The columns a file needs (ids) and must not have (a clash with the covering column)."""
    if "bbox" in columns:
        raise ValueError("a column named 'bbox' would clash with the GeoParquet covering column")
    if "nucleus_id" not in columns:
        raise ValueError("nuclei table needs a 'nucleus_id' column for deterministic ids")
    if slide_id is None and "slide_id" not in columns:
        raise ValueError("pass slide_id= or give the table a 'slide_id' column")


class GeoParquetStream:
    """A GeoParquet file written from row chunks of any size (temp name, renamed on success).

    Chunks are converted to Arrow as they come and written as row groups of ``row_group_size``
    rows, so a caller streaming a slide holds one row group in Arrow form, not in pandas. The
    ``geo`` metadata (geometry types, file bbox) is in the schema before the first row group:
    callers that stream a slide compute it in a first, cheap pass over their parts.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        geo: dict[str, Any],
        slide_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        row_group_size: int = ROW_GROUP_SIZE,
        compression_level: int = 6,
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id
        self.row_group_size = row_group_size
        self.compression_level = compression_level
        self.file_metadata = {
            b"geo": json.dumps(geo).encode(),
            b"hoverdask": json.dumps({
                "id_column": ID_COLUMN,
                "coordinates": "level-0 pixels, origin top-left of the top-left pixel, y down",
                "hoverdask_version": __version__,
                **(metadata or {}),
            }).encode(),
        }  # fmt: skip
        self._stack = ExitStack()
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def __enter__(self) -> Self:
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        return self

    def write(self, nuclei: gpd.GeoDataFrame) -> None:
        """Append the rows of ``nuclei`` (any number)."""
        columns = [c for c in nuclei.columns if c != nuclei.geometry.name]
        geometry = np.asarray(nuclei.geometry.values, dtype=object)
        table = _arrow_chunk(nuclei[columns], geometry, self.slide_id)
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self._tmp, table.schema.with_metadata(self.file_metadata), compression="zstd",
                compression_level=self.compression_level,
            )  # fmt: skip
            self._stack.callback(self._writer.close)  # before the rename: the footer goes first
        self._pending.append(table.cast(self._writer.schema))
        self._pending_rows += len(table)
        while self._pending_rows >= self.row_group_size:
            self._write_row_group(self.row_group_size)

    def _write_row_group(self, rows: int) -> None:
        assert self._writer is not None
        pending = pa.concat_tables(self._pending)
        self._writer.write_table(pending.slice(0, rows), row_group_size=max(rows, 1))
        rest = pending.slice(rows)
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def __exit__(self, *exc: object) -> bool | None:
        if exc[0] is None and self._pending:  # the last, partial row group
            try:
                self._write_row_group(self._pending_rows)
            except BaseException as error:
                self._stack.__exit__(type(error), error, error.__traceback__)
                raise
        return self._stack.__exit__(*exc)


def _hilbert_order(geometry: np.ndarray, extent: tuple[float, ...] | None) -> np.ndarray:
    if len(geometry) == 0:
        return np.arange(0)
    bounds = extent if extent is not None else tuple(gpd.GeoSeries(geometry).total_bounds)
    return np.argsort(hilbert_distances(geometry, bounds), kind="stable")


def hilbert_distances(geometry: np.ndarray, bounds: tuple[float, ...]) -> np.ndarray:
    """Each geometry's distance along the Hilbert curve spanning ``bounds`` (geopandas' key).

    One geometry's distance depends on itself and ``bounds`` only, so parts of a slide get the
    distances the whole table would."""
    series = gpd.GeoSeries(geometry, crs=None)
    return series.hilbert_distance(total_bounds=bounds).to_numpy()


def geo_metadata(type_ids: set[int], bounds: Any) -> dict[str, Any]:
    """The ``geo`` key: GeoParquet 1.1 with a bbox covering; ``bounds`` None for no rows."""
    type_ids = set(type_ids) - {-1}
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": sorted(_GEOMETRY_NAMES[t] for t in type_ids),
        "crs": None,
        "edges": "planar",
        "covering": {"bbox": _COVERING},
    }
    if bounds is not None:
        column["bbox"] = [float(v) for v in bounds]
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
