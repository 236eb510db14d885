"""hoverdask from Python: the functions ``import hoverdask`` offers (for notebooks and scripts).

``run`` is what ``hoverdask run`` calls; ``read_nuclei`` reads a run's cohort table back;
``load_model`` and ``segment`` work on one network and one in-memory image. Heavy libraries
(torch, dask, geopandas) are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoverdask.core.errors import HoverdaskError

if TYPE_CHECKING:
    import geopandas as gpd
    import numpy as np

    from hoverdask.core.types import TypeTable
    from hoverdask.model.build import Network
    from hoverdask.pipeline.run import CohortResult

PathLike = str | Path
FORMATS = ("parquet", "qupath")
DEVICES = ("auto", "cpu", "cuda")


def run(
    slides: PathLike | Sequence[PathLike],
    out: PathLike,
    model: PathLike | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    slurm: PathLike | None = None,
    client: Any = None,
    security: object | None = None,
    progress: bool = True,
    verbose: bool = False,
    **options: Any,
) -> CohortResult:
    """Find, outline and classify the nuclei of every slide; what ``hoverdask run`` does.

    Parameters
    ----------
    slides
        One slide file or a list of them (svs, ndpi, tiff, OME-Zarr...).
    out
        Output folder: one subfolder per slide, ``summary.csv``, ``report.html``, the cohort
        table ``nuclei/`` and the log ``hoverdask.log``.
    model
        Checkpoint file, an official model name (``hovernet_fast-pannuke``...; downloaded when
        not cached) or None for the bundled model.
    workers, threads_per_worker, scheduler, slurm, client, security
        The Dask cluster: a local one by default, ``scheduler`` (address or scheduler file),
        ``slurm`` (a ``hoverdask cluster slurm`` config file: worker jobs are submitted for this
        run and cancelled when it ends), or an existing ``distributed.Client`` (left open).
    progress
        Show progress bars on stderr.
    verbose
        Also show Dask's own INFO log lines on the terminal (they always go to the log file).
    **options
        Fields of :class:`hoverdask.pipeline.run.RunOptions`: ``mpp``, ``chunk_size``,
        ``batch_size``, ``device``, ``autocast``, ``autocast_dtype``, ``compile``,
        ``read_ahead``, ``formats`` (tuple or "parquet,qupath"), ``overwrite``, ``keep_work``,
        ``tissue_mask``, ``region`` ("X,Y,W,H" or a Region)...

    Returns
    -------
    CohortResult
        One result per slide (status, nuclei, seconds, error, output files); ``exit_code`` is 1
        when a slide failed.
    """
    from hoverdask.pipeline.run import run_cohort

    names = [slides] if isinstance(slides, str | Path) else list(slides)
    return run_cohort(
        names, out, model=model, client=client, options=run_options_from(options),
        workers=workers, threads_per_worker=threads_per_worker, scheduler=scheduler,
        security=security, slurm=slurm, progress=progress, log_file=True, verbose=verbose,
    )


def run_options_from(options: dict[str, Any]) -> Any:
    """:class:`RunOptions` from keyword options, checked like the command line checks them."""
    from hoverdask.pipeline.spec import Region, RunOptions

    known = {f.name for f in dataclasses.fields(RunOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise HoverdaskError(f"unknown run option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
    values = dict(options)
    if values.get("device", "auto") not in DEVICES:
        raise HoverdaskError(f"--device must be auto, cpu or cuda, not {values['device']!r}")
    if "formats" in values:
        given = values["formats"]
        wanted = tuple(f.strip() for f in (given.split(",") if isinstance(given, str) else given)
                       if f.strip())
        if not wanted or set(wanted) - set(FORMATS):
            raise HoverdaskError(f"--format takes parquet and/or qupath, not {given!r}")
        values["formats"] = wanted
    if isinstance(values.get("region"), str):
        values["region"] = Region.parse(values["region"])
    return RunOptions(**values)


def read_nuclei(
    out: PathLike,
    slides: Sequence[str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    columns: Sequence[str] | None = None,
) -> gpd.GeoDataFrame:
    """The nuclei of a run's cohort table ``OUT/nuclei`` as one GeoDataFrame.

    Parameters
    ----------
    out
        The run's output folder (or its ``nuclei`` dataset folder).
    slides
        Only these slide ids (the output folder names); None: every slide.
    bbox
        ``(xmin, ymin, xmax, ymax)`` in level-0 pixels: only nuclei whose bounding box meets
        it. The filter is pushed down to the Parquet reader (the ``bbox`` covering column), so
        row groups outside it are not read.
    columns
        Columns to read (``geometry`` and ``slide`` are always included).

    Returns
    -------
    geopandas.GeoDataFrame
        One row per nucleus, with the hive partition ``slide`` as a string column.
    """
    import geopandas as gpd

    folder = Path(out)
    dataset = folder if folder.name == "nuclei" else folder / "nuclei"
    if not dataset.is_dir():
        raise HoverdaskError(f"no cohort table {dataset}: is {out} the output folder of a run?")
    wanted = None
    if columns is not None:
        wanted = list(dict.fromkeys(["geometry", *columns, "slide"]))
    filters = [("slide", "in", list(slides))] if slides is not None else None
    frame = gpd.read_parquet(dataset, columns=wanted, bbox=bbox, filters=filters)
    if "slide" in frame.columns:
        frame["slide"] = frame["slide"].astype(str)
    return frame.reset_index(drop=True)


def load_model(name_or_path: PathLike | None = None, device: str = "cpu") -> Network:
    """The network of a checkpoint file or an official model name (None: the bundled model).

    The file is loaded safely (tensors only); an official name is downloaded into the user
    cache first when it is not there. ``device`` is cpu, cuda or auto.
    """
    from hoverdask.model.checkpoints import load_model as load_checkpoint
    from hoverdask.model.registry import resolve_model_argument

    return load_checkpoint(resolve_model_argument(name_or_path), device)


def segment(
    image: np.ndarray,
    model: PathLike | Network | None = None,
    *,
    device: str = "auto",
    batch_size: int = 8,
) -> gpd.GeoDataFrame:
    """Segment and classify the nuclei of an in-memory RGB image (the reference tile mode).

    Parameters
    ----------
    image
        ``(H, W, 3)`` uint8 RGB array (an alpha channel is dropped).
    model
        A network from :func:`load_model`, a checkpoint file, an official model name, or None
        for the bundled model.

    Returns
    -------
    geopandas.GeoDataFrame
        One row per nucleus in the image's pixel coordinates (origin at the top-left corner of
        the first pixel): ``geometry``, ``centroid_x``, ``centroid_y``, ``type``, ``type_name``,
        ``type_prob``, ``area_px``, ``nucleus_id``.
    """
    import numpy as np
    import torch

    from hoverdask.core.types import select_type_table
    from hoverdask.model.infer import predict_image, resolve_device
    from hoverdask.nuclei.postproc import process

    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise HoverdaskError(f"segment needs an (H, W, 3) uint8 RGB array, got {rgb.dtype} "
                             f"{rgb.shape}")
    rgb = np.ascontiguousarray(rgb[..., :3])
    if isinstance(model, torch.nn.Module):
        network = model.to(resolve_device(device)).eval()
    else:
        network = load_model(model, resolve_device(device))
    pred_map = predict_image(network, rgb, batch_size=batch_size)
    inst_map, inst_info = process(pred_map, network.nr_types)
    table, _ = select_type_table(network.nr_types, network.mode, getattr(network, "metadata", {}))
    return _inst_table(inst_map, inst_info, table)


def _inst_table(inst_map: Any, inst_info: dict[int, dict[str, Any]],
                table: TypeTable | None) -> gpd.GeoDataFrame:
    """The nuclei table (image pixel coordinates) of the reference's instance records."""
    import numpy as np
    import pandas as pd

    from hoverdask.nuclei.seams import nuclei_table

    ids = sorted(inst_info)
    areas = np.bincount(np.asarray(inst_map).ravel().astype(np.int64),
                        minlength=max(ids, default=0) + 1)
    frame = pd.DataFrame({
        "nucleus_id": np.array(ids, dtype=np.int64),
        "centroid_x": np.array([inst_info[i]["centroid"][0] for i in ids], dtype=np.float64),
        "centroid_y": np.array([inst_info[i]["centroid"][1] for i in ids], dtype=np.float64),
        "type": np.array([inst_info[i].get("type") or 0 for i in ids], dtype=np.int16),
        "type_prob": np.array([np.nan if inst_info[i].get("type_prob") is None
                               else inst_info[i]["type_prob"] for i in ids], dtype=np.float32),
        "area_px": areas[ids].astype(np.int32) if ids else np.zeros(0, np.int32),
        "contour": pd.Series([np.asarray(inst_info[i]["contour"]) for i in ids], dtype=object),
    })
    nuclei = nuclei_table(frame)
    names = [table.name_of(int(t)) if table is not None else "Nucleus" for t in nuclei["type"]]
    nuclei.insert(4, "type_name", pd.Series(names, dtype="string"))
    return nuclei
