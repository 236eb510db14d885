"""``--region X,Y,W,H``: run the pipeline on a level-0 rectangle of a slide as if it were the slide.

A region is cut out of the processing view (0.25 µm/px) once, at planning: the map-tile grid,
the reflection padding, the post-processing blocks and the nucleus ids all live in the cut-out,
exactly as for a slide whose pixels were only the region. Its processing-pixel origin is the
``offset`` that :func:`hoverdask.nuclei.to_level0` adds when the table is made, so every written
coordinate is in level-0 pixels of the original slide. A region run writes to its own folder
(``<slide id>-region-X-Y-W-H``), so its map cache and parts never mix with another region's.
"""

from __future__ import annotations

from dataclasses import dataclass

from hoverdask.errors import HoverdaskError

USAGE = "--region takes X,Y,W,H: four non-negative integers (level-0 pixels) with W and H > 0"


@dataclass(frozen=True)
class Region:
    """A rectangle of level-0 pixels ``[x, x + width) x [y, y + height)``."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        values = (self.x, self.y, self.width, self.height)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise HoverdaskError(f"{USAGE}, not {values!r}")
        if min(self.x, self.y) < 0 or min(self.width, self.height) <= 0:
            raise HoverdaskError(f"{USAGE}, not {self.text}")

    @classmethod
    def parse(cls, text: str) -> Region:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise HoverdaskError(f"{USAGE}, not {text!r}")
        return cls(*(int(p) for p in parts))

    @property
    def text(self) -> str:
        return f"{self.x},{self.y},{self.width},{self.height}"

    @property
    def suffix(self) -> str:
        """What the output folder name gets, so each region has its own files and cache."""
        return f"-region-{self.x}-{self.y}-{self.width}-{self.height}"

    def check_inside(self, level0_size: tuple[int, int], slide: str) -> None:
        """Fail with one line when the rectangle leaves the slide (``(width, height)``)."""
        width, height = level0_size
        if self.x + self.width > width or self.y + self.height > height:
            raise HoverdaskError(
                f"--region {self.text} is outside {slide} ({width}x{height} level-0 pixels): "
                f"X+W must be <= {width} and Y+H <= {height}"
            )

    def processing_box(self, scale: float, size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of the region in processing pixels (``scale``: level-0 px per
        processing px), edges rounded to the nearest pixel and kept inside the view."""
        height, width = size_hw
        y0, x0 = min(round(self.y / scale), height - 1), min(round(self.x / scale), width - 1)
        y1 = min(max(round((self.y + self.height) / scale), y0 + 1), height)
        x1 = min(max(round((self.x + self.width) / scale), x0 + 1), width)
        return y0, x0, y1, x1


def region_level0_box(
    box: tuple[int, int, int, int], scale: float
) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` level-0 bounds of a processing-pixel box ``(y0, x0, y1, x1)``."""
    y0, x0, y1, x1 = box
    return x0 * scale, y0 * scale, x1 * scale, y1 * scale
