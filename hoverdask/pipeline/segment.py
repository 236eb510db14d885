"""Tile mode for one ordinary image (PNG/JPEG/TIFF): the reference ``run_infer.py tile`` outputs.

Writes ``<stem>.json`` (``{"mag": null, "nuc": {id: {bbox, centroid, contour, type_prob,
type}}}``, the reference layout), ``<stem>_inst.npy`` (int32 instance map) and ``<stem>.png``
(contours coloured by type). Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hoverdask.core.atomic import atomic_write
from hoverdask.core.errors import HoverdaskError
from hoverdask.core.types import TypeTable, load_type_table, select_type_table
from hoverdask.nuclei.postproc import inst_info_to_json, process

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def read_rgb_image(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB; an alpha channel is dropped, grey images are refused."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise HoverdaskError(f"image {path} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise HoverdaskError(f"image {path}: expected one of {', '.join(IMAGE_SUFFIXES)}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise HoverdaskError(f"image {path} cannot be decoded")
    if image.dtype != np.uint8:
        raise HoverdaskError(f"image {path} is {image.dtype}; 8-bit RGB is required")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise HoverdaskError(f"image {path} has shape {image.shape}; an RGB image is required")
    return np.ascontiguousarray(cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB))


def draw_overlay(
    image: np.ndarray, inst_info: dict[int, dict[str, Any]], table: TypeTable | None
) -> np.ndarray:
    """RGB copy of ``image`` with each nucleus contour drawn 2 px wide in its type colour."""
    import cv2

    overlay = image.copy()
    for record in inst_info.values():
        type_id = record.get("type")
        color = table.color_of(type_id) if table is not None else (255, 200, 0)
        contour = np.asarray(record["contour"], dtype=np.int32).reshape(-1, 1, 2)
        cv2.drawContours(overlay, [contour], -1, tuple(int(c) for c in color), 2)
    return overlay




def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise HoverdaskError(f"cannot write {path}")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


@dataclass(frozen=True)
class SegmentResult:
    json_path: Path
    inst_path: Path
    overlay_path: Path
    nuclei: int
    type_counts: dict[str, int]
    table_reason: str


def segment_image(
    image_path: str | Path,
    model_path: str | Path,
    out_dir: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 8,
    types_path: str | Path | None = None,
) -> SegmentResult:
    """Segment and classify the nuclei of one image and write the three output files."""
    from hoverdask.model.checkpoints import load_model
    from hoverdask.model.infer import predict_image, resolve_device

    image_path, out_dir = Path(image_path), Path(out_dir)
    image = read_rgb_image(image_path)
    if (out_dir / f"{image_path.stem}.png").resolve() == image_path.resolve():
        raise HoverdaskError(
            f"--out {out_dir} would overwrite the input image; pick another folder"
        )
    target = resolve_device(device)
    model = load_model(model_path, device=target)
    if types_path is not None and model.nr_types is None:
        raise HoverdaskError("--types given, but the model has no type branch")
    if types_path is not None:
        table, reason = load_type_table(types_path, model.nr_types), f"types from {types_path}"
    else:
        table, reason = select_type_table(model.nr_types, model.mode, model.metadata)
    pred_map = predict_image(model, image, batch_size=batch_size)  # fp32: reference results
    inst_map, inst_info = process(pred_map, model.nr_types)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = image_path.stem
    doc = {"mag": None, "nuc": inst_info_to_json(inst_info)}
    json_path = out_dir / f"{stem}.json"
    inst_path = out_dir / f"{stem}_inst.npy"
    overlay_path = out_dir / f"{stem}.png"
    atomic_write(json_path, lambda p: p.write_text(json.dumps(doc)))
    atomic_write(inst_path, lambda p: _write_npy(p, inst_map.astype(np.int32)))
    overlay = draw_overlay(image, inst_info, table)
    atomic_write(overlay_path, lambda p: _write_png(p, overlay))

    counts: dict[str, int] = {}
    for record in inst_info.values():
        name = table.name_of(record["type"]) if table is not None else "Nucleus"
        counts[name] = counts.get(name, 0) + 1
    return SegmentResult(json_path, inst_path, overlay_path, len(inst_info), counts, reason)
