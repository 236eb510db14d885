"""Dask's log records go to the log file, the terminal keeps one-line warnings; thread caps."""

from __future__ import annotations

import logging

from hoverdask.cluster import LocalLayout, compute_threads
from hoverdask.logs import LOG_NAME, dask_logs


def test_dask_records_go_to_the_file_and_warnings_to_the_terminal(tmp_path, capsys) -> None:
    scheduler = logging.getLogger("distributed.scheduler")
    before = logging.getLogger("distributed").handlers[:]
    with dask_logs(tmp_path, verbose=False) as path:
        scheduler.info("State start")
        scheduler.warning("first line\nsecond line")
    assert path == tmp_path / LOG_NAME
    text = path.read_text()
    assert "State start" in text
    assert "second line" in text
    err = capsys.readouterr().err
    assert "State start" not in err
    assert "warning: distributed.scheduler: first line" in err
    assert "second line" not in err
    assert logging.getLogger("distributed").handlers == before  # restored afterwards


def test_verbose_keeps_info_on_the_terminal(tmp_path, capsys) -> None:
    with dask_logs(tmp_path, verbose=True):
        logging.getLogger("distributed.nanny").info("Start Nanny")
    assert "Start Nanny" in capsys.readouterr().err
    assert "Start Nanny" in (tmp_path / LOG_NAME).read_text()


def test_threads_are_capped_when_workers_outnumber_cores() -> None:
    assert compute_threads(LocalLayout(0, 0, 2, 1), cores=2) is None
    assert compute_threads(LocalLayout(0, 0, 4, 1), cores=2) == 1
    assert compute_threads(LocalLayout(0, 0, 2, 4), cores=4) == 2
    assert compute_threads(LocalLayout(1, 2, 3, 1), cores=4) == 1


def test_worker_processes_get_the_same_set_up_from_their_environment(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hoverdask.logs import worker_logging_env

    path = tmp_path / LOG_NAME
    code = ("import logging, distributed; log = logging.getLogger('distributed.worker'); "
            "log.info('Start worker'); log.error('lost\\nsecond', exc_info=ValueError('v'))")
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": root,
                                           **worker_logging_env(path)})
    assert done.stderr.strip() == "error: distributed.worker: lost"
    text = path.read_text()
    assert "Start worker" in text
    assert "ValueError: v" in text
