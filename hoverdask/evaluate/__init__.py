"""Scoring: the HoVer-Net paper's metrics as the reference computes them, and a model scored on
an annotated dataset. May import core, slide, model, nuclei and train."""

from __future__ import annotations

from hoverdask.evaluate.scoring import evaluate_model, format_table

__all__ = ["evaluate_model", "format_table"]
