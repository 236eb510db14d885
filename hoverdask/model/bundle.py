"""Turning a training checkpoint into a shipped model: fp16 weights plus the short card.

Half precision halves the file (the lite network is ~2.3 M parameters, ~4.6 MB); weights are
widened back to fp32 when loaded, so inference is unchanged but for the rounding of the weights
(see ``tests/test_model_lite.py``). Run as ``python -m hoverdask.model.bundle SRC DST CARD.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from hoverdask.model.checkpoints import load_model, save_checkpoint


def bundle_checkpoint(source: str | Path, target: str | Path, card: dict[str, Any]) -> Path:
    """Write ``source``'s weights in fp16 to ``target`` with ``card`` in its metadata (kept:
    the training metadata and the type table)."""
    model = load_model(source)
    info = {**model.metadata.get("hoverdask", {}), "card": card}
    return save_checkpoint(model.half(), target, extra={"hoverdask": info})


def _main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m hoverdask.model.bundle SOURCE.tar TARGET.tar CARD.json")
        return 2
    source, target, card_path = argv
    card = json.loads(Path(card_path).read_text())
    path = bundle_checkpoint(source, target, card)
    print(f"{path} ({path.stat().st_size / 1e6:.2f} MB, {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
