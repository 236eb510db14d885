"""Cluster helpers: a real LocalCluster, an external scheduler file, and the resource count."""

from __future__ import annotations

import json
import os

import pytest

from hoverdask.deploy.allocator import WORKER_ALLOCATOR_ENV
from hoverdask.deploy.cluster import ClusterError, describe, make_client
from hoverdask.pipeline.run import run_security


def _square(x: int) -> int:
    return x * x


def test_local_cluster_is_bound_to_localhost_with_processes(capsys) -> None:
    client = make_client(workers=2, threads_per_worker=1, device="cpu")
    try:
        info = describe(client)
        assert info.n_workers == 2
        assert info.gpu_workers == 0
        assert all(address.startswith("tcp://127.0.0.1:") for address in info.threads)
        assert client.submit(_square, 7).result() == 49
        pids = set(client.run(lambda: __import__("os").getpid()).values())
        assert len(pids) == 2  # two processes, not threads of this one
        environs = client.run(lambda: {k: __import__("os").environ.get(k)
                                       for k in WORKER_ALLOCATOR_ENV}).values()
        # the workers reuse freed memory instead of dask's trim-at-64-KiB default; a value set
        # in this process's environment would win
        expected = {k: os.environ.get(k, v) for k, v in WORKER_ALLOCATOR_ENV.items()}
        assert all(env == expected for env in environs)
        assert "127.0.0.1" in capsys.readouterr().out  # the dashboard link is printed
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_allocator_settings_keep_memory_that_dask_would_trim() -> None:
    assert WORKER_ALLOCATOR_ENV["MALLOC_MMAP_MAX_"] == "0"
    assert int(WORKER_ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]) > 65536  # dask's default


def test_scheduler_file_and_bad_address(tmp_path) -> None:
    bad = tmp_path / "scheduler.json"
    bad.write_text(json.dumps({"address": "tcp://127.0.0.1:9"}))
    with pytest.raises(ClusterError, match="cannot connect"):
        make_client(scheduler=str(bad), quiet=True, connect_timeout="2s")


def test_partial_tls_options_are_a_usage_error(tmp_path) -> None:
    assert run_security(None, None, None) is None
    with pytest.raises(Exception, match="all three"):
        run_security(tmp_path / "ca.pem", None, None)


def test_local_cluster_speaks_tls_when_given_certificates(tmp_path) -> None:
    from hoverdask.deploy.security import make_self_signed

    files = make_self_signed(tmp_path / "tls")
    security = run_security(files.ca_file, files.cert_file, files.key_file)
    assert security.require_encryption
    client = make_client(workers=1, threads_per_worker=1, device="cpu", security=security,
                         quiet=True, dashboard=False)
    try:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert client.submit(_square, 5).result() == 25
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_describe_waits_for_late_workers_then_gives_up() -> None:
    """An external cluster may start its workers after the client connects (queued SLURM jobs)."""
    import threading

    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=0, threads_per_worker=3, host="127.0.0.1", dashboard_address=None
    )
    client = Client(cluster)
    try:
        with pytest.raises(ClusterError, match="no workers"):
            describe(client, wait_s=0.5)

        def add_worker_later() -> None:
            cluster.scale(1)

        timer = threading.Timer(0.5, add_worker_later)
        timer.start()
        info = describe(client, wait_s=30)
        timer.join()
        assert info.n_workers == 1
        assert list(info.threads.values()) == [3]
    finally:
        client.close()
        cluster.close()


@pytest.mark.parametrize(
    ("gpus", "cores", "workers", "threads", "expected"),
    [
        (0, 8, None, None, (0, 0, 8, 1)),  # CPU: a worker per core
        (0, 8, 3, 2, (0, 0, 3, 2)),
        (1, 16, None, None, (1, 2, 14, 1)),  # GPU: 2 threads feed it, the other cores post-process
        (2, 16, None, None, (2, 2, 12, 1)),
        (4, 4, None, None, (4, 2, 0, 1)),  # no core left over: GPU workers only
        (1, 16, 0, 4, (1, 4, 0, 1)),
    ],
)
def test_local_layout(gpus, cores, workers, threads, expected) -> None:
    from hoverdask.deploy.cluster import local_layout

    layout = local_layout(gpus, cores, workers, threads)
    got = (layout.gpu_workers, layout.gpu_threads, layout.cpu_workers, layout.cpu_threads)
    assert got == expected


@pytest.mark.slow
def test_gpu_layout_puts_inference_on_gpu_workers_only_and_loads_no_model_elsewhere(
        tmp_path) -> None:
    """The GPU layout, tried on CPU: one worker advertising GPU=1 beside two CPU workers."""
    import numpy as np
    from distributed import get_task_stream

    from hoverdask.deploy.cluster import LocalLayout, start_local_cluster
    from hoverdask.pipeline.predictors import PLUGIN_NAME, ArrayPredictorFactory
    from hoverdask.pipeline.run import RunOptions, run_cohort
    from hoverdask.slide.synthetic import synthetic_pred_map, write_synthetic_slide

    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 656, 492, mpp=0.25, seed=1, compression="lossless",
                          keep_instances=False)
    np.save(tmp_path / "maps.npy", synthetic_pred_map(492, 656, 6, seed=3))
    factory = ArrayPredictorFactory(str(tmp_path / "maps.npy"), margin=46, output=164, nr_types=6)
    client = start_local_cluster(LocalLayout(1, 2, 2, 1), dashboard=False)
    try:
        info = describe(client)
        assert (info.n_workers, info.gpu_workers) == (3, 1)
        names = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        assert client.run(lambda dask_worker: dask_worker.state.total_resources,
                          workers=[names[0]])[names[0]] == {"GPU": 1}  # GPU workers come first
        with get_task_stream(client) as stream:
            result = run_cohort([slide], tmp_path / "out", predictor_factory=factory,
                                client=client, options=RunOptions(chunk_size=164,
                                                                  tissue_mask=False),
                                progress=False)
        loaded = client.run(lambda dask_worker:
                            dask_worker.plugins[PLUGIN_NAME].predictor is not None)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    assert result.exit_code == 0
    assert result.slides[0].nuclei > 0
    placed: dict[str, set[str]] = {}
    for record in stream.data:
        placed.setdefault(record["key"].split("-")[0], set()).add(record["worker"])
    assert placed["infer"] == {names[0]}
    assert loaded == {names[0]: True, names[1]: False, names[2]: False}


def test_slurm_takes_its_workers_from_the_config_only(tmp_path) -> None:
    """`--slurm` with --scheduler/--workers/--tls-* is refused before any job is submitted."""
    with pytest.raises(ClusterError, match="leave out scheduler, workers"):
        make_client(slurm=tmp_path / "cluster.toml", scheduler="tcp://127.0.0.1:9", workers=2,
                    quiet=True)


def test_cli_run_slurm_with_scheduler_is_one_line_and_exit_2(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from hoverdask import cli
    from hoverdask.slide.synthetic import write_synthetic_slide

    monkeypatch.setattr(cli.console, "width", 1000)
    slide = tmp_path / "s.svs"
    write_synthetic_slide(slide, 164, 164, mpp=0.25, seed=1, keep_instances=False)
    result = CliRunner().invoke(cli.app, ["run", str(slide), "--out", str(tmp_path / "out"),
                                          "--slurm", str(tmp_path / "cluster.toml"),
                                          "--scheduler", "tcp://127.0.0.1:9"])  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --slurm takes the workers from its config file")
