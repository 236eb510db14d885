"""The `hoverdask` command line: parse options, call one library function, print, exit.

Heavy imports (torch, dask, geopandas) happen inside the commands so that `--help` stays fast.
Errors the user can fix (:class:`hoverdask.core.errors.HoverdaskError`) exit with code 2 and a
one-line message; nothing else is caught here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from hoverdask.core.errors import HoverdaskError
from hoverdask.pipeline.spec import DEFAULT_CHUNK_SIZE

app = typer.Typer(
    name="hoverdask",
    help="Find, outline and classify every nucleus in whole-slide images with HoVer-Net on Dask.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

USAGE_ERROR = 2
FAILURE = 1  # e.g. a model download that failed: not the user's typing
INTERRUPTED = 130  # Ctrl-C, as shells report it


def user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn :class:`HoverdaskError` into a red one-line message and exit code 2 (1 for a failed
    download)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except HoverdaskError as err:
            from hoverdask.model.registry import DownloadError

            console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            code = FAILURE if isinstance(err, DownloadError) else USAGE_ERROR
            raise typer.Exit(code=code) from None

    return wrapper


@app.callback()
def main() -> None:
    """hoverdask: HoVer-Net nuclei for whole-slide cohorts."""


@app.command()
def version() -> None:
    """Print the hoverdask version."""
    from hoverdask.core.version import __version__

    typer.echo(__version__)


# --- commands: model and tile inference (segment, models) ---

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Checkpoint file (.tar or .pth) or an official model "
                 "name (hoverdask models), downloaded when not cached; default: the bundled "
                 "model."),
]


@app.command()
@user_errors
def segment(
    image: Annotated[Path, typer.Argument(help="PNG, JPEG or TIFF image (RGB; alpha is dropped).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    model: ModelOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per network call.")] = 8,
    types: Annotated[
        Path | None, typer.Option(help='Type table JSON: id -> {"name", "color" (RGB list)}.')
    ] = None,
) -> None:
    """Segment and classify the nuclei of one image (reference tile mode)."""
    from hoverdask.model.registry import resolve_model_argument
    from hoverdask.pipeline.segment import segment_image

    result = segment_image(
        image, resolve_model_argument(model), out, device=device, batch_size=batch_size,
        types_path=types,
    )
    console.print(f"{result.table_reason}")
    counts = ", ".join(f"{name} {n}" for name, n in sorted(result.type_counts.items()))
    typer.echo(f"{result.nuclei} nuclei" + (f" ({counts})" if counts else ""))
    for path in (result.json_path, result.inst_path, result.overlay_path):
        typer.echo(str(path))


models_app = typer.Typer(
    help="Models: list the bundled, cached and pullable ones; pull an official checkpoint.",
    invoke_without_command=True,
)
app.add_typer(models_app, name="models")


@models_app.callback()
@user_errors
def models(ctx: typer.Context) -> None:
    """List the type tables, the bundled model and the official checkpoints (cached or not)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from hoverdask.core.types import KNOWN_TABLES
    from hoverdask.model import registry
    from hoverdask.model.catalog import bundled_models, default_model_path

    table = Table(title="Type tables (id: name)")
    table.add_column("table")
    table.add_column("types")
    table.add_column("chosen when")
    chosen = {
        "pannuke": "nr_types 6",
        "monusac": "nr_types 5, fast mode",
        "consep": "nr_types 5, original mode",
    }
    for name, types in KNOWN_TABLES.items():
        listing = ", ".join(f"{k}: {t.name}" for k, t in types.types.items())
        table.add_row(name, listing, chosen.get(name, ""))
    Console().print(table)
    found = bundled_models()
    if not found:
        typer.echo(
            "No bundled model files (hoverdask/model/weights/*.tar). Pass a checkpoint file "
            "(official HoVer-Net .tar, TIAToolbox .pth) or an official name (below) with --model."
        )
    for entry in found:
        default = " (default)" if entry.path == default_model_path() else ""
        typer.echo(f"\n{entry.name}{default}: {entry.path}")
        typer.echo(f"  {entry.mode} mode, nr_types={entry.nr_types}, types: {entry.table}")
        for key in ("summary", "mpp", "licence", "validation", "trained"):
            if key in entry.card:
                typer.echo(f"  {key}: {entry.card[key]}")
        if entry.card_path.is_file():
            typer.echo(f"  model card: {entry.card_path}")
    typer.echo(f"\nOfficial HoVer-Net checkpoints (--model NAME; cache {registry.cache_dir()}):")
    for official in registry.OFFICIAL_MODELS.values():
        record = registry.cached_record(official)
        where = (f"cached: {registry.cached_path(official)}" if record is not None
                 else f"pullable: hoverdask models pull {official.name}")
        typer.echo(f"  {official.name}: {official.mode} mode, nr_types={official.nr_types}, "
                   f"types: {official.table or 'none'}, {official.mpp} µm/px, "
                   f"{official.licence}; {where}")


@models_app.command("pull")
@user_errors
def models_pull(
    name: Annotated[str, typer.Argument(help="Official checkpoint name (hoverdask models).")],
    force: Annotated[bool, typer.Option(help="Download again even when cached.")] = False,
) -> None:
    """Download an official HoVer-Net checkpoint into the user cache, verify it, record it."""
    from hoverdask.model import registry

    path = registry.pull_with_bar(name, force=force)
    record = registry.cached_record(registry.OFFICIAL_MODELS[name]) or {}
    if record.get("sha256"):
        typer.echo(f"sha256 {record['sha256']}")
    typer.echo(str(path))


# --- commands: slides (convert, tissue, synth) ---

MppOption = Annotated[
    float | None,
    typer.Option("--mpp", help="Pixel size in µm per level-0 pixel; overrides the slide metadata."),
]


@app.command()
@user_errors
def convert(
    slide: Annotated[Path, typer.Argument(help="Slide file (svs, ndpi, tiff, ome-tiff, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output OME-Zarr folder (X.zarr).")],
    mpp: MppOption = None,
    chunk: Annotated[int, typer.Option(help="Chunk side in pixels.")] = 1024,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing, different store.")] = False,
    tissue: Annotated[bool, typer.Option(help="Save the tissue mask next to the store.")] = True,
    workers: Annotated[
        int | None, typer.Option(help="Threads for the conversion (default: all cores).")
    ] = None,
) -> None:
    """Convert a slide to a chunked, compressed OME-Zarr (NGFF 0.4) pyramid; resumable."""
    from hoverdask.slide.convert import convert_to_omezarr

    result = convert_to_omezarr(
        slide, out, mpp=mpp, chunk=chunk, overwrite=overwrite, tissue=tissue, num_workers=workers
    )
    if result.up_to_date:
        typer.echo(f"{result.path} is up to date")
        return
    sizes = ", ".join(f"{p.width}x{p.height}" for p in result.levels)
    resumed = f" ({result.chunks_resumed} resumed)" if result.chunks_resumed else ""
    typer.echo(f"wrote {result.path}: {len(result.levels)} levels [{sizes}]{resumed}")


@app.command()
@user_errors
def tissue(
    slide: Annotated[Path, typer.Argument(help="Slide file or OME-Zarr store.")],
    png: Annotated[
        Path | None, typer.Option(help="Write the thumbnail with glass dimmed to this PNG.")
    ] = None,
    save: Annotated[Path | None, typer.Option(help="Save the mask (.npz) here.")] = None,
    mpp: MppOption = None,
) -> None:
    """Detect tissue on a low-resolution thumbnail; print its area, optionally save a picture."""
    from hoverdask.slide import open_slide
    from hoverdask.slide.tissue import tissue_mask

    with open_slide(slide, mpp) as opened:
        mask = tissue_mask(opened)
    if png is not None:
        mask.to_png(png)
    if save is not None:
        mask.save(save)
    typer.echo(
        f"{opened.slide_id}: tissue {mask.area_mm2:.2f} mm² ({mask.fraction:.0%} of the slide), "
        f"mask {mask.mask.shape[1]}x{mask.mask.shape[0]} at {mask.downsample:.1f}x"
    )


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output TIFF (.svs/.tiff/.ome.tiff).")],
    width: Annotated[int, typer.Option(help="Width in pixels.")] = 4096,
    height: Annotated[int, typer.Option(help="Height in pixels.")] = 4096,
    mpp: Annotated[float, typer.Option(help="Pixel size in µm.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    ome: Annotated[bool, typer.Option(help="Write OME-TIFF instead of Aperio SVS-like.")] = False,
    lossless: Annotated[bool, typer.Option(help="zlib tiles instead of JPEG.")] = False,
) -> None:
    """Write a synthetic H&E-like pyramidal slide with known nuclei (for demos and tests)."""
    from hoverdask.slide.synthetic import write_synthetic_slide

    truth = write_synthetic_slide(
        out, width, height, mpp=mpp, seed=seed, flavour="ome" if ome else "aperio",
        compression="lossless" if lossless else "jpeg", keep_instances=False,
    )  # fmt: skip
    typer.echo(f"wrote {out}: {width}x{height} at {mpp} µm/px, {truth.n_instances} nuclei")



# --- commands: pipeline (run) ---

SlidesArgument = Annotated[
    list[Path], typer.Argument(help="Slide files (svs, ndpi, tif, OME-Zarr...).")
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(help="Use this Dask scheduler (address or scheduler file) instead of a "
                 "local cluster."),
]
TlsCaOption = Annotated[Path | None, typer.Option(help="TLS CA certificate (PEM).")]
TlsCertOption = Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")]
TlsKeyOption = Annotated[Path | None, typer.Option(help="TLS private key (PEM).")]
SlideMppOption = Annotated[
    float | None, typer.Option(help="µm per level-0 pixel, for slides without it.")
]
ChunkSizeOption = Annotated[
    int, typer.Option(min=1, help="Map tile size in processing pixels (whole patches).")
]


@app.command()
@user_errors
def run(
    slides: SlidesArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (one subfolder a slide).")],
    model: ModelOption = None,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Local CPU worker processes (default: one per core; with GPUs, "
                     "one per core left beside the one worker per GPU)."),
    ] = None,
    threads_per_worker: Annotated[
        int | None,
        typer.Option(min=1, help="Threads per worker (default: 1; GPU workers: 2)."),
    ] = None,
    scheduler: SchedulerOption = None,
    slurm: Annotated[
        Path | None,
        typer.Option(dir_okay=False,
                     help="Run the workers as SLURM jobs: a `hoverdask cluster slurm` config "
                     "file (deploy/slurm/cluster.toml); the jobs are cancelled when the run "
                     "ends or is interrupted."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    mpp: SlideMppOption = None,
    chunk_size: ChunkSizeOption = DEFAULT_CHUNK_SIZE,
    batch_size: Annotated[
        int, typer.Option(min=0, help="Patches per network call; 0: fit the GPU's free memory "
                          "(1 on CPU, where one patch per call is fastest).")
    ] = 0,
    autocast: Annotated[
        bool, typer.Option(help="Reduced-precision inference (faster; maps differ slightly: "
                           "benchmarks/gpu_inference.py reports by how much): on CUDA, and in "
                           "bfloat16 on CPUs that have it in hardware (AMX, AVX512-BF16).")
    ] = False,
    autocast_dtype: Annotated[
        str, typer.Option(help="Precision of --autocast: bfloat16 or float16.")
    ] = "bfloat16",
    compile_model: Annotated[
        bool, typer.Option("--compile/--no-compile",
                           help="torch.compile the network on each worker (slower start-up).")
    ] = False,
    read_ahead: Annotated[
        int | None,
        typer.Option(min=0, help="Tiles each inference task reads ahead in the background "
                     "(default: 2 on GPUs, 0 on CPU)."),
    ] = None,
    formats: Annotated[
        str, typer.Option("--format", help="Comma-separated outputs: parquet, qupath.")
    ] = "parquet,qupath",
    overwrite: Annotated[bool, typer.Option(help="Redo slides that finished earlier.")] = False,
    keep_work: Annotated[
        bool, typer.Option(help="Keep the map cache and block parts (DIR/<slide>/.work).")
    ] = False,
    tissue_mask: Annotated[
        bool, typer.Option(help="Skip map tiles without tissue (off: process every tile).")
    ] = True,
    region: Annotated[
        str | None,
        typer.Option(help="Only this level-0 rectangle X,Y,W,H of the (one) slide, processed as "
                     "if it were the slide; coordinates stay those of the slide."),
    ] = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show Dask's INFO log lines here (they "
                           "always go to DIR/hoverdask.log).")
    ] = False,
) -> None:
    """Find, outline and classify the nuclei of every slide on a Dask cluster."""
    from hoverdask.api import run as run_slides
    from hoverdask.pipeline.run import run_security

    try:
        result = run_slides(
            slides, out, model, workers=workers, threads_per_worker=threads_per_worker,
            scheduler=scheduler, slurm=slurm, security=run_security(tls_ca, tls_cert, tls_key),
            verbose=verbose, mpp=mpp, chunk_size=chunk_size, batch_size=batch_size,
            device=device, autocast=autocast, autocast_dtype=autocast_dtype,
            compile=compile_model, read_ahead=read_ahead, formats=formats,
            overwrite=overwrite, keep_work=keep_work, tissue_mask=tissue_mask, region=region,
        )
    except KeyboardInterrupt:
        console.print("interrupted; finished slides and blocks are kept: the same command "
                      "resumes", highlight=False, soft_wrap=True)
        raise typer.Exit(code=INTERRUPTED) from None
    for slide in result.slides:
        note = f"  {slide.error}" if slide.error else ""
        typer.echo(f"{slide.status:8} {slide.slide_id}  {slide.nuclei} nuclei  "
                   f"{slide.seconds:.1f} s{note}")
    typer.echo(str(result.out_dir / "summary.csv"))
    raise typer.Exit(code=result.exit_code)


@app.command()
@user_errors
def check(
    slides: SlidesArgument,
    mpp: SlideMppOption = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the findings to this JSON file.")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="The checkpoint run would use (its patch geometry "
                     "sizes the map tiles); default: the bundled model."),
    ] = None,
    chunk_size: ChunkSizeOption = DEFAULT_CHUNK_SIZE,
    tissue_mask: Annotated[
        bool, typer.Option(help="Count only map tiles with tissue, as run does.")
    ] = True,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Local worker processes (default: one per core, "
                                 "at most one per slide).")
    ] = None,
    threads_per_worker: Annotated[
        int | None, typer.Option(min=1, help="Threads per local worker (default: 1).")
    ] = None,
    scheduler: SchedulerOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Open every slide without running a model: what run would do with it, or why it would fail.

    Exit 0 when every slide passes, 1 when some would fail (named with the reason and the fix).
    """
    import json

    from rich.table import Table

    from hoverdask.core.atomic import atomic_write_text
    from hoverdask.pipeline.check import COLUMNS, check_cohort, summary_lines, table_rows
    from hoverdask.pipeline.run import run_security

    result = check_cohort(
        slides, model=model, mpp=mpp, chunk_size=chunk_size, use_tissue_mask=tissue_mask,
        workers=workers, threads_per_worker=threads_per_worker, scheduler=scheduler,
        security=run_security(tls_ca, tls_cert, tls_key),
    )
    table = Table(title="hoverdask check")
    for name in COLUMNS:
        table.add_column(name, justify="right" if name in ("levels", "tissue mm²") else "left")
    for row in table_rows(result):
        table.add_row(*row)
    screen = Console()
    (screen if screen.is_terminal else Console(width=200)).print(table)
    for line in summary_lines(result):
        typer.echo(line)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result.to_json(), indent=2) + "\n")
        typer.echo(str(json_path))
    raise typer.Exit(code=result.exit_code)


# --- commands: outputs (validate-qupath) ---


@app.command("validate-qupath")
@user_errors
def validate_qupath_command(
    file: Annotated[
        Path, typer.Argument(help="GeoJSON file to check (.geojson, .json, optionally .gz).")
    ],
    max_problems: Annotated[
        int, typer.Option("--max-problems", min=1, help="How many problems to list.")
    ] = 20,
) -> None:
    """Check a GeoJSON file against QuPath's import rules: exit 0 valid, 1 invalid, 2 unreadable."""
    from hoverdask.export.validate import validate_qupath

    report = validate_qupath(file, max_problems=max_problems)
    if report.ok:
        typer.echo(f"{file}: valid, {report.count} features")
        return
    typer.echo(f"{file}: {report.problem_count} problems in {report.count} features", err=True)
    for problem in report.problems:
        typer.echo(f"  {problem}", err=True)
    raise typer.Exit(code=1)


# --- commands: training and evaluation (train, evaluate) ---


@app.command()
@user_errors
def train(
    data: Annotated[
        list[Path],
        typer.Option(
            "--data", help="Annotated dataset folder (repeat for several; layouts are detected)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.tar).")],
    mode: Annotated[
        str, typer.Option(help="Network mode: fast (256->164), original or lite (the light one).")
    ] = "fast",
    nr_types: Annotated[
        int | None,
        typer.Option(help="Classes including background; leave out for segmentation only."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps over both stages.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per step.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    init: Annotated[
        Path | None, typer.Option(help="Start from this checkpoint (tensors that fit are copied).")
    ] = None,
    val: Annotated[
        list[Path] | None, typer.Option(help="Validation dataset folder (repeatable).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run saved in --out (and --out.state).")
    ] = False,
    stage_one: Annotated[
        float, typer.Option(help="Fraction of steps with the encoder frozen (stage one).")
    ] = 0.5,
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA), fp32, bf16, fp16.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for weights and batch sampling.")] = 10,
    save_every: Annotated[int, typer.Option(min=0, help="Also save every N steps (0: no).")] = 0,
    val_every: Annotated[int, typer.Option(min=0, help="Also validate every N steps.")] = 0,
    val_windows: Annotated[
        int, typer.Option(min=1, help="Validation windows (a grid over the --val images).")
    ] = 32,
    workers: Annotated[int, typer.Option(min=0, help="Batch-building processes.")] = 0,
    input_size: Annotated[
        int | None,
        typer.Option(help="Training window side (default: the mode's patch input; lite: 256)."),
    ] = None,
    log_every: Annotated[int, typer.Option(min=1, help="Print every N steps.")] = 10,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate (default: 1e-4 paper schedule, 2e-3 cosine)."),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(help="paper (two stages, step decay; fast/original default) or cosine "
                     "(one stage, AdamW, warm-up and cosine decay; lite default)."),
    ] = None,
    holdout: Annotated[
        Path | None,
        typer.Option(help="Hold-out JSON: these source images never train and are the "
                     "validation set (when no --val is given)."),
    ] = None,
    loss_weight: Annotated[
        list[str] | None,
        typer.Option(help="Change one loss weight, NAME=VALUE (repeatable); names: "
                     "hv_mse, hv_msge, np_ce, np_dice, tp_ce, tp_dice."),
    ] = None,
    data_weight: Annotated[
        list[str] | None,
        typer.Option(help="Sample one --data folder more (or less) often, FOLDER=FACTOR "
                     "(repeatable): FACTOR multiplies its share of the training windows, "
                     "which is otherwise its share of the pixels."),
    ] = None,
) -> None:
    """Train HoVer-Net in two stages (frozen encoder, then all) with the paper's loss."""
    from hoverdask.train.loop import StepLog, TrainConfig, parse_data_weights
    from hoverdask.train.loop import train as run_training
    from hoverdask.train.losses import parse_loss_weights

    config = TrainConfig(
        data=tuple(data), out=out, mode=mode, nr_types=nr_types, steps=steps,
        batch_size=batch_size, device=device, init=init, val=tuple(val or ()), resume=resume,
        stage_one_fraction=stage_one, precision=precision, seed=seed, save_every=save_every,
        val_every=val_every, val_windows=val_windows, workers=workers, input_size=input_size,
        lr=lr, schedule=schedule, holdout=holdout, weights=parse_loss_weights(loss_weight or []),
        data_weights=parse_data_weights(data_weight or []),
    )

    def show(log: StepLog) -> None:
        if log.stage.startswith("val") or log.step % log_every == 0 or log.step == steps:
            terms = " ".join(f"{k} {v:.4f}" for k, v in log.terms.items())
            console.print(
                f"step {log.step}/{steps} stage {log.stage} loss {log.loss:.4f} ({terms}) "
                f"{log.seconds:.0f}s",
                highlight=False,
                soft_wrap=True,
            )

    result = run_training(config, progress=show)
    for note in result.notes:
        console.print(note, highlight=False, soft_wrap=True)
    typer.echo(str(result.checkpoint))
    typer.echo(str(result.log))


@app.command()
@user_errors
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Annotated dataset folder.")],
    json_path: Annotated[Path, typer.Option("--json", help="Write the scores here (JSON).")],
    model: ModelOption = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N images.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per network call.")] = 8,
    method: Annotated[str, typer.Option(help="Post-processing: reference or fast.")] = "reference",
    holdout: Annotated[
        Path | None,
        typer.Option(help="Hold-out JSON (as for train): score only the held-out images."),
    ] = None,
    autocast: Annotated[
        bool, typer.Option(help="Score the network as `run --autocast` runs it (bfloat16).")
    ] = False,
) -> None:
    """Score a model on annotated images: DICE, AJI, AJI+, DQ, SQ, PQ, and F_d/F_c with types."""
    import json

    from rich.table import Table

    from hoverdask.core.atomic import atomic_write_text
    from hoverdask.evaluate.scoring import evaluate_model, format_table
    from hoverdask.model.registry import resolve_model_argument

    report = evaluate_model(
        data, resolve_model_argument(model), limit=limit, device=device, batch_size=batch_size,
        method=method, holdout=holdout, autocast=autocast,
    )
    rows = format_table(report)
    table = Table(title="Instance segmentation")
    for name in rows[0]:
        table.add_column(name)
    for row in rows[1:]:
        table.add_row(*row)
    screen = Console()
    (screen if screen.is_terminal else Console(width=200)).print(table)
    mean = report.mean()
    if "f_d" in mean:
        per_class = ", ".join(f"{name} {value:.4f}" for name, value in mean["f_c"].items())
        typer.echo(f"F_d {mean['f_d']:.4f}  acc {mean['acc']:.4f}  F_c: {per_class}")
    for note in report.notes:
        console.print(note, highlight=False, soft_wrap=True)
    atomic_write_text(json_path, json.dumps(report.to_json(), indent=2) + "\n")
    typer.echo(str(json_path))


# --- commands: speed (bench) ---


@app.command()
@user_errors
def bench(
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
    model: ModelOption = None,
    seconds: Annotated[
        float, typer.Option(min=1.0, help="Time budget of the network measurement.")
    ] = 20.0,
    end_to_end_size: Annotated[
        int, typer.Option(min=0, help="Side of the synthetic slide timed end to end; 0 skips.")
    ] = 1024,
) -> None:
    """Measure network GFLOP/s against the matmul peak, post-processing and end-to-end speed."""
    import json

    from rich.table import Table

    from hoverdask.bench import bench_all, bench_rows, latest_figures_path
    from hoverdask.model.registry import resolve_model_argument

    results = bench_all(
        device,
        seconds=seconds,
        model_path=str(resolve_model_argument(model)) if model else None,
        end_to_end_size=end_to_end_size,
    )
    m = results["model"]
    table = Table(title=f"hoverdask bench ({m['device']}, {m['threads']} threads)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in bench_rows(results):
        table.add_row(name, value)
    Console().print(table)
    typer.echo(f"kept as this machine's latest figures: "
               f"{latest_figures_path()}")
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
        typer.echo(f"wrote {json_path}")


# --- commands: clusters (cluster) ---

cluster_app = typer.Typer(
    help="Start a Dask cluster on HPC/cloud resources for `hoverdask run --scheduler ADDRESS`.",
    no_args_is_help=True,
)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("slurm")
@user_errors
def cluster_slurm(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            help="TOML file: partition, account, cores, memory, GPUs per job, walltime, "
            "adaptive min/max jobs (example: deploy/slurm/cluster.toml).",
            dir_okay=False,
        ),
    ],
    print_script: Annotated[
        bool,
        typer.Option("--print-script", help="Print the sbatch script of one worker job and exit."),
    ] = False,
) -> None:
    """Run an adaptive SLURM cluster of GPU workers until Ctrl-C."""
    import time

    from hoverdask.deploy.jobqueue import (
        dashboard_link,
        job_script,
        load_slurm_config,
        start_slurm_cluster,
    )

    settings = load_slurm_config(config)
    if print_script:
        typer.echo(job_script(settings))
        return
    cluster = start_slurm_cluster(settings)
    try:
        typer.echo(f"scheduler: {cluster.scheduler_address}")
        typer.echo(f"dashboard: {dashboard_link(cluster, settings)}")
        typer.echo(
            f"workers: {settings.minimum_jobs}..{settings.maximum_jobs} jobs on partition "
            f"{settings.partition}; run `hoverdask run ... --scheduler "
            f"{cluster.scheduler_address}`; Ctrl-C stops the cluster"
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping the cluster and cancelling its jobs")
    finally:
        cluster.close()
