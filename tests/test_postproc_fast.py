"""The fast post-processing gives exactly the reference output, on fixtures and larger maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import parity_npz
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from skimage.segmentation import watershed

from hoverdask.nuclei import fast as fast_module
from hoverdask.nuclei._flood import flood_markers, groups_with_equal_values, growing_seeds
from hoverdask.nuclei._sums import instance_sums
from hoverdask.nuclei.instances import type_votes
from hoverdask.nuclei.postproc import (
    fill_holes,
    inst_info_to_json,
    instance_info_fast,
    instance_info_reference,
    proc_np_hv_reference,
    process,
    split_channels,
    watershed_by_component,
)
from hoverdask.slide.synthetic import dequantised_pred_map, synthetic_pred_map


@pytest.fixture(scope="module")
def wsi_map() -> np.ndarray:
    """The WSI fixture's network output, dequantised (1000x1400)."""
    return dequantised_pred_map(parity_npz("wsi_synth_input.npz"))


def assert_same_output(pred_map: np.ndarray, nr_types: int | None) -> int:
    ref_map, ref_info = process(pred_map, nr_types)
    fast_map, fast_info = process(pred_map, nr_types, method="fast")
    assert fast_map.dtype == ref_map.dtype == np.int32
    np.testing.assert_array_equal(fast_map, ref_map)
    assert inst_info_to_json(fast_info) == inst_info_to_json(ref_info)
    assert list(fast_info) == list(ref_info)
    return len(ref_info)


@pytest.mark.parametrize("nr_types", [6, None])
def test_parity_map(nr_types) -> None:
    pred_map = parity_npz("synth_postproc_input.npz")["pred_map"]
    assert assert_same_output(pred_map if nr_types else pred_map[..., 1:], nr_types) == 37


@pytest.mark.parametrize(("config", "nr_types"), [("fast_t6", 6), ("original_t5", 5)])
def test_model_maps(config: str, nr_types: int) -> None:
    assert_same_output(parity_npz(f"forward_{config}.npz")["infer_step_out"][0], nr_types)


@pytest.mark.parametrize("nr_types", [6, None])
def test_wsi_fixture_map(wsi_map: np.ndarray, nr_types) -> None:
    pred_map = wsi_map if nr_types else wsi_map[..., 1:]
    assert assert_same_output(pred_map, nr_types) > 700


@pytest.mark.slow
def test_wsi_fixture_tiled(wsi_map: np.ndarray) -> None:
    """2000x1400 with seams between copies: many nuclei, cut nuclei at the copy borders."""
    assert assert_same_output(np.tile(wsi_map[:, :700], (2, 2, 1)), 6) > 1400


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_maps(seed: int) -> None:
    assert assert_same_output(synthetic_pred_map(384, 512, nr_types=5, seed=seed), 5) > 250


def test_background_only_map() -> None:
    assert assert_same_output(np.zeros((40, 50, 4), np.float32), 6) == 0


def test_compiled_flood_equals_one_skimage_call(wsi_map: np.ndarray) -> None:
    """Every component flooded on its own, with skimage's queue order: the same labels."""
    _, np_prob, h, v = split_channels(wsi_map[:500, :700], 6)
    steps = proc_np_hv_reference(np_prob, h, v)
    labels, tied = flood_markers(steps.dist, steps.marker, steps.blb > 0,
                                 monotone=fast_module.COST_NEVER_DECREASES)  # fmt: skip
    assert tied.size == 0
    np.testing.assert_array_equal(labels, steps.inst_map)
    np.testing.assert_array_equal(watershed_by_component(steps.dist, steps.marker, steps.blb),
                                  steps.inst_map)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), levels=st.integers(1, 4), n_seeds=st.integers(1, 6),
       hole_density=st.floats(0.0, 0.4))  # fmt: skip
def test_compiled_flood_equals_skimage_on_plateaus(seed, levels, n_seeds, hole_density) -> None:
    """Few distinct costs (pushed pixels tie often, and their ages decide), seeds with distinct
    costs, masks with holes and several components: skimage's labels, component by component;
    components where two growing seeds tie are reported and left 0."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(2, 12)), int(rng.integers(2, 12)))
    dist = rng.integers(0, levels, shape).astype(np.float64)
    mask = rng.random(shape) >= hole_density
    marker = np.zeros(shape, np.int32)
    spots = rng.choice(dist.size, min(n_seeds, dist.size), replace=False)
    marker.flat[spots] = rng.integers(1, 4, spots.size)  # repeated labels: split markers
    dist.flat[spots] = -1.0 - rng.permutation(spots.size)
    if rng.random() < 0.3:
        dist.flat[spots] = -1.0  # all seeds tie
    expected = watershed(dist, marker, mask=mask)
    labels, tied = flood_markers(dist, marker, mask, monotone=fast_module.COST_NEVER_DECREASES)
    components = ndimage.label(mask)[0]
    tied_components = set(components.flat[tied].tolist())
    for label in range(1, components.max() + 1):
        inside = components == label
        if label in tied_components:
            assert not labels[inside].any()
        else:
            np.testing.assert_array_equal(labels[inside], expected[inside])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), levels=st.integers(1, 6))
def test_growing_seeds_and_their_ties_equal_numpy(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(2, 30)), int(rng.integers(2, 30)))
    mask = rng.random(shape) < 0.8
    marker = np.where(rng.random(shape) < 0.4, rng.integers(1, 5, shape), 0).astype(np.int32)
    dist = rng.integers(0, levels, shape).astype(np.float64)
    groups = rng.integers(0, 4, shape).astype(np.int32)
    seeds = (marker > 0) & mask
    free = np.pad(mask & ~seeds, 1)
    grows = seeds & (free[:-2, 1:-1] | free[2:, 1:-1] | free[1:-1, :-2] | free[1:-1, 2:])
    values, group_of = growing_seeds(dist, marker, mask, groups)
    np.testing.assert_array_equal(values, dist[grows])
    np.testing.assert_array_equal(group_of, groups[grows])
    expected = [len(set(values[group_of == g].tolist())) < np.sum(group_of == g) for g in range(4)]
    np.testing.assert_array_equal(groups_with_equal_values(values, group_of, 4), expected)


def test_the_cost_floor_follows_this_skimage() -> None:
    """The probe's row floods one way with the floor and the other without; skimage decides."""
    dist, marker = np.array([[2.0, -1.0, 0.0, 2.0, -3.0]]), np.array([[1, 0, 0, 0, 2]])
    mask = np.ones_like(marker, dtype=bool)
    with_floor = flood_markers(dist, marker, mask, monotone=True)[0]
    without = flood_markers(dist, marker, mask, monotone=False)[0]
    np.testing.assert_array_equal(with_floor, [[1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(without, [[1, 1, 1, 2, 2]])
    chosen = with_floor if fast_module.COST_NEVER_DECREASES else without
    np.testing.assert_array_equal(chosen, watershed(dist, marker))


def test_a_seed_tie_floods_the_whole_map(monkeypatch: pytest.MonkeyPatch) -> None:
    dist = np.array([[-1.0, 0.0, 0.0, 0.0, -1.0]])  # both seeds can grow, same cost
    marker, blb = np.array([[1, 0, 0, 0, 2]]), np.ones((1, 5), np.int32)
    assert flood_markers(dist, marker, blb > 0)[1].tolist() == [0]
    calls = []
    monkeypatch.setattr(fast_module, "watershed_instances",
                        lambda *args: calls.append(1) or watershed(*args[:2], mask=args[2]))  # fmt: skip
    np.testing.assert_array_equal(watershed_by_component(dist, marker, blb),
                                  watershed(dist, marker, mask=blb))  # fmt: skip
    assert calls == [1]


def test_tied_seeds_flood_the_whole_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """When seeds may tie in the queue the shortcut is refused and skimage floods everything."""
    _, np_prob, h, v = split_channels(parity_npz("synth_postproc_input.npz")["pred_map"], 6)
    steps = proc_np_hv_reference(np_prob, h, v)
    calls = []
    original = fast_module.watershed_instances

    def counting(dist, marker, mask):
        calls.append(mask.shape)
        return original(dist, marker, mask)

    monkeypatch.setattr(fast_module, "watershed_instances", counting)
    monkeypatch.setattr(fast_module, "SEEDS_QUEUE_BY_VALUE", False)
    result = watershed_by_component(steps.dist, steps.marker, steps.blb)
    np.testing.assert_array_equal(result, steps.inst_map)
    assert calls == [steps.dist.shape]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.3, 0.9))
def test_markers_with_any_ids_are_the_raster_markers_renamed(seed: int, density: float) -> None:
    rng = np.random.default_rng(seed)
    blb = cv2.GaussianBlur(rng.random((60, 80)), (0, 0), 2) < density  # blobs of many sizes
    inside = np.flatnonzero(blb)
    energy = cv2.GaussianBlur(rng.random((60, 80)), (0, 0), 1.5).astype(np.float32).ravel()[inside]
    raster = fast_module.markers_at(energy, inside, blb.shape)
    named = fast_module.markers_at(energy, inside, blb.shape, raster_ids=False)
    np.testing.assert_array_equal(raster > 0, named > 0)
    pairs = np.unique(np.stack([raster[raster > 0], named[raster > 0]]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]  # one-to-one


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_labels=st.integers(1, 30), n_types=st.integers(1, 7))
def test_instance_sums_equal_numpy(seed: int, n_labels: int, n_types: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels + 1, (37, 53)).astype(np.int32)
    labels[labels == n_labels // 2] = 0  # an id with no pixels
    types = rng.integers(0, n_types, labels.shape).astype(np.int32)
    sums = instance_sums(labels, types)
    size = int(labels.max()) + 1
    ys, xs = np.nonzero(labels)  # raster order
    ids = labels[ys, xs]
    np.testing.assert_array_equal(sums.area, np.bincount(ids, minlength=size))
    np.testing.assert_array_equal(sums.sum_y, np.bincount(ids, weights=ys, minlength=size))
    np.testing.assert_array_equal(sums.sum_x, np.bincount(ids, weights=xs, minlength=size))
    np.testing.assert_array_equal(sums.type_counts[:, :int(types[labels > 0].max()) + 1],
                                  type_votes(labels, types))  # fmt: skip
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            assert sums.area[label] == 0
            continue
        assert (sums.top[label], sums.bottom[label] + 1) == (box[0].start, box[0].stop)
        assert (sums.left[label], sums.right[label] + 1) == (box[1].start, box[1].stop)
        first = np.flatnonzero(ids == label)[0]
        assert (sums.top[label], sums.first_x[label]) == (ys[first], xs[first])
    assert instance_sums(labels).type_counts is None
    types[labels > 0] = -1
    with pytest.raises(ValueError, match="negative"):
        instance_sums(labels, types)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.2, 0.8))
def test_fill_holes_equals_scipy(seed: int, density: float) -> None:
    mask = np.random.default_rng(seed).random((23, 31)) < density
    np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_records_fast_equal_reference_on_awkward_shapes() -> None:
    """Ids with gaps, thin lines (no polygon), holes, touching instances, border contact."""
    inst_map = np.zeros((30, 30), dtype=np.int32)
    inst_map[0:10, 0:10] = 4
    inst_map[3:6, 3:6] = 0  # hole
    inst_map[0:10, 10:20] = 9  # touches 4
    inst_map[15, 2:20] = 11  # line: no polygon
    inst_map[20:30, 25:30] = 12  # on the border
    type_map = np.random.default_rng(3).integers(0, 4, inst_map.shape).astype(np.int32)
    type_map[inst_map == 9] = 0
    type_map[inst_map == 12] = 0
    type_map[20, 25] = 3  # instance 12: background majority, runner-up wins
    for types in (type_map, None):
        fast = inst_info_to_json(instance_info_fast(inst_map, types))
        assert fast == inst_info_to_json(instance_info_reference(inst_map, types))
    assert list(fast) == ["4", "9", "12"]


def test_negative_types_are_rejected() -> None:
    inst_map = np.ones((5, 5), dtype=np.int32)
    with pytest.raises(ValueError, match="negative"):
        instance_info_fast(inst_map, -np.ones((5, 5), dtype=np.int32))


def test_kernels_compile_without_a_cache_location(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numba finds nowhere to write its cache it refuses ``cache=True``; the kernels are
    then compiled without one instead of failing at import."""
    import numba

    from hoverdask.nuclei import _jit

    real = numba.njit

    def no_cache_location(*args, cache=False, **options):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real(*args, **options)

    monkeypatch.setattr(numba, "njit", no_cache_location)

    @_jit.kernel()
    def twice(x):
        return 2 * x

    assert twice(21) == 42
    assert twice._cache.__class__.__name__ == "NullCache"


def test_warm_compiles_every_kernel() -> None:
    from hoverdask.nuclei import _flood, _hull, _sums, compiled

    compiled.warm()
    for module, name in [(_flood, "_flood"), (_flood, "_growing_seeds"),
                         (_flood, "groups_with_equal_values"), (_sums, "_instance_sums"),
                         (_sums, "_pixel_sums"), (_sums, "_outline_sums"),
                         (_hull, "_hull_pixel_counts")]:  # fmt: skip
        assert getattr(module, name).signatures, name
