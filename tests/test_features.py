"""Per-nucleus features against scikit-image regionprops on the same masks."""

from __future__ import annotations

import cv2
import geopandas as gpd
import numpy as np
import pytest
import shapely
from skimage.color import rgb2hed
from skimage.draw import ellipse
from skimage.measure import regionprops

from hoverdask.core.schema import to_level0
from hoverdask.nuclei._sums import pixel_means
from hoverdask.nuclei.features import FEATURE_COLUMNS, measure

TYPES = {1: ("Neoplastic", (255, 0, 0)), 2: ("Inflammatory", (0, 255, 0))}


def synthetic_block(
    seed: int = 0,
    shape: tuple[int, int] = (256, 320),
    count: int = 60,
    scale: float = 1.0,
    offset: tuple[int, int] = (0, 0),
    slide_id: str = "synthetic",
) -> tuple[gpd.GeoDataFrame, np.ndarray, np.ndarray]:
    """Non-overlapping ellipses: (nuclei table, RGB block, instance label map)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    rows = []
    for _ in range(count):
        r, c = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        rr, cc = ellipse(r, c, rng.uniform(2.5, 9), rng.uniform(2.5, 9), shape, rng.uniform(0, 3.1))
        if labels[rr, cc].any():
            continue
        label = len(rows) + 1
        labels[rr, cc] = label
        mask = (labels == label).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        ring = to_level0(contours[0][:, 0, :], scale, offset)
        ys, xs = np.nonzero(mask)
        rows.append(
            {
                "geometry": shapely.Polygon(ring) if len(ring) >= 3 else shapely.Point(ring[0]),
                "centroid_x": (xs.mean() + offset[0] + 0.5) * scale,
                "centroid_y": (ys.mean() + offset[1] + 0.5) * scale,
                "type": np.int16(rng.integers(0, 3)),
                "type_prob": np.float32(rng.uniform(0.5, 1.0)),
                "area_px": np.int32(len(xs)),
                "nucleus_id": np.int64(1000 + label),
                "slide_id": slide_id,
                "label_id": label,
            }
        )
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    image[labels > 0] //= 2  # darker nuclei, so the colour features are not just noise
    nuclei = gpd.GeoDataFrame(rows, geometry="geometry", crs=None)
    return nuclei[nuclei.geometry.geom_type == "Polygon"].reset_index(drop=True), image, labels


def _regionprops_features(labels: np.ndarray, image: np.ndarray, ids, um: float) -> dict:
    """The reference: one regionprops call per nucleus on the same mask, converted to µm."""
    hed = rgb2hed(image) * 6.0  # skimage divides OD (log10 units) by 6 = -log10(1e-6)
    props = {p.label: p for p in regionprops(labels, intensity_image=hed)}
    rgb = {p.label: p for p in regionprops(labels, intensity_image=image.astype(float))}
    ref: dict[str, list[float]] = {name: [] for name in FEATURE_COLUMNS}
    for label in ids:
        p, q = props[label], rgb[label]
        values = {
            "area_um2": p.area * um * um,
            "perimeter_um": p.perimeter * um,
            "eq_diameter_um": p.equivalent_diameter_area * um,
            "major_axis_um": p.axis_major_length * um,
            "minor_axis_um": p.axis_minor_length * um,
            "eccentricity": p.eccentricity,
            "solidity": p.solidity,
            "extent": p.extent,
            "circularity": 4 * np.pi * p.area / p.perimeter**2,
            "orientation_deg": np.degrees(p.orientation),
            "h_od_mean": p.intensity_mean[0],
            "h_od_std": p.intensity_std[0],
            "e_od_mean": p.intensity_mean[1],
            "e_od_std": p.intensity_std[1],
            "r_mean": q.intensity_mean[0],
            "g_mean": q.intensity_mean[1],
            "b_mean": q.intensity_mean[2],
        }
        for name in FEATURE_COLUMNS:
            ref[name].append(values[name])
    return {name: np.array(v) for name, v in ref.items()}


def _assert_matches_regionprops(out, labels, image, um):
    ref = _regionprops_features(labels, image, out["label_id"], um)
    for name in FEATURE_COLUMNS:
        got = out[name].to_numpy(dtype=float)
        if name == "orientation_deg":  # ±90° is one direction; undefined for round nuclei
            defined = ref["major_axis_um"] - ref["minor_axis_um"] > 1e-6
            diff = np.abs((got - ref[name] + 90.0) % 180.0 - 90.0)[defined]
            assert defined.sum() > 10
            assert diff.max() < 1e-6, name
        else:
            np.testing.assert_allclose(got, ref[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    ("scale", "offset", "mpp"), [(1.0, (0, 0), 0.25), (2.0, (512, 1024), 0.2527)]
)
def test_rasterised_polygons_match_regionprops(scale, offset, mpp):
    nuclei, image, labels = synthetic_block(seed=1, scale=scale, offset=offset)
    assert len(nuclei) > 20
    origin = (offset[0] * scale, offset[1] * scale)
    out = measure(nuclei, image, mpp, origin=origin, scale=scale, type_table=TYPES)
    _assert_matches_regionprops(out, labels, image, scale * mpp)
    np.testing.assert_allclose(out["centroid_x_um"], nuclei["centroid_x"] * mpp)


def test_label_map_path_equals_rasterised_path():
    nuclei, image, labels = synthetic_block(seed=2)
    shuffled = nuclei.sample(frac=1.0, random_state=0)
    via_polygons = measure(shuffled, image, 0.5)
    via_labels = measure(shuffled, image, 0.5, labels=labels, label_column="label_id")
    for name in FEATURE_COLUMNS:
        np.testing.assert_array_equal(via_polygons[name], via_labels[name], err_msg=name)
    _assert_matches_regionprops(via_labels, labels, image, 0.5)
    # labels of nuclei the table does not hold (another block's) are background, nothing else
    subset = shuffled.iloc[::3]
    part = measure(subset, image, 0.5, labels=labels, label_column="label_id")
    for name in FEATURE_COLUMNS:
        np.testing.assert_array_equal(part[name], via_labels.loc[subset.index, name], err_msg=name)


def test_type_names_and_untyped_nuclei():
    nuclei, image, _ = synthetic_block(seed=3)
    out = measure(nuclei, image, 0.25, type_table=TYPES)
    expected = nuclei["type"].map({0: None, 1: "Neoplastic", 2: "Inflammatory"})
    assert out["type_name"].isna().tolist() == (nuclei["type"] == 0).tolist()
    assert out["type_name"].dropna().tolist() == expected.dropna().tolist()
    assert measure(nuclei, image, 0.25)["type_name"].dropna().str.startswith("Type ").all()


def test_nucleus_outside_block_gets_nan_and_bad_input_raises():
    nuclei, image, _ = synthetic_block(seed=4)
    moved = nuclei.copy()
    moved.loc[0, "geometry"] = shapely.affinity.translate(moved.geometry[0], 5000, 5000)
    out = measure(moved, image, 0.25)
    assert np.isnan(out.loc[0, "area_um2"])
    assert not out["area_um2"][1:].isna().any()
    with pytest.raises(ValueError, match="RGB uint8"):
        measure(nuclei, image[..., 0], 0.25)
    with pytest.raises(ValueError, match="positive"):
        measure(nuclei, image, 0.0)


def test_type_table_from_the_model_package():
    from hoverdask.core.types import PANNUKE
    from hoverdask.nuclei.features import type_info

    nuclei, image, _ = synthetic_block(seed=6)
    out = measure(nuclei, image, 0.25, type_table=PANNUKE)
    for type_id in (1, 2):
        names = out.loc[out["type"] == type_id, "type_name"]
        assert (names == PANNUKE.name_of(type_id)).all()
    info = type_info(PANNUKE)
    assert info[5] == (PANNUKE.name_of(5), PANNUKE.color_of(5))
    with pytest.raises(TypeError, match="TypeTable or a mapping"):
        type_info([("a", (1, 2, 3))])


def test_pixel_means_equal_bincounts_to_the_last_bit() -> None:
    """The compiled sums add in the pixels' order, as ``np.bincount`` does."""
    rng = np.random.default_rng(11)
    label = rng.integers(1, 40, 5000)
    rows, cols = rng.integers(0, 3000, (2, 5000)).astype(np.float64)
    stains = rng.random((5000, 3)) * 3.0
    rgb = rng.integers(0, 256, (5000, 3)).astype(np.uint8)
    size = 45  # labels 40-44 have no pixels
    means = pixel_means(label, rows, cols, stains, rgb, size)
    area = np.bincount(label, minlength=size).astype(np.float64)
    safe = np.where(area > 0, area, 1.0)

    def mean_of(values: np.ndarray) -> np.ndarray:
        return np.bincount(label, weights=values, minlength=size) / safe

    dr, dc = rows - mean_of(rows)[label], cols - mean_of(cols)[label]
    expected = {
        "area": area, "row": mean_of(rows), "col": mean_of(cols), "var_c": mean_of(dc * dc),
        "var_r": mean_of(dr * dr), "cov_rc": mean_of(dr * dc), "h_od": mean_of(stains[:, 0]),
        "h_od_sq": mean_of(stains[:, 0] ** 2), "e_od": mean_of(stains[:, 1]),
        "e_od_sq": mean_of(stains[:, 1] ** 2), "red": mean_of(rgb[:, 0].astype(float)),
        "green": mean_of(rgb[:, 1].astype(float)), "blue": mean_of(rgb[:, 2].astype(float)),
    }  # fmt: skip
    for name, values in expected.items():
        np.testing.assert_array_equal(getattr(means, name), values, err_msg=name)
