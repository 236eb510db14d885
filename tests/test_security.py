"""Security: TLS between separate Dask processes, localhost-only listening, safe output names.

A Dask scheduler runs whatever its clients send, so the properties checked here are the ones
that keep strangers from sending: TLS with a private CA refuses plain and foreign clients; the
local cluster listens on 127.0.0.1 only (checked on the sockets the OS reports, not on the
addresses dask prints); slide names cannot write outside the output folder. Checkpoint loading
(`weights_only`, a live malicious pickle refused) is tested in tests/test_model_checkpoints.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_deploy import start_process, stop_processes, wait_for_file

from hoverdask.core.errors import HoverdaskError
from hoverdask.deploy.security import TlsFiles, make_self_signed, tls_security
from hoverdask.slide import sanitize_slide_id

LOOPBACK = {"127.0.0.1", "::1"}
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


def _triple(files: TlsFiles) -> tuple[Path, Path, Path]:
    return files.ca_file, files.cert_file, files.key_file


@needs_openssl
def test_tls_security_requires_encryption_and_existing_files(tmp_path: Path) -> None:
    files = make_self_signed(tmp_path)
    security = tls_security(*_triple(files))
    assert security.require_encryption
    for role in ("client", "scheduler", "worker"):
        config = security.get_tls_config_for_role(role)
        assert config["ca_file"] == str(files.ca_file)
        assert config["cert"] == str(files.cert_file)
    with pytest.raises(HoverdaskError, match="key file"):
        tls_security(files.ca_file, files.cert_file, tmp_path / "missing.pem")


@needs_openssl
def test_self_signed_certificate_is_signed_by_its_ca(tmp_path: Path) -> None:
    files = make_self_signed(tmp_path, hostname="scheduler.example")
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(files.ca_file), str(files.cert_file)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    other = make_self_signed(tmp_path / "other")
    foreign = subprocess.run(
        ["openssl", "verify", "-CAfile", str(other.ca_file), str(files.cert_file)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert foreign.returncode != 0
    assert oct(files.key_file.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "ca-key.pem", "ca.pem", "ca.srl", "cert.pem", "key.pem"]  # fmt: skip


# --- TLS across processes -----------------------------------------------------------------------


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[str, TlsFiles]]:
    """A TLS-only scheduler and worker, separate processes, certificates from a private CA."""
    files = make_self_signed(tmp_path / "tls")
    flags = ["--tls-ca-file", str(files.ca_file), "--tls-cert", str(files.cert_file),
             "--tls-key", str(files.key_file)]  # fmt: skip
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = start_process(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "tls",
         "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file), *flags],
        tmp_path / "scheduler.log",
    )  # fmt: skip
    worker = None
    try:
        wait_for_file(scheduler_file, scheduler, tmp_path / "scheduler.log")
        address = json.loads(scheduler_file.read_text())["address"]
        worker = start_process(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--host", "127.0.0.1",
             "--nthreads", "1", "--no-dashboard", "--no-nanny", *flags],
            tmp_path / "worker.log",
        )  # fmt: skip
        yield address, files
    finally:
        stop_processes([worker] if worker else [])  # workers first, as in test_deploy
        stop_processes([scheduler])


@needs_openssl
@pytest.mark.slow
def test_tls_cluster_computes_for_its_clients_and_refuses_others(
    tls_cluster: tuple[str, TlsFiles], tmp_path: Path
) -> None:
    from distributed import Client

    address, files = tls_cluster
    assert address.startswith("tls://127.0.0.1:")
    with Client(address, security=tls_security(*_triple(files)), timeout="30s") as client:
        client.wait_for_workers(1, timeout=60)
        assert client.submit(sum, [20, 22]).result(timeout=60) == 42
        (worker_address,) = client.scheduler_info()["workers"]
        assert worker_address.startswith("tls://")

    host_port = address.removeprefix("tls://")
    with pytest.raises((OSError, TimeoutError)):  # a plain TCP client gets no Dask handshake
        Client(f"tcp://{host_port}", timeout="3s")
    stranger = make_self_signed(tmp_path / "stranger")  # valid TLS, but signed by another CA
    with pytest.raises((OSError, TimeoutError)):
        Client(address, security=tls_security(*_triple(stranger)), timeout="3s")

    # the refusals were the certificates' doing: the cluster still serves its own clients
    with Client(address, security=tls_security(*_triple(files)), timeout="30s") as client:
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3


# --- localhost only -----------------------------------------------------------------------------


def _listening(pid: int) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for conn in psutil.Process(pid).net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN:
            found.setdefault(conn.laddr.port, set()).add(conn.laddr.ip)
    return found


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only() -> None:
    from hoverdask.deploy.cluster import make_client

    client = make_client(workers=2, threads_per_worker=1, device="cpu", quiet=True)
    try:
        scheduler = client.cluster.scheduler
        workers = client.scheduler_info(n_workers=-1)["workers"]
        ports = {_port(scheduler.address), scheduler.http_server.port}
        ports |= {_port(w["nanny"]) for w in workers.values()}
        here = _listening(os.getpid())
        for port in ports:  # scheduler, dashboard and nannies live in this process
            assert here[port] <= LOOPBACK, (port, here[port])
        worker_pids = client.run(os.getpid).values()
        assert len(set(worker_pids)) == 2
        for pid in worker_pids:  # every socket a worker process listens on
            listening = _listening(pid)
            assert {_port(a) for a in workers} & set(listening)
            assert set().union(*listening.values()) <= LOOPBACK, listening
        assert "127.0.0.1" in client.dashboard_link
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


# --- slide names --------------------------------------------------------------------------------


@given(st.text(min_size=0, max_size=40))
def test_any_slide_name_stays_inside_the_output_folder(name: str) -> None:
    out = Path("/srv/hoverdask/out")
    slide_id = sanitize_slide_id(name)
    assert slide_id not in ("", ".", "..")
    assert not slide_id.startswith(".")
    assert "/" not in slide_id
    assert "\\" not in slide_id
    assert "\x00" not in slide_id
    assert os.path.normpath(out / slide_id).startswith(f"{out}/")
    assert (out / slide_id).parent == out


@pytest.mark.slow
def test_hostile_slide_file_names_write_only_inside_out(tmp_path: Path) -> None:
    import numpy as np
    from distributed import Client

    from hoverdask.pipeline.predictors import ArrayPredictorFactory
    from hoverdask.pipeline.run import RunOptions, run_cohort
    from hoverdask.slide.synthetic import synthetic_pred_map, write_synthetic_slide

    source = tmp_path / "src" / "plain.svs"
    source.parent.mkdir()
    write_synthetic_slide(source, 328, 328, mpp=0.25, seed=5, keep_instances=False)
    np.save(tmp_path / "maps.npy", synthetic_pred_map(328, 328, 6, seed=5))
    hostile = ["...svs", "..%2F..%2Fescape.svs", "$(touch pwned) ;x.svs", ".hidden.svs"]
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    slides = []
    for name in hostile:
        slides.append(deep / name)
        slides[-1].write_bytes(source.read_bytes())
    out = deep / "out"
    before = set(tmp_path.rglob("*"))
    client = Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None)
    try:
        result = run_cohort(
            slides, out, client=client, progress=False,
            predictor_factory=ArrayPredictorFactory(str(tmp_path / "maps.npy"), margin=46,
                                                    output=164, nr_types=6),
            options=RunOptions(chunk_size=328, tissue_mask=False),
        )  # fmt: skip
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    assert [s.status for s in result.slides] == ["ok"] * len(hostile)
    ids = [s.slide_id for s in result.slides]
    assert len(set(ids)) == len(ids)
    created = set(tmp_path.rglob("*")) - before
    outside = [p for p in created if out not in (p, *p.parents)]
    assert outside == []
    assert set(ids) <= {p.name for p in out.iterdir() if p.is_dir()}
    assert not any(name.startswith(".") for name in ids)
    assert not (Path.cwd() / "pwned").exists()
