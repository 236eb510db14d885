"""The nuclei table: the one schema every stage after post-processing speaks.

A nuclei table is a ``geopandas.GeoDataFrame`` with one row per nucleus. Coordinates are
*continuous level-0 pixel coordinates of the original slide*, QuPath's convention: the origin is
the top-left corner of the top-left pixel, pixel (row r, column c) covers
``[c, c+1) x [r, r+1)``, so its centre is ``(c + 0.5, r + 0.5)``. Post-processing works on pixel
indices (contours through pixel centres, as the reference does); :func:`to_level0` is the single
place where indices become table coordinates, so resampled slides scale correctly and QuPath
outlines sit where the pixels are.

Columns (the pipeline guarantees these; features and exports add more):

=============  ========  ==================================================================
column         dtype     meaning
=============  ========  ==================================================================
geometry       Polygon   nucleus outline, level-0 px (continuous, see above)
centroid_x     float64   level-0 px, from the instance's pixel moments
centroid_y     float64   level-0 px
type           int16     class id (0 = no class / model without a type branch)
type_prob      float32   fraction of the nucleus's pixels voting for ``type`` (NaN untyped)
area_px        int32     pixel count at processing resolution
nucleus_id     int64     deterministic id, independent of chunking and scheduling
slide_id       string    slide identifier (file stem), set by the pipeline
=============  ========  ==================================================================
"""

from __future__ import annotations

import numpy as np

CORE_COLUMNS: tuple[str, ...] = (
    "geometry",
    "centroid_x",
    "centroid_y",
    "type",
    "type_prob",
    "area_px",
)
PIPELINE_COLUMNS: tuple[str, ...] = (*CORE_COLUMNS, "nucleus_id", "slide_id")


def to_level0(
    xy: np.ndarray, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Map pixel-index ``(x, y)`` points at processing resolution to level-0 table coordinates.

    ``scale`` is level-0 pixels per processing pixel (0.5 when a 0.5 µm/px slide is upsampled to
    0.25 µm/px), ``offset`` the processing-resolution index ``(x, y)`` of the block's top-left
    pixel.
    """
    xy = np.asarray(xy, dtype=np.float64)
    return (xy + np.asarray(offset, dtype=np.float64) + 0.5) * scale
