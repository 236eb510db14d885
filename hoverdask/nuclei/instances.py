"""Per-nucleus records (bbox, centroid, contour, type vote) from an instance map.

``instance_info_reference`` follows the reference loop literally: one full-image mask per
instance, so it costs O(instances x pixels). ``instance_info_fast`` gives identical records from
one ``find_objects`` pass and per-instance crops: the crop of each instance is the very array the
reference builds (same bbox, same uint8 mask), so ``cv2.moments`` and ``cv2.findContours`` see
identical input and the results cannot drift. Type votes come from one joint ``bincount``.

Record layout (the reference's, key order included)::

    {"bbox": int64 [[rmin, cmin], [rmax, cmax]] (max exclusive),
     "centroid": float64 [x, y], "contour": int32 [[x, y], ...],
     "type_prob": float | None, "type": int | None}

Instances whose first contour has fewer than 3 points are left out of the dict (they stay in
the instance map), as in the reference.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from scipy import ndimage

InstInfo = dict[int, dict[str, Any]]

MIN_CONTOUR_POINTS = 3


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(rmin, rmax, cmin, cmax)`` of a non-empty boolean mask, max exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_record(crop: np.ndarray, rmin: int, cmin: int, rmax: int, cmax: int) -> dict | None:
    """Geometry of one instance from its uint8 0/1 bbox crop, or None if it has no contour.

    The centroid is the crop's moment ratio plus the crop offset, in that order, as the
    reference computes it (so it agrees to the last bit, not merely to rounding).
    """
    contour = first_contour(crop)
    if contour is None:
        return None
    moments = cv2.moments(crop)
    centroid = np.array([moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]])
    contour[:, 0] += cmin
    contour[:, 1] += rmin
    centroid[0] += cmin
    centroid[1] += rmin
    return {
        "bbox": np.array([[rmin, cmin], [rmax, cmax]]),
        "centroid": centroid,
        "contour": contour,
        "type_prob": None,
        "type": None,
    }


def first_contour(crop: np.ndarray) -> np.ndarray | None:
    """The reference's outline of a uint8 0/1 crop: its first contour as int32 ``(n, 2)``
    ``(x, y)`` in crop pixels, or None when that has fewer than 3 points."""
    contours = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    contour = np.squeeze(contours[0].astype(np.int32))
    if contour.ndim != 2 or contour.shape[0] < MIN_CONTOUR_POINTS:
        return None
    return contour


def vote_type_reference(types: np.ndarray, area: int) -> tuple[int, float]:
    """Majority pixel type; if that is 0 (background) and another type occurs, the runner-up.

    Ties go to the lower type id (a stable sort of ``np.unique``'s ascending output).
    ``type_prob`` is the winner's pixel fraction with the reference's ``+1e-6``.
    """
    values, counts = np.unique(types, return_counts=True)
    ranked = sorted(zip(values, counts, strict=True), key=lambda vc: vc[1], reverse=True)
    winner, count = ranked[0]
    if winner == 0 and len(ranked) > 1:
        winner, count = ranked[1]
    return int(winner), float(count / (area + 1.0e-6))


def instance_info_reference(inst_map: np.ndarray, type_map: np.ndarray | None = None) -> InstInfo:
    """The reference ``process`` record loop, unchanged in cost (one full mask per instance)."""
    info: InstInfo = {}
    for inst_id in np.unique(inst_map)[1:]:
        mask = inst_map == inst_id
        rmin, rmax, cmin, cmax = bounding_box(mask)
        crop = mask[rmin:rmax, cmin:cmax].astype(np.uint8)
        record = crop_record(crop, rmin, cmin, rmax, cmax)
        if record is not None:
            info[int(inst_id)] = record
    if type_map is not None:
        for inst_id, record in info.items():
            (rmin, cmin), (rmax, cmax) = record["bbox"]
            in_crop = inst_map[rmin:rmax, cmin:cmax] == inst_id
            types = type_map[rmin:rmax, cmin:cmax][in_crop]
            record["type"], record["type_prob"] = vote_type_reference(types, int(in_crop.sum()))
    return info


def type_votes(inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """``counts[id, t]``: pixels of instance ``id`` with type ``t``, from one joint bincount."""
    fg = inst_map > 0
    return type_counts(inst_map[fg], type_map[fg], int(inst_map.max()) + 1)


def type_counts(ids: np.ndarray, types: np.ndarray, n_ids: int) -> np.ndarray:
    """:func:`type_votes` from the ids and types of the instances' pixels."""
    ids, types = ids.astype(np.int64), types.astype(np.int64)
    if types.size and types.min() < 0:
        raise ValueError("type map holds negative classes; expected argmax class ids >= 0")
    n_types = int(types.max()) + 1 if types.size else 1
    counts = np.bincount(ids * n_types + types, minlength=n_ids * n_types)
    return counts.reshape(n_ids, n_types)


def vote_types(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`vote_type_reference` over rows of a ``(ids, types)`` count matrix.

    Returns ``(type, type_prob)`` per row. ``argmax`` takes the first maximum, i.e. the lowest
    type id among ties, which is what the reference's stable descending sort picks.
    """
    area = counts.sum(axis=1)
    winner = counts.argmax(axis=1)
    others = counts.copy()
    others[:, 0] = 0
    runner_up = others.argmax(axis=1)
    use_runner_up = (winner == 0) & (others.max(axis=1) > 0)
    winner = np.where(use_runner_up, runner_up, winner)
    count = counts[np.arange(len(counts)), winner]
    return winner, count / (area + 1.0e-6)


def instance_info_fast(inst_map: np.ndarray, type_map: np.ndarray | None = None) -> InstInfo:
    """Same records as :func:`instance_info_reference` in one pass over the map."""
    info: InstInfo = {}
    if inst_map.size == 0 or inst_map.max() <= 0:
        return info
    slices = ndimage.find_objects(inst_map)
    for index, box in enumerate(slices):
        if box is None:
            continue
        inst_id = index + 1
        crop = (inst_map[box] == inst_id).view(np.uint8)
        rows, cols = box
        record = crop_record(crop, rows.start, cols.start, rows.stop, cols.stop)
        if record is not None:
            info[inst_id] = record
    if type_map is not None and info:
        winner, prob = vote_types(type_votes(inst_map, type_map))
        for inst_id, record in info.items():
            record["type"] = int(winner[inst_id])
            record["type_prob"] = float(prob[inst_id])
    return info


def inst_info_to_json(info: InstInfo) -> dict[str, dict[str, Any]]:
    """JSON-ready copy (string ids, lists), the layout of the reference's saved ``.json``."""
    return {
        str(inst_id): {
            key: value.tolist() if isinstance(value, np.ndarray) else value
            for key, value in record.items()
        }
        for inst_id, record in info.items()
    }
