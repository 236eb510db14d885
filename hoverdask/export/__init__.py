"""Writers for the nuclei tables: GeoParquet, QuPath GeoJSON (+ validator), summary, QC.

Plain pandas/geopandas/numpy: the pipeline calls these per slide and per cohort.
"""

from __future__ import annotations

from hoverdask.export.geoparquet import write_geoparquet
from hoverdask.export.qc import write_qc_picture
from hoverdask.export.qupath import write_qupath
from hoverdask.export.summary import write_cohort_summary, write_slide_outputs
from hoverdask.export.validate import validate_qupath

__all__ = [
    "validate_qupath",
    "write_cohort_summary",
    "write_geoparquet",
    "write_qc_picture",
    "write_qupath",
    "write_slide_outputs",
]
