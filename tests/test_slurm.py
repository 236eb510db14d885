"""hoverdask on a live SLURM cluster: worker processes are batch jobs that SLURM schedules.

Skipped where there is no `sinfo` or no cluster answers; `deploy/slurm/local-cluster.sh start`
makes a one-node cluster on this machine. The cohort and the oracle (the nucleus sets of a
local run) are those of the fault drills; jobs carry a name of their own, so that the tests can
tell their jobs from anyone else's and check that none is left in the queue.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_cluster import (
    committed_tiles,
    job_pythonpath,
    nucleus_sets,
    processing_counts,
    record,
    reruns,
    wait_for,
)
from test_drills import OPTIONS, SlowFactory, _maps, clean, client, cohort  # noqa: F401

from hoverdask.pipeline.run import run_cohort

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLIDES = ("s1", "s2")


def _sinfo_partition() -> str:
    """The default partition of an answering SLURM cluster, or skip saying why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (sinfo/sbatch not found); deploy/slurm/local-cluster.sh "
                    "start makes a one-node cluster")
    pytest.importorskip("dask_jobqueue", reason="needs dask-jobqueue (hoverdask[slurm])")
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P %a %t"], capture_output=True, text=True,
                              timeout=20, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM does not answer (sinfo timed out)")
    if done.returncode != 0:
        pytest.skip(f"SLURM does not answer: {done.stderr.strip() or done.stdout.strip()}")
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()]
    usable = [name for name, avail, state in rows
              if avail == "up" and state.rstrip("*~#") in ("idle", "mix", "mixed")]
    if not usable:
        pytest.skip(f"SLURM answers but has no idle partition: {done.stdout.strip()!r}")
    default = [name for name in usable if name.endswith("*")]
    return (default or usable)[0].rstrip("*")


@pytest.fixture(scope="module")
def partition() -> Iterator[str]:
    name = _sinfo_partition()
    with pytest.MonkeyPatch.context() as patch:  # sbatch passes this environment to the jobs
        patch.setenv("PYTHONPATH", job_pythonpath())
        yield name


def our_jobs(name: str) -> dict[str, str]:
    """Job id -> state of the jobs named ``name`` still in the queue."""
    done = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True,
                          text=True, timeout=30, check=True)  # fmt: skip
    return dict(line.split() for line in done.stdout.splitlines() if line.strip())


def write_config(folder: Path, partition: str, jobs: int) -> tuple[Path, str]:
    """A cluster config of ``jobs`` one-core CPU jobs and the job name they carry."""
    name = f"hoverdask-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "cluster.toml"
    config.write_text(f"""
[slurm]
partition = "{partition}"
walltime = "00:15:00"
cores = 1
memory = "2GB"
gpus_per_job = 0
python = "{sys.executable}"
job_extra_directives = ["--job-name={name}"]
log_directory = "{folder / 'job-logs'}"
local_directory = "{folder / 'scratch'}"

[worker]
threads = 1
resources = {{ GPU = 1 }}

[adaptive]
minimum_jobs = {jobs}
maximum_jobs = {jobs}

[scheduler]
dashboard_address = "127.0.0.1:0"
""")
    return config, name


def assert_no_jobs_left(name: str, seconds: float = 60) -> float:
    return wait_for(lambda: not our_jobs(name), seconds, f"the jobs named {name} leaving squeue")


def test_run_with_slurm_workers_matches_the_local_run_and_cancels_its_jobs(
        partition, cohort, clean, tmp_path):  # noqa: F811
    config, name = write_config(tmp_path / "cluster", partition, jobs=2)
    out = tmp_path / "out"
    start = time.monotonic()
    result = run_cohort([cohort[s] for s in SLIDES], out, predictor_factory=_maps(cohort),
                        slurm=config, options=OPTIONS, progress=False)  # fmt: skip
    seconds = time.monotonic() - start
    assert [s.status for s in result.slides] == ["ok", "ok"], [s.error for s in result.slides]
    assert nucleus_sets(out, SLIDES) == clean
    logs = list((tmp_path / "cluster" / "job-logs").glob("*.err"))
    assert logs, "no job wrote a log: the workers did not run as SLURM jobs"
    left = assert_no_jobs_left(name)
    record("slurm_run", {"run_s": round(seconds, 1), "jobs_gone_after_s": round(left, 1)})


def test_scancel_of_a_worker_job_mid_run_gives_the_same_nuclei(partition, cohort, clean,  # noqa: F811
                                                               tmp_path):
    """Two worker jobs; when the first map tile is committed one of them is cancelled. Dask
    re-runs what was lost, adaptive scaling submits a new job, and the nuclei are the same."""
    from distributed import Client

    from hoverdask.deploy.jobqueue import load_slurm_config, start_slurm_cluster

    config, name = write_config(tmp_path / "cluster", partition, jobs=2)
    factory = SlowFactory(_maps(cohort), seconds=0.5)
    start = time.monotonic()
    cluster = start_slurm_cluster(load_slurm_config(config))
    try:
        client = Client(cluster)
        client.wait_for_workers(2, timeout=240)
        startup = time.monotonic() - start
        scheduler = cluster.scheduler

        start = time.monotonic()
        result = run_cohort([cohort[s] for s in SLIDES], tmp_path / "calm", client=client,
                            predictor_factory=factory, options=OPTIONS, progress=False)
        calm = time.monotonic() - start
        assert [s.status for s in result.slides] == ["ok", "ok"]

        out = tmp_path / "out"
        cancelled: dict[str, object] = {}

        def cancel_one_job() -> None:
            wait_for(lambda: bool(committed_tiles(out)), 240, "the first committed tile")
            busy = [ws.name for ws in scheduler.workers.values() if ws.processing]
            job = cluster.workers[busy[0] if busy else next(iter(cluster.workers))]
            subprocess.run(["scancel", str(job.job_id)], check=True, timeout=30)
            cancelled.update(job=job.job_id, at=time.monotonic())

        seen = len(scheduler.transition_log)
        watcher = threading.Thread(target=cancel_one_job, daemon=True)
        watcher.start()
        start = time.monotonic()
        result = run_cohort([cohort[s] for s in SLIDES], out, client=client,
                            predictor_factory=factory, options=OPTIONS, progress=False)
        faulty = time.monotonic() - start
        watcher.join(timeout=5)
        assert cancelled, "no job was cancelled: the run ended before the first tile was seen"
        assert [s.status for s in result.slides] == ["ok", "ok"], [s.error for s in result.slides]
        assert nucleus_sets(out, SLIDES) == clean
        assert nucleus_sets(tmp_path / "calm", SLIDES) == clean
        log = list(scheduler.transition_log)[seen:]
        again = reruns(processing_counts(log))
        client.wait_for_workers(2, timeout=240)  # adaptive scaling replaced the job
        replaced = time.monotonic() - float(cancelled["at"])  # type: ignore[arg-type]
        client.close()
    finally:
        cluster.close()
    assert str(cancelled["job"]) not in our_jobs(name)
    assert_no_jobs_left(name)
    record("slurm_scancel", {"worker_startup_s": round(startup, 1), "calm_run_s": round(calm, 1),
                             "run_with_scancel_s": round(faulty, 1),
                             "time_lost_s": round(faulty - calm, 1), "tasks_rerun": again,
                             "job_replaced_within_s": round(replaced, 1)})


INTERRUPTED_RUN = """
import signal
import sys
# Ctrl-C as in a terminal, also when the suite itself runs in the background (SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
import test_drills as d
from hoverdask.pipeline.run import run_cohort
maps, config, out, *slides = sys.argv[1:]
factory = d.SlowFactory(d.ArrayPredictorFactory(maps, margin=d.MARGIN, output=d.OUTPUT,
                                                nr_types=d.NR_TYPES), seconds=2.0)
if __name__ == "__main__":
    run_cohort(slides, Path(out), predictor_factory=factory, slurm=config, options=d.OPTIONS,
               progress=False)
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_cancels_its_jobs(partition, cohort, tmp_path, stop):  # noqa: F811
    config, name = write_config(tmp_path / "cluster", partition, jobs=1)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    process = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED_RUN, str(cohort["maps"]), str(config), str(out),
         *(str(cohort[s]) for s in SLIDES)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: bool(committed_tiles(out)), 240, "the first committed tile",
                 alive=lambda: process.poll() is None, log=lambda: log.read_text()[-3000:])
        assert our_jobs(name), "the run's worker job is not in the queue"
        process.send_signal(stop)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
            subprocess.run(["scancel", "-n", name], check=False, timeout=30)
    assert not (out / "s2" / "run.json").exists(), "the run finished before it was interrupted"
    assert process.returncode != 0, log.read_text()[-3000:]
    assert_no_jobs_left(name, seconds=30)
