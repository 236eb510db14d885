"""QuPath GeoJSON: one ``detection`` (or ``cell``) per nucleus, streamed to a (gzip) file.

Table coordinates already follow QuPath's convention (continuous level-0 pixels, origin at the
top-left corner of the top-left pixel; see :mod:`hoverdask.core.schema`), so no half-pixel shift is
applied here; ``offset`` subtracts an OpenSlide bounds origin when QuPath crops to it.
QuPath snaps imported geometry to a 0.01-px grid and rejects the whole file when one polygon is
invalid after that, so coordinates are rounded to 0.01 px here and any polygon that the rounding
makes invalid is snap-rounded with ``shapely.set_precision`` (largest part kept). Features are
written chunk by chunk to the output stream: memory depends on the chunk size, not on the slide.
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, Self

import geopandas as gpd
import numpy as np
import shapely

from hoverdask.core.atomic import atomic_path
from hoverdask.core.types import TypeTableLike
from hoverdask.nuclei.features import type_info, type_name_and_color

NUCLEUS_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "hoverdask.nucleus")
CHUNK_SIZE = 10_000
DECIMALS = 2  # QuPath's 0.01-px precision grid
MEASUREMENT_DECIMALS = 4

MEASUREMENT_NAMES: dict[str, str] = {
    "area_um2": "Nucleus: Area µm^2",
    "perimeter_um": "Nucleus: Perimeter µm",
    "eq_diameter_um": "Nucleus: Equivalent diameter µm",
    "major_axis_um": "Nucleus: Major axis µm",
    "minor_axis_um": "Nucleus: Minor axis µm",
    "eccentricity": "Nucleus: Eccentricity",
    "solidity": "Nucleus: Solidity",
    "extent": "Nucleus: Extent",
    "circularity": "Nucleus: Circularity",
    "orientation_deg": "Nucleus: Orientation °",
    "h_od_mean": "Nucleus: Hematoxylin OD mean",
    "h_od_std": "Nucleus: Hematoxylin OD std dev",
    "e_od_mean": "Nucleus: Eosin OD mean",
    "e_od_std": "Nucleus: Eosin OD std dev",
    "r_mean": "Nucleus: Red mean",
    "g_mean": "Nucleus: Green mean",
    "b_mean": "Nucleus: Blue mean",
    "area_px": "Nucleus: Area px (processing)",
    "type_prob": "HoVer-Net: Type probability",
}
"""Table column -> QuPath measurement name (``"<Compartment>: <Feature> <unit>"``)."""


def nucleus_uuids(slide_ids: Iterable[Any], nucleus_ids: Iterable[Any]) -> list[str]:
    """Deterministic UUIDs: the same nucleus gets the same id in Parquet and GeoJSON, every run."""
    return [
        str(uuid.uuid5(NUCLEUS_NAMESPACE, f"{slide}/{int(nid)}"))
        for slide, nid in zip(slide_ids, nucleus_ids, strict=True)
    ]


def write_qupath(
    nuclei: gpd.GeoDataFrame,
    path: str | os.PathLike[str],
    *,
    slide_id: str | None = None,
    type_table: TypeTableLike | None = None,
    as_cells: bool = False,
    cell_expansion_px: float = 0.0,
    offset: tuple[float, float] = (0.0, 0.0),
    chunk_size: int = CHUNK_SIZE,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Write a QuPath-importable FeatureCollection; ``.gz`` suffix means gzip. Returns the count.

    Parameters
    ----------
    nuclei
        Nuclei table (level-0 px) with ``nucleus_id``; feature columns become measurements.
    slide_id
        Slide id for the ids and metadata (default: the table's ``slide_id`` column).
    type_table
        Type names/colours; type 0 (or a table without types) gives unclassified objects.
    as_cells
        Write ``cell`` objects: nucleus as ``nucleusGeometry``, cell = nucleus grown by
        ``cell_expansion_px`` and clipped to the Voronoi region of its centroid.
    offset
        Subtracted from every coordinate (OpenSlide ``bounds-x/y`` for cropped formats).
    metadata
        JSON-able provenance (slide, mpp, model and its licence), stored as the collection's
        ``hoverdask`` member (a GeoJSON foreign member: QuPath reads only the features).
    """
    if "nucleus_id" not in nuclei.columns:
        raise ValueError("nuclei table needs a 'nucleus_id' column for deterministic ids")
    if slide_id is None and "slide_id" not in nuclei.columns:
        raise ValueError("pass slide_id= or give the table a 'slide_id' column")
    cells = None
    if as_cells:
        shifted = _shifted(np.asarray(nuclei.geometry.values, dtype=object), offset)
        cells = _expand_cells(shifted, cell_expansion_px)
    with QuPathStream(path, slide_id=slide_id, type_table=type_table, offset=offset,
                      chunk_size=chunk_size, metadata=metadata) as stream:  # fmt: skip
        stream.write(nuclei, cells)
    return stream.written


class QuPathStream:
    """A QuPath FeatureCollection written table chunk by table chunk (temp name, then rename).

    Each feature depends on its own row only, so a slide written part by part gives the same
    features as the whole table; a warning at the end counts the nuclei rounding removed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        slide_id: str | None = None,
        type_table: TypeTableLike | None = None,
        offset: tuple[float, float] = (0.0, 0.0),
        chunk_size: int = CHUNK_SIZE,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self.slide_id = slide_id
        self.info = type_info(type_table)
        self.offset = offset
        self.chunk_size = chunk_size
        self.written = self.dropped = 0
        self._stack = ExitStack()
        self._stream: IO[str] | None = None

    def __enter__(self) -> Self:
        self._stream = self._stack.enter_context(_atomic_text(self.path))
        head = '{"type":"FeatureCollection",'
        if self.metadata:
            head += f'"hoverdask":{json.dumps(self.metadata, separators=(",", ":"))},'
        self._stream.write(head + '"features":[')
        return self

    def write(self, nuclei: gpd.GeoDataFrame, cells: np.ndarray | None = None) -> None:
        """Append the features of ``nuclei`` (``cells``: their cell outlines, for cell objects)."""
        assert self._stream is not None, "use QuPathStream as a context manager"
        geoms = _shifted(np.asarray(nuclei.geometry.values, dtype=object), self.offset)
        for start in range(0, len(nuclei), self.chunk_size):
            stop = start + self.chunk_size
            features = _chunk_features(
                nuclei.iloc[start:stop],
                geoms[start:stop],
                None if cells is None else cells[start:stop],
                self.slide_id,
                self.info,
            )
            for text in features:
                if text is None:
                    self.dropped += 1
                    continue
                self._stream.write("," if self.written else "")
                self._stream.write(text)
                self.written += 1

    def __exit__(self, *exc: object) -> bool | None:
        if exc[0] is None and self._stream is not None:
            self._stream.write("]}\n")
        suppressed = self._stack.__exit__(*exc)
        if exc[0] is None and self.dropped:
            warnings.warn(
                f"{self.dropped} nuclei vanished when rounded to 0.01 px and were not written to "
                f"{self.path}",
                stacklevel=2,
            )
        return suppressed


def _shifted(geoms: np.ndarray, offset: tuple[float, float]) -> np.ndarray:
    if any(offset):
        return shapely.transform(geoms, lambda xy: xy - np.asarray(offset))
    return geoms


@contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    """A text stream to a temp file that becomes ``path`` only if writing finished."""
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as stream:
                yield stream
        else:
            with open(tmp, "w", encoding="utf-8") as stream:
                yield stream


def qupath_geometry(geoms: np.ndarray) -> np.ndarray:
    """Round to the 0.01-px grid and keep every polygon valid after rounding.

    Returns Polygons, MultiPolygons where snap-rounding or repairing an invalid input pinched a
    polygon into parts (QuPath reads those for any object type), ``None`` where one collapsed.
    """
    rounded = shapely.transform(geoms, lambda xy: np.round(xy, DECIMALS))
    bad = ~shapely.is_valid(rounded) | shapely.is_empty(rounded)
    if bad.any():
        rounded[bad] = shapely.set_precision(shapely.make_valid(geoms[bad]), 10.0**-DECIMALS)
    out = np.empty(len(rounded), dtype=object)
    for i, geom in enumerate(rounded):
        if geom is None or geom.is_empty:
            out[i] = None
        elif geom.geom_type == "Polygon":
            out[i] = geom
        else:
            parts = [g for g in shapely.get_parts(shapely.get_parts(geom)) if g.area > 0]
            if len(parts) > 1:
                out[i] = shapely.MultiPolygon(parts)
            else:
                out[i] = parts[0] if parts else None
    return out


def _expand_cells(nuclei: np.ndarray, distance: float) -> np.ndarray:
    """Nucleus grown by ``distance`` px, limited to its centroid's Voronoi region."""
    centroids = shapely.centroid(nuclei)
    regions = shapely.voronoi_polygons(shapely.multipoints(centroids), ordered=True)
    regions = np.asarray(shapely.get_parts(regions), dtype=object)
    if len(regions) != len(nuclei):  # GEOS merges duplicate sites
        raise ValueError("cell expansion needs distinct nucleus centroids")
    grown = shapely.intersection(shapely.buffer(nuclei, distance), regions)
    return shapely.make_valid(shapely.union(grown, nuclei))


def _chunk_features(
    chunk: gpd.GeoDataFrame,
    nuclei_geoms: np.ndarray,
    cell_geoms: np.ndarray | None,
    slide_id: str | None,
    info: dict[int, tuple[str, tuple[int, int, int]]],
) -> Iterator[str | None]:
    slides = chunk["slide_id"].to_numpy() if slide_id is None else [slide_id] * len(chunk)
    nucleus_ids = chunk["nucleus_id"].to_numpy()
    ids = nucleus_uuids(slides, nucleus_ids)
    nucleus_json = _geojson(qupath_geometry(nuclei_geoms))
    cell_json = None if cell_geoms is None else _geojson(qupath_geometry(cell_geoms))
    types = chunk["type"].to_numpy() if "type" in chunk else np.zeros(len(chunk), int)
    columns = [c for c in MEASUREMENT_NAMES if c in chunk.columns]
    table = chunk[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(table).tolist()
    values = np.round(table, MEASUREMENT_DECIMALS).tolist()  # Python floats: shortest repr
    names = [json.dumps(MEASUREMENT_NAMES[c]) for c in columns]
    classes = {
        int(t): json.dumps({"name": n, "color": list(c)})
        for t in np.unique(types)
        if t != 0
        for n, c in [type_name_and_color(int(t), info)]
    }
    object_type = "cell" if cell_json is not None else "detection"
    for i in range(len(chunk)):
        nucleus = nucleus_json[i]
        cell = None if cell_json is None else cell_json[i]
        if nucleus is None or (cell_json is not None and cell is None):
            yield None
            continue
        measurements = ",".join(
            f"{names[j]}:{values[i][j]!r}" for j in range(len(columns)) if finite[i][j]
        )
        klass = classes.get(int(types[i]))
        props = f'"objectType":"{object_type}"'
        if klass is not None:
            props += f',"classification":{klass}'
        props += f',"measurements":{{{measurements}}}'
        props += f',"metadata":{{"hoverdask_id":{json.dumps(f"{slides[i]}/{nucleus_ids[i]}")}}}'
        if cell is None:
            geometry = f'"geometry":{nucleus}'
        else:
            geometry = f'"geometry":{cell},"nucleusGeometry":{nucleus}'
        yield f'{{"type":"Feature","id":"{ids[i]}",{geometry},"properties":{{{props}}}}}'


def _geojson(geoms: np.ndarray) -> list[str | None]:
    present = np.array([g is not None for g in geoms], dtype=bool)
    out: list[str | None] = [None] * len(geoms)
    if present.any():
        texts = shapely.to_geojson(geoms[present])
        for i, text in zip(np.flatnonzero(present), texts, strict=True):
            out[i] = text
    return out
