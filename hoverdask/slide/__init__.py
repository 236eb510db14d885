"""Slides in: open a whole-slide image, its pixel size and pyramid, the processing view at the
model's resolution, the tissue mask, OME-Zarr conversion and synthetic slides.

May import :mod:`hoverdask.core` only. :func:`open_slide` is the one door; the readers are
:mod:`~hoverdask.slide._tiff` and :mod:`~hoverdask.slide.omezarr`, the shared interface
:mod:`~hoverdask.slide.base`.
"""

from __future__ import annotations

from hoverdask.slide._open import open_slide
from hoverdask.slide.base import (
    PixelReader,
    Slide,
    check_mpp,
    sanitize_slide_id,
    slide_stem,
)

__all__ = ["PixelReader", "Slide", "check_mpp", "open_slide", "sanitize_slide_id", "slide_stem"]
