"""Whole-slide pipeline: block layout, exactly-once seams, the Dask graph and its outputs.

:func:`nuclei_from_maps` turns a slide's network maps into its nuclei table with a result that
does not depend on the chunking (see :mod:`hoverdask.nuclei.seams` and ``docs/seams.md``).
"""

from hoverdask.pipeline.local import nuclei_from_maps

__all__ = ["nuclei_from_maps"]

# --- the distributed run (hoverdask run) ---
from hoverdask.pipeline.run import CohortResult, SlideResult, run_cohort
from hoverdask.pipeline.spec import RunOptions

__all__ += [
    "CohortResult",
    "RunOptions",
    "SlideResult",
    "run_cohort",
]
