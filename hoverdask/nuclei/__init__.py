"""Maps to nuclei, numpy (and a few numba kernels) only: post-processing (the reference, kept forever, and the exact fast
variant), the seam-stable passes and their ownership rule, the nuclei table and per-nucleus
features.

May import :mod:`hoverdask.core` only; knows no Dask, no files, no model.
"""

from __future__ import annotations

from hoverdask.nuclei.postproc import METHODS, process

__all__ = ["METHODS", "process"]
