"""``hoverdask check``: open every slide of a cohort without running a model.

For each slide: its format, pyramid levels, pixel size and where it came from (or why it is
missing), magnification, a decode of sampled storage tiles of every level, the tissue area, the
number of map tiles ``run`` would send to the network and, from this machine's last
``hoverdask bench`` figures, an estimated time. A slide that would fail is named with the
one-line reason ``run`` would record for it and the fix.

One implementation: ``run``'s plan step (:func:`hoverdask.pipeline.plan.plan_slide`) opens the
slide with the same :func:`~hoverdask.slide.open_slide`, runs the same :func:`~hoverdask.slide.inspect.inspect_slide`
decode test and plans with the same :func:`~hoverdask.pipeline.plan.plan_open_slide`, so a slide
that ``check`` fails, ``run`` fails with the same reason. Each slide is one Dask task
(:func:`check_task`), so a cohort is checked in parallel on a local cluster or ``--scheduler``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoverdask.core.errors import HoverdaskError, SlideError, one_line
from hoverdask.core.version import __version__
from hoverdask.deploy.cluster import client_for, cpu_count
from hoverdask.deploy.figures import latest_figures
from hoverdask.pipeline.plan import plan_open_slide
from hoverdask.pipeline.spec import DEFAULT_CHUNK_SIZE, NO_TISSUE_WARNING
from hoverdask.slide import Slide, check_mpp, open_slide, sanitize_slide_id, slide_stem
from hoverdask.slide.inspect import RECOPY, SlideFacts, inspect_slide, magnification_from_mpp

if TYPE_CHECKING:
    from distributed import Client


PLACEHOLDER_MPP = 1.0  # opens a slide without a pixel size, only to describe and decode it
MPP_CODES = ("no-mpp", "bad-mpp")
BENCH_HINT = "run hoverdask bench for an estimate"

FIXES = {
    "not-found": "check the path",
    "empty": RECOPY,
    "truncated": RECOPY,
    "damaged": RECOPY + " (or export/scan the slide again)",
    "not-a-slide": "leave it out, or convert it to a slide format hoverdask reads "
                   "(svs, ndpi, tif/tiff, ome-tiff, OME-Zarr from `hoverdask convert`)",
    "not-rgb": "leave it out: hoverdask reads RGB brightfield (H&E) slides",
    "no-mpp": "pass --mpp (µm per level-0 pixel, e.g. --mpp 0.25 for 40x, 0.5 for 20x)",
    "bad-mpp": "pass --mpp (µm per level-0 pixel, e.g. --mpp 0.25 for 40x, 0.5 for 20x)",
    "unreadable": "check that the file is a whole slide that opens in a viewer",
    "error": "see the reason; the file may need re-exporting",
}


# --- one slide's check -----------------------------------------------------------------------


@dataclass
class SlideCheck:
    """The check of one slide; :meth:`to_json` is its entry in ``check``'s JSON."""

    slide: str
    slide_id: str
    ok: bool = False
    reason: str = ""
    code: str = ""
    fix: str = ""
    format: str | None = None
    file_bytes: int | None = None
    levels: list[dict[str, Any]] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    mpp_missing: str | None = None
    magnification: float | None = None
    magnification_source: str | None = None
    tiles_decoded: int = 0
    bad_tiles: list[dict[str, Any]] = field(default_factory=list)
    tissue_mm2: float | None = None
    map_tile_size: int | None = None
    map_tiles: int | None = None
    map_tiles_total: int | None = None
    processed_megapixels: float | None = None
    estimated_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)

    def fail(self, error: BaseException) -> SlideCheck:
        self.ok = False
        self.reason = one_line(error)
        self.code = getattr(error, "code", None) or "error"
        self.fix = FIXES.get(self.code, FIXES["error"])
        return self

    def describe(self, facts: SlideFacts, slide: Slide, mpp_known: bool) -> None:
        self.format = facts.format
        self.width, self.height = (int(v) for v in slide.dimensions)
        self.levels = [asdict(level) for level in facts.levels]
        if mpp_known:
            self.mpp = round(float(slide.mpp), 6)
            self.mpp_source = str(slide.properties.get("hoverdask.mpp-source", "metadata"))
            for entry in self.levels:
                entry["mpp"] = round(self.mpp * entry["downsample"], 6)
        if facts.objective_power:
            self.magnification, self.magnification_source = facts.objective_power, "metadata"
        elif mpp_known:
            self.magnification = magnification_from_mpp(slide.mpp)
            self.magnification_source = "estimated from mpp"
        self.tiles_decoded = facts.tiles_decoded
        self.bad_tiles = [asdict(tile) for tile in facts.bad_tiles]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_slide(
    slide_path: str | Path,
    *,
    mpp: float | None = None,
    target_mpp: float = 0.25,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    output: int,
    margin: int,
    use_tissue_mask: bool = True,
) -> SlideCheck:
    """Check one slide as ``run`` would plan it; never raises for a bad slide."""
    path = Path(slide_path)
    result = SlideCheck(str(slide_path), sanitize_slide_id(slide_stem(path)))
    with contextlib.suppress(OSError):
        result.file_bytes = path.stat().st_size if path.is_file() else None
    mpp_error: SlideError | None = None
    try:
        slide = open_slide(path, mpp)
    except SlideError as err:
        if err.code not in MPP_CODES:
            return result.fail(err)
        mpp_error = err  # still describe it: levels, format and tiles do not need a pixel size
        try:
            slide = open_slide(path, PLACEHOLDER_MPP)
        except SlideError:
            return result.fail(err)
    with slide:
        result.slide_id = str(slide.slide_id)
        facts = inspect_slide(slide)
        result.describe(facts, slide, mpp_known=mpp_error is None)
        if mpp_error is not None:
            result.mpp_missing = str(mpp_error)
            return result.fail(mpp_error)
        try:
            facts.raise_if_damaged()
            plan, _ = plan_open_slide(
                slide, str(slide_path), Path("."), mpp=mpp, target_mpp=target_mpp,
                chunk_size=chunk_size, output=output, margin=margin,
                use_tissue_mask=use_tissue_mask,
            )  # fmt: skip
        except HoverdaskError as err:
            return result.fail(err)
    rows, cols = plan.grid.shape
    result.ok = True
    result.tissue_mm2 = None if plan.tissue_mm2 is None else round(plan.tissue_mm2, 4)
    result.map_tile_size = plan.grid.tile
    result.map_tiles, result.map_tiles_total = len(plan.tissue_tiles), rows * cols
    result.processed_megapixels = round(plan.processed_pixels / 1e6, 4)
    if use_tissue_mask and not plan.tissue_tiles:
        result.warnings.append(NO_TISSUE_WARNING.removeprefix("warning: "))
    return result


def check_task(slide_path: str, **settings: Any) -> SlideCheck:
    """:func:`check_slide` as a Dask task: the tissue thumbnail is reduced with dask's
    synchronous scheduler (a task must not spread nested tasks over the cluster it runs on)."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        return check_slide(slide_path, **settings)


# --- estimates from the bench figures --------------------------------------------------------


def seconds_per_megapixel(figures: dict[str, Any] | None) -> tuple[float | None, str]:
    """Seconds per processed megapixel on this machine and what the figure is based on."""
    if not figures:
        return None, BENCH_HINT
    when = f"hoverdask bench of {figures.get('measured_at') or 'unknown date'} on " \
           f"{figures.get('device', 'this machine')}"
    end_to_end = figures.get("end_to_end_mpix_per_s")
    if end_to_end:
        return 1.0 / float(end_to_end), f"end-to-end rate of the {when}"
    model, post = figures.get("model_mpix_per_s"), figures.get("postproc_mpix_per_s")
    if model and post:
        return 1.0 / float(model) + 1.0 / float(post), f"network + post-processing rates of the {when}"
    return None, BENCH_HINT


# --- a cohort --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGeometry:
    """The patch geometry the map tiles are planned with, and which model it is."""

    output: int
    margin: int
    mode: str
    name: str
    path: str | None
    note: str = ""


def model_geometry(model: str | Path | None) -> ModelGeometry:
    """The geometry of ``model`` (default: the bundled model), as ``run`` would use it.

    Reading a checkpoint needs torch; when the bundled default's file is absent the lite
    geometry (the default model's mode) is used and the note says so.
    """
    from hoverdask.model.catalog import DEFAULT_MODEL_NAME, WEIGHTS_DIR, model_card
    from hoverdask.model.geometry import patch_geometry

    if model is None:
        path = WEIGHTS_DIR / f"{DEFAULT_MODEL_NAME}.tar"
        if not path.is_file():
            lite = patch_geometry("lite")
            return ModelGeometry(lite.output, lite.margin, "lite", DEFAULT_MODEL_NAME, None,
                                 f"the bundled model file {path} is absent: map tiles are "
                                 "planned with the lite geometry")  # fmt: skip
    else:
        path = Path(model)
        if not path.is_file():
            raise HoverdaskError(f"model file {path} does not exist")
    from hoverdask.model.checkpoints import load_model

    network = load_model(path, "cpu")
    geometry = patch_geometry(network.mode)
    name = model_card(network.metadata).get("name", path.stem)
    return ModelGeometry(geometry.output, geometry.margin, network.mode, str(name),
                         str(path.resolve()))


@dataclass
class CohortCheck:
    """Every slide's check, the settings and the estimate; :meth:`to_json` is ``--json``."""

    slides: list[SlideCheck]
    settings: dict[str, Any]
    model: ModelGeometry
    figures: dict[str, Any] | None
    estimate_basis: str
    checked_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def failed(self) -> list[SlideCheck]:
        return [s for s in self.slides if not s.ok]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def totals(self) -> dict[str, Any]:
        passed = [s for s in self.slides if s.ok]
        estimates = [s.estimated_seconds for s in passed]
        known = all(e is not None for e in estimates)
        return {
            "slides": len(self.slides),
            "passed": len(passed),
            "failed": len(self.failed),
            "tissue_mm2": round(sum(s.tissue_mm2 or 0.0 for s in passed), 4),
            "map_tiles": sum(s.map_tiles or 0 for s in passed),
            "processed_megapixels": round(sum(s.processed_megapixels or 0.0 for s in passed), 4),
            "estimated_seconds": round(sum(estimates), 1) if known and passed else None,  # type: ignore[arg-type]
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "hoverdask_version": __version__,
            "checked_at": self.checked_at,
            "ok": not self.failed,
            "settings": self.settings,
            "model": asdict(self.model),
            "bench": self.figures,
            "estimate_basis": self.estimate_basis,
            "totals": self.totals(),
            "slides": [s.to_json() for s in self.slides],
        }


def check_cohort(
    slides: Sequence[str | Path],
    *,
    model: str | Path | None = None,
    mpp: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    target_mpp: float = 0.25,
    use_tissue_mask: bool = True,
    client: Client | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    security: object | None = None,
    figures: dict[str, Any] | bool | None = True,
) -> CohortCheck:
    """Check every slide, one Dask task each (``client``, or a local cluster / ``scheduler``).

    ``figures``: the bench figures for the estimate; True reads this machine's latest
    (:func:`hoverdask.deploy.figures.latest_figures`), None gives no estimate.
    """
    if not slides:
        raise HoverdaskError("no slides given")
    if mpp is not None:
        check_mpp(mpp, "--mpp")
    if chunk_size < 1:
        raise HoverdaskError(f"--chunk-size must be at least 1, got {chunk_size}")
    geometry = model_geometry(model)
    if figures is True:
        figures = latest_figures()
    settings = {"mpp": mpp, "target_mpp": target_mpp, "chunk_size": chunk_size,
                "output": geometry.output, "margin": geometry.margin,
                "use_tissue_mask": use_tissue_mask}
    if client is None and workers is None and scheduler is None:
        workers = max(1, min(cpu_count(), len(slides)))  # no idle workers for a few slides
    with client_for(client, workers, threads_per_worker, scheduler, "cpu", security,
                    quiet=True, dashboard=False) as live:
        futures = [live.submit(check_task, str(slide), key=f"check-{index}-{Path(slide).name}",
                               pure=False, retries=0, **settings)
                   for index, slide in enumerate(slides)]
        results = [_gather(future, slide) for future, slide in zip(futures, slides, strict=True)]
    rate, basis = seconds_per_megapixel(figures or None)  # type: ignore[arg-type]
    for result in results:
        if result.ok and rate is not None and result.processed_megapixels is not None:
            result.estimated_seconds = round(result.processed_megapixels * rate, 1)
    return CohortCheck(results, settings, geometry, figures or None, basis)  # type: ignore[arg-type]


def _gather(future: Any, slide: str | Path) -> SlideCheck:
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - an unexpected failure fails its slide only
        return SlideCheck(str(slide), sanitize_slide_id(slide_stem(Path(slide)))).fail(err)


# --- what the command prints -----------------------------------------------------------------

COLUMNS = ("slide", "result", "format", "levels", "mpp (source)", "mag", "tiles decoded",
           "tissue mm²", "map tiles", "estimate")


def table_rows(cohort: CohortCheck) -> list[tuple[str, ...]]:
    """One row per slide for the table of :data:`COLUMNS`."""
    rows = []
    for s in cohort.slides:
        mpp = f"{s.mpp:.4g} ({s.mpp_source})" if s.mpp is not None else (
            "missing" if s.mpp_missing else "")
        mag = "" if s.magnification is None else f"{s.magnification:g}x" + (
            "?" if s.magnification_source != "metadata" else "")
        decoded = f"{s.tiles_decoded - len(s.bad_tiles)}/{s.tiles_decoded}" if s.levels else ""
        tiles = "" if s.map_tiles is None else f"{s.map_tiles}/{s.map_tiles_total}"
        rows.append((
            s.slide_id, "ok" if s.ok else f"FAIL ({s.code})", s.format or "",
            str(len(s.levels)) if s.levels else "",
            mpp, mag, decoded, "" if s.tissue_mm2 is None else f"{s.tissue_mm2:.2f}", tiles,
            format_seconds(s.estimated_seconds),
        ))  # fmt: skip
    return rows


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def summary_lines(cohort: CohortCheck) -> list[str]:
    """What follows the table: each failing slide with its reason and fix, then the totals."""
    lines = [f"FAIL {s.slide}: {s.reason}\n     fix: {s.fix}" for s in cohort.failed]
    lines += [f"warning {s.slide}: {w}" for s in cohort.slides for w in s.warnings]
    totals = cohort.totals()
    estimate = totals["estimated_seconds"]
    when = (f"about {format_seconds(estimate)} ({cohort.estimate_basis})" if estimate is not None
            else cohort.estimate_basis)
    lines.append(f"{totals['passed']} of {totals['slides']} slides pass: "
                 f"{totals['tissue_mm2']:.2f} mm² of tissue, {totals['map_tiles']} map tiles "
                 f"of {cohort.model.output * (cohort.settings['chunk_size'] // cohort.model.output)}"
                 f" px to run with {cohort.model.name} ({cohort.model.mode}); estimate: {when}")
    if cohort.model.note:
        lines.append(f"note: {cohort.model.note}")
    return lines
