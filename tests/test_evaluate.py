"""Evaluation: ground truth scored against itself, a known perturbation, and the CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import parity_json, parity_npz, shared_dataset
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.evaluate.scoring import (
    Prediction,
    evaluate_predictions,
    nucleus_points,
    score_instances,
)
from hoverdask.train.datasets import open_dataset


def test_ground_truth_as_prediction_scores_one() -> None:
    data = open_dataset(shared_dataset("consep-train-tiles"))
    items = [data[i] for i in range(3)]
    predictions = []
    for item in items:
        centroids, kinds = nucleus_points(item.inst, item.types)
        # the prediction has other ids than the ground truth: the metrics must not care
        shuffled = np.where(item.inst > 0, item.inst * 3 + 11, 0)
        predictions.append(Prediction(item.name, item.inst, shuffled, item.types, centroids, kinds))
    report = evaluate_predictions(predictions, {1: "misc", 2: "inflammatory", 3: "epi", 4: "spindle"})
    mean = report.mean()
    for name in ("dice", "aji", "aji_plus", "dq", "sq", "pq"):
        assert mean[name] == pytest.approx(1.0, abs=1e-5), name
    assert mean["f_d"] == 1.0
    assert mean["acc"] == 1.0
    assert set(mean["f_c"].values()) == {1.0}
    payload = report.to_json()
    assert set(payload) >= {"mean", "images"}
    assert len(payload["images"]) == 3
    assert payload["images"][0]["n_true"] == payload["images"][0]["n_pred"]


def test_instance_scores_match_reference_metrics() -> None:
    inputs = parity_npz("metrics_inputs.npz")
    expected = parity_json("metrics_expected.json")["pred2_perturbed"]
    scores = score_instances(inputs["true"], inputs["pred2"])
    assert scores["dice"] == pytest.approx(expected["dice_1"], abs=1e-12)
    for name in ("aji", "aji_plus", "dq", "sq", "pq"):
        assert scores[name] == pytest.approx(expected[name], abs=1e-12), name


def test_untyped_predictions_have_no_type_scores() -> None:
    inst = np.zeros((30, 30), np.int32)
    inst[5:15, 5:15] = 1
    pred = np.zeros_like(inst)
    pred[5:15, 5:13] = 4  # IoU 0.8
    report = evaluate_predictions([Prediction("a", inst, pred)])
    assert report.types is None
    scores = report.images[0].scores
    assert scores["dq"] == 1.0
    assert scores["sq"] == pytest.approx(0.8, abs=1e-6)
    assert scores["dice"] == pytest.approx(2 * 80 / 180)
    assert "f_d" not in report.mean()


def test_evaluate_without_model_and_without_the_bundled_one_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hoverdask.model import catalog

    monkeypatch.setattr(catalog, "WEIGHTS_DIR", tmp_path / "empty")
    result = CliRunner().invoke(
        app, ["evaluate", "--data", str(tmp_path), "--json", str(tmp_path / "s.json")]
    )
    assert result.exit_code == 2
    assert "bundled default model" in result.output
    assert "--model" in result.output
    assert not (tmp_path / "s.json").exists()


@pytest.mark.slow
def test_cli_evaluate_prints_table_and_writes_json(tmp_path: Path) -> None:
    import torch

    from hoverdask.model import HoVerNet
    from hoverdask.model.checkpoints import save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "m.tar"
    save_checkpoint(HoVerNet("fast", 5), checkpoint, extra={"hoverdask": {"type_table": "consep"}})
    root = shared_dataset("consep-train-tiles")
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(app, [
        "evaluate", "--model", str(checkpoint), "--data", str(root), "--limit", "1",
        "--device", "cpu", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "aji_plus" in result.output
    assert "F_d" in result.output
    payload = json.loads(out.read_text())
    first = open_dataset(root)[0]
    assert [image["name"] for image in payload["images"]] == [first.name]
    assert payload["images"][0]["n_true"] == len(np.unique(first.inst)) - 1
    assert set(payload["mean"]["f_c"]) <= {"Miscellaneous", "Inflammatory", "Epithelial", "Spindle"}
    for name in ("dice", "aji", "aji_plus", "dq", "sq", "pq"):
        value = payload["mean"][name]
        assert value is None or 0.0 <= value <= 1.0
