"""Whole-slide pipeline, the one package that knows Dask: the run's options (:mod:`.spec`), the
plan, the task graph, the resume ledger, the map cache and the outputs.

:func:`nuclei_from_maps` turns a slide's network maps into its nuclei table with a result that
does not depend on the chunking (see :mod:`hoverdask.nuclei.seams` and ``docs/seams.md``);
:func:`run_cohort` runs a cohort of slides. The names are imported on first use, so that
``hoverdask.pipeline.spec`` (the options and defaults the CLI reads) stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hoverdask.pipeline.local import nuclei_from_maps
    from hoverdask.pipeline.run import CohortResult, SlideResult, run_cohort
    from hoverdask.pipeline.spec import RunOptions

_EXPORTS = {
    "nuclei_from_maps": "hoverdask.pipeline.local",
    "CohortResult": "hoverdask.pipeline.run",
    "SlideResult": "hoverdask.pipeline.run",
    "run_cohort": "hoverdask.pipeline.run",
    "RunOptions": "hoverdask.pipeline.spec",
}
__all__ = ["CohortResult", "RunOptions", "SlideResult", "nuclei_from_maps", "run_cohort"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hoverdask.pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
