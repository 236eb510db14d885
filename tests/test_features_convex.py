"""Convex areas counted row by row equal the per-pixel hull test they replace."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage
from skimage.morphology import convex_hull_image

from hoverdask.nuclei._sums import outline_sums
from hoverdask.nuclei.features import _PERIMETER_WEIGHTS, _grouped_extremes, _hull_areas


def per_pixel_convex_area(mask: np.ndarray) -> int:
    """Pixel centres of the bounding box inside or on the hull of the border pixels' diamonds,
    one ``shapely.intersects_xy`` test per pixel (the definition)."""
    rr, cc = np.nonzero(mask)
    diamonds = [(c + dx, r + dy) for r, c in zip(rr, cc, strict=True)
                for dx, dy in ((-0.5, 0), (0.5, 0), (0, -0.5), (0, 0.5))]  # fmt: skip
    hull = shapely.MultiPoint(diamonds).convex_hull
    ys, xs = np.mgrid[rr.min() : rr.max() + 1, cc.min() : cc.max() + 1]
    return int(shapely.intersects_xy(hull, xs.ravel(), ys.ravel()).sum())


def random_labels(seed: int, shape=(90, 110)) -> np.ndarray:
    """Touching blobs of every shape: thin lines, single pixels, holes, concave arms."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.8, 3.0))
    labels, _ = ndimage.label(noise > np.quantile(noise, rng.uniform(0.4, 0.8)))
    labels[rng.random(shape) < 0.01] = labels.max() + 1  # scattered single pixels, one label
    return labels.astype(np.int32)


@pytest.mark.parametrize("seed", range(8))
def test_convex_area_equals_the_per_pixel_test(seed: int) -> None:
    labels = random_labels(seed)
    count = int(labels.max())
    origin = (7, 3)
    _, *entries = outline_sums(labels, _PERIMETER_WEIGHTS, count + 1)
    got = _hull_areas(_grouped_extremes(*entries, origin), count + 1)
    want = [per_pixel_convex_area(labels == i) if (labels == i).any() else 0
            for i in range(1, count + 1)]  # fmt: skip
    np.testing.assert_array_equal(got, want)
    # and skimage's own convex hull image agrees on solid blobs
    for i in range(1, min(count, 10) + 1):
        mask = labels == i
        if mask.sum() > 3:
            assert convex_hull_image(mask).sum() == want[i - 1]


def test_rasterise_multipolygons_and_empty_rows_as_their_parts() -> None:
    from hoverdask.nuclei.features import rasterise

    a = shapely.box(2, 2, 9, 7)
    b = shapely.Polygon([(12, 3), (20, 4), (15, 12)])
    c = shapely.box(3, 10, 8, 14)
    combined = rasterise(np.array([shapely.MultiPolygon([a, b]), None, c, shapely.Polygon()],
                                  dtype=object), (20, 24))  # fmt: skip
    parts = rasterise(np.array([a, b, c], dtype=object), (20, 24))
    expected = np.select([parts == 1, parts == 2, parts == 3], [1, 1, 3], 0)
    np.testing.assert_array_equal(combined, expected)
    assert (combined == 1).sum() > 40
    assert (combined == 3).sum() > 20


@pytest.mark.parametrize("seed", range(4))
def test_outline_sums_give_skimage_perimeters_and_row_extremes(seed: int) -> None:
    from skimage.measure import perimeter

    labels = random_labels(seed, (60, 70))
    count = int(labels.max())
    got, label, row, left, right = outline_sums(labels, _PERIMETER_WEIGHTS, count + 1)
    want = [perimeter(labels == i) for i in range(1, count + 1)]
    np.testing.assert_allclose(got[1:], want, rtol=1e-12)
    expected = []
    for i in range(1, count + 1):
        for r in np.unique(np.nonzero(labels == i)[0]):
            cols = np.flatnonzero(labels[r] == i)
            expected.append((i, r, cols[0], cols[-1]))
    assert list(zip(label.tolist(), row.tolist(), left.tolist(), right.tolist(),
                    strict=True)) == expected  # fmt: skip
