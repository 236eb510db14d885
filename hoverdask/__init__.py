"""hoverdask: HoVer-Net nucleus segmentation and classification for whole-slide cohorts on Dask.

From Python::

    import hoverdask

    result = hoverdask.run(["a.svs", "b.svs"], "out/", model="hovernet_fast-pannuke")
    nuclei = hoverdask.read_nuclei("out/", bbox=(1000, 1400, 1100, 1500))
    net = hoverdask.load_model("hovernet_fast-pannuke")
    tile_nuclei = hoverdask.segment(rgb_array, net)
    with hoverdask.open_slide("a.svs") as slide: ...
    table = hoverdask.nuclei_from_maps(maps, chunk_size=1968, nr_types=6)
    hoverdask.write_geoparquet(table, "nuclei.parquet")

The functions live in :mod:`hoverdask.api` and the stage packages and are imported on first use,
so that ``import hoverdask`` stays light (Dask workers import it too).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from hoverdask.core.version import __version__

if TYPE_CHECKING:
    from hoverdask.api import load_model, read_nuclei, run, segment
    from hoverdask.export import write_geoparquet, write_qupath
    from hoverdask.pipeline.local import nuclei_from_maps
    from hoverdask.slide import open_slide

_API = {
    "load_model": "hoverdask.api",
    "read_nuclei": "hoverdask.api",
    "run": "hoverdask.api",
    "segment": "hoverdask.api",
    "open_slide": "hoverdask.slide",
    "nuclei_from_maps": "hoverdask.pipeline.local",
    "write_geoparquet": "hoverdask.export",
    "write_qupath": "hoverdask.export",
}
__all__ = ["__version__", "load_model", "nuclei_from_maps", "open_slide", "read_nuclei", "run",
           "segment", "write_geoparquet", "write_qupath"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'hoverdask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
