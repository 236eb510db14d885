"""A quiet terminal: Dask's own log lines go to ``OUT/hoverdask.log``, not to the screen.

distributed (and tornado, bokeh) log every worker start, connection and shutdown at INFO level
on stderr. During a run those records go to the log file in the output folder; the terminal
keeps only warnings and errors, one line each (no tracebacks: those are in the file), unless
``verbose``. Worker processes of a local cluster are started with distributed's level at
WARNING (:data:`QUIET_WORKER_ENV`), so their start-up lines stay off the terminal too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "hoverdask.log"
DASK_LOGGERS = ("distributed", "dask", "tornado", "bokeh")
# environment of quiet local worker processes, set before they start (read by distributed's
# logging set-up at import)
QUIET_WORKER_ENV = {
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "DASK_DISTRIBUTED__ADMIN__LOG_FORMAT": "%(levelname)s: %(name)s: %(message)s",
}
FILE_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"


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
        terminal.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - "
                                                "%(message)s"))
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
