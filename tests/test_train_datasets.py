"""Dataset readers: the shared annotated sets and small synthetic folders in each layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import shared_dataset
from PIL import Image

from hoverdask.core.errors import DatasetError
from hoverdask.train.datasets import (
    LabelledImage,
    open_dataset,
    pannuke_labels,
    resample,
)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_consep_tiles_types_agree_with_type_mat() -> None:
    root = shared_dataset("consep-train-tiles")
    data = open_dataset(root)
    assert data.layout == "consep-tiles"
    assert len(data) == 432
    assert data.type_table == "consep"
    item = data[data.refs.index(next(r for r in data.refs if r.name == "train_1_000"))]
    inst = np.asarray(Image.open(root / "inst" / "train_1_000.png")).astype(np.int32)
    np.testing.assert_array_equal(item.inst, inst)
    mat = scipy.io.loadmat(root / "type_mat" / "train_1_000.mat")
    ids = np.unique(inst)[1:]
    for instance, expected in zip(ids, mat["inst_type"].ravel(), strict=True):
        values, counts = np.unique(item.types[inst == instance], return_counts=True)
        assert values[counts.argmax()] == expected
    assert item.image.shape == (256, 256, 3)


def test_cpm15_swapped_masks_and_20x_upsampling() -> None:
    root = shared_dataset("cpm15")
    data = open_dataset(root)
    by_name = {ref.name: i for i, ref in enumerate(data.refs)}
    image04 = data[by_name["image04"]]  # 623x493 image at 20x, paired with image05_mask.txt
    assert image04.inst.shape == (986, 1246)
    assert image04.mpp == 0.25
    assert len(np.unique(image04.inst)) - 1 == 144
    image12 = data[by_name["image12"]]  # 40x: unchanged
    native = np.asarray(Image.open(root / "images" / "image12.png"))
    np.testing.assert_array_equal(image12.image, native[..., :3])


def test_monuseg_polygons_skip_degenerate_regions() -> None:
    root = shared_dataset("monuseg-train")
    data = open_dataset(root)
    assert data.layout == "monuseg"
    assert not data.has_types
    by_name = {ref.name: ref for ref in data.refs}
    assert by_name["TCGA-NH-A8F7-01A-01-TS1"].mpp == 0.25  # no MicronsPerPixel: MoNuSeg is 40x
    assert by_name["TCGA-21-5784-01Z-00-DX1"].mpp == pytest.approx(0.2527)


def test_imagescope_rasterising(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "a.png", np.zeros((20, 30, 3), np.uint8))
    regions = [
        [(2, 2), (12, 2), (12, 8), (2, 8)],  # x 2..12, y 2..8
        [(10, 5), (20, 5), (20, 15), (10, 15)],  # overlaps the first; drawn on top
        [(1, 1), (3, 3)],  # degenerate: skipped
    ]
    body = "".join(
        "<Region><Vertices>"
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in poly)
        + "</Vertices></Region>"
        for poly in regions
    )
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "a.xml").write_text(
        f'<Annotations MicronsPerPixel="0.252"><Annotation><Regions>{body}'
        "</Regions></Annotation></Annotations>"
    )
    item = open_dataset(tmp_path)[0]
    assert set(np.unique(item.inst)) == {0, 1, 2}
    assert item.inst[5, 11] == 2
    assert item.inst[5, 5] == 1
    assert (item.inst == 2).sum() == 11 * 11


def test_official_consep_mat_merges_types(tmp_path: Path) -> None:
    image = np.full((8, 8, 3), 200, np.uint8)
    _png(tmp_path / "Images" / "test_1.png", image)
    inst = np.zeros((8, 8)); inst[1:3, 1:3] = 1; inst[4:7, 4:7] = 2
    type_map = np.zeros((8, 8)); type_map[inst == 1] = 4; type_map[inst == 2] = 6
    (tmp_path / "Labels").mkdir()
    scipy.io.savemat(tmp_path / "Labels" / "test_1.mat", {"inst_map": inst, "type_map": type_map})
    item = open_dataset(tmp_path)[0]
    assert item.types[1, 1] == 3  # 4 (malignant epithelial) -> 3
    assert item.types[5, 5] == 4  # 6 (fibroblast... spindle group) -> 4
    np.testing.assert_array_equal(item.inst, inst.astype(np.int32))


def test_pannuke_channels_become_types(tmp_path: Path) -> None:
    masks = np.zeros((2, 16, 16, 6))
    masks[0, 2:5, 2:5, 0] = 7  # neoplastic
    masks[0, 8:12, 8:12, 1] = 7  # inflammatory, same id value in another channel
    masks[0, ..., 5] = 1
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3))
    fold = tmp_path / "Fold 1" / "images" / "fold1"
    fold.mkdir(parents=True)
    np.save(fold / "images.npy", images)
    (tmp_path / "Fold 1" / "masks" / "fold1").mkdir(parents=True)
    np.save(tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy", masks)
    data = open_dataset(tmp_path)
    assert (data.layout, len(data), data.type_table) == ("pannuke", 2, "pannuke")
    item = data[0]
    assert len(np.unique(item.inst)) == 3
    assert item.types[3, 3] == 1
    assert item.types[9, 9] == 2
    np.testing.assert_array_equal(item.image, np.rint(images[0]).astype(np.uint8))
    inst, _ = pannuke_labels(masks[1])
    assert not inst.any()


def test_pairs_with_mpp_are_resampled(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "x.png", np.zeros((10, 12, 3), np.uint8))
    labels = np.zeros((10, 12), np.uint16); labels[2:6, 3:7] = 300
    _png(tmp_path / "labels" / "x_label.png", labels)
    (tmp_path / "dataset.json").write_text(json.dumps({"mpp": 0.5}))
    data = open_dataset(tmp_path)
    assert data.layout == "pairs"
    assert not data.has_types
    item = data[0]
    assert item.inst.shape == (20, 24)
    assert (item.inst == 300).sum() == 4 * 4 * 4


def test_unknown_layout_and_missing_labels(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        open_dataset(tmp_path)
    _png(tmp_path / "images" / "x.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "labels").mkdir()
    with pytest.raises(DatasetError, match="no label file"):
        open_dataset(tmp_path)


def test_resample_keeps_near_model_pixel_size() -> None:
    shape = (100, 100)
    item = LabelledImage("x", np.zeros((*shape, 3), np.uint8), np.ones(shape, np.int32), None, 0)
    assert resample(item, 0.2527, 0.25).inst.shape == shape  # within the 2 % mpp rule
    assert resample(item, 0.26, 0.25).inst.shape == (104, 104)
    assert resample(item, 0.5, 0.25).inst.shape == (200, 200)


def test_training_images_are_resampled_exactly_as_slides_are(tmp_path: Path) -> None:
    from hoverdask.slide import open_slide
    from hoverdask.slide.resample import processing_array
    from hoverdask.slide.synthetic import write_synthetic_slide
    from hoverdask.train.datasets import MODEL_MPP

    path = tmp_path / "20x.svs"
    write_synthetic_slide(path, 300, 220, mpp=0.5, seed=2, compression="lossless",
                          keep_instances=False)
    with open_slide(path) as slide:
        native = np.asarray(slide.read_region((0, 0), 0, (300, 220)))[..., :3]
        view = processing_array(slide, MODEL_MPP, chunk=128)
        inference = np.asarray(view.array.compute())
    labels = np.arange(300 * 220, dtype=np.int32).reshape(220, 300)
    item = LabelledImage("x", native, labels, labels % 5, 0.5)
    trained = resample(item, 0.5, MODEL_MPP)
    np.testing.assert_array_equal(trained.image, inference)  # same pixels as inference sees
    # labels: nearest source pixel on the same pixel-centre grid (2x: each covers 2x2 outputs)
    np.testing.assert_array_equal(trained.inst, np.repeat(np.repeat(labels, 2, 0), 2, 1))
    np.testing.assert_array_equal(trained.types, trained.inst % 5)


def test_holdout_splits_whole_source_images(tmp_path: Path) -> None:
    from hoverdask.train.holdout import Holdout

    root = shared_dataset("consep-train-tiles")
    spec = tmp_path / "holdout.json"
    spec.write_text(json.dumps({"held_out": {root.name: ["train_5_*", "train_12_*"]}}))
    train, held = Holdout.read(spec).split(open_dataset(root))
    assert len(held) == 32  # 16 tiles of each source image
    assert {ref.name.rsplit("_", 1)[0] for ref in held.refs} == {"train_5", "train_12"}
    assert not {ref.name for ref in train.refs} & {ref.name for ref in held.refs}
    assert len(train) + len(held) == len(open_dataset(root))
    spec.write_text(json.dumps({"held_out": {root.name: ["train_99_*"]}}))
    with pytest.raises(DatasetError, match="matches no image"):
        Holdout.read(spec).split(open_dataset(root))
    spec.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="not a hold-out file"):
        Holdout.read(spec)
