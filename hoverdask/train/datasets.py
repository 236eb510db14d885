"""Readers for annotated nucleus datasets: every layout becomes images with instance/type maps.

Supported folder layouts (detected from the files present):

* ``consep-tiles``: ``images/*.jpg|png`` + ``inst/*.png|npy`` (instance ids, any numbering)
  + optional ``seg_mask/*.png`` (per-pixel type) or ``type_mat/*.mat`` (``inst_type`` per id in
  ascending id order). 40x.
* ``consep``: the official release, ``Images/*.png`` + ``Labels/*.mat`` with ``inst_map`` and
  ``type_map``. Types are merged to HoVer-Net's four classes (3,4 -> 3 epithelial; 5,6,7 -> 4
  spindle). 40x.
* ``monuseg``: ``images/`` (or ``Tissue Images``) ``*.tif`` + ``annotations/`` (or
  ``Annotations``) ImageScope ``*.xml``, one polygon per nucleus, rasterised with later
  polygons on top. Pixel size from ``MicronsPerPixel``; MoNuSeg is 40x, so 0.25 where missing.
* ``cpm15``: ``images/imageNN.png`` + ``masks/imageNN_mask.txt``. The published image04/image05
  masks are swapped; they are paired with the image they fit. image01-07 are 20x, 08-15 40x.
* ``pannuke``: ``images.npy`` (N, 256, 256, 3) + ``masks.npy`` (N, 256, 256, 6) anywhere below
  the folder; channels 0-4 are per-class instance maps (types 1-5), channel 5 background. 40x.
* ``pairs``: ``images/`` + ``labels/`` (or ``masks/``) with instance-label PNG/TIFF/NPY files of
  the same stem (a ``_label``, ``_labels``, ``_mask`` or ``_inst`` suffix is allowed), optional
  ``types/`` per-pixel type maps. Pixel size from ``dataset.json`` (``{"mpp": 0.5}``), else 0.25.

Every image is resampled to the model's pixel size (``target_mpp``, 0.25 µm/px) when its own
differs by more than the project's mpp rule allows (``hoverdask.slide.resample.SAME_MPP_TOLERANCE``,
2 %) with the functions that resample slides (:mod:`hoverdask.slide.resample`: antialiased linear for
the image, nearest on the same pixel-centre grid for labels), so training sees what inference sees.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hoverdask.core.errors import DatasetError
from hoverdask.slide.resample import SAME_MPP_TOLERANCE, resample_image, resample_labels

MODEL_MPP = 0.25
MPP_40X = 0.25
MPP_20X = 0.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
PAIR_LABEL_TAGS = ("", "_label", "_labels", "_mask", "_inst")
CONSEP_TYPE_MERGE = np.array([0, 1, 2, 3, 3, 4, 4, 4], np.int32)
CPM15_MASK_OF = {"image04": "image05", "image05": "image04"}
CPM15_LAST_20X = 7


@dataclass(frozen=True)
class LabelledImage:
    """One annotated image at the model's pixel size."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    inst: np.ndarray  # (H, W) int32, 0 = background
    types: np.ndarray | None  # (H, W) int32 per-pixel type, 0 = background; None: untyped
    mpp: float


@dataclass(frozen=True)
class ImageRef:
    """A not-yet-loaded image: its name, native pixel size and how to read it."""

    name: str
    mpp: float
    read: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    shape: tuple[int, int]  # native (height, width), read from the header only


@dataclass
class LabelledSet(Sequence[LabelledImage]):
    """The images of one dataset folder, loaded on first use and kept in memory."""

    root: Path
    layout: str
    refs: list[ImageRef]
    has_types: bool
    type_table: str | None = None  # a name known to hoverdask.core.types, when the layout says
    target_mpp: float = MODEL_MPP
    cache: bool = True
    _loaded: dict[int, LabelledImage] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> LabelledImage:  # type: ignore[override]
        if index in self._loaded:
            return self._loaded[index]
        ref = self.refs[index]
        try:
            image, inst, types = ref.read()
        except (OSError, ValueError, KeyError) as err:
            raise DatasetError(f"{self.root}: cannot read {ref.name}: {err}") from err
        item = _checked(ref.name, image, inst, types)
        item = resample(item, ref.mpp, self.target_mpp)
        if self.cache:
            self._loaded[index] = item
        return item

    def __iter__(self) -> Iterator[LabelledImage]:
        return (self[i] for i in range(len(self)))

    def areas(self) -> np.ndarray:
        """Pixel count of each image at the model's pixel size (to sample windows evenly)."""
        return np.array(
            [ref.shape[0] * ref.shape[1] * (ref.mpp / self.target_mpp) ** 2 for ref in self.refs]
        )

    def subset(self, keep: Callable[[str], bool]) -> LabelledSet:
        """The images whose name ``keep`` accepts (same folder, layout and pixel size)."""
        refs = [ref for ref in self.refs if keep(ref.name)]
        return LabelledSet(self.root, self.layout, refs, self.has_types, self.type_table,
                           self.target_mpp, self.cache)

    def describe(self) -> str:
        mpps = sorted({ref.mpp for ref in self.refs})
        typed = "typed" if self.has_types else "untyped"
        return f"{self.root} ({self.layout}, {len(self)} images, {typed}, mpp {mpps})"


def _checked(
    name: str, image: np.ndarray, inst: np.ndarray, types: np.ndarray | None
) -> LabelledImage:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"{name}: expected an RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    inst = np.asarray(inst)
    if inst.shape != image.shape[:2]:
        raise DatasetError(f"{name}: label map {inst.shape} does not match image {image.shape}")
    if inst.min() < 0:
        raise DatasetError(f"{name}: negative instance ids")
    if types is not None:
        types = np.asarray(types).astype(np.int32)
        if types.shape != inst.shape:
            raise DatasetError(f"{name}: type map {types.shape} does not match {inst.shape}")
        if types.min() < 0:
            raise DatasetError(f"{name}: negative type values")
    return LabelledImage(name, np.ascontiguousarray(image), inst.astype(np.int32), types, 0.0)


def resample(item: LabelledImage, mpp: float, target_mpp: float) -> LabelledImage:
    """``item`` at ``target_mpp``: unchanged when within the slide pipeline's tolerance of it,
    else resampled by the very functions that resample slides for inference."""
    if abs(mpp - target_mpp) <= SAME_MPP_TOLERANCE * target_mpp:
        return LabelledImage(item.name, item.image, item.inst, item.types, mpp)
    scale = target_mpp / mpp  # source px per output px, as in processing_array
    image = resample_image(item.image, scale)
    inst = resample_labels(item.inst, scale)
    types = None if item.types is None else resample_labels(item.types, scale)
    return LabelledImage(item.name, image, inst, types, target_mpp)


# --- file readers -------------------------------------------------------------------------


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as img:
        return img.height, img.width


def read_labels(path: Path) -> np.ndarray:
    """An integer label image (16-bit PNG, TIFF or .npy) as int32, unchanged values."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        array = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as img:
            array = np.asarray(img)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise DatasetError(f"{path}: a label map must be 2-D, got shape {array.shape}")
    if not np.array_equal(array, np.rint(array)):
        raise DatasetError(f"{path}: label values must be integers")
    return array.astype(np.int32)


def paint_types(inst: np.ndarray, inst_type: np.ndarray) -> np.ndarray:
    """Per-pixel types from one type per instance, in ascending order of the non-zero ids."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    inst_type = np.asarray(inst_type).ravel().astype(np.int32)
    if len(ids) != len(inst_type):
        raise DatasetError(f"{len(ids)} instances but {len(inst_type)} type entries")
    lookup = np.zeros(int(inst.max()) + 1, np.int32)
    lookup[ids] = inst_type
    return lookup[inst]


def rasterise_imagescope(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    """Instance map from an Aperio ImageScope XML (one Region = one nucleus) and its mpp."""
    from skimage.draw import polygon

    root = ET.parse(path).getroot()
    inst = np.zeros(shape, np.int32)
    next_id = 1
    for region in root.iter("Region"):
        xy = [(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")]
        if len(xy) < 3:
            continue
        cols, rows = np.asarray(xy).T
        rr, cc = polygon(rows, cols, shape=shape)
        if len(rr):
            inst[rr, cc] = next_id
            next_id += 1
    mpp = root.get("MicronsPerPixel")
    return inst, float(mpp) if mpp else None



def read_cpm_mask(path: Path) -> np.ndarray:
    """A CPM-15 text mask: ``width height`` then one label per pixel, row-major."""
    values = np.array(path.read_text().split(), dtype=np.int64)
    width, height = int(values[0]), int(values[1])
    if values.size != 2 + width * height:
        raise DatasetError(f"{path}: expected {width}x{height} labels, found {values.size - 2}")
    return values[2:].reshape(height, width).astype(np.int32)


# --- layouts ------------------------------------------------------------------------------


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _subdir(root: Path, *names: str) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _consep_tiles(root: Path) -> LabelledSet:
    images, inst_dir = root / "images", root / "inst"
    seg_dir, mat_dir = root / "seg_mask", root / "type_mat"
    refs = []
    typed = seg_dir.is_dir() or mat_dir.is_dir()
    for image_path in _files(images, IMAGE_SUFFIXES):
        stem = image_path.stem
        label_path = _first_existing(inst_dir, stem, LABEL_SUFFIXES)
        if label_path is None:
            raise DatasetError(f"{root}: no instance map inst/{stem}.png|npy for {image_path.name}")

        def read(ip: Path = image_path, lp: Path = label_path, s: str = stem) -> tuple:
            inst = read_labels(lp)
            types = None
            if seg_dir.is_dir():
                types = read_labels(seg_dir / f"{s}.png")
            elif mat_dir.is_dir():
                import scipy.io

                types = paint_types(inst, scipy.io.loadmat(mat_dir / f"{s}.mat")["inst_type"])
            return read_rgb(ip), inst, types

        refs.append(ImageRef(stem, MPP_40X, read, image_shape(image_path)))
    return LabelledSet(root, "consep-tiles", refs, typed, "consep" if typed else None)


def _first_existing(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _consep_official(root: Path) -> LabelledSet:
    import scipy.io

    refs = []
    for image_path in _files(root / "Images", IMAGE_SUFFIXES):
        mat_path = root / "Labels" / f"{image_path.stem}.mat"
        if not mat_path.is_file():
            raise DatasetError(f"{root}: missing Labels/{mat_path.name}")

        def read(ip: Path = image_path, mp: Path = mat_path) -> tuple:
            mat = scipy.io.loadmat(mp)
            types = CONSEP_TYPE_MERGE[np.clip(mat["type_map"].astype(np.int64), 0, 7)]
            return read_rgb(ip), read_labels_array(mat["inst_map"], mp), types

        refs.append(ImageRef(image_path.stem, MPP_40X, read, image_shape(image_path)))
    return LabelledSet(root, "consep", refs, True, "consep")


def read_labels_array(array: np.ndarray, source: Path) -> np.ndarray:
    if not np.array_equal(array, np.rint(array)):
        raise DatasetError(f"{source}: label values must be integers")
    return np.asarray(array).astype(np.int32)


def _monuseg(root: Path, images: Path, annotations: Path) -> LabelledSet:
    refs = []
    for xml_path in sorted(annotations.glob("*.xml")):
        image_path = _first_existing(images, xml_path.stem, IMAGE_SUFFIXES)
        if image_path is None:
            raise DatasetError(f"{root}: no image for {xml_path.name} in {images.name}/")
        mpp = _imagescope_mpp(xml_path)

        def read(ip: Path = image_path, xp: Path = xml_path) -> tuple:
            image = read_rgb(ip)
            inst, _ = rasterise_imagescope(xp, image.shape[:2])
            return image, inst, None

        refs.append(ImageRef(xml_path.stem, mpp or MPP_40X, read, image_shape(image_path)))
    return LabelledSet(root, "monuseg", refs, False)


def _imagescope_mpp(path: Path) -> float | None:
    """``MicronsPerPixel`` of the root element, read from the head of the file (no full parse)."""
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8", "replace")
    root_tag = re.search(r"<Annotations\b[^>]*>", head)
    found = root_tag and re.search(r'MicronsPerPixel="([0-9.eE+-]+)"', root_tag.group(0))
    return float(found.group(1)) if found else None


def _cpm15(root: Path) -> LabelledSet:
    refs = []
    for image_path in _files(root / "images", (".png",)):
        stem = image_path.stem
        mask_path = root / "masks" / f"{CPM15_MASK_OF.get(stem, stem)}_mask.txt"
        if not mask_path.is_file():
            raise DatasetError(f"{root}: missing masks/{mask_path.name}")
        number = re.search(r"(\d+)$", stem)
        mpp = MPP_20X if number and int(number.group(1)) <= CPM15_LAST_20X else MPP_40X

        def read(ip: Path = image_path, mp: Path = mask_path) -> tuple:
            return read_rgb(ip), read_cpm_mask(mp), None

        refs.append(ImageRef(stem, mpp, read, image_shape(image_path)))
    return LabelledSet(root, "cpm15", refs, False)


def _pannuke(root: Path, images_npy: Path, masks_npy: Path) -> LabelledSet:
    images = np.load(images_npy, mmap_mode="r")
    masks = np.load(masks_npy, mmap_mode="r")
    if images.shape[:3] != masks.shape[:3] or masks.shape[-1] != 6:
        raise DatasetError(f"{root}: images {images.shape} and masks {masks.shape} do not match")

    def read(i: int) -> tuple:
        return np.asarray(images[i]), *pannuke_labels(np.asarray(masks[i]))

    refs = [
        ImageRef(f"{images_npy.parent.name}_{i:05d}", MPP_40X, lambda i=i: read(i), images.shape[1:3])
        for i in range(images.shape[0])
    ]
    return LabelledSet(root, "pannuke", refs, True, "pannuke", cache=False)


def pannuke_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance and type maps from a PanNuke (H, W, 6) mask; class channel c is type c + 1."""
    inst = np.zeros(mask.shape[:2], np.int32)
    types = np.zeros(mask.shape[:2], np.int32)
    offset = 0
    for channel in range(5):
        ids = np.rint(mask[..., channel]).astype(np.int64)
        _, dense = np.unique(ids, return_inverse=True)
        dense = dense.reshape(ids.shape)
        if ids.min() > 0:
            dense = dense + 1
        on = ids > 0
        inst[on] = dense[on] + offset
        types[on] = channel + 1
        offset = int(inst.max())
    return inst, types


def _pairs(root: Path, images: Path, labels: Path) -> LabelledSet:
    mpp = MPP_40X
    meta = root / "dataset.json"
    if meta.is_file():
        try:
            mpp = float(json.loads(meta.read_text())["mpp"])
        except (ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{meta}: expected {{\"mpp\": <µm per pixel>}}: {err}") from err
    types_dir = root / "types"
    refs = []
    for image_path in _files(images, IMAGE_SUFFIXES):
        label_path = _pair_label(labels, image_path.stem)
        if label_path is None:
            raise DatasetError(f"{root}: no label file for {image_path.name} in {labels.name}/")
        type_path = _pair_label(types_dir, image_path.stem) if types_dir.is_dir() else None
        if types_dir.is_dir() and type_path is None:
            raise DatasetError(f"{root}: no type map for {image_path.name} in types/")

        def read(ip: Path = image_path, lp: Path = label_path, tp: Path | None = type_path):
            return read_rgb(ip), read_labels(lp), None if tp is None else read_labels(tp)

        refs.append(ImageRef(image_path.stem, mpp, read, image_shape(image_path)))
    return LabelledSet(root, "pairs", refs, types_dir.is_dir())


def _pair_label(folder: Path, stem: str) -> Path | None:
    for tag in PAIR_LABEL_TAGS:
        found = _first_existing(folder, stem + tag, LABEL_SUFFIXES)
        if found is not None:
            return found
    return None


LAYOUT_HELP = (
    "images/+inst/ (CoNSeP tiles), Images/+Labels/*.mat (CoNSeP), images/+annotations/*.xml "
    "(MoNuSeg), images/+masks/*_mask.txt (CPM-15), images.npy+masks.npy (PanNuke), "
    "images/+labels/ (image and instance-label pairs)"
)


def open_dataset(path: str | Path, target_mpp: float = MODEL_MPP) -> LabelledSet:
    """Detect the layout of ``path`` and list its images (nothing is decoded yet)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    dataset = _detect(root)
    if len(dataset) == 0:
        raise DatasetError(f"{root}: no images found ({dataset.layout} layout)")
    dataset.target_mpp = target_mpp
    return dataset


def _detect(root: Path) -> LabelledSet:
    images = _subdir(root, "images")
    if images is not None and (root / "inst").is_dir():
        return _consep_tiles(root)
    if (root / "Images").is_dir() and (root / "Labels").is_dir():
        return _consep_official(root)
    tissue = _subdir(root, "images", "Tissue Images", "Tissue_Images")
    annotations = _subdir(root, "annotations", "Annotations")
    if tissue is not None and annotations is not None and any(annotations.glob("*.xml")):
        return _monuseg(root, tissue, annotations)
    if images is not None and (root / "masks").is_dir() and any(root.glob("masks/*_mask.txt")):
        return _cpm15(root)
    npys = sorted(root.rglob("images.npy"))
    if npys:
        masks = sorted(root.rglob("masks.npy"))
        if len(masks) != len(npys):
            raise DatasetError(f"{root}: found {len(npys)} images.npy but {len(masks)} masks.npy")
        if len(npys) > 1:
            raise DatasetError(f"{root}: several PanNuke folds below; pass each fold with --data")
        return _pannuke(root, npys[0], masks[0])
    labels = _subdir(root, "labels", "masks")
    if images is not None and labels is not None:
        return _pairs(root, images, labels)
    raise DatasetError(f"{root}: unknown dataset layout; expected one of: {LAYOUT_HELP}")
