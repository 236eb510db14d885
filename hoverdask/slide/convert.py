"""Slide -> OME-Zarr conversion (``hoverdask convert``), in the layout
:mod:`hoverdask.slide.omezarr` describes and reads.

Conversion is parallel (one Dask task per output chunk), memory-bounded (each task holds one
chunk, or four for a halving step), atomic (written to ``OUT.partial``, renamed when complete) and
resumable (a ledger in the partial store lists finished chunks; a rerun skips them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.errors import SlideError
from hoverdask.slide._open import open_slide
from hoverdask.slide.base import PixelReader, Slide
from hoverdask.slide.omezarr import open_omezarr, read_attributes
from hoverdask.slide.tissue import tissue_mask, tissue_path

NGFF_VERSION = "0.4"
FORMAT_TAG = "hoverdask-omezarr-1"
SMALLEST_LEVEL = 512
DEFAULT_CHUNK = 1024
LEDGER = ".hoverdask-done"


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
    ``tissue`` the tissue mask is saved next to the store 
    (:func:`hoverdask.slide.tissue.tissue_path`).
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
