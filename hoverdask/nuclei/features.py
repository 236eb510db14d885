"""Per-nucleus measurements, computed per block from the pixels the model saw.

Every feature is defined on the nucleus *mask* at processing resolution, exactly as
``skimage.measure.regionprops`` defines it, then converted to µm with ``scale * mpp`` (µm per
image pixel). Instead of one ``regionprops`` call per nucleus (a Python loop), the block is turned
into one instance label map and every statistic is a per-label sum over its pixels, in raster
order (compiled, :mod:`hoverdask.nuclei._sums`): moments give centroid, axes, eccentricity and
orientation; a 4-neighbour border mask and the weighted 3x3 neighbour code reproduce skimage's
perimeter; the convex area counts pixel centres inside the hull of the diamond-offset border
pixels (skimage's ``convex_hull_image`` rule), row by row in exact integer arithmetic
(:mod:`hoverdask.nuclei._hull`).

Fastest honest path: pass the block's instance ``labels`` (which post-processing already has) and
a column holding each row's label id; otherwise each polygon is rasterised with ``cv2.fillPoly``
(pixels whose index lies inside or on the outline, which gives back the mask a contour through
pixel centres was traced from). Nuclei of one block never overlap, so one shared label map is exact.

Colour features use colour deconvolution with the H&E(-DAB) stain matrix of
``skimage.color.rgb2hed``, in optical-density units (log10, clipped at 0): ``h_od = 6 *
rgb2hed(rgb)[..., 0]`` (skimage divides by ``-ln(1e-6)``; OD multiplies that back).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from skimage.color import hed_from_rgb

from hoverdask.core.types import TypeTableLike
from hoverdask.nuclei._hull import hull_pixel_counts
from hoverdask.nuclei._sums import outline_sums, pixel_means

FEATURE_COLUMNS: tuple[str, ...] = (
    "area_um2",
    "perimeter_um",
    "eq_diameter_um",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "solidity",
    "extent",
    "circularity",
    "orientation_deg",
    "h_od_mean",
    "h_od_std",
    "e_od_mean",
    "e_od_std",
    "r_mean",
    "g_mean",
    "b_mean",
)
"""Numeric per-nucleus features, in the order they are written."""

MEASURED_COLUMNS: tuple[str, ...] = (
    *FEATURE_COLUMNS,
    "type_name",
    "centroid_x_um",
    "centroid_y_um",
)

_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision: 1/16 px
# skimage's perimeter weight per neighbour code (1 + 2 per edge-adjacent + 10 per corner-adjacent
# border pixel of the same label; see ``nuclei._sums.outline_sums``)
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2.0)
_PERIMETER_WEIGHTS[[13, 23]] = (1.0 + np.sqrt(2.0)) / 2.0
# Optical density of each 8-bit value: -log10(max(v/255, 1e-6)).
_OD_LUT = -np.log10(np.maximum(np.arange(256) / 255.0, 1e-6))

TypeInfo = dict[int, tuple[str, tuple[int, int, int]]]


def type_info(type_table: TypeTableLike | None = None) -> TypeInfo:
    """``{id: (name, (r, g, b))}`` from a ``hoverdask.core.types.TypeTable``, a plain mapping
    ``{id: (name, (r, g, b))}`` (or ``{id: NucleusType}``), or ``None`` (no table).

    Ids missing from the table are named ``"Type <id>"`` with a palette colour (the same palette
    as ``TypeTable.color_of``). Id 0 means "no class" for every output, whatever its name.
    """
    if type_table is None:
        return {}
    entries = getattr(type_table, "types", type_table)
    if not isinstance(entries, Mapping):
        raise TypeError(f"type_table must be a TypeTable or a mapping, got {type(type_table)}")
    out: TypeInfo = {}
    for key, value in entries.items():
        name, color = (value.name, value.color) if hasattr(value, "color") else value
        out[int(key)] = (str(name), (int(color[0]), int(color[1]), int(color[2])))
    return out


_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))  # fmt: skip


def type_name_and_color(type_id: int, info: TypeInfo) -> tuple[str, tuple[int, int, int]]:
    """Name and colour of one type id (the fallback used where the table has no entry)."""
    if type_id in info:
        return info[type_id]
    return f"Type {type_id}", _PALETTE[(type_id - 1) % len(_PALETTE)]


def measure(
    nuclei: gpd.GeoDataFrame,
    image: np.ndarray,
    mpp: float,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    type_table: TypeTableLike | None = None,
    labels: np.ndarray | None = None,
    label_column: str = "label_id",
) -> gpd.GeoDataFrame:
    """Return ``nuclei`` with the feature columns of :data:`MEASURED_COLUMNS` added.

    Parameters
    ----------
    nuclei
        Nuclei table (see :mod:`hoverdask.core.schema`), level-0 coordinates.
    image
        RGB uint8 block at processing resolution, ``(H, W, 3)``.
    mpp
        µm per level-0 pixel.
    origin
        Table coordinate ``(x, y)`` of the image's top-left corner.
    scale
        Level-0 pixels per image pixel: point ``P`` lies at image coordinate ``(P - origin) / scale``.
    type_table
        Type names (``TypeTable`` or ``{id: (name, (r, g, b))}``); ``None`` names types ``"Type <id>"``.
    labels
        Optional instance label map of the block (same height/width as ``image``); then
        ``nuclei[label_column]`` gives each row's label and nothing is rasterised.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if not (mpp and mpp > 0 and scale > 0):
        raise ValueError(f"mpp and scale must be positive, got mpp={mpp}, scale={scale}")
    height, width = image.shape[:2]
    if labels is None:
        label_map = rasterise(nuclei.geometry.to_numpy(), (height, width), origin, scale)
    else:
        if labels.shape != (height, width):
            raise ValueError(f"labels shape {labels.shape} != image shape {(height, width)}")
        label_map = _relabel(labels, nuclei[label_column].to_numpy())
    stats = label_stats(label_map, image, len(nuclei))

    um = scale * mpp
    columns = {
        "area_um2": stats["area"] * um * um,
        "perimeter_um": stats["perimeter"] * um,
        "eq_diameter_um": np.sqrt(4.0 * stats["area"] / np.pi) * um,
        "major_axis_um": stats["major_axis"] * um,
        "minor_axis_um": stats["minor_axis"] * um,
    }
    for name in ("eccentricity", "solidity", "extent"):
        columns[name] = stats[name]
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = 4.0 * np.pi * stats["area"] / stats["perimeter"] ** 2
    columns["circularity"] = np.where(stats["perimeter"] > 0, circularity, np.nan)
    columns["orientation_deg"] = np.degrees(stats["orientation"])
    for name in ("h_od_mean", "h_od_std", "e_od_mean", "e_od_std", "r_mean", "g_mean", "b_mean"):
        columns[name] = stats[name]
    info = type_info(type_table)
    types = nuclei["type"].to_numpy() if "type" in nuclei else np.zeros(len(nuclei), dtype=int)
    names = {int(t): type_name_and_color(int(t), info)[0] for t in np.unique(types) if t != 0}
    columns["type_name"] = pd.array([names.get(int(t)) for t in types], dtype="string")
    columns["centroid_x_um"] = nuclei["centroid_x"].to_numpy(dtype=np.float64) * mpp
    columns["centroid_y_um"] = nuclei["centroid_y"].to_numpy(dtype=np.float64) * mpp
    # one concat instead of a GeoDataFrame.__setitem__ per column (each costs ~1 ms)
    kept = nuclei.drop(columns=[c for c in columns if c in nuclei.columns])
    added = pd.DataFrame(columns, index=nuclei.index)
    out = gpd.GeoDataFrame(pd.concat([kept, added], axis=1), geometry=nuclei.geometry.name,
                           crs=nuclei.crs)  # fmt: skip
    out = out[[*nuclei.columns, *(c for c in columns if c not in nuclei.columns)]]
    out.attrs = dict(nuclei.attrs)
    return out


def rasterise(
    polygons: np.ndarray,
    shape: tuple[int, int],
    origin: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
) -> np.ndarray:
    """Instance label map (row ``i`` -> label ``i + 1``) of polygons in table coordinates.

    A pixel belongs to a polygon when its index point (continuous coordinate minus 0.5) lies
    inside or on the outline, which is how ``cv2.fillPoly`` fills.
    """
    label_map = np.zeros(shape, dtype=np.int32)
    rings = _fixed_point_rings(polygons, origin, scale)
    for index, polygon in enumerate(polygons):
        if index in rings:
            parts = [rings[index]]
        elif polygon is None or polygon.is_empty:
            continue
        else:
            geoms = np.array(list(getattr(polygon, "geoms", [polygon])), dtype=object)
            parts = _fixed_point_rings(geoms, origin, scale).values()
        for points in parts:
            cv2.fillPoly(label_map, [points], index + 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return label_map


def _fixed_point_rings(
    polygons: np.ndarray, origin: tuple[float, float], scale: float
) -> dict[int, np.ndarray]:
    """Exterior rings of the non-empty plain polygons in ``fillPoly``'s fixed-point pixel
    coordinates, by position (one vectorised conversion instead of one per polygon)."""
    geometries = np.asarray(polygons, dtype=object)
    simple = np.flatnonzero(
        (shapely.get_type_id(geometries) == shapely.GeometryType.POLYGON)
        & ~shapely.is_empty(geometries)
    )
    if simple.size == 0:
        return {}
    ring, owner = shapely.get_coordinates(
        shapely.get_exterior_ring(geometries[simple]), return_index=True
    )
    pixel = np.empty_like(ring)
    pixel[:, 0] = (ring[:, 0] - origin[0]) / scale - 0.5
    pixel[:, 1] = (ring[:, 1] - origin[1]) / scale - 0.5
    points = np.round(pixel * float(1 << _SUBPIXEL_BITS)).astype(np.int32)
    bounds = [0, *(np.flatnonzero(np.diff(owner)) + 1).tolist(), len(points)]
    rings = [points[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    return dict(zip(simple.tolist(), rings, strict=True))


def _relabel(labels: np.ndarray, label_ids: np.ndarray) -> np.ndarray:
    """Map the block's label ids to row numbers + 1; pixels of other labels become background."""
    label_ids = np.asarray(label_ids, dtype=np.int64)
    if len(np.unique(label_ids)) != len(label_ids):
        raise ValueError("label ids must be unique within a block")
    lookup = np.zeros(int(max(labels.max(initial=0), label_ids.max(initial=0))) + 1, np.int32)
    lookup[label_ids] = np.arange(1, len(label_ids) + 1, dtype=np.int32)
    lookup[0] = 0
    return lookup[labels]


def label_stats(label_map: np.ndarray, image: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """regionprops-equivalent statistics for labels ``1..count`` (NaN where a label is absent).

    Works on the bounding box of all labelled pixels (nothing outside it is labelled, so borders
    and perimeters are the same), with pixel coordinates kept absolute so that every sum sees
    the very values, in the very order, of the whole map.
    """
    box = _labelled_box(label_map)
    if box is None:
        return {name: np.full(count, np.nan) for name in _STAT_NAMES}
    r0, c0 = box[0].start, box[1].start
    label_map = label_map[box]
    image = image[box]
    width = label_map.shape[1]
    flat = label_map.ravel()
    foreground = np.flatnonzero(flat)
    label = flat[foreground].astype(np.int64)
    local_rows, local_cols = np.divmod(foreground, width)
    rows = (local_rows + r0).astype(np.float64)
    cols = (local_cols + c0).astype(np.float64)
    size = count + 1
    pixels = image.reshape(-1, 3)[foreground]
    # np.dot: the same BLAS product as ``@`` here, bit for bit, without matmul's slow path for
    # a (N, 3) x (3, 3) product
    stains = np.dot(_OD_LUT[pixels], hed_from_rgb)
    np.maximum(stains, 0.0, out=stains)
    means = pixel_means(label, rows, cols, stains, pixels, size)
    area = means.area[1:]
    present = area > 0
    var_c, var_r, cov = means.var_c[1:], means.var_r[1:], -means.cov_rc[1:]
    half_trace = (var_c + var_r) / 2.0
    root = np.sqrt(((var_c - var_r) / 2.0) ** 2 + cov**2)
    ev_major = np.maximum(half_trace + root, 0.0)
    ev_minor = np.maximum(half_trace - root, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(ev_major > 0, np.sqrt(1.0 - ev_minor / ev_major), 0.0)
    orientation = 0.5 * np.arctan2(-2.0 * cov, var_r - var_c)
    ties = var_c - var_r == 0
    orientation[ties] = np.where(cov[ties] < 0, np.pi / 4.0, -np.pi / 4.0)

    perimeter, *entries = outline_sums(label_map, _PERIMETER_WEIGHTS, size)
    perimeter = perimeter[1:]
    extremes = _grouped_extremes(*entries, (r0, c0))
    row_min, row_max, col_min, col_max = _bounding_boxes(extremes, size)
    extent = area / ((row_max - row_min + 1) * (col_max - col_min + 1))
    convex_area = _hull_areas(extremes, size)

    stats = {
        "area": area,
        "perimeter": perimeter,
        "major_axis": 4.0 * np.sqrt(ev_major),
        "minor_axis": 4.0 * np.sqrt(ev_minor),
        "eccentricity": eccentricity,
        "orientation": orientation,
        "extent": extent,
        "solidity": area / np.where(convex_area > 0, convex_area, np.nan),
    }
    for name, mean, mean_sq in (("h_od", means.h_od, means.h_od_sq),
                                ("e_od", means.e_od, means.e_od_sq)):  # fmt: skip
        stats[f"{name}_mean"] = mean[1:]
        stats[f"{name}_std"] = np.sqrt(np.maximum(mean_sq[1:] - mean[1:] * mean[1:], 0.0))
    stats["r_mean"], stats["g_mean"], stats["b_mean"] = means.red[1:], means.green[1:], means.blue[1:]
    for name, values in stats.items():
        stats[name] = np.where(present, values, np.nan)
    return stats


_STAT_NAMES = ("area", "perimeter", "major_axis", "minor_axis", "eccentricity", "orientation",
               "extent", "solidity", "h_od_mean", "h_od_std", "e_od_mean", "e_od_std", "r_mean",
               "g_mean", "b_mean")  # fmt: skip


def _labelled_box(label_map: np.ndarray) -> tuple[slice, slice] | None:
    """Slices of the bounding box of all labelled pixels, or None when there are none."""
    rows = np.flatnonzero(label_map.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(label_map.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


@dataclass(frozen=True)
class _RowExtremes:
    """The leftmost and rightmost pixel of every (label, row), grouped by label (a label's
    rows in order); absolute pixel indices."""

    row: np.ndarray
    left: np.ndarray
    right: np.ndarray
    present: np.ndarray  # labels with pixels, ascending
    first: np.ndarray  # index of each present label's first (label, row)


def _grouped_extremes(label: np.ndarray, row: np.ndarray, left: np.ndarray, right: np.ndarray,
                      origin: tuple[int, int]) -> _RowExtremes:  # fmt: skip
    """:class:`_RowExtremes` from (label, row) entries already grouped by label, rows ascending."""
    present, first = np.unique(label, return_index=True)
    return _RowExtremes(row + origin[0], left + origin[1], right + origin[1], present, first)


def _bounding_boxes(extremes: _RowExtremes, size: int) -> tuple[np.ndarray, ...]:
    """Per-label min/max row and column (inclusive pixel indices; +-inf where absent)."""
    boxes = [np.full(size - 1, np.inf), np.full(size - 1, -np.inf),
             np.full(size - 1, np.inf), np.full(size - 1, -np.inf)]  # fmt: skip
    if extremes.present.size:
        at, first = extremes.present - 1, extremes.first
        last = np.append(first[1:], extremes.row.size) - 1
        boxes[0][at] = extremes.row[first]
        boxes[1][at] = extremes.row[last]
        boxes[2][at] = np.minimum.reduceat(extremes.left, first)
        boxes[3][at] = np.maximum.reduceat(extremes.right, first)
    return tuple(boxes)


def _hull_areas(extremes: _RowExtremes, size: int) -> np.ndarray:
    """Pixel count of skimage's ``convex_hull_image`` per label (0 where a label is absent),
    from each label's row extremes (:mod:`hoverdask.nuclei._hull`)."""
    convex_area = np.zeros(size - 1)
    if extremes.present.size:
        first = np.append(extremes.first, extremes.row.size)
        counts = hull_pixel_counts(extremes.row, extremes.left, extremes.right, first)
        convex_area[extremes.present - 1] = counts
    return convex_area
