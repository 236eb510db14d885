"""A slide's nuclei kept as Parquet parts (one per post-processing block), read back for export
one row group at a time, so writing a slide's files never holds its whole table.

The whole-table writers sort the concatenated parts by ``nucleus_id`` and then (stably) by the
Hilbert distance of each nucleus over the slide extent. Both keys are per nucleus, so a first
pass reads only ``nucleus_id`` and the geometry of each part and keeps a few numbers per nucleus
(the keys, then just part and row); the rows of each row group are then gathered from the parts
they live in, which are read as Arrow tables through a small least-recently-used cache (the
Hilbert order is spatially compact, so consecutive row groups mostly need the same blocks).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from hoverdask.export.geoparquet import ROW_GROUP_SIZE, geo_metadata, hilbert_distances

GEOMETRY = "geometry"
CACHE_ROWS = 30_000  # a few blocks around the rows being gathered


@dataclass(frozen=True)
class SlideParts:
    """Where each row of the slide's files lives: ``part[i]``, ``row[i]`` for file row ``i``."""

    paths: tuple[Path, ...]
    part: np.ndarray
    row: np.ndarray
    geometry_types: frozenset[int]
    bounds: tuple[float, float, float, float]
    median_area: float

    def __len__(self) -> int:
        return len(self.part)

    def geo_metadata(self) -> dict[str, Any]:
        return geo_metadata(set(self.geometry_types), self.bounds)

    def chunks(
        self, size: int = ROW_GROUP_SIZE, *, cache_rows: int = CACHE_ROWS
    ) -> Iterator[gpd.GeoDataFrame]:
        """The table in file order, ``size`` rows at a time, as the whole table's rows would be."""
        cache = _PartCache(self.paths, cache_rows)
        pool = pa.default_memory_pool()
        for start in range(0, len(self), size):
            # Arrow's allocator keeps freed pages; handing them back keeps the RSS flat too
            pool.release_unused()
            yield _gather(cache, self.part[start : start + size], self.row[start : start + size])


def index_parts(
    paths: Iterable[str | os.PathLike[str]],
    *,
    extent: tuple[float, float, float, float] | None = None,
) -> SlideParts | None:
    """Order the rows of the parts as the whole-table writers would (``extent`` as theirs).

    Returns None when only the whole table can reproduce the files: no nuclei at all, parts
    whose columns differ (concatenating them would align and upcast columns) or that lack the
    geometry or ``nucleus_id`` (the whole-table writers say what is wrong).
    """
    paths = tuple(Path(p) for p in paths)
    footers = [pq.read_metadata(p) for p in paths]  # row counts and schemas: one read per part
    used = tuple(p for p, meta in zip(paths, footers, strict=True) if meta.num_rows)
    schemas = [meta.schema.to_arrow_schema() for meta in footers if meta.num_rows]
    if not used or not _same_columns(schemas):
        return None
    lengths = np.array([meta.num_rows for meta in footers if meta.num_rows], dtype=np.int64)
    ends = np.cumsum(lengths)
    ids = np.empty(ends[-1], np.int64)
    distances = np.empty(ends[-1], np.uint32)  # geopandas' level-16 curve: 32 bits
    areas = np.empty(ends[-1], np.float64)
    geometry_types: set[int] = set()
    bounds = np.full(4, np.nan)
    pool = pa.default_memory_pool()
    for path, stop, n in zip(used, ends, lengths, strict=True):
        rows = slice(stop - n, stop)
        table = pq.read_table(path, columns=[GEOMETRY, "nucleus_id"])
        geometry = shapely.from_wkb(np.array(table[GEOMETRY]))
        geometry_types |= set(shapely.get_type_id(geometry).tolist())
        bounds = _union_bounds(bounds, shapely.total_bounds(geometry))
        np.copyto(ids[rows], table["nucleus_id"].to_numpy(), casting="safe")
        areas[rows] = shapely.area(geometry)
        if extent is not None:
            np.copyto(distances[rows], hilbert_distances(geometry, extent), casting="safe")
        del table, geometry
        pool.release_unused()  # Arrow's allocator would keep every part's pages
    if extent is None:  # the curve spans the data: a second pass once the bounds are known
        for path, stop, n in zip(used, ends, lengths, strict=True):
            np.copyto(distances[stop - n : stop], hilbert_distances(_geometry(path), tuple(bounds)),
                      casting="safe")
    median_area = float(np.median(areas, overwrite_input=True))  # the QC picture's dot size
    del areas
    # stable sorts by nucleus_id, then distance == lexsort (ties keep the concatenation order)
    order = np.lexsort((ids, distances))
    del ids, distances
    part = np.searchsorted(ends, order, side="right").astype(np.int32)
    order -= (ends - lengths)[part]  # -> row within the part
    return SlideParts(
        paths=used,
        part=part,
        row=order.astype(np.int32),
        geometry_types=frozenset(geometry_types),
        bounds=tuple(float(v) for v in bounds),  # type: ignore[arg-type]
        median_area=median_area,
    )


def _geometry(path: Path) -> np.ndarray:
    return shapely.from_wkb(np.array(pq.read_table(path, columns=[GEOMETRY])[GEOMETRY]))


def _union_bounds(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bounds of both (NaN bounds, those of empty geometry, count as no bounds)."""
    return np.concatenate([np.fmin(a[:2], b[:2]), np.fmax(a[2:], b[2:])])


def _same_columns(schemas: Sequence[pa.Schema]) -> bool:
    first = schemas[0].remove_metadata()
    keys = {GEOMETRY, "nucleus_id"} <= set(first.names)  # else the writers' own errors
    return keys and all(s.remove_metadata().equals(first) for s in schemas[1:])


class _PartCache:
    """Parts as Arrow tables, the least recently used dropped beyond ``max_rows`` rows."""

    def __init__(self, paths: Sequence[Path], max_rows: int) -> None:
        self.paths = paths
        self.max_rows = max_rows
        self.tables: OrderedDict[int, pa.Table] = OrderedDict()

    def get(self, index: int) -> pa.Table:
        if index in self.tables:
            self.tables.move_to_end(index)
            return self.tables[index]
        table = pq.read_table(self.paths[index])
        self.tables[index] = table
        while len(self.tables) > 1 and sum(t.num_rows for t in self.tables.values()) > self.max_rows:
            self.tables.popitem(last=False)
        return table


def _gather(cache: _PartCache, part: np.ndarray, row: np.ndarray) -> gpd.GeoDataFrame:
    """Rows ``row`` of parts ``part`` in the given order (a function: its temporaries go)."""
    pieces, positions = [], []
    for index in np.unique(part):
        here = np.flatnonzero(part == index)
        pieces.append(cache.get(int(index)).take(pa.array(row[here])))
        positions.append(here)
    in_order = np.argsort(np.concatenate(positions), kind="stable")
    return _to_geodataframe(pa.concat_tables(pieces).take(pa.array(in_order)))


def _to_geodataframe(table: pa.Table) -> gpd.GeoDataFrame:
    """Arrow rows of the parts -> the frame ``geopandas.read_parquet`` makes of them."""
    columns = table.column_names
    frame = table.drop_columns([GEOMETRY]).to_pandas()
    geometry = gpd.array.from_wkb(np.array(table[GEOMETRY]))
    frame.insert(columns.index(GEOMETRY), GEOMETRY, geometry)
    return gpd.GeoDataFrame(frame, geometry=GEOMETRY)
