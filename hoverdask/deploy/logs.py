"""A quiet terminal: Dask's own log lines go to ``OUT/hoverdask.log``, not to the screen.

distributed (and tornado, bokeh) log every worker start, connection and shutdown at INFO level
on stderr. During a run those records go to the log file in the output folder; the terminal
keeps only warnings and errors, one line each (no tracebacks: those are in the file), unless
``verbose``. Worker processes of a local cluster get the same set-up before distributed starts
in them (:func:`worker_logging_env`), so their lines reach the same file and the same filter.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOG_NAME = "hoverdask.log"
DASK_LOGGERS = ("distributed", "dask", "tornado", "bokeh")
FILE_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
VERBOSE_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
# distributed's own default levels (distributed.config), kept in the worker processes
WORKER_LEVELS = {"distributed": "INFO", "distributed.client": "WARNING",
                 "distributed.gc": "WARNING", "bokeh": "ERROR", "tornado": "CRITICAL",
                 "tornado.application": "ERROR"}


class OneLine(logging.Formatter):
    """``warning: distributed.nanny: message``: the message's first line, no traceback."""

    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines()
        return f"{record.levelname.lower()}: {record.name}: {lines[0] if lines else ''}"


def _dask_loggers() -> list[logging.Logger]:
    """The Dask loggers that hold handlers or are the top of their family."""
    names = set(DASK_LOGGERS)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.handlers and (
            name.split(".")[0] in DASK_LOGGERS
        ):
            names.add(name)
    return [logging.getLogger(name) for name in sorted(names)]


@contextmanager
def dask_logs(out_dir: str | Path, *, verbose: bool = False) -> Iterator[Path]:
    """Send Dask's log records to ``out_dir/hoverdask.log`` (and the terminal, ``verbose``)."""
    import distributed  # noqa: F401 - its logging set-up runs at import; replace it after

    path = Path(out_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    to_file.setLevel(logging.INFO)
    terminal = logging.StreamHandler(sys.stderr)
    if verbose:
        terminal.setFormatter(logging.Formatter(VERBOSE_FORMAT))
    else:
        terminal.setFormatter(OneLine())
        terminal.setLevel(logging.WARNING)
    saved = []
    for logger in _dask_loggers():
        saved.append((logger, logger.handlers[:], logger.level, logger.propagate))
        logger.handlers = [to_file, terminal]
        logger.propagate = False
    distributed_logger = logging.getLogger("distributed")
    if distributed_logger.level in (logging.NOTSET,) or distributed_logger.level > logging.INFO:
        distributed_logger.setLevel(logging.INFO)
    try:
        yield path
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        to_file.close()


def worker_logging_env(path: str | Path, *, verbose: bool = False) -> dict[str, str]:
    """Environment that gives a worker process :func:`dask_logs`' set-up, writing to ``path``.

    distributed configures logging when it is imported, from the dask config, which reads
    ``DASK_*`` variables: ``DASK_LOGGING`` holds a :func:`logging.config.dictConfig` dict.
    """
    terminal: dict[str, Any] = (
        {"format": VERBOSE_FORMAT} if verbose else {"()": f"{__name__}.OneLine"}
    )
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"file": {"format": FILE_FORMAT}, "terminal": terminal},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "file",
                     "level": "INFO", "encoding": "utf-8"},
            "terminal": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                         "formatter": "terminal", "level": "INFO" if verbose else "WARNING"},
        },
        "loggers": {name: {"level": level, "handlers": ["file", "terminal"], "propagate": False}
                    for name, level in WORKER_LEVELS.items()},
    }
    return {"DASK_LOGGING": repr(config)}
