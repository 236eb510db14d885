"""HoVer-Net post-processing: network maps -> instance map + per-nucleus records.

``process(pred_map, nr_types, method="reference")`` reproduces the reference
``post_proc.process(pred_map, nr_types, return_centroids=True)`` bit for bit; ``method="fast"``
gives identical output faster (see :mod:`hoverdask.nuclei.fast`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from hoverdask.nuclei.fast import (
    energy_in_foreground,
    fill_holes,
    foreground_components,
    markers_fast,
    proc_np_hv_fast,
    surface_from_energy,
    watershed_by_component,
)
from hoverdask.nuclei.instances import (
    InstInfo,
    bounding_box,
    crop_record,
    inst_info_to_json,
    instance_info_fast,
    instance_info_reference,
    type_votes,
    vote_type_reference,
    vote_types,
)
from hoverdask.nuclei.reference import (
    Intermediates,
    foreground_mask,
    inverted_gradients,
    markers_from_energy,
    minmax_normalise,
    proc_np_hv_reference,
    remove_small_labels,
    sobel_energy,
    split_channels,
    watershed_instances,
    watershed_surface,
)

Method = Literal["reference", "fast"]
METHODS: tuple[str, ...] = ("reference", "fast")

__all__ = [
    "METHODS",
    "InstInfo",
    "Intermediates",
    "bounding_box",
    "crop_record",
    "energy_in_foreground",
    "fill_holes",
    "foreground_components",
    "foreground_mask",
    "inst_info_to_json",
    "instance_info_fast",
    "instance_info_reference",
    "inverted_gradients",
    "markers_fast",
    "markers_from_energy",
    "minmax_normalise",
    "proc_np_hv_fast",
    "proc_np_hv_reference",
    "process",
    "remove_small_labels",
    "sobel_energy",
    "split_channels",
    "surface_from_energy",
    "type_votes",
    "vote_type_reference",
    "vote_types",
    "watershed_by_component",
    "watershed_instances",
    "watershed_surface",
]


def process(
    pred_map: np.ndarray, nr_types: int | None = None, method: Method = "reference"
) -> tuple[np.ndarray, InstInfo]:
    """Instance map (int32, ids = watershed marker labels, gaps allowed) and records by id.

    ``pred_map`` is ``(H, W, 4)`` ``[tp, np, h, v]`` when ``nr_types`` is set, else
    ``(H, W, 3)`` ``[np, h, v]``: the layout of the reference ``infer_step``. Without types the
    records carry ``type`` and ``type_prob`` None.
    """
    type_map, np_prob, h, v = split_channels(pred_map, nr_types)
    if method == "reference":
        inst_map = proc_np_hv_reference(np_prob, h, v).inst_map
        return inst_map, instance_info_reference(inst_map, type_map)
    if method == "fast":
        inst_map = proc_np_hv_fast(np_prob, h, v)
        return inst_map, instance_info_fast(inst_map, type_map)
    raise ValueError(f"unknown post-processing method {method!r}; choose one of {METHODS}")
