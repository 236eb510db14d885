"""Cluster helpers: a real LocalCluster, an external scheduler file, and the resource count."""

from __future__ import annotations

import json

import pytest

from hoverdask.cluster import ClusterError, describe, make_client
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
        assert "127.0.0.1" in capsys.readouterr().out  # the dashboard link is printed
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


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
    from hoverdask.security import make_self_signed

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
