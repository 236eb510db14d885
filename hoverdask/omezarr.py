"""Slide -> OME-Zarr conversion, and reading those stores back as a :class:`~hoverdask.slide.Slide`.

Format: **OME-NGFF 0.4 on Zarr v2** (``.zattrs`` multiscales, ``/`` chunk separator). 0.5 (Zarr
v3) is newer, but QuPath (OMEZarrReader) writes and reads 0.4 and bioformats2raw emits 0.4, while
ome-zarr-py and napari read both; 0.4 is the version every viewer a pathologist uses can open.

Layout: arrays ``0, 1, ...`` of shape ``(c=3, y, x)`` uint8 (NGFF wants the channel axis before the
spatial ones), chunks ``(3, N, N)``, Blosc-zstd (lossless: values are exactly what tiffslide
decodes). Level ``0..k`` are the slide's own pyramid levels; further levels halve the last one
(2x2 mean) until the longest side is at most :data:`SMALLEST_LEVEL` px, so viewers and the
tissue mask always have a small level. The fill value is 255 (glass) and all-white chunks are not
stored.

Conversion is parallel (one Dask task per output chunk), memory-bounded (each task holds one
chunk, or four for a halving step), atomic (written to ``OUT.partial``, renamed when complete) and
resumable (a ledger in the partial store lists finished chunks; a rerun skips them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.errors import SlideError
from hoverdask.slide import (
    PixelReader,
    Slide,
    ThreadLocalHandles,
    cache_token,
    check_mpp,
    open_slide,
    sanitize_slide_id,
    slide_stem,
)

NGFF_VERSION = "0.4"
FORMAT_TAG = "hoverdask-omezarr-1"
SMALLEST_LEVEL = 512
DEFAULT_CHUNK = 1024
LEDGER = ".hoverdask-done"
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
    from hoverdask.slide import MPP_HINT

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


# --- writing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LevelPlan:
    """One output level: its size, and where its pixels come from."""

    index: int
    width: int
    height: int
    source_level: int | None  # slide level copied, or None: 2x2 mean of the previous output level


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    levels: tuple[LevelPlan, ...]
    chunks_written: int
    chunks_resumed: int
    up_to_date: bool = False


def plan_levels(slide: Slide) -> list[LevelPlan]:
    """The slide's own levels, then halvings until the longest side is ``SMALLEST_LEVEL``."""
    plans = [
        LevelPlan(i, w, h, i) for i, (w, h) in enumerate(slide.level_dimensions) if min(w, h) > 0
    ]
    while max(plans[-1].width, plans[-1].height) > SMALLEST_LEVEL:
        last = plans[-1]
        plans.append(LevelPlan(last.index + 1, -(-last.width // 2), -(-last.height // 2), None))
    return plans


def _fingerprint(slide: Slide, chunk: int) -> dict[str, Any]:
    stat = slide.path.stat()
    return {
        "format": FORMAT_TAG,
        "source": str(slide.path.resolve()),
        "source_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "mpp": slide.mpp,
        "chunk": chunk,
    }


def ngff_attributes(slide: Slide, plans: list[LevelPlan], chunk: int) -> dict[str, Any]:
    """Group attributes: NGFF 0.4 multiscales + omero rendering + hoverdask provenance."""
    w0, h0 = slide.dimensions
    datasets = [
        {
            "path": str(p.index),
            "coordinateTransformations": [
                {
                    "type": "scale",
                    "scale": [1.0, slide.mpp * (h0 / p.height), slide.mpp * (w0 / p.width)],
                }
            ],
        }
        for p in plans
    ]
    channels = [
        {
            "label": name,
            "color": color,
            "window": {"start": 0, "end": 255, "min": 0, "max": 255},
            "active": True,
        }
        for name, color in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
    ]
    properties = {k: v for k, v in slide.properties.items() if _json_scalar(v)}
    return {
        "multiscales": [
            {
                "version": NGFF_VERSION,
                "name": slide.slide_id,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {
                    "description": "levels 0..k: the slide's own pyramid, decoded; further "
                    "levels: 2x2 mean of the previous level"
                },
            }
        ],
        "omero": {"rdefs": {"model": "color"}, "channels": channels},
        "hoverdask": {
            **_fingerprint(slide, chunk),
            "slide_id": slide.slide_id,
            "objective_power": slide.objective_power,
            "source_levels": sum(p.source_level is not None for p in plans),
            "properties": properties,
        },
    }


def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def convert_to_omezarr(
    slide_path: str | Path,
    out: str | Path,
    *,
    mpp: float | None = None,
    chunk: int = DEFAULT_CHUNK,
    overwrite: bool = False,
    tissue: bool = True,
    scheduler: str | None = None,
    num_workers: int | None = None,
) -> ConversionResult:
    """Write ``slide_path`` as an OME-Zarr at ``out`` (see the module docstring for the layout).

    A complete store from the same source and options is left alone (``up_to_date``); a
    different existing store needs ``overwrite``. An interrupted run resumes from
    ``OUT.partial``. A damaged slide discovered mid-way removes the partial store. With
    ``tissue`` the tissue mask is saved next to the store (:func:`hoverdask.tissue.tissue_path`).
    """
    if chunk < 64 or chunk % 16:
        raise SlideError(f"--chunk must be a multiple of 16 and at least 64, got {chunk}")
    out = Path(out)
    slide = open_slide(slide_path, mpp)  # refuses bad input before anything is written
    fingerprint = _fingerprint(slide, chunk)
    plans = plan_levels(slide)
    if out.exists():
        if _is_complete_match(out, fingerprint):
            return ConversionResult(out, tuple(plans), 0, 0, up_to_date=True)
        if not overwrite:
            raise SlideError(f"{out} already exists; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not _fingerprint_matches(partial, fingerprint):
        shutil.rmtree(partial)  # a run from another source or with other options: start over
    out.parent.mkdir(parents=True, exist_ok=True)
    job = _Job(slide, partial, plans, chunk)
    try:
        written, resumed = job.run(scheduler, num_workers)
    except SlideError:
        shutil.rmtree(partial, ignore_errors=True)  # the input is broken: resuming cannot help
        raise
    finally:
        slide.close()
    (partial / LEDGER).unlink(missing_ok=True)
    _replace(partial, out)
    if tissue:
        from hoverdask.tissue import tissue_mask, tissue_path

        with open_omezarr(out) as converted:
            tissue_mask(converted).save(tissue_path(out))
    return ConversionResult(out, tuple(plans), written, resumed)


def _fingerprint_matches(store: Path, fingerprint: dict[str, Any]) -> bool:
    try:
        stored = read_attributes(store).get("hoverdask", {})
    except (OSError, ValueError):
        return False
    return all(stored.get(k) == v for k, v in fingerprint.items())


def _is_complete_match(out: Path, fingerprint: dict[str, Any]) -> bool:
    return _fingerprint_matches(out, fingerprint) and not (out / LEDGER).exists()


def _replace(partial: Path, out: Path) -> None:
    """Rename the finished store into place; an old store is moved aside first, then removed."""
    old = out.with_name(out.name + ".old")
    _remove(old)
    if out.exists():
        out.rename(old)
    partial.rename(out)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class _Job:
    """The chunk-by-chunk copy of one slide into a partial store, with a resume ledger."""

    def __init__(self, slide: Slide, partial: Path, plans: list[LevelPlan], chunk: int) -> None:
        self.slide, self.partial, self.plans, self.chunk = slide, partial, plans, chunk

    def run(self, scheduler: str | None, num_workers: int | None) -> tuple[int, int]:
        import dask

        self._create_store()
        done = self._done_units()
        written = resumed = 0
        for plan in self.plans:  # level by level: a halving reads the level above it
            units = list(_units(plan, self.chunk))
            todo = [u for u in units if u not in done]
            resumed += len(units) - len(todo)
            tasks = [
                dask.delayed(_write_unit, pure=False)(
                    self.slide.reader, self.partial, plan, self.chunk, unit
                )
                for unit in todo
            ]
            kwargs: dict[str, Any] = {}
            if scheduler is not None:
                kwargs["scheduler"] = scheduler
            if num_workers is not None:
                kwargs["num_workers"] = num_workers
            dask.compute(*tasks, **kwargs)
            written += len(todo)
        return written, resumed

    def _create_store(self) -> None:
        import numcodecs
        import zarr

        group = zarr.open_group(self.partial, mode="a", zarr_format=2)
        group.attrs.update(ngff_attributes(self.slide, self.plans, self.chunk))
        for plan in self.plans:
            if str(plan.index) in group:
                continue
            group.create_array(
                str(plan.index),
                shape=(3, plan.height, plan.width),
                chunks=(3, self.chunk, self.chunk),
                dtype="uint8",
                fill_value=255,
                compressors=numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )

    def _done_units(self) -> set[tuple[int, int, int]]:
        ledger = self.partial / LEDGER
        if not ledger.exists():
            return set()
        done = set()
        for line in ledger.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:  # a line cut short by a crash is simply redone
                done.add((int(parts[0]), int(parts[1]), int(parts[2])))
        return done


def _units(plan: LevelPlan, chunk: int) -> Iterator[tuple[int, int, int]]:
    for row in range(-(-plan.height // chunk)):
        for col in range(-(-plan.width // chunk)):
            yield plan.index, row, col


def _write_unit(
    reader: PixelReader, partial: Path, plan: LevelPlan, chunk: int, unit: tuple[int, int, int]
) -> None:
    """Fill one output chunk, then record it in the ledger (one atomic append)."""
    import zarr

    _, row, col = unit
    y0, x0 = row * chunk, col * chunk
    y1, x1 = min(y0 + chunk, plan.height), min(x0 + chunk, plan.width)
    if plan.source_level is not None:
        pixels = reader.read(plan.source_level, y0, y1, x0, x1)
    else:
        above = zarr.open_array(partial / str(plan.index - 1), mode="r")
        block = np.moveaxis(np.asarray(above[:, 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]), 0, -1)
        pixels = halve(block)[: y1 - y0, : x1 - x0]
    target = zarr.open_array(partial / str(plan.index), mode="r+")
    target[:, y0:y1, x0:x1] = np.moveaxis(pixels, -1, 0)
    fd = os.open(partial / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{unit[0]} {row} {col}\n".encode())
    finally:
        os.close(fd)


def halve(block: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded half up) of an ``(h, w, c)`` uint8 block; odd edges repeat their pixel."""
    h, w = block.shape[:2]
    padded = np.pad(block, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge").astype(np.uint16)
    total = padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)
