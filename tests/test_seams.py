"""Exactly-once seams: chunking never changes the nuclei (oracles: the untiled run, the reference
``process()`` on the whole map, and the reference WSI-mode JSON)."""

from __future__ import annotations

import warnings

import cv2
import dask.array as da
import numpy as np
import pytest
import shapely
from conftest import parity_json, parity_npz
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree

from hoverdask.nuclei.postproc import process
from hoverdask.nuclei.reference import SOBEL_KSIZE
from hoverdask.nuclei.seams import (
    CONTEXT_MARGIN,
    BlockGrid,
    OversizedClusterWarning,
    contour_polygon,
    merge_boxes,
)
from hoverdask.nuclei.stable import (
    NormRanges,
    WindowSegmentation,
    find_clusters,
    flood_clusters,
    normalise_with_range,
    seed_ties,
    segment_window,
    sobel_range,
    sobel_responses,
    value_range,
)
from hoverdask.pipeline import nuclei_from_maps
from hoverdask.slide.synthetic import dequantised_pred_map

NR_TYPES = 6


def wsi_maps(with_coverage: bool = False) -> np.ndarray:
    """The parity WSI maps ``[tp, np, h, v]`` dequantised as the fixture README defines them."""
    data = parity_npz("wsi_synth_input.npz")
    maps = dequantised_pred_map(data)
    if with_coverage:
        maps = maps * data["coverage"].astype(np.float32)[..., None]
    return maps


def untiled(maps: np.ndarray, nr_types: int | None = NR_TYPES):
    return nuclei_from_maps(maps, max(maps.shape[:2]), nr_types)


def assert_same_nuclei(a, b) -> None:
    """Same rows, same order, bit-identical values and polygons."""
    assert len(a) == len(b)
    np.testing.assert_array_equal(a["nucleus_id"].to_numpy(), b["nucleus_id"].to_numpy())
    for column in ("centroid_x", "centroid_y", "type", "type_prob", "area_px"):
        np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy(), err_msg=column)
    assert all(shapely.equals_exact(a.geometry.values, b.geometry.values, tolerance=0))


def reference_records(maps: np.ndarray, nr_types: int | None = NR_TYPES):
    """``process()`` on the whole map, as (sorted) tuples in table coordinates; contours go
    through the table's documented conversion (+0.5 px, self-touching rings repaired)."""
    _, info = process(maps, nr_types)
    return sorted(
        (
            outline(contour_polygon(rec["contour"] + 0.5)[0]),
            rec["centroid"][0] + 0.5,
            rec["centroid"][1] + 0.5,
        )
        + ((rec["type"], np.float32(rec["type_prob"])) if nr_types else ())
        for rec in info.values()
    )


def outline(polygon) -> tuple[float, ...]:
    return tuple(np.asarray(polygon.exterior.coords)[:-1].ravel())


def table_records(table, typed: bool = True):
    return sorted(
        (outline(p), cx, cy) + ((t, tp) if typed else ())
        for p, cx, cy, t, tp in zip(
            table.geometry,
            table["centroid_x"],
            table["centroid_y"],
            table["type"],
            table["type_prob"],
            strict=True,
        )
    )


@pytest.fixture(scope="module")
def maps() -> np.ndarray:
    return wsi_maps()


@pytest.fixture(scope="module")
def whole(maps):
    return untiled(maps)


# --- the building blocks ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalise_with_range_matches_cv2_on_any_window(dtype) -> None:
    rng = np.random.default_rng(7)
    full = (rng.standard_normal((300, 411)) * 1e3).astype(dtype)
    expected = cv2.normalize(full, None, 0, 1, cv2.NORM_MINMAX, cv2.CV_32F)
    lo, hi = float(full.min()), float(full.max())
    for y0, x0, y1, x1 in [(0, 0, 300, 411), (17, 3, 140, 203), (150, 200, 151, 211)]:
        got = normalise_with_range(full[y0:y1, x0:x1], lo, hi)
        np.testing.assert_array_equal(got, expected[y0:y1, x0:x1])
    # values outside the range (filter edge effects) must not move the others
    window = full[10:50, 10:50].copy()
    window[0, 0] = hi * 10
    got = normalise_with_range(window, lo, hi)
    np.testing.assert_array_equal(got[1:, 1:], expected[11:50, 11:50])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_value_range_is_min_and_max_of_any_view(dtype) -> None:
    rng = np.random.default_rng(3)
    full = (rng.standard_normal((120, 90, 4)) * 1e3).astype(dtype)
    for view in (full[..., 2], full[5:60, 7:80, 3], full[..., 0].copy()):
        assert value_range(view) == (float(view.min()), float(view.max()))
    with pytest.raises(ValueError, match="empty"):
        value_range(full[:0, :, 0])


def test_float64_sobel_of_a_pixel_does_not_depend_on_where_the_window_ends() -> None:
    """What :func:`sobel_range` relies on: the float64 Sobel of every pixel of a window equals
    that of the crop its kernel reads (anchored where it meets the window's edge)."""
    x = np.random.default_rng(5).random((47, 63)).astype(np.float32)
    reach = SOBEL_KSIZE // 2
    for dx, dy in ((1, 0), (0, 1)):
        full = cv2.Sobel(x, cv2.CV_64F, dx, dy, ksize=SOBEL_KSIZE)
        for y in range(x.shape[0]):
            for col in range(x.shape[1]):
                y0, x0 = max(y - reach, 0), max(col - reach, 0)
                crop = x[y0 : y + reach + 1, x0 : col + reach + 1]
                alone = cv2.Sobel(crop, cv2.CV_64F, dx, dy, ksize=SOBEL_KSIZE)[y - y0, col - x0]
                assert alone == full[y, col], (dx, dy, y, col)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), box=st.tuples(st.integers(0, 40), st.integers(0, 40),
       st.integers(1, 40), st.integers(1, 40)), plateau=st.booleans())  # fmt: skip
def test_sobel_range_equals_the_float64_filter(seed, box, plateau) -> None:
    rng = np.random.default_rng(seed)
    smooth = cv2.GaussianBlur(rng.random((90, 110)), (0, 0), 6).astype(np.float32)
    x = normalise_with_range(smooth, float(smooth.min()), float(smooth.max()))
    if plateau:  # every pixel ties: the float32 filter cannot narrow it down
        x[:] = 0.5
    top, left, height, width = box
    inner = slice(top, top + height), slice(left, left + width)
    for dx, dy in ((1, 0), (0, 1)):
        expected = value_range(cv2.Sobel(x, cv2.CV_64F, dx, dy, ksize=SOBEL_KSIZE)[inner])
        assert sobel_range(x, dx, dy, inner) == expected


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.2, 0.7), origin=st.tuples(
    st.integers(0, 5000), st.integers(0, 5000)))
def test_find_clusters_equals_scipy_labels_and_integer_sums(seed, density, origin) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    blb = (rng.random((41, 57)) < density).astype(np.int32)
    clusters_map, clusters = find_clusters(blb, origin)
    expected, count = ndimage.label(ndimage.binary_fill_holes(blb), structure=np.ones((3, 3)))
    assert len(clusters) == count
    oy, ox = origin
    for cluster in clusters:
        pixels = clusters_map == cluster.label
        scipy_label = expected[pixels][0]
        np.testing.assert_array_equal(pixels, expected == scipy_label)  # the same partition
        ys, xs = np.nonzero(pixels)  # raster order
        assert cluster.anchor == (ys[0] + oy, xs[0] + ox)
        assert cluster.box == (ys.min() + oy, xs.min() + ox, ys.max() + 1 + oy, xs.max() + 1 + ox)
        assert cluster.centroid == (ys.sum() // ys.size + oy, xs.sum() // xs.size + ox)


def test_block_grid_cores_tile_the_slide_exactly_once() -> None:
    grid = BlockGrid(1000, 1400, 333, halo=40)
    assert grid.shape == (4, 5)
    cover = np.zeros((1000, 1400), dtype=np.int32)
    for block in grid.blocks():
        y0, x0, y1, x1 = grid.core(*block)
        cover[y0:y1, x0:x1] += 1
        assert y1 - y0 == 333 or y1 == 1000
        assert x1 - x0 == 333 or x1 == 1400
        wy0, wx0, wy1, wx1 = grid.window(*block)
        assert (wy0, wx0) == (max(y0 - 40, 0), max(x0 - 40, 0))
        assert (wy1, wx1) == (min(y1 + 40, 1000), min(x1 + 40, 1400))
        assert grid.block_of(y0, x0) == block
        assert grid.block_of(y1 - 1, x1 - 1) == block
    assert (cover == 1).all()


def test_can_decide_needs_margin_except_at_slide_edges() -> None:
    grid = BlockGrid(1000, 1400, 333, halo=40)
    window = grid.window(1, 1)  # (293, 293, 706, 706): no slide edge
    m = CONTEXT_MARGIN
    assert grid.can_decide(window, (293 + m, 293 + m, 706 - m, 706 - m))
    assert not grid.can_decide(window, (293 + m - 1, 400, 500, 500))
    assert not grid.can_decide(window, (400, 400, 500, 706 - m + 1))
    corner = grid.window(0, 0)  # (0, 0, 373, 373): top and left are slide edges
    assert grid.can_decide(corner, (0, 0, 373 - m, 373 - m))
    assert not grid.can_decide(corner, (0, 0, 373 - m + 1, 100))


def test_merge_boxes_unions_overlaps_only() -> None:
    boxes = [(0, 0, 10, 10), (5, 5, 20, 20), (30, 30, 40, 40), (19, 19, 31, 31)]
    assert merge_boxes(boxes) == [(0, 0, 40, 40)]
    assert merge_boxes([(0, 0, 5, 5), (5, 5, 9, 9)]) == [(0, 0, 5, 5), (5, 5, 9, 9)]


def test_seed_ties_flags_equal_seeds_that_can_grow() -> None:
    blb = np.ones((3, 7), dtype=np.int32)
    marker = np.zeros((3, 7), dtype=np.int32)
    marker[:, :2], marker[:, 5:] = 1, 2
    clusters_map, clusters = find_clusters(blb, (0, 0))

    def segmentation(dist: np.ndarray) -> WindowSegmentation:
        return WindowSegmentation((0, 0), blb, dist, marker, clusters_map, clusters, None)

    assert seed_ties(segmentation(np.zeros((3, 7))))[1]
    ramp = -(np.tile(np.arange(7.0), (3, 1)) ** 2)  # distinct values at the growing seeds
    ramp[:, 5] -= np.arange(3)  # seed column 5 varies down the rows as well
    ramp[:, 1] += np.arange(3) * 0.5
    assert not seed_ties(segmentation(ramp))[1]


def test_flooding_alone_equals_flooding_together_without_ties(maps) -> None:
    crop = maps[200:600, 300:800]
    h, v = crop[..., 2], crop[..., 3]
    ranges = NormRanges(value_range(h), value_range(v))
    sobel_h, sobel_v = sobel_responses(h, v, ranges)
    ranges = NormRanges(ranges.h, ranges.v, value_range(sobel_h), value_range(sobel_v))
    seg = segment_window(crop, (0, 0), ranges, NR_TYPES)
    ties = seed_ties(seg)
    assert not ties.any()
    together = flood_clusters(seg, seg.clusters, ties)
    alone = flood_clusters(seg, seg.clusters, np.ones_like(ties))
    np.testing.assert_array_equal(together, alone)
    inst_map, _ = process(crop, NR_TYPES)  # the reference floods the whole map at once
    np.testing.assert_array_equal(together, inst_map)


# --- the WSI fixture -------------------------------------------------------------------------


def test_untiled_equals_reference_process_on_the_whole_map(maps, whole) -> None:
    expected = reference_records(maps)
    assert len(expected) == len(whole) == 784
    assert table_records(whole) == expected


def test_untiled_on_covered_map_equals_reference_untiled_count() -> None:
    covered = wsi_maps(with_coverage=True)
    table = untiled(covered)
    assert len(table) == parity_json("wsi_expected.json")["num_nuclei_whole_image_untiled"]
    assert table_records(table) == reference_records(covered)


@pytest.mark.parametrize("chunk_size", [256, 333, 500])
def test_wsi_fixture_same_nuclei_for_every_chunk_size(maps, whole, chunk_size) -> None:
    table = nuclei_from_maps(maps, chunk_size, NR_TYPES)
    assert_same_nuclei(table, whole)
    assert table.attrs["oversized_clusters"] == []


def test_small_halo_takes_the_oversize_path_and_stays_exact(maps, whole) -> None:
    with pytest.warns(OversizedClusterWarning):
        table = nuclei_from_maps(maps, 100, NR_TYPES, halo=CONTEXT_MARGIN)
    assert len(table.attrs["oversized_clusters"]) > 50
    assert_same_nuclei(table, whole)


def test_polygons_are_valid_and_never_overlap(whole) -> None:
    geoms = whole.geometry.values
    assert shapely.is_valid(geoms).all()
    pairs = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pairs = pairs[:, pairs[0] < pairs[1]]
    overlap = shapely.area(shapely.intersection(geoms[pairs[0]], geoms[pairs[1]]))
    assert (overlap < 1e-9).all()


def test_nucleus_id_is_the_first_pixel_in_raster_order(maps, whole) -> None:
    inst_map, info = process(maps, NR_TYPES)
    flat = inst_map.ravel()
    labels, first = np.unique(flat, return_index=True)
    first_of = dict(zip(labels.tolist(), first.tolist(), strict=True))
    assert sorted(first_of[i] for i in info) == whole["nucleus_id"].tolist()
    assert whole["nucleus_id"].is_monotonic_increasing


def test_schema(whole) -> None:
    assert list(whole.columns) == [
        "geometry",
        "centroid_x",
        "centroid_y",
        "type",
        "type_prob",
        "area_px",
        "nucleus_id",
    ]
    assert whole["type"].dtype == np.int16
    assert whole["type_prob"].dtype == np.float32
    assert whole["area_px"].dtype == np.int32
    assert whole["nucleus_id"].dtype == np.int64
    area = shapely.area(whole.geometry.values)
    assert (area <= whole["area_px"].to_numpy()).all()  # pixel-centre outlines sit inside


def test_distance_from_reference_wsi_mode() -> None:
    """The reference WSI mode merges per-tile results (505 nuclei); ours is the untiled 510."""
    reference = parity_json("wsi_expected.json")["reference_json"]["nuc"]
    table = nuclei_from_maps(wsi_maps(with_coverage=True), 500, NR_TYPES)
    ref_centroid = np.array([rec["centroid"] for rec in reference.values()]) + 0.5
    ours = np.stack([table["centroid_x"], table["centroid_y"]], axis=1)
    dist, nearest = cKDTree(ours).query(ref_centroid)
    assert (dist < 0.2).all()  # every reference nucleus is ours, shifted by < 0.2 px
    ref_types = np.array([rec["type"] for rec in reference.values()])
    np.testing.assert_array_equal(table["type"].to_numpy()[nearest], ref_types)
    ours_contours = {tuple(np.asarray(p.exterior.coords)[:-1].ravel()) for p in table.geometry}
    ref_contours = {tuple((np.asarray(rec["contour"]) + 0.5).ravel()) for rec in reference.values()}
    assert len(ours_contours & ref_contours) == 426
    assert len(table) - len(set(nearest.tolist())) == 5  # only ours


def test_dask_input_and_untyped_maps(maps, whole) -> None:
    lazy = da.from_array(maps, chunks=(128, 256, 4))
    assert_same_nuclei(nuclei_from_maps(lazy, 333, NR_TYPES), whole)
    untyped = nuclei_from_maps(maps[..., 1:], 500)
    assert (untyped["type"] == 0).all()
    assert untyped["type_prob"].isna().all()
    np.testing.assert_array_equal(untyped["nucleus_id"], whole["nucleus_id"])
    assert all(shapely.equals_exact(untyped.geometry.values, whole.geometry.values, 0))
    assert table_records(untyped, typed=False) == reference_records(maps[..., 1:], None)


def test_bad_maps_are_refused(maps) -> None:
    with pytest.raises(ValueError, match="maps must be"):
        nuclei_from_maps(maps[..., :2], 256)
    with pytest.raises(ValueError, match="tp channel"):
        nuclei_from_maps(maps[..., 1:], 256, NR_TYPES)
    with pytest.raises(ValueError, match="halo"):
        nuclei_from_maps(maps, 256, halo=CONTEXT_MARGIN - 1)


# --- property: random crops, random grids ----------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    y0=st.integers(0, 700),
    x0=st.integers(0, 1000),
    height=st.integers(120, 300),
    width=st.integers(120, 400),
    chunk_size=st.integers(64, 600),
    halo=st.sampled_from([CONTEXT_MARGIN, 40, 128]),
)
def test_random_crops_and_grids_match_the_untiled_result(
    maps, y0, x0, height, width, chunk_size, halo
) -> None:
    crop = maps[y0 : y0 + height, x0 : x0 + width]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversizedClusterWarning)
        tiled = nuclei_from_maps(crop, chunk_size, NR_TYPES, halo=halo)
    reference = untiled(crop)
    assert_same_nuclei(tiled, reference)
    assert table_records(reference) == reference_records(crop)
