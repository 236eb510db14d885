"""Dask clusters for hoverdask: a LocalCluster on this machine, or an existing scheduler.

Both paths hand back a plain ``distributed.Client`` so the pipeline code never knows which one it
got. Local workers are processes bound to 127.0.0.1 (nothing is exposed to the network); when
this machine has GPUs there is one single-GPU worker per device, advertising the ``GPU`` resource
that inference tasks ask for, and the model plugin pins each worker to its own device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hoverdask.errors import HoverdaskError

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


def make_client(
    workers: int | None = None,
    threads_per_worker: int | None = None,
    scheduler: str | None = None,
    device: Device = "auto",
    security: object | None = None,
    *,
    dashboard: bool = True,
    quiet: bool = False,
    connect_timeout: str = "30s",
) -> Client:
    """Connect to ``scheduler`` (an address or a scheduler file), or start a LocalCluster.

    The local cluster gets one worker per GPU when ``device`` resolves to ``cuda`` (each with
    the ``GPU=1`` resource and by default this machine's cores shared out as threads, so CPU
    post-processing runs beside inference), else ``workers`` CPU workers (default: one per core,
    one thread each). The dashboard link is printed unless ``quiet``.
    """
    from distributed import Client, LocalCluster

    if scheduler is not None:
        client = _connect(scheduler, security, connect_timeout)
    else:
        if (workers is not None and workers < 1) or (
            threads_per_worker is not None and threads_per_worker < 1
        ):
            raise ClusterError("--workers and --threads-per-worker must be at least 1")
        resolved = resolve_device(device)
        n_gpus = local_gpu_count() if resolved == "cuda" else 0
        if n_gpus:
            n_workers = n_gpus
            threads = threads_per_worker or max(1, cpu_count() // n_gpus)
        else:
            n_workers = workers or cpu_count()
            threads = threads_per_worker or 1
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:8787" if dashboard else "127.0.0.1:0",
            resources={GPU_RESOURCE: 1} if n_gpus else None,
            security=security,
            protocol="tls://" if security is not None else None,
        )
        client = Client(cluster, security=security)
    if not quiet:
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
    return client


def _connect(scheduler: str, security: object | None, timeout: str) -> Client:
    from distributed import Client

    path = Path(scheduler)
    try:
        if path.is_file():
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
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
