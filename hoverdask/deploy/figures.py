"""The machine's last ``hoverdask bench`` figures, kept so each ``run.json`` can quote them.

Apart from :mod:`hoverdask.bench` so that reading them (once per run, on the client)
does not import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hoverdask.core.atomic import atomic_write_json


def latest_figures_path() -> Path:
    """``bench.json`` in the user's hoverdask folder (``typer.get_app_dir``)."""
    import typer

    return Path(typer.get_app_dir("hoverdask")) / "bench.json"


def remember_figures(results: dict[str, Any]) -> Path:
    """Keep ``results`` as this machine's latest bench figures (written whole, then renamed)."""
    return atomic_write_json(latest_figures_path(), results)


def latest_figures() -> dict[str, Any] | None:
    """The headline figures of the last ``hoverdask bench`` on this machine, or None.

    Meant for ``run.json``: ``{"measured_at", "device", "model_gflop_per_s",
    "model_peak_gflop_per_s", "model_mpix_per_s", "postproc_mpix_per_s",
    "end_to_end_mpix_per_s", "end_to_end_slide_mpix_per_s", "tissue_fraction", "path"}``.
    An unreadable file counts as no figures: they are informative, never needed.
    """
    path = latest_figures_path()
    try:
        results = json.loads(path.read_text())
        model, e2e = results["model"], results.get("end_to_end", {})
        return {
            "measured_at": results.get("measured_at"),
            "device": model["device"],
            "model_gflop_per_s": model["gflop_per_s"],
            "model_peak_gflop_per_s": model["peak_gflop_per_s"],
            "model_mpix_per_s": model["mpix_per_s"],
            "postproc_mpix_per_s": results["postproc"]["mpix_per_s"],
            "end_to_end_mpix_per_s": e2e.get("mpix_per_s"),
            "end_to_end_slide_mpix_per_s": e2e.get("slide_mpix_per_s"),
            "tissue_fraction": e2e.get("tissue_fraction"),
            "path": str(path),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None
