"""HoVer-Net's evaluation metrics (``metrics/stats_utils.py``, ``compute_stats.py``), vectorised.

Every instance metric starts from one joint histogram of (true id, pred id) over all pixels,
instead of one mask per instance pair, so the cost is one pass over the image plus a matrix of
``instances x instances``. The counts are integers, so sums and ratios come out bit-identical to
the reference's mask loops; the assignment steps get the same dense matrices the reference
builds and therefore the same pairs.

Reference quirks kept (for parity with published numbers):

* AJI pairs each true instance with its best-IoU prediction, and a prediction may be used by
  several true instances (``aji``); ``aji_plus`` uses a one-to-one assignment instead.
* AJI's IoU has ``+1e-6`` in the denominator; PQ's has none; SQ divides by ``tp + 1e-6``.
* PQ at ``match_iou >= 0.5`` pairs every (true, pred) with IoU strictly above the threshold
  (unique by construction); below 0.5 it uses a Hungarian assignment.
* ``dice2`` (ensemble Dice) adds ``|t| + |p|`` once per overlapping pair, so an instance that
  overlaps several others is counted several times; the reference's slow ``get_dice_2`` has the
  same definition and value, so there is no separate slow variant here.
* ``type_stats`` pairs centroids within a hard-coded 12 px (40x), casts centroids to float32,
  and stands in a dummy centroid (0, 0) of type 0 for an image without instances; that dummy
  can pair with a real nucleus near the origin and type 0 then joins the default type list.

Deviations (the reference would fail): ids need not be contiguous here (results are reported
with the ids given; for contiguous ids they equal the reference's), maps without background are
fine; for two empty maps Dice, AJI, AJI+, DQ and PQ are NaN (the reference divides by zero or
warns) and ``dice2`` without any overlap is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

TYPE_PAIRING_RADIUS = 12.0  # px at 40x (0.25 µm/px), hard-coded in compute_stats


def remap_label(label: np.ndarray, by_size: bool = False) -> np.ndarray:
    """int32 copy with ids renumbered 1..N (ascending old id, or by size, largest first).

    Equal sizes keep ascending id order (the reference's stable sort).
    """
    label = np.asarray(label)
    ids, inverse = np.unique(label, return_inverse=True)
    inverse = inverse.reshape(label.shape)
    has_background = ids.size > 0 and ids[0] == 0
    fg_ids = ids[1:] if has_background else ids
    rank = np.arange(1, fg_ids.size + 1)
    if by_size:
        sizes = np.bincount(inverse.ravel(), minlength=ids.size)
        sizes = sizes[1:] if has_background else sizes
        order = np.argsort(-sizes, kind="stable")
        rank = np.empty(fg_ids.size, dtype=np.int64)
        rank[order] = np.arange(1, fg_ids.size + 1)
    lut = np.concatenate([[0], rank]) if has_background else rank
    return lut[inverse].astype(np.int32)


@dataclass(frozen=True)
class Overlaps:
    """Instance ids, areas and the intersection matrix of a true and a predicted map."""

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    inter: np.ndarray  # (n_true, n_pred) pixel counts

    @property
    def union(self) -> np.ndarray:
        """``|t| + |p| - inter`` where the pair overlaps, 0 elsewhere (as the reference fills)."""
        union = self.true_area[:, None] + self.pred_area[None, :] - self.inter
        return np.where(self.inter > 0, union, 0)


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """One joint histogram of (true, pred) ids over all pixels."""
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"true {true.shape} and pred {pred.shape} maps differ in shape")
    t_ids, t_index = np.unique(true, return_inverse=True)
    p_ids, p_index = np.unique(pred, return_inverse=True)
    joint = np.bincount(
        t_index.ravel().astype(np.int64) * p_ids.size + p_index.ravel(),
        minlength=t_ids.size * p_ids.size,
    ).reshape(t_ids.size, p_ids.size)
    t_fg, p_fg = t_ids != 0, p_ids != 0
    return Overlaps(
        true_ids=t_ids[t_fg],
        pred_ids=p_ids[p_fg],
        true_area=joint.sum(axis=1)[t_fg],
        pred_area=joint.sum(axis=0)[p_fg],
        inter=joint[np.ix_(t_fg, p_fg)],
    )


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Dice of the binarised maps (the reference's ``get_dice_1``)."""
    t, p = np.asarray(true) > 0, np.asarray(pred) > 0
    with np.errstate(invalid="ignore"):  # NaN when both maps are empty
        return float(2.0 * np.sum(t & p) / (np.sum(t) + np.sum(p)))


def _aji_from_pairs(ov: Overlaps, rows: np.ndarray, cols: np.ndarray) -> float:
    inter = ov.inter.astype(np.float64)
    union = ov.union.astype(np.float64)
    overall_inter = inter[rows, cols].sum()
    overall_union = union[rows, cols].sum()
    unpaired_true = np.ones(len(ov.true_ids), dtype=bool)
    unpaired_true[rows] = False
    unpaired_pred = np.ones(len(ov.pred_ids), dtype=bool)
    unpaired_pred[cols] = False
    overall_union += ov.true_area[unpaired_true].sum() + ov.pred_area[unpaired_pred].sum()
    with np.errstate(invalid="ignore"):  # NaN when both maps are empty
        return float(overall_inter / overall_union)


def _aji_iou(ov: Overlaps) -> np.ndarray:
    return ov.inter / (ov.union + 1.0e-6)


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (``get_fast_aji``): best-IoU prediction per true instance."""
    ov = overlaps(true, pred)
    iou = _aji_iou(ov)
    if iou.size == 0:
        return _aji_from_pairs(ov, np.zeros(0, int), np.zeros(0, int))
    best = iou.argmax(axis=1)
    rows = np.flatnonzero(iou.max(axis=1) > 0.0)
    return _aji_from_pairs(ov, rows, best[rows])


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ (``get_fast_aji_plus``): one-to-one pairs by Hungarian assignment on IoU."""
    ov = overlaps(true, pred)
    iou = _aji_iou(ov)
    rows, cols = linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0.0
    return _aji_from_pairs(ov, rows[keep], cols[keep])


def dice2(true: np.ndarray, pred: np.ndarray) -> float:
    """Ensemble Dice (``get_fast_dice_2``): ``2 sum(inter) / sum(|t| + |p|)`` over overlaps.

    0 when no instances overlap (the reference divides by zero there).
    """
    ov = overlaps(true, pred)
    rows, cols = np.nonzero(ov.inter)
    total = ov.true_area[rows].sum() + ov.pred_area[cols].sum()
    return float(2 * ov.inter[rows, cols].sum() / total) if total else 0.0


def panoptic_quality(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> dict:
    """``{"dq", "sq", "pq", "paired_true", "paired_pred", "unpaired_true", "unpaired_pred"}``.

    Pairs are lists of instance ids (1-based for remapped maps), as ``get_fast_pq`` returns.
    """
    if match_iou < 0.0:
        raise ValueError(f"match_iou must be >= 0, got {match_iou}")
    ov = overlaps(true, pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(ov.inter > 0, ov.inter / ov.union, 0.0)
    if match_iou >= 0.5:
        rows, cols = np.nonzero(iou > match_iou)
    else:
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > match_iou
        rows, cols = rows[keep], cols[keep]
    paired_iou = iou[rows, cols]
    tp = len(rows)
    fn = len(ov.true_ids) - tp
    fp = len(ov.pred_ids) - tp
    detections = tp + 0.5 * fp + 0.5 * fn
    dq = tp / detections if detections else float("nan")
    sq = paired_iou.sum() / (tp + 1.0e-6)
    return {
        "dq": float(dq),
        "sq": float(sq),
        "pq": float(dq * sq),
        "paired_true": ov.true_ids[rows].tolist(),
        "paired_pred": ov.pred_ids[cols].tolist(),
        "unpaired_true": np.setdiff1d(ov.true_ids, ov.true_ids[rows]).tolist(),
        "unpaired_pred": np.setdiff1d(ov.pred_ids, ov.pred_ids[cols]).tolist(),
    }


def pair_coordinates(
    a: np.ndarray, b: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique pairs of points within ``radius`` (inclusive), minimising the total distance.

    Returns ``(pairing (K, 2) indices into a and b, unpaired indices of a, of b)``.
    """
    a = np.asarray(a).reshape(-1, 2)
    b = np.asarray(b).reshape(-1, 2)
    distance = cdist(a, b, metric="euclidean")
    rows, cols = linear_sum_assignment(distance)
    close = distance[rows, cols] <= radius
    pairing = np.stack([rows[close], cols[close]], axis=1)
    unpaired_a = np.delete(np.arange(len(a)), rows[close])
    unpaired_b = np.delete(np.arange(len(b)), cols[close])
    return pairing, unpaired_a, unpaired_b


def _f1_type(
    paired_true: np.ndarray,
    paired_pred: np.ndarray,
    unpaired_true: np.ndarray,
    unpaired_pred: np.ndarray,
    type_id: int,
    exhaustive: bool,
) -> float:
    """Per-type F1 with the paper's weights: paired errors count twice, detection errors once."""
    involved = (paired_true == type_id) | (paired_pred == type_id)
    t, p = paired_true[involved], paired_pred[involved]
    tp_dt = np.sum((t == type_id) & (p == type_id))
    tn_dt = np.sum((t != type_id) & (p != type_id))  # always 0 after the restriction
    fp_dt = np.sum((t != type_id) & (p == type_id))
    fn_dt = np.sum((t == type_id) & (p != type_id))
    if not exhaustive:
        fp_dt -= np.sum(t == -1)
    fp_d = np.sum(unpaired_pred == type_id)
    fn_d = np.sum(unpaired_true == type_id)
    correct = 2 * (tp_dt + tn_dt)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN for type -1 when not exhaustive
        return float(np.float64(correct) / (correct + 2 * fp_dt + 2 * fn_dt + fp_d + fn_d))


def _as_points(centroids: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centroids = np.asarray(centroids, dtype=np.float32).reshape(-1, 2)
    types = np.asarray(types, dtype=np.int32).reshape(-1)
    if len(centroids) != len(types):
        raise ValueError(f"{len(centroids)} centroids but {len(types)} types")
    if len(centroids) == 0:  # the reference's stand-in for an image without nuclei
        return np.zeros((1, 2), dtype=np.float32), np.zeros(1, dtype=np.int32)
    return centroids, types


def type_stats(
    true_centroids: Sequence[np.ndarray],
    true_types: Sequence[np.ndarray],
    pred_centroids: Sequence[np.ndarray],
    pred_types: Sequence[np.ndarray],
    type_ids: Sequence[int] | None = None,
    exhaustive: bool = True,
    radius: float = TYPE_PAIRING_RADIUS,
) -> dict:
    """Detection and classification stats pooled over images (``run_nuclei_type_stat``).

    Each argument holds one array per image: centroids ``(N, 2)`` as ``(x, y)``, types ``(N,)``.
    Returns ``{"f1_d", "acc", "f1_per_type": {type: F1}}``; ``type_ids`` defaults to the types
    present in the ground truth. With ``exhaustive=False`` paired ground truth of type -1
    (unlabelled) is not counted as a classification error.
    """
    n_images = len(true_centroids)
    if not n_images == len(true_types) == len(pred_centroids) == len(pred_types):
        raise ValueError("type_stats needs the same number of images in every argument")
    paired, unpaired_true, unpaired_pred = [], [], []
    true_all, pred_all = [], []
    true_offset = pred_offset = 0
    for image in range(n_images):
        t_xy, t_type = _as_points(true_centroids[image], true_types[image])
        p_xy, p_type = _as_points(pred_centroids[image], pred_types[image])
        pairs, lone_true, lone_pred = pair_coordinates(t_xy, p_xy, radius)
        paired.append(pairs + np.array([true_offset, pred_offset]))
        unpaired_true.append(lone_true + true_offset)
        unpaired_pred.append(lone_pred + pred_offset)
        true_all.append(t_type)
        pred_all.append(p_type)
        true_offset += len(t_type)
        pred_offset += len(p_type)
    pairs = np.concatenate(paired).reshape(-1, 2)
    true_types_all, pred_types_all = np.concatenate(true_all), np.concatenate(pred_all)
    paired_true = true_types_all[pairs[:, 0]]
    paired_pred = pred_types_all[pairs[:, 1]]
    lone_true = true_types_all[np.concatenate(unpaired_true)]
    lone_pred = pred_types_all[np.concatenate(unpaired_pred)]

    tp_d, fp_d, fn_d = len(pairs), len(lone_pred), len(lone_true)
    correct = np.sum(paired_true == paired_pred)
    wrong = np.sum(paired_true != paired_pred)
    if not exhaustive:
        wrong -= np.sum(paired_true == -1)
    if type_ids is None:
        type_ids = np.unique(true_types_all).tolist()
    return {
        "f1_d": float(2 * tp_d / (2 * tp_d + fp_d + fn_d)),
        "acc": float(correct / (correct + wrong)),
        "f1_per_type": {
            int(t): _f1_type(paired_true, paired_pred, lone_true, lone_pred, t, exhaustive)
            for t in type_ids
        },
    }
