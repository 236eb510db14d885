"""OME-Zarr stores written by ``hoverdask convert``, read back as a
:class:`~hoverdask.slide.base.Slide`.

Format: **OME-NGFF 0.4 on Zarr v2** (``.zattrs`` multiscales, ``/`` chunk separator). 0.5 (Zarr
v3) is newer, but QuPath (OMEZarrReader) writes and reads 0.4 and bioformats2raw emits 0.4, while
ome-zarr-py and napari read both; 0.4 is the version every viewer a pathologist uses can open.

Layout: arrays ``0, 1, ...`` of shape ``(c=3, y, x)`` uint8 (NGFF wants the channel axis before the
spatial ones), chunks ``(3, N, N)``, Blosc-zstd (lossless: values are exactly what tiffslide
decodes). Level ``0..k`` are the slide's own pyramid levels; further levels halve the last one
(2x2 mean) until the longest side is at most :data:`~hoverdask.slide.convert.SMALLEST_LEVEL` px, so viewers and the
tissue mask always have a small level. The fill value is 255 (glass) and all-white chunks are not
stored.

The writer is :mod:`hoverdask.slide.convert`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.errors import SlideError
from hoverdask.slide.base import (
    MPP_HINT,
    Slide,
    ThreadLocalHandles,
    cache_token,
    check_mpp,
    sanitize_slide_id,
    slide_stem,
)

_UNIT_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4}


# --- reading --------------------------------------------------------------------------------


class ZarrReader:
    """Pixels of an NGFF multiscale image stored ``(c, y, x)``; returned as ``(y, x, 3)``."""

    def __init__(self, path: Path, dataset_paths: list[str], mtime_ns: int) -> None:
        self.path = path
        self.dataset_paths = dataset_paths
        self.mtime_ns = mtime_ns
        self._handles = ThreadLocalHandles(self._open)

    def _open(self) -> list[Any]:
        import zarr

        return [zarr.open_array(self.path / p, mode="r") for p in self.dataset_paths]

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dataset_paths": self.dataset_paths, "mtime_ns": self.mtime_ns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["dataset_paths"], state["mtime_ns"])  # type: ignore[misc]

    def tile_size(self, level: int) -> tuple[int, int]:
        chunks = self._handles.get()[level].chunks
        return int(chunks[1]), int(chunks[2])

    def token(self) -> str:
        return cache_token(str(self.path), self.mtime_ns)

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            block = self._handles.get()[level][:3, y0:y1, x0:x1]
        except Exception as err:  # codec/IO errors: a damaged store
            raise SlideError(
                f"{self.path}: cannot read level {level} x {x0}:{x1}, y {y0}:{y1} "
                f"({type(err).__name__}: {err}); the store is damaged",
                code="damaged",
            ) from err
        return np.ascontiguousarray(np.moveaxis(np.asarray(block), 0, -1))

    def close(self) -> None:
        self._handles.close()


def read_attributes(path: Path) -> dict[str, Any]:
    """The group attributes of a Zarr v2 (``.zattrs``) or v3 (``zarr.json``) store, or ``{}``."""
    if (path / ".zattrs").is_file():
        return dict(json.loads((path / ".zattrs").read_text()))
    if (path / "zarr.json").is_file():
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        return dict(attrs.get("ome", attrs))
    return {}


def open_omezarr(path: Path, mpp: float | None = None) -> Slide:
    """Open an NGFF multiscale RGB image (as written by :func:`convert_to_omezarr`) as a Slide."""
    import zarr

    try:
        attrs = read_attributes(path)
    except (OSError, ValueError) as err:
        raise SlideError(f"{path}: unreadable Zarr metadata ({err})") from err
    multiscales = attrs.get("multiscales")
    if not multiscales:
        raise SlideError(
            f"{path}: a folder but not an OME-Zarr image (no multiscales metadata); "
            "convert slides with `hoverdask convert`",
            code="not-a-slide",
        )
    image = multiscales[0]
    axes = [axis["name"] if isinstance(axis, dict) else axis for axis in image.get("axes", [])]
    if axes != ["c", "y", "x"]:
        raise SlideError(f"{path}: expected axes c, y, x for an RGB slide, found {axes}")
    datasets = image["datasets"]
    try:
        arrays = [zarr.open_array(path / d["path"], mode="r") for d in datasets]
    except Exception as err:
        raise SlideError(f"{path}: cannot open its pyramid arrays ({err})") from err
    if arrays[0].shape[0] < 3 or arrays[0].dtype != np.uint8:
        raise SlideError(f"{path}: expected RGB uint8, found {arrays[0].dtype} {arrays[0].shape}")
    extra = attrs.get("hoverdask", {})
    if mpp is not None:
        mpp_value, source = check_mpp(mpp, "--mpp"), "override"
    else:
        mpp_value, source = _mpp_from_ngff(path, image), "ome-zarr"
    power = extra.get("objective_power")
    return Slide(
        path=path,
        slide_id=sanitize_slide_id(extra.get("slide_id") or slide_stem(path)),
        level_dimensions=tuple((int(a.shape[2]), int(a.shape[1])) for a in arrays),
        mpp=mpp_value,
        objective_power=float(power) if power else None,
        properties={**extra.get("properties", {}), "hoverdask.mpp-source": source},
        reader=ZarrReader(path, [d["path"] for d in datasets], path.stat().st_mtime_ns),
    )


def _mpp_from_ngff(path: Path, image: dict[str, Any]) -> float:
    axes = image["axes"]
    unit = axes[2].get("unit") if isinstance(axes[2], dict) else None
    scales = [
        t["scale"]
        for t in image["datasets"][0].get("coordinateTransformations", [])
        if t.get("type") == "scale"
    ]
    if unit not in _UNIT_TO_UM or not scales:
        raise SlideError(f"{path}: the store has no physical pixel size; {MPP_HINT}",
                         code="no-mpp")
    mpp_y, mpp_x = (float(v) * _UNIT_TO_UM[unit] for v in scales[0][1:3])
    return check_mpp((mpp_x + mpp_y) / 2.0, f"{path.name} multiscales scale")
