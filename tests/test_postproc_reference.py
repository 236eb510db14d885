"""Reference post-processing against the parity fixtures made with the official code."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import parity_json, parity_npz
from scipy import ndimage

from hoverdask.nuclei.postproc import (
    inst_info_to_json,
    instance_info_reference,
    proc_np_hv_reference,
    process,
    split_channels,
    vote_type_reference,
)


@pytest.fixture(scope="module")
def synth_pred_map() -> np.ndarray:
    return parity_npz("synth_postproc_input.npz")["pred_map"]


def assert_inst_info_equal(mine: dict, expected: dict) -> None:
    """bbox, contour, type, type_prob exact; centroid to 1e-9; same ids in the same order."""
    mine = inst_info_to_json(mine)
    assert list(mine) == list(expected)
    for inst_id, record in expected.items():
        got = mine[inst_id]
        assert list(got) == ["bbox", "centroid", "contour", "type_prob", "type"]
        for key in ("bbox", "contour", "type", "type_prob"):
            assert got[key] == record[key], (inst_id, key)
        np.testing.assert_allclose(got["centroid"], record["centroid"], rtol=0, atol=1e-9)


def test_intermediates_match_fixture(synth_pred_map: np.ndarray) -> None:
    expected = parity_npz("synth_postproc_intermediates.npz")
    _, np_prob, h, v = split_channels(synth_pred_map, 6)
    steps = proc_np_hv_reference(np_prob, h, v)
    np.testing.assert_array_equal(steps.blb, expected["blb"])
    assert steps.overall.dtype == np.float64
    np.testing.assert_array_equal(steps.overall, expected["overall"])
    np.testing.assert_array_equal(steps.dist, expected["dist"])
    np.testing.assert_array_equal(steps.marker, expected["marker"])


@pytest.mark.parametrize(("nr_types", "key"), [(6, "nr_types_6"), (None, "nr_types_none")])
def test_process_matches_reference(synth_pred_map: np.ndarray, nr_types, key: str) -> None:
    pred_map = synth_pred_map if nr_types else synth_pred_map[..., 1:]
    inst_map, info = process(pred_map, nr_types)
    expected = parity_npz("synth_postproc_output.npz")
    assert inst_map.dtype == np.int32
    np.testing.assert_array_equal(inst_map, expected["inst_map"])
    assert_inst_info_equal(info, parity_json("synth_postproc_inst_info.json")[key])
    if nr_types:
        type_map = np.zeros_like(inst_map)
        for inst_id, record in info.items():
            type_map[inst_map == inst_id] = record["type"]
        np.testing.assert_array_equal(type_map, expected["type_map"])


@pytest.mark.parametrize(("config", "nr_types"), [("fast_t6", 6), ("original_t5", 5)])
def test_model_outputs_match_reference(config: str, nr_types: int) -> None:
    pred_map = parity_npz(f"forward_{config}.npz")["infer_step_out"][0]
    inst_map, info = process(pred_map, nr_types)
    np.testing.assert_array_equal(
        inst_map, parity_npz("model_postproc_output.npz")[f"inst_map_{config}"]
    )
    assert_inst_info_equal(info, parity_json("model_postproc_inst_info.json")[config])


def test_type_vote_rules() -> None:
    """Majority wins, ties go to the lower id, background majority yields the runner-up."""
    assert vote_type_reference(np.array([2, 2, 3, 3, 1]), 5) == (2, pytest.approx(0.4))
    winner, prob = vote_type_reference(np.array([0, 0, 0, 4]), 4)
    assert (winner, prob) == (4, 1 / (4 + 1e-6))
    assert vote_type_reference(np.array([0, 0]), 2)[0] == 0


def test_records_skip_instances_without_a_polygon() -> None:
    """A 1-pixel-wide line has a 2-point contour: kept in the map, left out of the records."""
    inst_map = np.zeros((12, 12), dtype=np.int32)
    inst_map[2, 1:9] = 3
    inst_map[5:9, 5:9] = 7
    info = instance_info_reference(inst_map)
    assert list(info) == [7]
    assert info[7]["bbox"].tolist() == [[5, 5], [9, 9]]
    np.testing.assert_allclose(info[7]["centroid"], ndimage.center_of_mass(inst_map == 7)[::-1])


@pytest.mark.parametrize(
    ("shape", "nr_types"), [((64, 64, 3), 6), ((64, 64, 4), None), ((64, 64), None)]
)
def test_wrong_layout_is_a_clear_error(shape: tuple[int, ...], nr_types) -> None:
    with pytest.raises(ValueError, match="pred_map must be"):
        process(np.zeros(shape, np.float32), nr_types)
