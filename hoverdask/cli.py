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


_ = (Annotated, Path)  # used by the command sections above
