"""Check a GeoJSON file against the rules QuPath (0.4-0.7) applies when importing objects.

QuPath's reader has no per-feature error handling: one unparsable classification or unclosed ring
aborts the whole import, and several mistakes (unknown ``objectType``, non-UUID ``id``) are
silently turned into something else (annotations, fresh random ids). Every rule in
``docs/outputs.md`` "QuPath import rules" is checked here, so tests and users can catch both kinds
before opening QuPath.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely

from hoverdask.core.errors import HoverdaskError

OBJECT_TYPES = frozenset({"detection", "cell", "tile", "tmaCore", "tma_core", "annotation", "root"})
GEOMETRY_TYPES = frozenset(
    {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
     "GeometryCollection"}
)  # fmt: skip
GRID = 0.01  # QuPath's PrecisionModel(-0.01)
_BATCH = 10_000
READ_SIZE = 1 << 20  # characters per read; a value longer than that doubles it


class UnreadableGeoJSON(HoverdaskError):
    """The file cannot be opened or is not JSON."""


@dataclass
class Problem:
    index: int | None  # feature index in the file, None for the file itself
    message: str

    def __str__(self) -> str:
        where = "file" if self.index is None else f"feature {self.index}"
        return f"{where}: {self.message}"


@dataclass
class ValidationReport:
    count: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0


class _Constant:
    """Marker for the non-JSON literals NaN/Infinity that Python's parser would accept."""

    def __init__(self, text: str) -> None:
        self.text = text


def validate_qupath(path: str | Path, *, max_problems: int = 20) -> ValidationReport:
    """Validate a ``.geojson``/``.json`` (optionally gzip) file; keep the first ``max_problems``.

    The file is read as a stream, one feature at a time, so that files of millions of nuclei
    can be checked in bounded memory (ids are kept as 16-byte integers for the duplicate check).
    """
    path = Path(path)
    report = ValidationReport()

    def add(index: int | None, message: str) -> None:
        report.problem_count += 1
        if len(report.problems) < max_problems:
            report.problems.append(Problem(index, message))

    ids = _IdLog()
    geometries: list[tuple[int, str, Any]] = []
    try:
        with _open_text(path) as stream:
            for index, feature in enumerate(_iter_features(_Reader(stream), add)):
                report.count += 1
                _check_feature(index, feature, add, ids, geometries)
                if len(geometries) >= _BATCH:
                    _check_geometry_validity(geometries, add)
                    geometries.clear()
    except (OSError, UnicodeDecodeError, EOFError, json.JSONDecodeError) as err:
        raise UnreadableGeoJSON(f"cannot read {path} as (gzip) JSON: {err}") from err
    _check_geometry_validity(geometries, add)
    for index, first in ids.duplicates():
        add(index, f"duplicate id (same as feature {first})")
    return report


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


class _IdLog:
    """Feature ids as (high, low) 64-bit halves: 16 bytes per nucleus for the duplicate check."""

    def __init__(self) -> None:
        self.high, self.low, self.index = array("Q"), array("Q"), array("q")

    def add(self, index: int, value: uuid.UUID) -> None:
        self.high.append(value.int >> 64)
        self.low.append(value.int & 0xFFFFFFFFFFFFFFFF)
        self.index.append(index)

    def duplicates(self) -> list[tuple[int, int]]:
        high, low = np.frombuffer(self.high, np.uint64), np.frombuffer(self.low, np.uint64)
        index = np.frombuffer(self.index, np.int64)
        order = np.lexsort((index, low, high))
        same = (high[order][1:] == high[order][:-1]) & (low[order][1:] == low[order][:-1])
        out = []
        for k in np.flatnonzero(same):
            first = k
            while first > 0 and same[first - 1]:
                first -= 1
            out.append((int(index[order][k + 1]), int(index[order][first])))
        return sorted(out)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(parse_constant=_Constant)


class _Reader:
    """Incremental JSON reading: values are decoded one at a time from a growing buffer."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.buf, self.pos, self.eof = stream, "", 0, False

    def _fill(self) -> bool:
        chunk = self.stream.read(max(READ_SIZE, len(self.buf) - self.pos))
        if not chunk:
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return True

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise json.JSONDecodeError(f"expected {char!r}", self.buf, self.pos)
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if not self._fill():
                    raise
                continue
            if end == len(self.buf) and not self.eof and self._fill():
                continue  # a number may go on in the next chunk
            self.pos = end
            return obj

    def items(self) -> Iterator[Any]:
        """The elements of the array that starts here."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("]")
            return


def _iter_features(reader: _Reader, add: Any) -> Iterator[Any]:
    """Features of a FeatureCollection, an array of Features, or a single Feature."""
    first = reader.peek()
    if first == "[":
        for item in reader.items():
            yield from _top_level_features(item, add)
    elif first == "{":
        reader.pos += 1
        header: dict[str, Any] = {}
        streamed = False
        while reader.peek() != "}":
            if header or streamed:
                reader.expect(",")
            key = reader.value()
            reader.expect(":")
            if key == "features" and reader.peek() == "[":
                streamed = True
                yield from reader.items()
            else:
                header[key] = reader.value()
        reader.pos += 1
        if streamed and header.get("type") != "FeatureCollection":
            add(None, f"object with 'features' has type {header.get('type')!r}, not FeatureCollection")
        elif not streamed:
            yield from _top_level_features(header, add)
    else:
        yield from _top_level_features(reader.value(), add)
    if reader.peek() != "":
        raise json.JSONDecodeError("extra data after the document", reader.buf, reader.pos)


def _top_level_features(document: Any, add: Any) -> list[Any]:
    if isinstance(document, list):
        return [f for item in document for f in _top_level_features(item, add)]
    if not isinstance(document, dict):
        add(None, "top level must be a FeatureCollection, a Feature or an array of Features")
        return []
    kind = document.get("type")
    if kind == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            add(None, "FeatureCollection has no 'features' array")
            return []
        return features
    if kind == "Feature":
        return [document]
    if kind in GEOMETRY_TYPES:
        add(None, f"bare {kind} geometry: QuPath imports it as an annotation")
        return []
    add(None, f"unknown top-level type {kind!r}")
    return []


def _check_feature(index: int, feature: Any, add: Any, ids: _IdLog, geometries: list) -> None:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        add(index, "not a GeoJSON Feature object ('type' must be 'Feature')")
        return
    _check_id(index, feature.get("id"), add, ids)
    if "objectType" in feature:
        add(index, "'objectType' at feature top level is ignored; put it in properties")
    props = feature.get("properties")
    if not isinstance(props, dict):
        add(index, "missing 'properties' object: QuPath makes it an annotation")
        props = {}
    object_type = _check_object_type(index, props, add)
    if "classification" in props:
        _check_classification(index, props["classification"], add)
    if "color" in props and not _is_color(props["color"]):
        add(index, f"object color must be [r, g, b] or a packed int, got {props['color']!r}")
    if "measurements" in props:
        _check_measurements(index, props["measurements"], add)
    if "metadata" in props:
        _check_metadata(index, props["metadata"], add)
    if "isLocked" in props and not isinstance(props["isLocked"], bool):
        add(index, "isLocked must be true or false")
    if "nucleusGeometry" in props:
        add(index, "nucleusGeometry belongs at feature top level, not in properties")
    geometry = feature.get("geometry")
    if geometry is None:
        add(index, "geometry is missing or null")
    elif _check_geometry(index, "geometry", geometry, add):
        geometries.append((index, "geometry", geometry))
    if "nucleusGeometry" in feature:
        if object_type != "cell":
            add(index, "nucleusGeometry is only read for objectType 'cell'")
        if _check_geometry(index, "nucleusGeometry", feature["nucleusGeometry"], add):
            geometries.append((index, "nucleusGeometry", feature["nucleusGeometry"]))


def _check_id(index: int, value: Any, add: Any, ids: _IdLog) -> None:
    if value is None:
        add(index, "no 'id': QuPath assigns a random UUID (ids then differ per import)")
        return
    try:
        parsed = uuid.UUID(str(value))
    except ValueError:
        add(index, f"id {value!r} is not a UUID: QuPath drops it and assigns a random one")
        return
    if not isinstance(value, str):
        add(index, "id must be a string")
    ids.add(index, parsed)


def _check_object_type(index: int, props: dict, add: Any) -> str | None:
    value = props.get("objectType")
    if value is None:
        for legacy in ("object_type", "type"):
            if legacy in props:
                add(index, f"uses legacy properties.{legacy}; write properties.objectType")
                return None
        add(index, "no properties.objectType: QuPath imports it as an annotation")
        return None
    if value not in OBJECT_TYPES:
        add(index, f"objectType {value!r} is unknown (case-sensitive): becomes an annotation")
        return None
    return value


def _check_classification(index: int, value: Any, add: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, dict):
        add(index, "classification must be a string or an object")
        return
    has_name = isinstance(value.get("name"), str) or (
        isinstance(value.get("names"), list) and all(isinstance(n, str) for n in value["names"])
    )
    if not has_name:
        add(index, "classification object needs 'name' (string) or 'names' (list of strings)")
    if "color" not in value:
        add(index, "classification without 'color': QuPath aborts the whole import")
    elif not _is_color(value["color"]):
        add(index, f"classification color must be [r, g, b(, a)] in 0-255, got {value['color']!r}")


def _is_color(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return (
        isinstance(value, list)
        and len(value) in (3, 4)
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    )


def _check_measurements(index: int, value: Any, add: Any) -> None:
    if isinstance(value, list):
        items = []
        for entry in value:
            if not isinstance(entry, dict) or "name" not in entry or "value" not in entry:
                add(index, "measurement list entries need 'name' and 'value'")
                return
            items.append((entry["name"], entry["value"]))
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        add(index, "measurements must be an object {name: number}")
        return
    for name, number in items:
        if not isinstance(name, str):
            add(index, f"measurement name {name!r} is not a string")
        elif isinstance(number, _Constant):
            add(index, f"measurement {name!r} is {number.text}, not valid JSON")
        elif isinstance(number, bool) or not isinstance(number, int | float):
            add(index, f"measurement {name!r} = {number!r} is not a number (QuPath 0.4 fails)")
        elif not math.isfinite(number):
            add(index, f"measurement {name!r} is not finite")


def _check_metadata(index: int, value: Any, add: Any) -> None:
    if not isinstance(value, dict):
        add(index, "metadata must be an object")
        return
    for key, item in value.items():
        if isinstance(item, dict | list) or item is None:
            add(index, f"metadata {key!r} is not a primitive value (QuPath drops it)")


def _check_geometry(index: int, where: str, geometry: Any, add: Any) -> bool:
    """Structure checks QuPath's parser depends on; True when the geometry can be built."""
    if not isinstance(geometry, dict) or geometry.get("type") not in GEOMETRY_TYPES:
        kind = geometry.get("type") if isinstance(geometry, dict) else type(geometry).__name__
        add(index, f"{where}: unsupported geometry type {kind!r}")
        return False
    kind = geometry["type"]
    if kind == "GeometryCollection":
        parts = geometry.get("geometries")
        if not isinstance(parts, list):
            add(index, f"{where}: GeometryCollection without 'geometries'")
            return False
        return all(_check_geometry(index, where, part, add) for part in parts)
    coords = geometry.get("coordinates")
    depth = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2,
             "Polygon": 2, "MultiPolygon": 3}[kind]  # fmt: skip
    problem = _check_positions(coords, depth)
    if problem:
        add(index, f"{where}: {problem}")
        return False
    rings = {"Polygon": [coords], "MultiPolygon": coords}.get(kind, [])
    for polygon in rings:
        if not polygon:
            add(index, f"{where}: polygon without rings")
            return False
        for ring in polygon:
            if len(ring) < 4:
                add(index, f"{where}: ring has {len(ring)} positions, needs at least 4")
                return False
            if ring[0][:2] != ring[-1][:2]:
                add(index, f"{where}: ring is not closed (first position != last)")
                return False
    return True


def _check_positions(coords: Any, depth: int) -> str | None:
    if depth == 0:
        if (
            not isinstance(coords, list)
            or len(coords) < 2
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in coords
            )
        ):
            return f"bad position {coords!r}"
        return None
    if not isinstance(coords, list):
        return "coordinates must be nested arrays"
    if depth == 1 and _plain_positions(coords):
        return None
    for item in coords:
        problem = _check_positions(item, depth - 1)
        if problem:
            return problem
    return None


def _plain_positions(positions: list) -> bool:
    """Fast path: a list of positions of 2+ finite int/float values (no bools, no strings)."""
    try:
        if {type(v) for position in positions for v in position} - {int, float}:
            return False
        array = np.array(positions, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return array.ndim == 2 and array.shape[1] >= 2 and bool(np.isfinite(array).all())


def _check_geometry_validity(geometries: list[tuple[int, str, Any]], add: Any) -> None:
    """Valid and non-empty after QuPath snaps coordinates to its 0.01-px grid."""
    if not geometries:
        return
    texts = [json.dumps(g) for _, _, g in geometries]
    shapes = shapely.from_geojson(texts, on_invalid="ignore")
    snapped = shapely.transform(shapes, lambda xy: np.round(xy / GRID) * GRID)
    valid = shapely.is_valid(snapped)
    area_like = np.isin(shapely.get_type_id(snapped), [3, 6])
    suspect = ~valid | (area_like & (shapely.area(snapped) <= 0)) | shapely.is_missing(snapped)
    for k in np.flatnonzero(suspect):
        index, where, _ = geometries[k]
        try:
            reduced = None if shapes[k] is None else shapely.set_precision(shapes[k], GRID)
        except shapely.errors.GEOSException:  # invalid before rounding already
            reduced = shapes[k]
        if reduced is None or reduced.is_empty:
            add(index, f"{where}: empty after rounding to {GRID} px (QuPath drops or fails)")
        else:
            reason = shapely.is_valid_reason(snapped[k])
            add(index, f"{where}: invalid after rounding to {GRID} px ({reason})")
