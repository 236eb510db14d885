"""Model files shipped inside the package (``hoverdask/model/weights/*.tar``), described."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class BundledModel:
    path: Path
    mode: str
    nr_types: int | None
    table: str


def bundled_models(folder: Path = WEIGHTS_DIR) -> list[BundledModel]:
    """Every checkpoint in ``folder``, loaded safely to read its layout and type table."""
    from hoverdask.model.checkpoints import load_model
    from hoverdask.model.types import select_type_table

    found = []
    for path in sorted(folder.glob("*.tar")) if folder.is_dir() else []:
        model = load_model(path)
        table, _ = select_type_table(model.nr_types, model.mode, model.metadata)
        found.append(
            BundledModel(path, model.mode, model.nr_types, table.name if table else "no types")
        )
    return found
