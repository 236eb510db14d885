"""The resume ledger: where a slide's intermediate results live and how they are committed.

Everything a run produces for one slide sits under ``DIR/<slide_id>/``. Work in progress goes to
``.work/``; each unit of work (a map tile, a block of nuclei) is committed by writing a file under a
temporary name and renaming it, so a crash or Ctrl-C leaves either a whole part or none. A rerun
reads the ledger and redoes only the units whose part is missing. The final files
(``nuclei.parquet``, ``run.json``) are written the same way, ``run.json`` last: its presence with
``"status": "ok"`` is what marks a slide finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.atomic import atomic_write, atomic_write_json

WORK_DIR = ".work"
PARAMS_FILE = "params.json"
RUN_FILE = "run.json"
NUCLEI_FILE = "nuclei.parquet"
TISSUE_FILE = "tissue.npz"  # the tissue mask and its thumbnail, kept for the QC picture


@dataclass(frozen=True)
class SlideLedger:
    """Paths of one slide's outputs and of its committed units of work."""

    slide_dir: Path

    @property
    def work(self) -> Path:
        return self.slide_dir / WORK_DIR

    @property
    def maps_store(self) -> Path:
        return self.work / "maps.zarr"

    @property
    def nuclei_path(self) -> Path:
        return self.slide_dir / NUCLEI_FILE

    @property
    def run_path(self) -> Path:
        return self.slide_dir / RUN_FILE

    def tile_marker(self, row: int, col: int) -> Path:
        return self.work / "tiles" / f"{row}_{col}.json"

    def block_part(self, row: int, col: int) -> Path:
        return self.work / "blocks" / f"{row}_{col}.parquet"

    def stage_part(self, stage: str, row: int, col: int) -> Path:
        return self.work / stage / f"{row}_{col}.json"

    def is_finished(self) -> bool:
        """A slide is finished when its run.json says so (it is written last)."""
        try:
            return json.loads(self.run_path.read_text()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def read_marker(self, path: Path) -> Any | None:
        """The committed payload of a unit of work, or None when it has not been committed."""
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def prepare(self, params: dict[str, Any], *, overwrite: bool) -> bool:
        """Make the work folder ready for ``params``; return True when earlier work is reused.

        Earlier parts are only valid for the exact parameters that produced them, so a change of
        model, resolution or tiling discards them instead of mixing results.
        """
        if overwrite and self.slide_dir.exists():
            shutil.rmtree(self.slide_dir)
        params_path = self.work / PARAMS_FILE
        previous = self.read_marker(params_path)
        normalised = json.loads(json.dumps(params, sort_keys=True, default=str))
        if previous is not None and previous != normalised and self.work.exists():
            shutil.rmtree(self.work)
            previous = None
        for stale in (self.run_path, self.nuclei_path):
            stale.unlink(missing_ok=True)
        atomic_write_json(params_path, normalised)
        return previous is not None

    def clean_work(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


# --- the tissue mask kept for the QC picture -------------------------------------------------


def save_tissue(path: Path, mask: Any) -> None:
    """Keep the tissue mask and its thumbnail (at ``path``) for the QC picture drawn at the end."""
    if mask is None or mask.thumbnail is None:
        return
    thumbnail = mask.thumbnail
    downsample = mask.downsample * mask.mask.shape[1] / max(1, thumbnail.shape[1])

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez_compressed(handle, mask=mask.mask, thumbnail=thumbnail,
                                thumbnail_downsample=downsample)

    atomic_write(path, write)


def tissue_file(ledger: SlideLedger) -> Path:
    return ledger.work / TISSUE_FILE


def saved_tissue(ledger: SlideLedger) -> dict[str, np.ndarray] | None:
    """The mask and thumbnail :func:`save_tissue` kept (None: the slide has no QC picture)."""
    path = tissue_file(ledger)
    if not path.exists():
        return None
    with np.load(path) as data:
        return dict(data)
