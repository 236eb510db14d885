"""Separate hosts: the scheduler, two workers and the client each in a network namespace.

Each namespace is a host with one interface (a veth pair) on a bridge that lives in a namespace
of its own, with addresses from 10.213.0.0/24 that nothing outside knows: the Dask traffic
(mutual TLS, :mod:`hoverdask.deploy.security`) cannot leave these namespaces. The file system is
shared, as a cluster's shared file system would be. Needs root and the ``ip`` command (Linux);
skipped elsewhere. Everything is removed in a finalizer, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from live_cluster import (
    committed_tiles,
    job_pythonpath,
    nucleus_sets,
    record,
    tls_handshake,
    wait_for,
)
from test_drills import clean, client, cohort  # noqa: F401

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SLIDES = ("s1", "s2")
SUBNET = "10.213.0"
ADDRESSES = {"sched": 1, "w0": 11, "w1": 12, "cli": 21}
PORT = 8786
SLOW_S = 0.5  # per map tile: the teardown lands mid-run
# How long the scheduler waits for a silent worker before it gives the worker's tasks to others:
# the time a vanished host costs at least. Dask's default is 5 minutes; too short a value removes
# live workers whose event loop is busy (setting up the predictor on a loaded machine).
LOST_HOST_TTL = "30s"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)  # fmt: skip


def _namespaces_or_skip() -> None:
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip("needs Linux and the `ip` command (iproute2)")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    probe = f"hdprobe{uuid.uuid4().hex[:6]}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {made.stderr.strip()}")
    ip("netns", "del", probe, check=False)


@dataclass
class Hosts:
    """The namespaces, the processes started in them and the files they share."""

    tag: str
    folder: Path
    tls: tuple[Path, Path, Path]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"hd{self.tag}-{role}"

    def address(self, role: str) -> str:
        return f"{SUBNET}.{ADDRESSES[role]}"

    @property
    def scheduler(self) -> str:
        return f"tls://{self.address('sched')}:{PORT}"

    def add_host(self, role: str) -> None:
        """A namespace with lo, and eth0 on the bridge at this role's address."""
        name, outer = self.ns(role), f"v{self.tag}{role}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", outer,
           "netns", self.ns("sw"))  # fmt: skip
        ip("-n", self.ns("sw"), "link", "set", outer, "master", "br0", "up")
        ip("-n", name, "addr", "add", f"{self.address(role)}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")

    def start(self, role: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.folder / f"{role}.log").open("w")
        environ = {**os.environ, "PYTHONPATH": job_pythonpath(), **(env or {})}
        self.processes[role] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(role), sys.executable, *args],
            stdout=log, stderr=subprocess.STDOUT, env=environ, start_new_session=True,
            cwd=self.folder,
        )  # fmt: skip

    def tls_args(self) -> list[str]:
        ca, cert, key = map(str, self.tls)
        return ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]

    def log(self, role: str) -> str:
        return (self.folder / f"{role}.log").read_text()[-3000:]

    def tear_down_host(self, role: str) -> None:
        """The host is gone: its link first (no goodbye reaches anyone), then its processes."""
        ip("-n", self.ns("sw"), "link", "del", f"v{self.tag}{role}", check=False)
        self.kill_namespace(self.ns(role))
        self.processes.pop(role, None)

    def kill_namespace(self, name: str) -> None:
        pids = ip("netns", "pids", name, check=False).stdout.split()
        for pid in map(int, pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ip("netns", "del", name, check=False)
        if name in self.namespaces:
            self.namespaces.remove(name)

    def close(self) -> None:
        for role in ("cli", "w0", "w1", "sched"):  # workers before their scheduler
            process = self.processes.pop(role, None)
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for name in list(reversed(self.namespaces)):
            self.kill_namespace(name)


@pytest.fixture
def hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hosts]:
    """A TLS scheduler and two ``GPU=1`` workers, each alone in its namespace. Parametrised
    (indirect) with the scheduler's worker TTL, else Dask's default."""
    _namespaces_or_skip()
    from hoverdask.deploy.security import make_self_signed

    ttl: str | None = getattr(request, "param", None)

    files = make_self_signed(tmp_path / "tls", hostname="hoverdask-netns")
    world = Hosts(f"{os.getpid() % 10000:04d}", tmp_path,
                  (files.ca_file, files.cert_file, files.key_file))  # fmt: skip
    try:
        ip("netns", "add", world.ns("sw"))
        world.namespaces.append(world.ns("sw"))
        ip("-n", world.ns("sw"), "link", "add", "br0", "type", "bridge")
        ip("-n", world.ns("sw"), "link", "set", "br0", "up")
        for role in ADDRESSES:
            world.add_host(role)
        scheduler_file = tmp_path / "scheduler.json"
        world.start("sched", [
            "-m", "distributed.cli.dask_scheduler", "--host", world.address("sched"),
            "--port", str(PORT), "--protocol", "tls", *world.tls_args(), "--no-dashboard",
            "--scheduler-file", str(scheduler_file),
        ], env={"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": ttl} if ttl else None)  # fmt: skip
        wait_for(scheduler_file.exists, 120, "the scheduler file",
                 alive=lambda: world.processes["sched"].poll() is None,
                 log=lambda: world.log("sched"))
        for role in ("w0", "w1"):
            world.start(role, [
                "-m", "distributed.cli.dask_worker", world.scheduler,
                "--host", world.address(role), "--nthreads", "1", "--resources", "GPU=1",
                "--name", role, "--no-dashboard", "--no-nanny", *world.tls_args(),
                # torch imported before joining: the model plugin's set-up, on the worker's event
                # loop, then takes seconds, not the minute a busy machine may need, which would
                # miss the heartbeats a short worker TTL asks for
                "--preload", "torch",
            ])  # fmt: skip
        yield world
    finally:
        world.close()
        leftover = [n for n in ip("netns", "list", check=False).stdout.split()
                    if n.startswith(f"hd{world.tag}-")]
        assert not leftover, f"namespaces left behind: {leftover}"


CLIENT = """
import json, sys, time
from pathlib import Path
from distributed import Client
import test_drills as d
from hoverdask.pipeline.run import run_cohort
from hoverdask.deploy.security import tls_security
from live_cluster import processing_counts, reruns

scheduler, ca, cert, key, maps, out, seconds, *slides = sys.argv[1:]
factory = d.SlowFactory(d.ArrayPredictorFactory(maps, margin=d.MARGIN, output=d.OUTPUT,
                                                nr_types=d.NR_TYPES), seconds=float(seconds))
if __name__ == "__main__":
    client = Client(scheduler, security=tls_security(ca, cert, key), timeout="60s")
    client.wait_for_workers(2, timeout=120)
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    start = time.monotonic()
    result = run_cohort(slides, Path(out), predictor_factory=factory, client=client,
                        options=d.OPTIONS, progress=False)
    took = time.monotonic() - start
    log = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.transition_log))
    print(json.dumps({"status": [s.status for s in result.slides],
                      "errors": [s.error for s in result.slides], "workers": workers,
                      "seconds": took, "reruns": reruns(processing_counts(log))}))
    client.close()
"""


def run_client(world: Hosts, slides: dict[str, Path], out: Path, seconds: float) -> None:
    ca, cert, key = map(str, world.tls)
    world.start("cli", ["-c", CLIENT, world.scheduler, ca, cert, key, str(slides["maps"]),
                        str(out), str(seconds), *(str(slides[s]) for s in SLIDES)])


def client_report(world: Hosts, timeout: float = 300) -> dict:
    process = world.processes["cli"]
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the run did not end in {timeout:.0f} s:\n{world.log('cli')}\n"
                             f"scheduler:\n{world.log('sched')}") from None
    assert process.returncode == 0, world.log("cli")
    return json.loads(world.log("cli").strip().splitlines()[-1])


def scheduler_answers(world: Hosts, role: str | None = None) -> bool:
    """Whether a TLS handshake with the scheduler succeeds from the namespace of ``role`` (None:
    from this process, outside them all)."""
    args = [world.address("sched"), str(PORT), *map(str, world.tls)]
    if role is None:
        return tls_handshake(*args)
    probe = ("import sys\nfrom live_cluster import tls_handshake\n"
             "sys.exit(0 if tls_handshake(*sys.argv[1:]) else 1)")
    done = subprocess.run(["ip", "netns", "exec", world.ns(role), sys.executable, "-c", probe,
                           *args], env={**os.environ, "PYTHONPATH": job_pythonpath()},
                          timeout=60, check=False)  # fmt: skip
    return done.returncode == 0


def test_tls_cluster_across_namespaces_gives_the_local_nuclei(hosts, cohort, clean, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run_client(hosts, cohort, out, seconds=SLOW_S)
    report = client_report(hosts)
    assert report["status"] == ["ok", "ok"], report["errors"]
    record("netns_calm", {"run_s": round(report["seconds"], 1), "tasks_rerun": report["reruns"]})
    hosts_seen = sorted(address.rsplit(":", 1)[0] for address in report["workers"])
    assert hosts_seen == [f"tls://{hosts.address('w0')}", f"tls://{hosts.address('w1')}"]
    assert nucleus_sets(out, SLIDES) == clean
    assert scheduler_answers(hosts, "cli")
    assert not scheduler_answers(hosts), "the scheduler answers outside its namespaces"


@pytest.mark.parametrize("hosts", [LOST_HOST_TTL], indirect=True, ids=["ttl"])
def test_worker_host_torn_down_mid_run_gives_the_same_nuclei(hosts, cohort, clean, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run_client(hosts, cohort, out, seconds=SLOW_S)
    wait_for(lambda: bool(committed_tiles(out)), 240, "the first committed tile",
             alive=lambda: hosts.processes["cli"].poll() is None, log=lambda: hosts.log("cli"))
    torn = time.monotonic()
    hosts.tear_down_host("w1")
    assert hosts.ns("w1") not in ip("netns", "list").stdout
    report = client_report(hosts)
    finished = time.monotonic() - torn
    assert report["status"] == ["ok", "ok"], report["errors"]
    assert nucleus_sets(out, SLIDES) == clean
    record("netns_teardown", {"worker_ttl": LOST_HOST_TTL, "run_s": round(report["seconds"], 1),
                              "finished_after_teardown_s": round(finished, 1),
                              "tasks_rerun": report["reruns"]})
