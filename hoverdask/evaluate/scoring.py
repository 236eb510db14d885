"""Scoring a model on an annotated dataset with the HoVer-Net paper's metrics (Tables III and V).

Per image: DICE, AJI, AJI+, DQ, SQ, PQ (``compute_stats.run_nuclei_inst_stat``; the mean is
the mean of per-image values). With types: F_d, accuracy and F_c per class, pooled over all
images (``run_nuclei_type_stat``: centroids paired within 12 px at 0.25 µm/px).

Images are read by :mod:`hoverdask.train.datasets` and scored at the model's pixel size
(0.25 µm/px): those at other sizes are resampled first, ground truth included. Ground-truth
centroids and per-nucleus types come from the same instance records as the predictions
(centroid from image moments, majority type vote).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.errors import DatasetError, HoverdaskError
from hoverdask.core.types import select_type_table
from hoverdask.evaluate.metrics import (
    aji,
    aji_plus,
    dice,
    panoptic_quality,
    remap_label,
    type_stats,
)
from hoverdask.nuclei.instances import instance_info_fast
from hoverdask.nuclei.postproc import METHODS, process

INSTANCE_METRICS = ("dice", "aji", "aji_plus", "dq", "sq", "pq")


@dataclass(frozen=True)
class Prediction:
    """Ground truth and prediction for one image (types optional on both sides)."""

    name: str
    true_inst: np.ndarray
    pred_inst: np.ndarray
    true_types: np.ndarray | None = None  # per-pixel type map
    pred_centroids: np.ndarray | None = None  # (N, 2) x, y; None: from pred_inst
    pred_nucleus_types: np.ndarray | None = None  # (N,) one type per predicted nucleus


@dataclass(frozen=True)
class ImageScores:
    name: str
    scores: dict[str, float]
    n_true: int
    n_pred: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.scores, "n_true": self.n_true, "n_pred": self.n_pred}


@dataclass
class EvaluationReport:
    """Per-image instance scores, their mean, and pooled type scores when both sides have types."""

    images: list[ImageScores]
    types: dict[str, Any] | None = None
    type_names: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def mean(self) -> dict[str, Any]:
        mean: dict[str, Any] = {
            name: _nanmean([image.scores[name] for image in self.images])
            for name in INSTANCE_METRICS
        }
        if self.types is not None:
            mean["f_d"] = self.types["f1_d"]
            mean["acc"] = self.types["acc"]
            mean["f_c"] = {
                self.type_names.get(t, str(t)): value
                for t, value in self.types["f1_per_type"].items()
            }
        return mean

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": _json_safe(self.mean()),
            "images": [_json_safe(image.to_json()) for image in self.images],
            "notes": self.notes,
        }


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _json_safe(value: Any) -> Any:
    """NaN (e.g. PQ of an image with no nuclei on either side) becomes null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def score_instances(true_inst: np.ndarray, pred_inst: np.ndarray) -> dict[str, float]:
    """DICE, AJI, AJI+, DQ, SQ, PQ of one image (ids are renumbered first, as the reference)."""
    true = remap_label(true_inst)
    pred = remap_label(pred_inst)
    pq = panoptic_quality(true, pred, match_iou=0.5)
    return {
        "dice": dice(true, pred),
        "aji": aji(true, pred),
        "aji_plus": aji_plus(true, pred),
        "dq": pq["dq"],
        "sq": pq["sq"],
        "pq": pq["pq"],
    }


def nucleus_points(inst: np.ndarray, types: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (N, 2) x, y and one type per nucleus (majority vote; 0 when untyped)."""
    info = instance_info_fast(np.asarray(inst, np.int32), types)
    centroids = np.array([rec["centroid"] for rec in info.values()]).reshape(-1, 2)
    kinds = np.array([rec["type"] or 0 for rec in info.values()], np.int64)
    return centroids, kinds


def evaluate_predictions(
    predictions: Iterable[Prediction], type_names: dict[int, str] | None = None
) -> EvaluationReport:
    """Score each prediction; pool type statistics when every image has types on both sides."""
    images: list[ImageScores] = []
    points: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    typed = True
    for item in predictions:
        scores = score_instances(item.true_inst, item.pred_inst)
        n_true = len(np.unique(item.true_inst[item.true_inst > 0]))
        n_pred = len(np.unique(item.pred_inst[item.pred_inst > 0]))
        images.append(ImageScores(item.name, scores, n_true, n_pred))
        if item.true_types is None or item.pred_nucleus_types is None:
            typed = False
            continue
        true_xy, true_kind = nucleus_points(item.true_inst, item.true_types)
        pred_xy = item.pred_centroids
        if pred_xy is None:
            pred_xy, _ = nucleus_points(item.pred_inst, None)
        points.append((true_xy, true_kind, np.asarray(pred_xy), item.pred_nucleus_types))
    report = EvaluationReport(images, type_names=dict(type_names or {}))
    if typed and points:
        report.types = type_stats(*(list(column) for column in zip(*points, strict=True)))
    return report


def evaluate_model(
    data: str | Path,
    model_path: str | Path | None = None,
    *,
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 8,
    method: str = "reference",
    holdout: str | Path | None = None,
    autocast: bool = False,
) -> EvaluationReport:
    """Run tile inference and post-processing on each image of ``data`` and score it
    (only its held-out images when a ``holdout`` file is given). ``autocast`` runs the network
    in reduced precision where the device has it, as ``run --autocast`` does."""
    from hoverdask.model.catalog import default_model_path
    from hoverdask.model.checkpoints import load_model
    from hoverdask.model.infer import predict_image, resolve_device
    from hoverdask.train.datasets import open_dataset

    if method not in METHODS:
        raise HoverdaskError(f"unknown post-processing method {method!r}; use one of {METHODS}")
    path = Path(model_path) if model_path is not None else default_model_path()
    dataset = open_dataset(data)
    if holdout is not None:
        from hoverdask.train.holdout import Holdout

        dataset = Holdout.read(holdout).split(dataset)[1]
        if not len(dataset):
            raise DatasetError(f"{holdout} holds out no image of {data}")
    if limit is not None and limit < 1:
        raise DatasetError("--limit must be at least 1")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    torch_device = resolve_device(device)
    model = load_model(path, torch_device)
    table, reason = select_type_table(model.nr_types, model.mode, model.metadata)
    notes = [f"model {path} ({model.mode}, nr_types={model.nr_types}); {reason}"]
    notes.append(f"data {dataset.describe()}; {count} image(s) scored")
    typed = model.nr_types is not None and dataset.has_types
    if typed and table is not None and dataset.type_table not in (None, table.name):
        notes.append(
            f"the data uses the {dataset.type_table!r} classes but the model the {table.name!r} "
            "table: F_c compares class ids as they are"
        )

    def predictions() -> Iterable[Prediction]:
        for index in range(count):
            item = dataset[index]
            pred_map = predict_image(model, item.image, batch_size=batch_size, device=torch_device,
                                     autocast=autocast)
            inst, info = process(pred_map, model.nr_types, method=method)  # type: ignore[arg-type]
            centroids = np.array([r["centroid"] for r in info.values()]).reshape(-1, 2)
            kinds = np.array([r["type"] or 0 for r in info.values()], np.int64) if typed else None
            yield Prediction(
                item.name, item.inst, inst, item.types if typed else None, centroids, kinds
            )

    names = {k: t.name for k, t in table.types.items()} if table is not None else {}
    report = evaluate_predictions(predictions(), names)
    report.notes = notes
    return report


def format_table(report: EvaluationReport) -> list[list[str]]:
    """Rows for a text table: header, one row per image, then the mean."""
    header = ["image", "n_true", "n_pred", *INSTANCE_METRICS]
    rows = [header]
    for image in report.images:
        values = [f"{image.scores[m]:.4f}" for m in INSTANCE_METRICS]
        rows.append([image.name, str(image.n_true), str(image.n_pred), *values])
    mean = report.mean()
    rows.append(["mean", "", "", *(f"{mean[m]:.4f}" for m in INSTANCE_METRICS)])
    return rows
