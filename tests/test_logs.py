"""Dask's log records go to the log file, the terminal keeps one-line warnings; thread caps."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from hoverdask.deploy.cluster import LocalLayout, compute_threads
from hoverdask.deploy.logs import LOG_NAME, dask_logs

ROOT = Path(__file__).resolve().parents[1]


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
    import subprocess

    from hoverdask.deploy.logs import worker_logging_env

    path = tmp_path / LOG_NAME
    code = ("import logging, distributed; log = logging.getLogger('distributed.worker'); "
            "log.info('Start worker'); log.error('lost\\nsecond', exc_info=ValueError('v'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                           **worker_logging_env(path)})
    assert done.stderr.strip() == "error: distributed.worker: lost"
    text = path.read_text()
    assert "Start worker" in text
    assert "ValueError: v" in text


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
def test_ctrl_c_closes_the_cluster_cleanly(tmp_path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-run."""
    import signal
    import subprocess
    import time

    import torch

    from hoverdask.model import LiteHoVerNet, save_checkpoint
    from hoverdask.model.lite import LiteShape
    from hoverdask.slide.synthetic import write_synthetic_slide

    slide = tmp_path / "big.svs"
    write_synthetic_slide(slide, 3000, 3000, mpp=0.25, seed=3, compression="lossless",
                          keep_instances=False)
    torch.manual_seed(0)
    model = save_checkpoint(LiteHoVerNet(5, LiteShape((8, 16), 1)), tmp_path / "tiny.tar")
    out = tmp_path / "out"

    def default_sigint() -> None:  # a test runner may start children with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    command = [sys.executable, "-m", "hoverdask", "run", str(slide), "--out", str(out),
               "--model", str(model), "--workers", "2", "--device", "cpu", "--no-tissue-mask"]
    process = subprocess.Popen(command, start_new_session=True, preexec_fn=default_sigint,  # noqa: PLW1509
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while not list(out.glob("big/.work/maps*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    terminal, _ = process.communicate(timeout=300)
    assert process.returncode == 130, terminal
    assert "Traceback" not in terminal
    assert "interrupted" in terminal
    log = (out / LOG_NAME).read_text()
    assert "killing" not in log
    assert "killed by signal" not in log
