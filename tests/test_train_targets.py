"""Training targets against the reference gen_targets fixture and hand-made label maps."""

from __future__ import annotations

import numpy as np
from conftest import parity_npz

from hoverdask.train.targets import hv_map, make_targets, split_disconnected


def test_hv_target_matches_reference_gen_targets() -> None:
    data = parity_npz("synth_postproc_input.npz")
    targets = make_targets(data["gt_label_full"], None, (256, 256))
    np.testing.assert_array_equal(targets.hv, data["hv_target"])
    np.testing.assert_array_equal(targets.np, data["np_target"])
    assert targets.tp is None


def test_hv_full_map_matches_reference_before_cropping() -> None:
    data = parity_npz("synth_postproc_input.npz")
    full = hv_map(data["gt_label_full"], (256, 256))
    np.testing.assert_array_equal(full, data["hv_full_uncropped"])


def test_zero_crossing_is_one_pixel_before_the_centre_of_mass() -> None:
    # a disc centred at (row 20, col 20): the reference target is 0 at col 19 / row 19
    rows, cols = np.indices((41, 41))
    inst = ((rows - 20) ** 2 + (cols - 20) ** 2 <= 36).astype(np.int32)
    hv = hv_map(inst)
    assert hv[20, 19, 0] == 0.0
    assert hv[20, 20, 0] > 0.0
    assert hv[19, 20, 1] == 0.0
    assert hv[20, 14, 0] == -1.0  # leftmost pixel: -5 / 5
    assert hv[20, 26, 0] == 1.0  # rightmost: +7 / 7
    assert hv[20, 25, 0] == np.float32(6 / 7)


def test_small_instances_get_no_hv_but_count_as_nuclei() -> None:
    inst = np.zeros((40, 40), np.int32)
    inst[5:10, 5:10] = 1  # 25 px < 30
    inst[20:30, 20:30] = 2
    targets = make_targets(inst, inst * 2, (40, 40))
    assert not targets.hv[5:10, 5:10].any()
    assert targets.hv[20:30, 20:30].any()
    assert targets.np[5:10, 5:10].all()
    np.testing.assert_array_equal(targets.tp, inst * 2)


def test_pieces_of_one_id_become_separate_instances() -> None:
    inst = np.zeros((30, 60), np.int32)
    inst[5:25, 5:25] = 7
    inst[5:25, 35:55] = 7
    pieces = split_disconnected(inst)
    assert len(np.unique(pieces)) == 3
    hv = hv_map(inst)
    # each square has its own centre: both have the same x profile
    np.testing.assert_array_equal(hv[5:25, 5:25], hv[5:25, 35:55])


def test_instance_at_the_top_left_edge_gets_values() -> None:
    # deviation from the reference, which skips boxes that start within 2 px of the edge
    inst = np.zeros((40, 40), np.int32)
    inst[0:10, 0:10] = 1
    hv = hv_map(inst)
    assert hv[0, 0, 0] == -1.0
    assert hv[0, 0, 1] == -1.0
