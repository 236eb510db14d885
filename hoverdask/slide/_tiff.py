"""TIFF-based slides (svs, ndpi, tif/tiff, ome-tiff, scn, bif, ... whatever tiffslide reads).

:func:`open_tiff` checks the file (a TIFF header, complete, RGB), finds its pixel size (the
override, the vendor metadata, OME ``PhysicalSizeX/Y``, the TIFF resolution tags, in that order)
and returns a :class:`~hoverdask.slide.base.Slide` that reads through :class:`TiffReader`.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.errors import SlideError
from hoverdask.slide.base import (
    MPP_HINT,
    SUPPORTED_FORMATS,
    Slide,
    ThreadLocalHandles,
    cache_token,
    check_mpp,
    sanitize_slide_id,
    slide_stem,
)


class TiffReader:
    """Pixels of a TIFF-based slide through tiffslide's zarr view of its pyramid."""

    def __init__(self, path: Path, mtime_ns: int) -> None:
        self.path = path
        self.mtime_ns = mtime_ns
        self._handles = ThreadLocalHandles(self._open)

    def _open(self) -> Any:
        from tiffslide import TiffSlide

        return TiffSlide(self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mtime_ns": self.mtime_ns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["mtime_ns"])  # type: ignore[misc]

    def _level(self, level: int) -> Any:
        return self._handles.get().zarr_group[str(level)]

    def tile_size(self, level: int) -> tuple[int, int]:
        chunks = self._level(level).chunks
        axes = self._handles.get().properties.get("tiffslide.series-axes", "YXS")
        return (chunks[1], chunks[2]) if axes == "CYX" else (chunks[0], chunks[1])

    def token(self) -> str:
        return cache_token(str(self.path), self.mtime_ns)

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            array = self._level(level)
            axes = self._handles.get().properties.get("tiffslide.series-axes", "YXS")
            if axes == "CYX":
                block = np.moveaxis(np.asarray(array[:3, y0:y1, x0:x1]), 0, -1)
            else:
                block = np.asarray(array[y0:y1, x0:x1])
        except Exception as err:  # decoder errors come in many types; all mean a broken file
            raise SlideError(
                f"{self.path}: cannot decode level {level} pixels "
                f"x {x0}:{x1}, y {y0}:{y1} ({type(err).__name__}: {err}); the file is damaged",
                code="damaged",
            ) from err
        return np.ascontiguousarray(block[..., :3], dtype=np.uint8)

    def close(self) -> None:
        self._handles.close()


def open_tiff(path: Path, mpp_override: float | None, size: int) -> Slide:
    from tiffslide import TiffSlide

    tifffile_log = logging.getLogger("tifffile")  # its warnings would duplicate our message
    previous_level = tifffile_log.level
    tifffile_log.setLevel(logging.CRITICAL)
    handle = None
    try:
        handle = TiffSlide(path)
        properties = dict(handle.properties)
        level_dimensions = tuple(tuple(int(v) for v in dims) for dims in handle.level_dimensions)
        tiff = handle.ts_tifffile
        _check_complete(path, tiff, size, properties)
        _check_rgb(path, handle)
        ome_mpp, ome_power = _ome_pixel_size(tiff)
    except SlideError:
        raise
    except Exception as err:
        if _has_tiff_header(path):
            raise SlideError(
                f"{path}: a TIFF file whose structure cannot be read, probably truncated or "
                f"damaged ({type(err).__name__}: {err}); copy it again from its source",
                code="truncated",
            ) from err
        raise SlideError(
            f"{path}: not a readable slide ({type(err).__name__}: {err}); "
            f"hoverdask reads {SUPPORTED_FORMATS}",
            code="not-a-slide",
        ) from err
    finally:
        tifffile_log.setLevel(previous_level)
        if handle is not None:
            handle.close()  # pixels are read through per-thread handles (TiffReader)
    mpp, mpp_source = _pick_mpp(path, properties, ome_mpp, mpp_override)
    properties["hoverdask.mpp-source"] = mpp_source
    power = properties.get("tiffslide.objective-power") or ome_power
    reader = TiffReader(path, path.stat().st_mtime_ns)
    return Slide(
        path=path,
        slide_id=sanitize_slide_id(slide_stem(path)),
        level_dimensions=level_dimensions,  # type: ignore[arg-type]
        mpp=mpp,
        objective_power=float(power) if power else None,
        properties=properties,
        reader=reader,
    )


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _has_tiff_header(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) in _TIFF_MAGIC


def _check_complete(path: Path, tiff: Any, size: int, properties: dict[str, Any]) -> None:
    """Refuse a truncated file up front: every tile of every level must lie inside the file."""
    series = tiff.series[int(properties.get("tiffslide.series-index") or 0)]
    for level_series in series.levels:
        for page in level_series.pages:
            if page is None:
                continue
            ends = [
                offset + count
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False)
                if count
            ]
            if ends and max(ends) > size:  # (empty tiles, count 0, are legal: sparse files)
                raise SlideError(
                    f"{path}: the file is truncated or incomplete (image data missing "
                    f"beyond byte {size}); copy it again from its source",
                    code="truncated",
                )


def _check_rgb(path: Path, handle: Any) -> None:
    array = handle.zarr_group["0"]
    axes = handle.properties.get("tiffslide.series-axes")
    samples = array.shape[0] if axes == "CYX" else (array.shape[2] if array.ndim == 3 else 1)
    if array.dtype != np.uint8 or samples not in (3, 4):
        raise SlideError(
            f"{path}: expected an RGB brightfield slide (uint8, 3 samples), found "
            f"{array.dtype} with {samples} sample(s) (axes {axes})",
            code="not-rgb",
        )


def _pick_mpp(
    path: Path, properties: dict[str, Any], ome_mpp: float | None, override: float | None
) -> tuple[float, str]:
    if override is not None:
        return float(override), "override"
    vendor = properties.get("tiffslide.vendor")
    candidates: list[tuple[Any, Any, str]] = []
    if vendor and vendor != "generic-tiff":
        candidates.append(
            (properties.get("tiffslide.mpp-x"), properties.get("tiffslide.mpp-y"), vendor)
        )
    candidates.append((ome_mpp, ome_mpp, "ome"))
    candidates.append((properties.get("tiffslide.mpp-x"), properties.get("tiffslide.mpp-y"), "tiff"))
    for mpp_x, mpp_y, source in candidates:
        if mpp_x:
            values = [float(v) for v in (mpp_x, mpp_y) if v]
            return check_mpp(sum(values) / len(values), f"{path.name} metadata ({source})"), source
    raise SlideError(f"{path}: the slide's metadata has no pixel size (mpp); {MPP_HINT}",
                     code="no-mpp")


_OME_UNITS_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_pixel_size(tiff: Any) -> tuple[float | None, float | None]:
    """``(mpp, objective power)`` from OME-XML, if the file has it."""
    xml = getattr(tiff, "ome_metadata", None) if getattr(tiff, "is_ome", False) else None
    if not xml:
        return None, None
    root = ET.fromstring(xml)
    mpp = None
    for pixels in root.iter():
        if pixels.tag.endswith("}Pixels") and pixels.get("PhysicalSizeX"):
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            if unit in _OME_UNITS_TO_UM:
                mpp = float(pixels.get("PhysicalSizeX", "0")) * _OME_UNITS_TO_UM[unit]
            break
    power = None
    for objective in root.iter():
        if objective.tag.endswith("}Objective") and objective.get("NominalMagnification"):
            power = float(objective.get("NominalMagnification", "0"))
            break
    return mpp, power
