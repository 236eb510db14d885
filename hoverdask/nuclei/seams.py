"""Exactly-once seams: whole-slide nuclei from network maps, identical for every chunking.

Three passes over a grid of blocks (``docs/seams.md`` has the argument):

1. :func:`hv_ranges` on each block core: min/max of h and v, merged into slide-wide ranges.
2. :func:`sobel_ranges` on each core plus a 10 px context: min/max of the two Sobel responses.
3. :func:`block_nuclei` on each core plus ``halo``: the reference post-processing with those
   slide-wide ranges (:mod:`hoverdask.nuclei.stable`), keeping the clusters this block owns.

Ownership rule: a *cluster* (8-connected component of the hole-filled foreground; touching
nuclei form one) is reported by the block whose core holds the floor of its centroid, if that
block's window holds the cluster with :data:`CONTEXT_MARGIN` to spare; otherwise by the block
whose core holds its first pixel, under the same condition; otherwise it is *oversized*: the
blocks that see a cut piece of it in their core say so, and :func:`refit_nuclei` decides it on a
window fitted to it (grown until it fits). So every nucleus is reported once, and equals what
the whole slide processed at once gives. Oversized clusters are listed in the table's ``attrs``
and announced with an :class:`OversizedClusterWarning`.

The pass functions are plain numpy functions on a window and its box, so the pipeline can run
them on any scheduler: :func:`hoverdask.pipeline.local.nuclei_from_maps` composes them with
dask on one map, :mod:`hoverdask.pipeline.postprocess` as committed tasks of a slide's graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hoverdask.core.schema import to_level0
from hoverdask.nuclei.stable import (
    CONTEXT_MARGIN,
    Box,
    Cluster,
    NormRanges,
    NucleusRecord,
    WindowForeground,
    normalise_with_range,
    segment_window,
    sobel_range,
    value_range,
    window_foreground,
    window_nuclei,
)

if TYPE_CHECKING:
    import geopandas as gpd

# Default halo (processing px): CONTEXT_MARGIN (12) plus 116 px of cluster reach from its
# centroid, i.e. clusters up to ~230 px across are decided inside a block. Nuclei at 0.25 µm/px
# are at most ~80 px across; larger touching clusters take the (exact, slower) oversize path.
DEFAULT_HALO = 128


class OversizedClusterWarning(UserWarning):
    """A nucleus cluster did not fit a block window; it was decided on a fitted window."""


@dataclass(frozen=True)
class BlockGrid:
    """Blocks of ``chunk_size`` px over a (height, width) map, addressed by (row, col).

    The *core* of a block is its share of the slide (cores tile the slide, sizes exactly
    ``chunk_size`` except at the far edges); its *window* is the core grown by ``halo`` and
    clipped, never padded, at the slide border.
    """

    height: int
    width: int
    chunk_size: int
    halo: int = DEFAULT_HALO

    def __post_init__(self) -> None:
        if self.height < 2 or self.width < 2:
            raise ValueError(f"map must be at least 2x2 px, got {self.height}x{self.width}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.halo < CONTEXT_MARGIN:
            raise ValueError(f"halo must be at least {CONTEXT_MARGIN} px, got {self.halo}")

    @property
    def shape(self) -> tuple[int, int]:
        return math.ceil(self.height / self.chunk_size), math.ceil(self.width / self.chunk_size)

    def blocks(self) -> Iterator[tuple[int, int]]:
        rows, cols = self.shape
        for row in range(rows):
            for col in range(cols):
                yield row, col

    def core(self, row: int, col: int) -> Box:
        y0, x0 = row * self.chunk_size, col * self.chunk_size
        return y0, x0, min(y0 + self.chunk_size, self.height), min(x0 + self.chunk_size, self.width)

    def grow(self, box: Box, margin: int) -> Box:
        """``box`` grown by ``margin`` on every side, clipped to the slide."""
        y0, x0, y1, x1 = box
        return (
            max(y0 - margin, 0),
            max(x0 - margin, 0),
            min(y1 + margin, self.height),
            min(x1 + margin, self.width),
        )

    def window(self, row: int, col: int) -> Box:
        return self.grow(self.core(row, col), self.halo)

    def block_of(self, y: int, x: int) -> tuple[int, int]:
        return y // self.chunk_size, x // self.chunk_size

    def can_decide(self, window: Box, box: Box) -> bool:
        """Whether a cluster with bounding box ``box`` is exact in ``window``: every side keeps
        :data:`CONTEXT_MARGIN` px of context, unless that side of the window is the slide edge."""
        wy0, wx0, wy1, wx1 = window
        y0, x0, y1, x1 = box
        m = CONTEXT_MARGIN
        return (
            wy0 <= y0
            and wx0 <= x0
            and y1 <= wy1
            and x1 <= wx1
            and (wy0 == 0 or y0 - m >= wy0)
            and (wx0 == 0 or x0 - m >= wx0)
            and (wy1 == self.height or y1 + m <= wy1)
            and (wx1 == self.width or x1 + m <= wx1)
        )

    def reporter(self, cluster: Cluster) -> tuple[int, int] | None:
        """The block that reports ``cluster`` (the ownership rule), or None if it is oversized."""
        for y, x in (cluster.centroid, cluster.anchor):
            block = self.block_of(y, x)
            if self.can_decide(self.window(*block), cluster.box):
                return block
        return None


def box_slices(box: Box, origin: tuple[int, int] = (0, 0)) -> tuple[slice, slice]:
    y0, x0, y1, x1 = box
    return slice(y0 - origin[0], y1 - origin[0]), slice(x0 - origin[1], x1 - origin[1])


def hv_ranges(core: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Pass 1: (min, max) of h and of v over a block core (channels ``[..., h, v]``)."""
    return value_range(core[..., -2]), value_range(core[..., -1])


def sobel_ranges(
    window: np.ndarray, window_box: Box, core: Box, ranges: NormRanges
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Pass 2: (min, max) of the two Sobel responses over ``core``.

    ``window`` must reach :data:`SOBEL_REACH` px past the core, or the slide edge, on every side
    (``BlockGrid.grow(core, SOBEL_REACH)``), so the core values are the whole-slide values.
    """
    inner = box_slices(core, window_box[:2])
    h_n = normalise_with_range(window[..., -2], *ranges.h)
    v_n = normalise_with_range(window[..., -1], *ranges.v)
    return sobel_range(h_n, 1, 0, inner), sobel_range(v_n, 0, 1, inner)


@dataclass
class BlockNuclei:
    """Pass 3 output of one block: its nuclei and the cut clusters seen in its core."""

    records: list[NucleusRecord] = field(default_factory=list)
    fragments: list[Box] = field(default_factory=list)
    seed_ties: list[Box] = field(default_factory=list)  # clusters flooded alone (seed tie)


def block_nuclei(
    window: np.ndarray,
    window_box: Box,
    grid: BlockGrid,
    block: tuple[int, int],
    ranges: NormRanges,
    nr_types: int | None = None,
) -> BlockNuclei:
    """Pass 3 on one block window (``grid.window(*block)``): the nuclei this block reports.

    Which clusters the block owns needs only the foreground of the whole window; the rest of the
    reference steps run on the part of the window that holds the owned clusters with
    :data:`CONTEXT_MARGIN` to spare (about the core, instead of core plus halo), reusing that
    foreground: exact for the owned clusters (see ``segment_window``).
    """
    foreground = window_foreground(window[..., -3], window_box[:2])
    core = grid.core(*block)
    out = BlockNuclei()
    owned = []
    for cluster in foreground.clusters:
        if grid.can_decide(window_box, cluster.box):
            if _reported_by(grid, cluster, block):
                owned.append(cluster)
        elif _has_pixel_in(foreground, cluster, core):
            out.fragments.append(cluster.box)
    if not owned:
        return out
    part = _intersection(grid.grow(_union([c.box for c in owned]), CONTEXT_MARGIN), window_box)
    seg = segment_window(window[box_slices(part, window_box[:2])], part[:2], ranges, nr_types,
                         foreground)  # fmt: skip
    out.records, out.seed_ties = window_nuclei(seg, owned, grid.width)
    return out


def _has_pixel_in(foreground: WindowForeground, cluster: Cluster, box: Box) -> bool:
    """Whether ``cluster`` has a pixel in ``box`` (looked at where the two boxes meet only)."""
    if not _intersects(cluster.box, box):
        return False
    meet = box_slices(_intersection(cluster.box, box), foreground.origin)
    return bool((foreground.clusters_map[meet] == cluster.label).any())


def _reported_by(grid: BlockGrid, cluster: Cluster, block: tuple[int, int]) -> bool:
    """``grid.reporter(cluster) == block`` for a cluster this block's window can decide, without
    building windows for the clusters of the halo, which other blocks report."""
    by_centroid = grid.block_of(*cluster.centroid)
    if by_centroid == block:
        return True
    return grid.block_of(*cluster.anchor) == block and not grid.can_decide(
        grid.window(*by_centroid), cluster.box
    )


@dataclass
class RefitNuclei:
    """Output of :func:`refit_nuclei`: the oversized clusters' nuclei, or a larger window."""

    records: list[NucleusRecord] = field(default_factory=list)
    oversized: list[Box] = field(default_factory=list)
    grow_to: Box | None = None
    seed_ties: list[Box] = field(default_factory=list)


def refit_nuclei(
    window: np.ndarray,
    window_box: Box,
    grid: BlockGrid,
    target: Box,
    ranges: NormRanges,
    nr_types: int | None = None,
) -> RefitNuclei:
    """Decide the oversized clusters meeting ``target`` on a window fitted around them.

    If a cluster meeting ``target`` is still cut by this window, returns ``grow_to``: the window
    to try next. Only clusters no block may report are returned, so running this on overlapping
    targets gives the same records twice, never different ones (callers drop duplicate ids).
    """
    seg = segment_window(window, window_box[:2], ranges, nr_types)
    meeting = [c for c in seg.clusters if _intersects(c.box, target)]
    cut = [c.box for c in meeting if not grid.can_decide(window_box, c.box)]
    if cut:
        grown = _union([window_box, *(grid.grow(box, CONTEXT_MARGIN) for box in cut)])
        return RefitNuclei(grow_to=grown)
    oversized = [c for c in meeting if grid.reporter(c) is None]
    records, ties = window_nuclei(seg, oversized, grid.width)
    return RefitNuclei(records, [c.box for c in oversized], seed_ties=ties)


RefitJobs = Callable[[list[tuple[Box, Box]]], Sequence[RefitNuclei]]


def refit_rounds(fragments: Sequence[Box], grid: BlockGrid, run: RefitJobs) -> Iterator[RefitNuclei]:
    """The oversize pass's driver: every cluster cut at a block's edge, decided on a fitted window.

    The fragments the blocks reported are merged into targets; each target's window starts at
    the target plus :data:`CONTEXT_MARGIN` and grows (``grow_to``) until its clusters fit.
    ``run`` computes one round, a list of ``(window box, target)`` jobs, as :func:`refit_nuclei`
    on each window, on whatever scheduler the caller has (``dask.delayed`` for one map, plain
    calls inside a committed task of the distributed graph). Yields the decided refits, round
    by round, in job order.
    """
    pending = [(grid.grow(t, CONTEXT_MARGIN), t) for t in merge_boxes(fragments)]
    while pending:
        retry = []
        for (_, target), refit in zip(pending, run(pending), strict=True):
            if refit.grow_to is not None:
                retry.append((refit.grow_to, target))
                continue
            yield refit
        pending = retry


def _intersects(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _intersection(a: Box, b: Box) -> Box:
    return max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])


def _union(boxes: Sequence[Box]) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def merge_boxes(boxes: Sequence[Box]) -> list[Box]:
    """Union overlapping boxes until none overlap (the fragments of one cluster become one)."""
    merged: list[Box] = []
    for box in boxes:
        current = box
        changed = True
        while changed:
            changed = False
            for other in merged:
                if _intersects(current, other):
                    merged.remove(other)
                    current = _union([current, other])
                    changed = True
                    break
        merged.append(current)
    return sorted(merged)


def records_frame(records: Sequence[NucleusRecord]) -> Any:
    """Pixel-index table (pandas) of records, one row per nucleus id, sorted by id.

    ``centroid_x/y`` and ``contour`` are slide pixel indices at processing resolution.
    """
    import pandas as pd

    unique = {r.nucleus_id: r for r in records}
    rows = [unique[key] for key in sorted(unique)]
    return pd.DataFrame(
        {
            "nucleus_id": np.array([r.nucleus_id for r in rows], dtype=np.int64),
            "centroid_x": np.array([r.centroid[0] for r in rows], dtype=np.float64),
            "centroid_y": np.array([r.centroid[1] for r in rows], dtype=np.float64),
            "type": np.array([r.type for r in rows], dtype=np.int16),
            "type_prob": np.array([r.type_prob for r in rows], dtype=np.float32),
            "area_px": np.array([r.area_px for r in rows], dtype=np.int32),
            "contour": pd.Series([r.contour for r in rows], dtype=object),
        }
    )


def contour_polygon(contour_xy: np.ndarray) -> tuple[Any, bool]:
    """Polygon from table-coordinate contour points; ``(polygon, repaired)``.

    A contour through pixel centres can touch itself where an instance is one pixel thin; such a
    ring is repaired with ``make_valid`` and the largest polygon part is kept.
    """
    from shapely.geometry import Polygon

    polygon = Polygon(contour_xy)
    if polygon.is_valid:
        return polygon, False
    return _repaired(polygon), True


def _repaired(polygon: Any) -> Any:
    from shapely import make_valid

    fixed = make_valid(polygon)
    parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon"]
    if not parts:
        return polygon
    return max(parts, key=lambda g: g.area)


def contour_polygons(
    contours: Sequence[np.ndarray], scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, int]:
    """:func:`contour_polygon` of every pixel-index contour at once; ``(polygons, repaired)``.

    The same coordinates (``to_level0`` is elementwise) and the same closed rings, built and
    validated in vectorised shapely calls; only invalid rings are repaired one by one.
    """
    import shapely

    if not len(contours):
        return np.empty(0, dtype=object), 0
    sizes = np.array([len(c) for c in contours])
    points = to_level0(np.concatenate(contours), scale, offset)
    rings = shapely.linearrings(points, indices=np.repeat(np.arange(len(contours)), sizes))
    polygons = shapely.polygons(rings)
    invalid = np.flatnonzero(~shapely.is_valid(polygons))
    for index in invalid:
        polygons[index] = _repaired(polygons[index])
    return polygons, len(invalid)


def nuclei_table(
    frame: Any, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> gpd.GeoDataFrame:
    """The nuclei table (``hoverdask.core.schema`` schema, no ``slide_id``) from a pixel-index frame."""
    import geopandas as gpd

    polygons, repaired = contour_polygons(list(frame["contour"]), scale, offset)
    centroids = to_level0(
        np.stack([frame["centroid_x"].to_numpy(), frame["centroid_y"].to_numpy()], axis=1),
        scale,
        offset,
    )
    table = gpd.GeoDataFrame(
        {
            "geometry": gpd.GeoSeries(polygons, dtype="geometry"),
            "centroid_x": centroids[:, 0],
            "centroid_y": centroids[:, 1],
            "type": frame["type"].to_numpy(np.int16),
            "type_prob": frame["type_prob"].to_numpy(np.float32),
            "area_px": frame["area_px"].to_numpy(np.int32),
            "nucleus_id": frame["nucleus_id"].to_numpy(np.int64),
        },
        geometry="geometry",
        crs=None,
    )
    table.attrs["polygons_repaired"] = int(repaired)
    return table
