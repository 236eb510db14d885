"""What a run is asked to do, as plain data: its options, the model it runs, the region.

Every other pipeline module reads these; this one imports no other pipeline module, so the
options are one place (the defaults included: :data:`DEFAULT_CHUNK_SIZE`) and planning, the
graph and the outputs do not import the driver to learn them.

``--region X,Y,W,H``: run the pipeline on a level-0 rectangle of a slide as if it were the slide.

A region is cut out of the processing view (0.25 µm/px) once, at planning: the map-tile grid,
the reflection padding, the post-processing blocks and the nucleus ids all live in the cut-out,
exactly as for a slide whose pixels were only the region. Its processing-pixel origin is the
``offset`` that :func:`hoverdask.core.schema.to_level0` adds when the table is made, so every written
coordinate is in level-0 pixels of the original slide. A region run writes to its own folder
(``<slide id>-region-X-Y-W-H``), so its map cache and parts never mix with another region's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hoverdask.core.errors import HoverdaskError
from hoverdask.core.types import TypeTable

# Map tile side in processing pixels: 12 whole outputs of the fast model's 164 px patches; the
# plan rounds it down to whole outputs of the model that runs (docs/pipeline.md).
DEFAULT_CHUNK_SIZE = 1968

NO_TISSUE_WARNING = (
    "warning: the tissue mask found no tissue (blank or glass-only slide?), so nothing was "
    "segmented; pass --no-tissue-mask to process every tile"
)


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


@dataclass(frozen=True)
class RunOptions:
    """Parameters that shape the results (all recorded in run.json)."""

    target_mpp: float = 0.25
    mpp: float | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    batch_size: int = 0  # 0: fit the GPU's free memory (1 on CPU)
    device: str = "auto"
    autocast: bool = False
    autocast_dtype: str = "bfloat16"
    compile: bool = False
    formats: tuple[str, ...] = ("parquet", "qupath")
    tissue_mask: bool = True
    overwrite: bool = False
    keep_work: bool = False
    retries: int = 1
    region: Region | None = None  # a level-0 rectangle of the (single) slide, run as the slide
    read_ahead: int | None = None  # tiles read ahead per inference task; None: 2 on GPU, 0 on CPU


class TilePredictor(Protocol):
    margin: int
    output: int
    nr_types: int | None

    def predict_tile(self, window: np.ndarray, tile_origin_yx: tuple[int, int]) -> np.ndarray:
        """Maps (H - 2*margin, W - 2*margin, C) float32 for a (H, W, 3) uint8 window."""
        ...


class PredictorFactory(Protocol):
    def __call__(self) -> TilePredictor: ...


@dataclass(frozen=True)
class ModelSpec:
    """The predictor's geometry and provenance, fixed for the whole run."""

    factory: PredictorFactory
    output: int
    margin: int
    nr_types: int | None
    description: dict[str, Any]
    type_table: TypeTable | None = None
