"""Dask clusters for hoverdask: a local cluster of worker processes on this machine, or an existing scheduler.

Both paths hand back a plain ``distributed.Client`` so the pipeline code never knows which one it
got. Local workers are processes bound to 127.0.0.1 (nothing is exposed to the network); when
this machine has GPUs there is one single-GPU worker per device, advertising the ``GPU`` resource
that inference tasks ask for (the model plugin pins each to its own device), and the cores left
over become single-threaded CPU workers for planning and post-processing: separate processes, so
their Python work never holds the GIL that the thread feeding a GPU needs.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hoverdask.core.errors import HoverdaskError
from hoverdask.deploy.allocator import WORKER_ALLOCATOR_ENV
from hoverdask.deploy.jobqueue import slurm_client

if TYPE_CHECKING:
    from distributed import Client

Device = Literal["auto", "cpu", "cuda"]
GPU_RESOURCE = "GPU"


class ClusterError(HoverdaskError):
    """The Dask cluster cannot be reached or cannot run the requested work."""


@dataclass(frozen=True)
class ClusterInfo:
    """What the pipeline needs to know about the workers it got."""

    n_workers: int
    gpu_workers: int
    threads: dict[str, int]

    @property
    def has_gpus(self) -> bool:
        return self.gpu_workers > 0

    @property
    def worker_threads(self) -> int:
        """All the workers' threads together (the task slots)."""
        return sum(self.threads.values())


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    """Turn ``auto`` into ``cuda`` when this machine has a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if local_gpu_count() > 0 else "cpu"
    if device == "cuda" and local_gpu_count() == 0:
        raise ClusterError("--device cuda was asked for but torch sees no CUDA device here")
    return device


@dataclass(frozen=True)
class LocalLayout:
    """Worker processes of a local cluster: GPU workers (``GPU=1`` each) and CPU workers."""

    gpu_workers: int
    gpu_threads: int
    cpu_workers: int
    cpu_threads: int

    @property
    def n_workers(self) -> int:
        return self.gpu_workers + self.cpu_workers


GPU_WORKER_THREADS = 2  # one feeds the GPU; one plans slides and post-processes beside it


def local_layout(
    n_gpus: int, cores: int, workers: int | None = None, threads_per_worker: int | None = None
) -> LocalLayout:
    """The default worker layout for this machine.

    Without GPUs: ``workers`` CPU workers (default one per core) of ``threads_per_worker``
    threads (default 1). With GPUs: one worker per GPU with ``threads_per_worker`` threads
    (default 2) and ``workers`` single-threaded CPU workers (default: the cores left over).
    """
    if n_gpus <= 0:
        return LocalLayout(0, 0, cores if workers is None else workers, threads_per_worker or 1)
    gpu_threads = threads_per_worker or GPU_WORKER_THREADS
    spare = workers if workers is not None else max(0, cores - n_gpus * gpu_threads)
    return LocalLayout(n_gpus, gpu_threads, spare, 1)


def make_client(
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    device: Device = "auto",
    security: object | None = None,
    *,
    dashboard: bool = True,
    quiet: bool = False,
    worker_env: dict[str, str] | None = None,
    connect_timeout: str = "30s",
    slurm: str | Path | None = None,
) -> Client:
    """Connect to ``scheduler`` (an address or a scheduler file), start the SLURM cluster of
    the config file ``slurm`` (its workers are SLURM jobs), or start a local cluster.

    The local cluster's workers follow :func:`local_layout` (GPU workers when ``device``
    resolves to ``cuda``). The dashboard link is printed unless ``quiet``, and so is one line
    when the workers outnumber the cores (:func:`compute_threads`). ``worker_env`` is added to
    the environment the local worker processes start with (e.g. their logging set-up).
    """
    if slurm is not None:
        others = {"scheduler": scheduler, "workers": workers,
                  "threads_per_worker": threads_per_worker, "TLS options": security}
        given = [name for name, value in others.items() if value is not None]
        if given:
            raise ClusterError(f"--slurm takes the workers from its config file; leave out "
                               f"{', '.join(given)} (TLS: the config's [tls] table)")
        return slurm_client(slurm, quiet=quiet)
    if scheduler is not None:
        client = _connect(scheduler, security, connect_timeout)
    else:
        resolved = resolve_device(device)
        n_gpus = local_gpu_count() if resolved == "cuda" else 0
        if (workers is not None and workers < (0 if n_gpus else 1)) or (
            threads_per_worker is not None and threads_per_worker < 1
        ):
            raise ClusterError("--workers and --threads-per-worker must be at least 1 (--workers "
                               "may be 0 beside GPU workers)")
        cores = cpu_count()
        layout = local_layout(n_gpus, cores, workers, threads_per_worker)
        compute = compute_threads(layout, cores)
        if compute is not None and not quiet:
            print(f"{layout.n_workers} workers on {cores} cores: torch and BLAS use {compute} "
                  f"thread{'s' if compute > 1 else ''} per worker", flush=True)
        client = start_local_cluster(layout, dashboard=dashboard, security=security,
                                     worker_env=worker_env)
        if compute is not None and client.cluster is not None:
            client.cluster.compute_threads = compute  # type: ignore[attr-defined]
    if not quiet:
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
    return client


@contextlib.contextmanager
def client_for(
    client: Client | None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    device: Device = "auto",
    security: object | None = None,
    **options: Any,
) -> Iterator[Client]:
    """``client`` as it is, or one from :func:`make_client` (``options``: ``quiet``,
    ``dashboard``, ``worker_env``, ``slurm``) that is closed, with the cluster it started, on
    leaving (:func:`close_client`: no local worker is killed; SLURM jobs are cancelled, also
    when the run is interrupted or terminated)."""
    if client is not None:
        yield client
        return
    stopping = _terminate_as_interrupt() if options.get("slurm") else contextlib.nullcontext()
    with stopping:
        owned = make_client(workers, threads_per_worker, scheduler, device, security, **options)
        try:
            yield owned
        finally:
            close_client(owned)


def compute_threads(layout: LocalLayout, cores: int) -> int | None:
    """Torch/BLAS threads per worker when the workers' threads would outnumber the cores.

    None when they fit. Otherwise the cores shared out (at least one thread each): with more
    workers than cores nothing better than one thread per worker is possible.
    """
    total = layout.gpu_workers * layout.gpu_threads + layout.cpu_workers * layout.cpu_threads
    if total <= cores or layout.n_workers == 0:
        return None
    return max(1, cores // layout.n_workers)


def start_local_cluster(
    layout: LocalLayout,
    *,
    dashboard: bool = True,
    security: object | None = None,
    worker_env: dict[str, str] | None = None,
) -> Client:
    """Worker processes on 127.0.0.1 as ``layout`` says, and a client of them.

    Workers are named 0..N-1, GPU workers first, so that GPU worker ``i`` uses device ``i``.
    Memory limits share this machine's memory out evenly, as LocalCluster does.
    """
    from distributed import Client, Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    protocol = "tls://" if security is not None else None
    common = {"host": "127.0.0.1", "memory_limit": int(MEMORY_LIMIT / layout.n_workers),
              "security": security, "protocol": protocol}
    workers: dict[int, dict[str, object]] = {}
    for index in range(layout.n_workers):
        gpu = index < layout.gpu_workers
        options = {**common, "nthreads": layout.gpu_threads if gpu else layout.cpu_threads,
                   "resources": {GPU_RESOURCE: 1} if gpu else {}}
        workers[index] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "security": security, "protocol": protocol,
        "dashboard_address": "127.0.0.1:8787" if dashboard else "127.0.0.1:0"}}
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.update(WORKER_ALLOCATOR_ENV)
    environ.update(worker_env or {})
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), _ctrl_c_to_us():
        cluster = SpecCluster(workers=workers, scheduler=scheduler, security=security)
    client = Client(cluster, security=security)
    client.wait_for_workers(layout.n_workers)
    return client


@contextlib.contextmanager
def _ctrl_c_to_us() -> Iterator[None]:
    """Start worker processes with SIGINT ignored, so that Ctrl-C reaches only this process.

    A terminal sends Ctrl-C to every process of the foreground group; workers that got it would
    start closing on their own while this process closes them in order, and time out talking to
    nannies that are already gone. Python keeps an ignored SIGINT ignored in a child it starts.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, ``scancel`` of a run that is itself a job) into
    KeyboardInterrupt while a cluster of batch jobs is up, so that the jobs are cancelled on the
    way out instead of waiting, orphaned, for their scheduler to time out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


CLOSE_TIMEOUT_S = 60.0


def close_client(client: Client, *, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Close ``client`` and, when it started one, its local cluster, without killing workers.

    distributed gives a worker process 4 s to exit before it kills it; on a loaded machine that
    is too short, so the nannies are asked to close first with ``timeout`` seconds to spare.
    """
    cluster = client.cluster
    client.close()
    if cluster is None:
        return
    from distributed import Nanny

    # local worker processes; a SLURM cluster's "workers" are jobs that its close cancels
    nannies = [w for w in getattr(cluster, "workers", {}).values() if isinstance(w, Nanny)]
    if nannies:
        with contextlib.suppress(Exception):  # the cluster's own close still ends them
            cluster.sync(_close_nannies, nannies, timeout)
    cluster.close()


async def _close_nannies(nannies: list[Any], timeout: float) -> None:
    import asyncio

    await asyncio.gather(*(n.close(timeout=timeout) for n in nannies if hasattr(n, "close")),
                         return_exceptions=True)


def _connect(scheduler: str, security: object | None, timeout: str) -> Client:
    from distributed import Client

    path = Path(scheduler)
    try:
        if path.is_file():  # not Client(scheduler_file=): it fails obscurely on a broken file
            address = json.loads(path.read_text())["address"]
            return Client(address, security=security, timeout=timeout)
        return Client(scheduler, security=security, timeout=timeout)
    except (OSError, TimeoutError, ValueError, KeyError) as err:
        raise ClusterError(f"cannot connect to the Dask scheduler {scheduler!r}: {err}") from None


WORKER_WAIT_S = 300.0


def describe(client: Client, *, wait_s: float = WORKER_WAIT_S) -> ClusterInfo:
    """Count the workers, the GPU workers among them and each worker's threads.

    An external cluster may still be starting its workers (SLURM jobs waiting in the queue, pods
    being scheduled), so wait up to ``wait_s`` seconds for the first one before giving up.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        try:
            client.wait_for_workers(1, timeout=wait_s)
        except TimeoutError:
            raise ClusterError(
                f"the Dask cluster has no workers (waited {wait_s:.0f} s); start workers or "
                "check the scheduler address"
            ) from None
        workers = client.scheduler_info(n_workers=-1)["workers"]
    gpu = sum(1 for w in workers.values() if w.get("resources", {}).get(GPU_RESOURCE, 0) >= 1)
    threads = {address: int(w.get("nthreads", 1)) for address, w in workers.items()}
    return ClusterInfo(n_workers=len(workers), gpu_workers=gpu, threads=threads)


def cpu_count() -> int:
    """Cores this process may use: dask's count (CPU affinity and a cgroup CPU quota)."""
    from dask.system import CPU_COUNT

    return CPU_COUNT
