"""Model files shipped inside the package (``hoverdask/model/weights/*.tar``), described.

The default model is :data:`DEFAULT_MODEL_NAME`; its card (``<name>.md``, beside the weights)
says what it was trained on, how well it does and under which licence. The checkpoint itself
carries the short form of the card under ``metadata["hoverdask"]["card"]`` (name, licence,
mpp, training summary), so that every run can name the model and its licence in its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hoverdask.core.errors import CheckpointError
from hoverdask.core.types import select_type_table

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL_NAME = "hoverdask-lite"


@dataclass(frozen=True)
class BundledModel:
    path: Path
    mode: str
    nr_types: int | None
    table: str
    card: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.stem))

    @property
    def card_path(self) -> Path:
        return self.path.with_suffix(".md")


def model_card(metadata: dict[str, Any]) -> dict[str, Any]:
    """The short card stored in a checkpoint's metadata (empty when there is none)."""
    info = metadata.get("hoverdask")
    card = info.get("card") if isinstance(info, dict) else None
    return dict(card) if isinstance(card, dict) else {}


def bundled_models(folder: Path | None = None) -> list[BundledModel]:
    """Every checkpoint in ``folder`` (the package's), loaded safely to read its layout and card."""
    from hoverdask.model.checkpoints import load_model

    folder = folder or WEIGHTS_DIR
    found = []
    for path in sorted(folder.glob("*.tar")) if folder.is_dir() else []:
        model = load_model(path)
        table, _ = select_type_table(model.nr_types, model.mode, model.metadata)
        found.append(BundledModel(path, model.mode, model.nr_types,
                                  table.name if table else "no types", model_card(model.metadata)))
    return found


def default_model_path(folder: Path | None = None) -> Path:
    """The bundled default model's file, what every command uses when no ``--model`` is given."""
    path = (folder or WEIGHTS_DIR) / f"{DEFAULT_MODEL_NAME}.tar"
    if not path.is_file():
        raise CheckpointError(
            f"the bundled default model {path} is missing (a broken install?); reinstall "
            "hoverdask or pass --model with an official HoVer-Net .tar, a TIAToolbox .pth or a "
            "checkpoint from hoverdask train"
        )
    return path
