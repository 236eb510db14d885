"""Whole-slide pipeline: block layout, exactly-once seams, the Dask graph and its outputs.

:func:`nuclei_from_maps` turns a slide's network maps into its nuclei table with a result that
does not depend on the chunking (see :mod:`hoverdask.pipeline.seams` and ``docs/seams.md``).
"""

from hoverdask.pipeline.seams import nuclei_from_maps

__all__ = ["nuclei_from_maps"]

# --- the distributed run (hoverdask run) ---
from hoverdask.pipeline.run import CohortResult, RunOptions, SlideResult, run_cohort

__all__ += [
    "CohortResult",
    "RunOptions",
    "SlideResult",
    "run_cohort",
]
