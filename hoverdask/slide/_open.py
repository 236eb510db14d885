"""The one door to a slide: :func:`open_slide` picks the reader from what the path is."""

from __future__ import annotations

from pathlib import Path

from hoverdask.core.errors import SlideError
from hoverdask.slide._tiff import open_tiff
from hoverdask.slide.base import Slide, check_mpp
from hoverdask.slide.omezarr import open_omezarr


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide (TIFF-based file or OME-Zarr from ``convert``); ``mpp`` overrides metadata.

    Raises :class:`SlideError` for anything that is not a readable RGB slide, and when no pixel
    size is known (the message says to pass ``--mpp``).
    """
    path = Path(path)
    if mpp is not None:
        check_mpp(mpp, "--mpp")
    if not path.exists():
        raise SlideError(f"{path}: no such file or folder", code="not-found")
    if path.is_dir():
        return open_omezarr(path, mpp)
    size = path.stat().st_size
    if size == 0:
        raise SlideError(f"{path}: the file is empty (0 bytes)", code="empty")
    return open_tiff(path, mpp, size)
