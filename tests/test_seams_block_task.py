"""The post-processing block task (passes 2 and 3, polygons and features) gives the pinned tables.

Oracle: ``tests/data/block_task/*.parquet``, the tables that :func:`block_task_table` built with
the code of commit 7ef543a (before the block task was optimised), on the parity WSI maps and on a
synthetic map, each cut into blocks as the pipeline cuts a slide (one case with a small halo, so
the oversized-cluster path runs too). Every later version must give the same rows: same ids and
geometry bit for bit, every other column to 1e-9. Regenerate only for a deliberate change of
definition::

    python tests/test_seams_block_task.py --write
"""

from __future__ import annotations

import sys

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from conftest import DATA, parity_npz

from hoverdask.core.schema import to_level0
from hoverdask.nuclei import seams
from hoverdask.nuclei.features import measure
from hoverdask.nuclei.stable import (
    CONTEXT_MARGIN,
    SOBEL_REACH,
    NormRanges,
    merge_ranges,
    value_range,
)
from hoverdask.pipeline import local
from hoverdask.slide.synthetic import dequantised_pred_map, synthetic_pred_map

NR_TYPES = 6
MPP = 0.25
TYPES = {1: ("Neoplastic", (255, 0, 0)), 3: ("Inflammatory", (0, 255, 0))}
ORACLES = DATA / "block_task"
# name -> (maps and oracle, chunk size, halo, level-0 px per map px, offset (x, y) of the map)
CASES = {
    "wsi_chunk492": ("wsi", 492, seams.DEFAULT_HALO, 1.0, (0, 0)),
    "wsi_chunk256_halo40": ("wsi", 256, 40, 1.0, (0, 0)),
    "synthetic_chunk300_scaled": ("synthetic", 300, seams.DEFAULT_HALO, 0.5, (17, 5)),
}
WRITTEN_BY = ("wsi_chunk492", "synthetic_chunk300_scaled")  # chunking never changes a table


def case_maps(name: str) -> np.ndarray:
    if name == "wsi":
        return dequantised_pred_map(parity_npz("wsi_synth_input.npz"))
    return synthetic_pred_map(700, 900, NR_TYPES, seed=5)


def rgb_of(maps: np.ndarray) -> np.ndarray:
    """A deterministic RGB image that follows the maps (dark nuclei, class-dependent green)."""
    tp, prob, h, v = (maps[..., i] for i in range(4))
    red = 250 - 170 * prob
    green = (37 * tp + 40 * (1 - prob)) % 256
    blue = 127.5 * (h + 1) * 0.6 + 60 * (v + 1)
    return np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)


def block_task_table(name: str) -> gpd.GeoDataFrame:
    source, chunk, halo, scale, offset = CASES[name]
    maps = case_maps(source)
    return composed_table(maps, rgb_of(maps), chunk, halo, scale, offset, MPP)


def composed_table(maps, image, chunk, halo, scale, offset, mpp) -> gpd.GeoDataFrame:
    """Passes 1-3 block by block and the oversize refit, as ``pipeline.postprocess`` runs them,
    composed from the pure functions (no map cache, no slide)."""
    height, width = maps.shape[:2]
    grid = seams.BlockGrid(height, width, chunk, halo)

    def window(box):
        return maps[box[0] : box[2], box[1] : box[3]]

    def measured(records, box) -> gpd.GeoDataFrame:
        """The pipeline's ``measured_table`` with the RGB read from ``image``."""
        table = seams.nuclei_table(seams.records_frame(records), scale, offset)
        if not len(table):
            return table
        y0, x0, y1, x1 = box
        origin = ((x0 + offset[0]) * scale, (y0 + offset[1]) * scale)
        return measure(table, image[y0:y1, x0:x1], mpp, origin=origin, scale=scale,
                       type_table=TYPES)  # fmt: skip

    hv = [seams.hv_ranges(window(grid.core(*b))) for b in grid.blocks()]
    hv_ranges = NormRanges(merge_ranges([r[0] for r in hv]), merge_ranges([r[1] for r in hv]))
    sobel = []
    for block in grid.blocks():
        core = grid.core(*block)
        context = grid.grow(core, SOBEL_REACH)
        sobel.append(seams.sobel_ranges(window(context), context, core, hv_ranges))
    ranges = NormRanges(
        hv_ranges.h,
        hv_ranges.v,
        merge_ranges([s[0] for s in sobel]),
        merge_ranges([s[1] for s in sobel]),
    )
    tables, fragments = [], []
    for block in grid.blocks():
        box = grid.window(*block)
        found = seams.block_nuclei(window(box), box, grid, block, ranges, NR_TYPES)
        tables.append(measured(found.records, box))
        fragments.extend(found.fragments)
    pending = [(grid.grow(t, CONTEXT_MARGIN), t) for t in seams.merge_boxes(fragments)]
    while pending:
        retry = []
        for box, target in pending:
            refit = seams.refit_nuclei(window(box), box, grid, target, ranges, NR_TYPES)
            if refit.grow_to is not None:
                retry.append((refit.grow_to, target))
            else:
                tables.append(measured(refit.records, box))
        pending = retry
    return sorted_table(tables)


def sorted_table(tables) -> gpd.GeoDataFrame:
    table = pd.concat([t for t in tables if len(t)], ignore_index=True)
    table = table.drop_duplicates("nucleus_id").sort_values("nucleus_id", ignore_index=True)
    table.attrs = {}
    return gpd.GeoDataFrame(table, geometry="geometry")


def assert_same_table(got: gpd.GeoDataFrame, expected: gpd.GeoDataFrame) -> None:
    """Same ids and polygons bit for bit, every other column to 1e-9 (NaN where NaN)."""
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected) > 100
    np.testing.assert_array_equal(got["nucleus_id"].to_numpy(), expected["nucleus_id"].to_numpy())
    assert all(shapely.equals_exact(got.geometry.values, expected.geometry.values, tolerance=0))
    for column in expected.columns:
        if column == "geometry":
            continue
        want, have = expected[column], got[column]
        assert have.dtype == want.dtype, column
        if pd.api.types.is_numeric_dtype(want):
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-9, err_msg=column)
        else:
            assert have.equals(want), column


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_task_gives_the_pinned_table(name: str) -> None:
    expected = gpd.read_parquet(ORACLES / f"{CASES[name][0]}.parquet")
    assert_same_table(block_task_table(name), expected)


def test_the_small_halo_case_exercises_the_oversize_path() -> None:
    maps = case_maps("wsi")
    _, chunk, halo, _, _ = CASES["wsi_chunk256_halo40"]
    with pytest.warns(seams.OversizedClusterWarning, match="did not fit a 40 px halo"):
        table = local.nuclei_from_maps(maps, chunk, NR_TYPES, halo=halo)
    assert table.attrs["oversized_clusters"]


def write_oracles() -> None:
    ORACLES.mkdir(parents=True, exist_ok=True)
    for name in WRITTEN_BY:
        table = block_task_table(name)
        table.to_parquet(ORACLES / f"{CASES[name][0]}.parquet", index=False)
        print(name, len(table), "nuclei")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    write_oracles()


# --- the faster steps against the steps they replace, window by window ------------------------


@pytest.fixture(scope="module")
def windows():
    """(maps window, origin, ranges) of pass-3 windows of a synthetic map: corner, interior, edge."""
    maps = synthetic_pred_map(1100, 1100, NR_TYPES, seed=11)
    grid = seams.BlockGrid(1100, 1100, 300, seams.DEFAULT_HALO)
    ranges = local.slide_ranges(maps, grid)
    out = []
    for block in ((0, 0), (1, 1), (2, 3), (3, 1)):
        box = grid.window(*block)
        out.append((maps[box[0] : box[2], box[1] : box[3]], box[:2], ranges))
    return out


def test_pass3_markers_equal_the_reference_markers(windows) -> None:
    from hoverdask.nuclei.fast import markers_fast
    from hoverdask.nuclei.reference import foreground_mask, markers_from_energy
    from hoverdask.nuclei.stable import energy_with_ranges

    for window, _, ranges in windows:
        blb = foreground_mask(window[..., 1])
        overall = energy_with_ranges(window[..., 2], window[..., 3], blb, ranges)
        # NaN energy inside the foreground is a core pixel for the reference (NaN >= t is False)
        inside = np.flatnonzero(blb.ravel())
        overall.ravel()[inside[:: max(1, inside.size // 40)]] = np.nan
        expected = markers_from_energy(overall, blb)
        assert expected.max() > 50
        np.testing.assert_array_equal(markers_fast(overall, blb), expected)
        np.testing.assert_array_equal(markers_fast(overall.astype(np.float32), blb), expected)


def test_pass3_surface_and_markers_equal_the_reference_steps(windows) -> None:
    """Oracle: the reference's float64 ``overall`` (slide-wide ranges), its surface and markers."""
    from hoverdask.nuclei.reference import foreground_mask, markers_from_energy, watershed_surface
    from hoverdask.nuclei.stable import energy_with_ranges, segment_window

    for window, origin, ranges in windows:
        seg = segment_window(window, origin, ranges, NR_TYPES)
        blb = foreground_mask(window[..., 1])
        overall = energy_with_ranges(window[..., 2], window[..., 3], blb, ranges)
        np.testing.assert_array_equal(seg.blb, blb)
        np.testing.assert_array_equal(seg.dist, watershed_surface(overall, blb))
        np.testing.assert_array_equal(seg.marker, markers_from_energy(overall, blb))


def test_float32_threshold_equals_the_float64_comparison() -> None:
    from hoverdask.nuclei.fast import _at_least

    values = np.float32(0.4) + np.arange(-3, 4, dtype=np.float32) * np.float32(2**-25)
    for threshold in (0.4, float(np.float32(0.4)), 0.3, 0.7):
        np.testing.assert_array_equal(_at_least(values, threshold),
                                      values.astype(np.float64) >= threshold)


def test_flood_equals_one_skimage_call_on_the_untied_clusters(windows) -> None:
    from skimage.segmentation import watershed

    from hoverdask.nuclei.stable import flood_clusters, seed_ties, segment_window

    for window, origin, ranges in windows:
        seg = segment_window(window, origin, ranges, NR_TYPES)
        ties = seed_ties(seg)
        flooded = flood_clusters(seg, seg.clusters, ties)
        untied = ~ties
        untied[0] = False
        region = np.take(untied, seg.clusters_map) & (seg.blb > 0)
        expected = watershed(seg.dist, markers=np.where(region, seg.marker, 0), mask=region)
        assert len(np.unique(expected)) > 100
        np.testing.assert_array_equal(np.where(region, flooded, 0), expected)


def test_contour_polygons_equal_one_by_one_polygons_repairs_included() -> None:
    from hoverdask.nuclei.instances import crop_record
    from hoverdask.nuclei.postproc import process

    _, info = process(synthetic_pred_map(300, 300, NR_TYPES, seed=2), NR_TYPES, method="fast")
    contours = [record["contour"] for record in info.values()]
    thin = np.zeros((12, 16), np.uint8)
    thin[1:5, 1:5] = 1  # two squares joined through one pixel: the ring touches itself
    thin[5, 5] = 1
    thin[6:10, 6:10] = 1
    thin[2, 5:14] = 1  # and a one-pixel-thin arm
    contours.append(crop_record(thin, 0, 0, 12, 16)["contour"])
    scale, offset = 0.5, (17.0, 5.0)
    polygons, repaired = seams.contour_polygons(contours, scale, offset)
    one_by_one = [seams.contour_polygon(to_level0(c, scale, offset)) for c in contours]
    assert repaired == sum(fixed for _, fixed in one_by_one) >= 1
    assert all(shapely.equals_exact(polygons, [p for p, _ in one_by_one], tolerance=0))


@pytest.mark.slow
@pytest.mark.parametrize("halo", [seams.DEFAULT_HALO, 40])
def test_pipeline_tasks_equal_the_pure_composition(tmp_path, monkeypatch, halo: int) -> None:
    """``sobel_block``, ``nuclei_block`` and ``oversized_nuclei`` on a real map cache and slide
    give the composition of the pure functions pinned above (with the slide's RGB); the small
    halo sends clusters through ``oversized_nuclei``, on overlapping windows."""
    from hoverdask.pipeline import maps_store, postprocess
    from hoverdask.pipeline.plan import plan_slide
    from hoverdask.pipeline.tasks import read_rgb
    from hoverdask.slide.synthetic import write_synthetic_slide

    maps = case_maps("wsi")
    height, width = maps.shape[:2]
    slide = tmp_path / "wsi.svs"
    write_synthetic_slide(slide, width, height, mpp=0.25, seed=1, keep_instances=False)
    plan, _ = plan_slide(str(slide), tmp_path / "out", mpp=None, target_mpp=0.25, chunk_size=300,
                         output=164, margin=46, use_tissue_mask=False, type_table=TYPES)  # fmt: skip
    store, tile = plan.ledger.maps_store, plan.grid.tile
    maps_store.create_store(store, (height, width), tile, NR_TYPES)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            maps_store.write_tile(store, y, x, maps[y : y + tile, x : x + tile], NR_TYPES)
    stored = maps_store.read_window(store, 0, 0, height, width, NR_TYPES)
    grid = seams.BlockGrid(height, width, plan.grid.tile, halo)
    monkeypatch.setattr(postprocess, "block_grid", lambda _plan: grid)
    hv = (value_range(stored[..., -2]), value_range(stored[..., -1]))
    sobel = [postprocess.sobel_block(plan, b, hv, NR_TYPES) for b in grid.blocks()]
    for block, got in zip(grid.blocks(), sobel, strict=True):
        context = grid.grow(grid.core(*block), SOBEL_REACH)
        window = stored[context[0] : context[2], context[1] : context[3]]
        assert got == seams.sobel_ranges(window, context, grid.core(*block), NormRanges(*hv))
    ranges = postprocess.slide_norm_ranges(hv, sobel, False)
    parts = [postprocess.nuclei_block(plan, b, ranges, NR_TYPES) for b in grid.blocks()]
    refit = postprocess.oversized_nuclei(plan, parts, ranges, NR_TYPES)
    assert (len(refit["parts"]) > len(parts)) == (halo == 40)
    got = sorted_table([gpd.read_parquet(p) for p in refit["parts"]])
    image = read_rgb(plan.source, np.arange(height), np.arange(width))
    expected = composed_table(stored, image, grid.chunk_size, grid.halo, plan.scale, plan.offset,
                              plan.slide_mpp)  # fmt: skip
    assert_same_table(got, expected)


def test_ownership_shortcut_equals_the_reporter_rule() -> None:
    from hoverdask.nuclei.stable import window_foreground

    maps = synthetic_pred_map(600, 600, NR_TYPES, seed=9)
    checked = owned = 0
    for chunk, halo in ((100, 40), (256, 128)):
        grid = seams.BlockGrid(600, 600, chunk, halo)
        for block in grid.blocks():
            box = grid.window(*block)
            foreground = window_foreground(maps[box[0] : box[2], box[1] : box[3], 1], box[:2])
            for cluster in foreground.clusters:
                if grid.can_decide(box, cluster.box):
                    mine = seams._reported_by(grid, cluster, block)
                    assert mine == (grid.reporter(cluster) == block)
                    checked += 1
                    owned += mine
    assert checked > 1000
    assert 100 < owned < checked
