"""Metrics against values computed by the reference code (metrics_expected.json) and against
straightforward per-mask implementations of the same definitions on random maps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import parity_json, parity_npz
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from hoverdask.evaluate import metrics

EXPECTED = parity_json("metrics_expected.json")
TOL = 1e-12


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return parity_npz("metrics_inputs.npz")


def test_instance_metrics_match_reference(inputs) -> None:
    true, pred = inputs["true"], inputs["pred"]
    assert metrics.dice(true, pred) == pytest.approx(EXPECTED["dice_1"], abs=TOL)
    assert metrics.aji(true, pred) == pytest.approx(EXPECTED["aji"], abs=TOL)
    assert metrics.aji_plus(true, pred) == pytest.approx(EXPECTED["aji_plus"], abs=TOL)
    assert metrics.dice2(true, pred) == pytest.approx(EXPECTED["dice_2_fast"], abs=TOL)
    assert metrics.dice2(true, pred) == pytest.approx(EXPECTED["dice_2"], abs=TOL)


@pytest.mark.parametrize("match_iou", [0.5, 0.3])
def test_panoptic_quality_matches_reference(inputs, match_iou: float) -> None:
    expected = EXPECTED[f"pq_iou{match_iou}"]
    result = metrics.panoptic_quality(inputs["true"], inputs["pred"], match_iou)
    for key in ("dq", "sq", "pq"):
        assert result[key] == pytest.approx(expected[key], abs=TOL)
    for key in ("paired_true", "paired_pred", "unpaired_true", "unpaired_pred"):
        assert result[key] == expected[key]


def test_perturbed_prediction_matches_reference(inputs) -> None:
    expected = EXPECTED["pred2_perturbed"]
    true, pred2 = inputs["true"], inputs["pred2"]
    assert metrics.dice(true, pred2) == pytest.approx(expected["dice_1"], abs=TOL)
    assert metrics.aji(true, pred2) == pytest.approx(expected["aji"], abs=TOL)
    assert metrics.aji_plus(true, pred2) == pytest.approx(expected["aji_plus"], abs=TOL)
    pq = metrics.panoptic_quality(true, pred2)
    for key in ("dq", "sq", "pq"):
        assert pq[key] == pytest.approx(expected[key], abs=TOL)


def test_pair_coordinates_matches_reference(inputs) -> None:
    expected = EXPECTED["pair_coordinates_r12"]
    pairing, lone_a, lone_b = metrics.pair_coordinates(
        inputs["true_centroid"], inputs["pred_centroid"], 12
    )
    assert pairing.tolist() == expected["pairing"]
    assert lone_a.tolist() == expected["unpaired_true"]
    assert lone_b.tolist() == expected["unpaired_pred"]


def test_type_stats_match_reference_printout(inputs) -> None:
    expected = EXPECTED["type_stat_two_images"]
    stats = metrics.type_stats(
        [inputs["true_centroid"]] * 2,
        [inputs["true_type"]] * 2,
        [inputs["pred_centroid"], inputs["pred2_centroid"]],
        [inputs["pred_type"], inputs["pred2_type"]],
    )
    printed = [stats["f1_d"], stats["acc"], *stats["f1_per_type"].values()]
    reference = [float(v) for v in expected["printed"].strip("[]").split()]
    assert [f"{v:.5f}" for v in printed] == [f"{v:.5f}" for v in reference]
    assert list(stats["f1_per_type"]) == [1, 2, 3, 4, 5]


def test_pair_coordinates_radius_is_inclusive() -> None:
    pairing, lone_a, lone_b = metrics.pair_coordinates([[0, 0], [50, 0]], [[3, 4], [50, 5.5]], 5)
    assert pairing.tolist() == [[0, 0]]
    assert lone_a.tolist() == [1]
    assert lone_b.tolist() == [1]


def test_type_stats_empty_image_and_unlabelled_truth() -> None:
    """An image without predictions stands in a (0, 0) type-0 point; type -1 truth is ignored
    as a classification error when the annotation is not exhaustive."""
    true_xy = [np.array([[10.0, 10.0], [40.0, 40.0]]), np.array([[5.0, 5.0]])]
    true_type = [np.array([1, -1]), np.array([2])]
    pred_xy = [np.array([[11.0, 10.0], [40.0, 41.0]]), np.zeros((0, 2))]
    pred_type = [np.array([1, 2]), np.zeros(0)]
    full = metrics.type_stats(true_xy, true_type, pred_xy, pred_type)
    # the dummy prediction at (0, 0) pairs with the true nucleus at (5, 5): 3 pairs, 0 misses
    assert full["f1_d"] == 1.0
    assert full["acc"] == pytest.approx(1 / 3)
    assert list(full["f1_per_type"]) == [-1, 1, 2]
    partial = metrics.type_stats(true_xy, true_type, pred_xy, pred_type, exhaustive=False)
    assert partial["acc"] == pytest.approx(1 / 2)
    # type 2: one true (paired with type 0) and one pred (paired with type -1, ignored)
    assert partial["f1_per_type"][2] == 0.0


def test_remap_label() -> None:
    label = np.array([[0, 7, 7, 3], [9, 9, 9, 0]])
    assert metrics.remap_label(label).tolist() == [[0, 2, 2, 1], [3, 3, 3, 0]]
    assert metrics.remap_label(label, by_size=True).tolist() == [[0, 2, 2, 3], [1, 1, 1, 0]]
    assert metrics.remap_label(np.array([[4, 2]])).tolist() == [[2, 1]]  # no background
    assert metrics.remap_label(label).dtype == np.int32


# --- random maps against per-mask implementations of the definitions --------------------------


def blobs(rng: np.random.Generator, n: int, shape=(40, 40)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.int32)
    for inst_id in range(1, n + 1):
        r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(2, 10, 2)
        label[r : r + h, c : c + w] = inst_id
    return metrics.remap_label(label)


def masks(label: np.ndarray) -> list[np.ndarray]:
    return [label == i for i in range(1, int(label.max()) + 1)]


def pair_tables(true: np.ndarray, pred: np.ndarray):
    t_masks, p_masks = masks(true), masks(pred)
    inter = np.array([[np.sum(t & p) for p in p_masks] for t in t_masks], float)
    union = np.array([[np.sum(t | p) for p in p_masks] for t in t_masks], float)
    union[inter == 0] = 0
    return t_masks, p_masks, inter.reshape(len(t_masks), len(p_masks)), union


def slow_aji(true: np.ndarray, pred: np.ndarray, one_to_one: bool) -> float:
    t_masks, p_masks, inter, union = pair_tables(true, pred)
    iou = inter / (union + 1e-6)
    if one_to_one:
        rows, cols = linear_sum_assignment(-iou)
    else:
        rows, cols = np.arange(len(t_masks)), iou.argmax(axis=1)
    keep = iou[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    total = inter[rows, cols].sum() / (
        union[rows, cols].sum()
        + sum(t_masks[i].sum() for i in range(len(t_masks)) if i not in rows)
        + sum(p_masks[j].sum() for j in range(len(p_masks)) if j not in cols)
    )
    return float(total)


def slow_pq(true: np.ndarray, pred: np.ndarray, match_iou: float) -> tuple[float, ...]:
    t_masks, p_masks, inter, union = pair_tables(true, pred)
    with np.errstate(invalid="ignore"):
        iou = np.where(inter > 0, inter / union, 0)
    if match_iou >= 0.5:
        rows, cols = np.nonzero(iou > match_iou)
    else:
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > match_iou
        rows, cols = rows[keep], cols[keep]
    tp = len(rows)
    dq = tp / (tp + 0.5 * (len(p_masks) - tp) + 0.5 * (len(t_masks) - tp))
    sq = iou[rows, cols].sum() / (tp + 1e-6)
    return dq, sq, dq * sq


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_true=st.integers(1, 12), n_pred=st.integers(1, 12))
def test_random_maps_against_per_mask_definitions(seed: int, n_true: int, n_pred: int) -> None:
    rng = np.random.default_rng(seed)
    true, pred = blobs(rng, n_true), blobs(rng, n_pred)
    if not true.any() or not pred.any():
        return
    assert metrics.aji(true, pred) == pytest.approx(slow_aji(true, pred, False), abs=TOL)
    assert metrics.aji_plus(true, pred) == pytest.approx(slow_aji(true, pred, True), abs=TOL)
    for match_iou in (0.5, 0.3, 0.1):
        result = metrics.panoptic_quality(true, pred, match_iou)
        expected = slow_pq(true, pred, match_iou)
        assert [result["dq"], result["sq"], result["pq"]] == pytest.approx(expected, abs=TOL)
    _, _, inter, _ = pair_tables(true, pred)
    rows, cols = np.nonzero(inter)
    areas = 0.5 + sum(
        np.sum(true == r + 1) + np.sum(pred == c + 1) for r, c in zip(rows, cols, strict=True)
    )
    expected_dice2 = 2 * inter.sum() / (areas - 0.5) if inter.any() else 0.0
    assert metrics.dice2(true, pred) == pytest.approx(expected_dice2, abs=TOL)


def test_empty_maps() -> None:
    """One empty side scores 0; two empty maps are undefined (NaN), not an exception."""
    empty = np.zeros((5, 5), dtype=np.int32)
    one = empty.copy()
    one[1:3, 1:3] = 1
    for true, pred in ((one, empty), (empty, one)):
        assert metrics.dice(true, pred) == metrics.aji(true, pred) == 0.0
        assert metrics.aji_plus(true, pred) == metrics.panoptic_quality(true, pred)["pq"] == 0.0
    for score in (metrics.dice, metrics.aji, metrics.aji_plus):
        assert np.isnan(score(empty, empty))
    assert np.isnan(metrics.panoptic_quality(empty, empty)["dq"])
    assert metrics.dice2(empty, empty) == 0.0
