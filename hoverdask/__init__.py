"""hoverdask: HoVer-Net nucleus segmentation and classification for whole-slide cohorts on Dask.

From Python::

    import hoverdask

    result = hoverdask.run(["a.svs", "b.svs"], "out/", model="hovernet_fast-pannuke")
    nuclei = hoverdask.read_nuclei("out/", bbox=(1000, 1400, 1100, 1500))
    net = hoverdask.load_model("hovernet_fast-pannuke")
    tile_nuclei = hoverdask.segment(rgb_array, net)

The functions live in :mod:`hoverdask.api` and are imported on first use, so that
``import hoverdask`` stays light (Dask workers import it too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hoverdask.core.version import __version__

__all__ = ["__version__", "load_model", "read_nuclei", "run", "segment"]

if TYPE_CHECKING:
    from hoverdask.api import load_model, read_nuclei, run, segment

_API = ("load_model", "read_nuclei", "run", "segment")


def __getattr__(name: str) -> Any:
    if name in _API:
        from hoverdask import api

        return getattr(api, name)
    raise AttributeError(f"module 'hoverdask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
