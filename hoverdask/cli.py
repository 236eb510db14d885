"""The `hoverdask` command line: parse options, call one library function, print, exit.

Heavy imports (torch, dask, geopandas) happen inside the commands so that `--help` stays fast.
Errors the user can fix (:class:`hoverdask.errors.HoverdaskError`) exit with code 2 and a
one-line message; nothing else is caught here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console

from hoverdask.errors import HoverdaskError

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


def user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn :class:`HoverdaskError` into a red one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except HoverdaskError as err:
            console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(code=USAGE_ERROR) from None

    return wrapper


@app.callback()
def main() -> None:
    """hoverdask: HoVer-Net nuclei for whole-slide cohorts."""


@app.command()
def version() -> None:
    """Print the hoverdask version."""
    from hoverdask import __version__

    typer.echo(__version__)


# --- commands: model and tile inference (segment, models) ---


# --- commands: slides (convert, tissue, synth) ---


# --- commands: pipeline (run) ---


# --- commands: outputs (validate-qupath) ---


# --- commands: training and evaluation (train, evaluate) ---


# --- commands: speed (bench) ---


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

    from hoverdask.jobqueue import (
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



_ = (Annotated, Path)  # used by the command sections above
