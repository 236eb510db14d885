"""How the post-processing kernels are compiled: numba, no GIL, cached on disk when possible.

A kernel compiles on its first call in a process (about 9 s for all of them, once per machine)
and is then loaded from numba's cache (about 0.2 s, plus numba's import): next to the sources,
or in the user's cache folder when those are read-only (``NUMBA_CACHE_DIR`` chooses another).
Where no writable cache location exists at all, caching is off and each process compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba


def kernel(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(cache=True, nogil=True, **options)``, without the cache where numba finds
    no writable place for it (numba refuses to decorate then)."""

    def compile_(function: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(cache=False, nogil=True, **options)(function)

    return compile_

