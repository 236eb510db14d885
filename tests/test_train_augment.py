"""Augmentation and batches: mirrored windows, label/image alignment, reproducible batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_dataset

from hoverdask.train.augment import (
    Window,
    affine_crop,
    colour_jitter,
    context_size,
    mirror_window,
    random_window,
)
from hoverdask.train.batches import WindowSource
from hoverdask.train.datasets import open_dataset


def _blobs(size: int = 64) -> Window:
    """Squares whose image colour encodes their id, so alignment can be checked after warps."""
    inst = np.zeros((size, size), np.int32)
    image = np.full((size, size, 3), 230, np.uint8)
    for k, (r, c) in enumerate([(4, 4), (4, 40), (30, 20), (50, 50)], start=1):
        inst[r : r + 12, c : c + 12] = k
        image[r : r + 12, c : c + 12] = (40 * k, 0, 255 - 40 * k)
    return Window(image, inst, (inst > 0).astype(np.int32) * 2)


def test_mirror_window_inside_is_a_crop_and_copies_get_new_ids() -> None:
    win = _blobs()
    inside = mirror_window(win, 10, 12, 40)
    np.testing.assert_array_equal(inside.image, win.image[10:50, 12:52])
    assert len(np.unique(inside.inst)) == len(np.unique(win.inst[10:50, 12:52]))
    padded = mirror_window(win, -20, -20, 104)
    np.testing.assert_array_equal(padded.image, np.pad(win.image, ((20, 20), (20, 20), (0, 0)), "symmetric"))
    # blob 1 touches nothing; its reflections across the top and left edges are new instances
    top_copy = padded.inst[20 - 16 + 4 : 20 - 4, 24:36]
    original = padded.inst[24:36, 24:36]
    assert top_copy.min() > 0
    assert original.min() > 0
    assert np.unique(top_copy)[0] != np.unique(original)[0]
    np.testing.assert_array_equal(padded.types > 0, padded.inst > 0)


def test_affine_crop_keeps_labels_on_their_pixels() -> None:
    win = _blobs(128)
    rng = np.random.default_rng(3)
    for _ in range(5):
        out = affine_crop(win, 64, rng)
        assert out.image.shape == (64, 64, 3)
        assert out.inst.shape == (64, 64)
        np.testing.assert_array_equal(out.types > 0, out.inst > 0)
        on = out.inst > 0
        # every labelled pixel shows a nucleus colour (blue or red channel far from background)
        nucleus_like = out.image[..., 1] < 120
        assert nucleus_like[on].mean() > 0.9
        assert nucleus_like[~on].mean() < 0.1


def test_random_window_covers_a_context_that_survives_rotation() -> None:
    assert context_size(256) >= 256 * np.sqrt(2) / 0.8
    win = random_window(_blobs(), 32, np.random.default_rng(0))
    assert win.inst.shape == (context_size(32), context_size(32))


def test_colour_jitter_is_seeded_and_changes_colour() -> None:
    image = _blobs().image
    a = colour_jitter(image, np.random.default_rng(5))
    b = colour_jitter(image, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8
    assert a.shape == image.shape
    assert not np.array_equal(a, image)


@pytest.mark.parametrize("augment", [True, False])
def test_batches_are_reproducible_and_targets_match_labels(augment: bool) -> None:
    data = open_dataset(shared_dataset("consep-train-tiles"))
    source = WindowSource(
        [data], input_size=128, output_size=36, nr_types=5, batch_size=2, seed=7, augment=augment
    )
    first, again = source[3], source[3]
    for key in first:
        assert np.array_equal(first[key].numpy(), again[key].numpy()), key
    assert not np.array_equal(first["image"].numpy(), source[4]["image"].numpy())
    assert first["image"].shape == (2, 3, 128, 128)
    assert first["hv"].shape == (2, 2, 36, 36)
    assert bool(first["has_types"].all())
    fg = first["np"].numpy() > 0
    np.testing.assert_array_equal(fg, first["tp"].numpy() > 0)
    hv = first["hv"].numpy()
    assert not hv[:, 0][~fg].any()
    assert np.abs(hv).max() <= 1.0


def test_window_source_without_types_refuses_nr_types() -> None:
    from hoverdask.core.errors import DatasetError

    data = open_dataset(shared_dataset("cpm15"))
    with pytest.raises(DatasetError, match="no dataset has nucleus types"):
        WindowSource([data], input_size=128, output_size=36, nr_types=5, batch_size=1, seed=0)
    source = WindowSource([data], input_size=128, output_size=36, nr_types=None, batch_size=1, seed=0)
    assert not bool(source[0]["has_types"].any())


def test_dataset_weight_multiplies_its_share_of_windows() -> None:
    consep = open_dataset(shared_dataset("consep-train-tiles"))
    cpm = open_dataset(shared_dataset("cpm15"))
    kwargs = {"input_size": 128, "output_size": 36, "nr_types": None, "batch_size": 1, "seed": 0}
    even = WindowSource([consep, cpm], **kwargs)
    tripled = WindowSource([consep, cpm], dataset_weights=[3.0, 1.0], **kwargs)
    n = len(consep)
    share, share3 = even.weights[:n].sum(), tripled.weights[:n].sum()
    assert share == pytest.approx(consep.areas().sum() / (consep.areas().sum() + cpm.areas().sum()))
    # odds (share / rest) grow by exactly the factor; within a dataset, still by pixels
    assert share3 / (1 - share3) == pytest.approx(3 * share / (1 - share))
    np.testing.assert_allclose(tripled.weights[n:] / tripled.weights[n:].sum(),
                               cpm.areas() / cpm.areas().sum())
    drawn = [tripled.index[int(np.random.default_rng(k).choice(len(tripled.index), p=tripled.weights))][0]
             for k in range(400)]
    assert abs(drawn.count(0) / 400 - share3) < 0.08


def test_cli_train_refuses_a_data_weight_for_an_unknown_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hoverdask.cli import app

    result = CliRunner().invoke(app, [
        "train", "--mode", "lite", "--steps", "1", "--data", str(shared_dataset("cpm15")),
        "--data-weight", "consep=2", "--out", str(tmp_path / "m.tar"),
    ])
    assert result.exit_code == 2
    assert "no --data folder has that name" in result.output
    assert not (tmp_path / "m.tar").exists()
    bad = CliRunner().invoke(app, [
        "train", "--mode", "lite", "--steps", "1", "--data", str(shared_dataset("cpm15")),
        "--data-weight", "cpm15", "--out", str(tmp_path / "m.tar"),
    ])
    assert bad.exit_code == 2
    assert "FOLDER=FACTOR" in bad.output
    zero = CliRunner().invoke(app, [
        "train", "--mode", "lite", "--steps", "1", "--data", str(shared_dataset("cpm15")),
        "--data-weight", "cpm15=0", "--out", str(tmp_path / "m.tar"),
    ])
    assert zero.exit_code == 2
    assert "must be above 0" in zero.output


def test_stain_jitter_changes_each_stain_alone() -> None:
    from hoverdask.train.augment import _RGB_OD_FROM_HED, stain_jitter

    class Fixed:  # the generator's draws, chosen: scale haematoxylin only
        def __init__(self, scale: list[float]) -> None:
            self.draws = [np.array(scale), np.zeros(3)]

        def uniform(self, *_args: object, **_kwargs: object) -> np.ndarray:
            return self.draws.pop(0)

    # a pure-eosin picture (its optical density is a multiple of the eosin vector)
    eosin_od = 0.6 * _RGB_OD_FROM_HED[1]
    image = np.full((8, 8, 3), 256 * np.exp(-eosin_od) - 1).round().astype(np.uint8)
    unchanged = stain_jitter(image, Fixed([1.2, 1.0, 1.0]))  # more haematoxylin: none there
    assert np.abs(unchanged.astype(int) - image).max() <= 1
    darker = stain_jitter(image, Fixed([1.0, 1.2, 1.0]))  # more eosin: darker, same hue
    assert (darker.astype(int) <= image).all()
    assert darker.astype(int).sum() < image.astype(int).sum()
    assert stain_jitter(image, np.random.default_rng(0)).shape == image.shape
