"""GPU Dask workers as SLURM jobs: a TOML file in, an adaptive `dask_jobqueue.SLURMCluster` out.

Users keep one small file per site (partition, account, GPUs, memory) instead of a page of
`SLURMCluster(...)` arguments; the file is checked field by field before any job is submitted, so a
typo fails in a second on the login node rather than as a job that never starts. dask-jobqueue is
an optional extra (`pip install hoverdask[slurm]`).
"""

from __future__ import annotations

import re
import signal
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoverdask.core.errors import HoverdaskError
from hoverdask.deploy.security import tls_security

if TYPE_CHECKING:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

WALLTIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")
MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|[KMGT]i?B)$", re.IGNORECASE)
SECTIONS = {
    "slurm": {
        "partition", "account", "walltime", "cores", "memory", "gpus_per_job",
        "job_extra_directives", "job_script_prologue", "interface", "local_directory",
        "log_directory", "python",
    },
    "worker": {"threads", "resources"},
    "adaptive": {"minimum_jobs", "maximum_jobs"},
    "scheduler": {"dashboard_address"},
    "tls": {"ca_file", "cert_file", "key_file"},
}  # fmt: skip


@dataclass(frozen=True)
class SlurmConfig:
    """One site's GPU job shape. Each job runs one Dask worker process per GPU."""

    partition: str
    walltime: str
    cores: int
    memory: str
    gpus_per_job: int = 1
    account: str | None = None
    worker_threads: int | None = None
    worker_resources: dict[str, float] = field(default_factory=lambda: {"GPU": 1})
    minimum_jobs: int = 1
    maximum_jobs: int = 1
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None
    dashboard_address: str = "127.0.0.1:8787"
    tls: tuple[Path, Path, Path] | None = None

    @property
    def processes(self) -> int:
        return max(self.gpus_per_job, 1)

    @property
    def threads(self) -> int:
        """Threads per worker process: as given, else the job's cores shared out."""
        return self.worker_threads or max(self.cores // self.processes, 1)


def load_slurm_config(path: str | Path) -> SlurmConfig:
    """Read and check a `hoverdask cluster slurm` TOML file; every problem names its field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HoverdaskError(f"cluster config {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise HoverdaskError(f"cluster config {path} is not valid TOML: {err}") from None
    return parse_slurm_config(raw, source=str(path))


def parse_slurm_config(raw: dict[str, Any], source: str = "config") -> SlurmConfig:
    """Validate the parsed TOML tables (see `deploy/slurm/cluster.toml` for every field)."""
    where = _Where(source)
    for section, value in raw.items():
        if section not in SECTIONS:
            raise HoverdaskError(
                f"{source}: unknown section [{section}]; expected {', '.join(sorted(SECTIONS))}"
            )
        if not isinstance(value, dict):
            raise HoverdaskError(f"{source}: [{section}] must be a table")
        unknown = set(value) - SECTIONS[section]
        if unknown:
            raise HoverdaskError(
                f"{source}: unknown field(s) {', '.join(sorted(unknown))} in [{section}]"
            )
    slurm = raw.get("slurm")
    if slurm is None:
        raise HoverdaskError(f"{source}: missing the [slurm] section")
    worker, adaptive = raw.get("worker", {}), raw.get("adaptive", {})
    scheduler, tls = raw.get("scheduler", {}), raw.get("tls")

    walltime = where.string(slurm, "slurm.walltime", required=True)
    if not WALLTIME.match(walltime):
        raise HoverdaskError(f"{source}: slurm.walltime {walltime!r} is not like '04:00:00'")
    memory = where.string(slurm, "slurm.memory", required=True)
    if not MEMORY.match(memory):
        raise HoverdaskError(f"{source}: slurm.memory {memory!r} is not like '64GB' or '500MiB'")
    # at least one job stays: `hoverdask run` plans against the workers it finds, so a cluster
    # scaled to zero would refuse work instead of growing
    minimum = where.integer(adaptive, "adaptive.minimum_jobs", 1, minimum=1)
    maximum = where.integer(adaptive, "adaptive.maximum_jobs", minimum, minimum=1)
    if maximum < minimum:
        raise HoverdaskError(
            f"{source}: adaptive.maximum_jobs ({maximum}) is below minimum_jobs ({minimum})"
        )
    resources = worker.get("resources", {"GPU": 1})
    if not isinstance(resources, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for v in resources.values()
    ):
        raise HoverdaskError(f"{source}: worker.resources must be a table like {{ GPU = 1 }}")
    config = SlurmConfig(
        partition=where.string(slurm, "slurm.partition", required=True),
        account=where.string(slurm, "slurm.account"),
        walltime=walltime,
        cores=where.integer(slurm, "slurm.cores", None, minimum=1),
        memory=memory,
        gpus_per_job=where.integer(slurm, "slurm.gpus_per_job", 1, minimum=0),
        worker_threads=where.integer(worker, "worker.threads", 0, minimum=1) or None,
        worker_resources={str(k): float(v) for k, v in resources.items()},
        minimum_jobs=minimum,
        maximum_jobs=maximum,
        job_extra_directives=where.strings(slurm, "slurm.job_extra_directives"),
        job_script_prologue=where.strings(slurm, "slurm.job_script_prologue"),
        interface=where.string(slurm, "slurm.interface"),
        local_directory=where.string(slurm, "slurm.local_directory"),
        log_directory=where.string(slurm, "slurm.log_directory"),
        python=where.string(slurm, "slurm.python"),
        dashboard_address=where.string(scheduler, "scheduler.dashboard_address")
        or "127.0.0.1:8787",
        tls=None if tls is None else _tls_paths(tls, where),
    )
    if config.threads * config.processes > config.cores:
        raise HoverdaskError(
            f"{source}: worker.threads ({config.threads}) x {config.processes} worker process(es) "
            f"per job exceeds slurm.cores ({config.cores})"
        )
    return config


def slurm_cluster(config: SlurmConfig) -> SLURMCluster:
    """Start the scheduler here and return the (not yet scaled) SLURMCluster for `config`."""
    cluster_class = _import_slurm_cluster()

    directives = list(config.job_extra_directives)
    if config.gpus_per_job:
        directives.insert(0, f"--gres=gpu:{config.gpus_per_job}")
    resources = ",".join(f"{name}={value:g}" for name, value in config.worker_resources.items())
    security = None if config.tls is None else tls_security(*config.tls)
    return cluster_class(
        queue=config.partition,
        account=config.account,
        walltime=config.walltime,
        cores=config.threads * config.processes,
        job_cpu=config.cores,
        memory=config.memory,
        processes=config.processes,
        interface=config.interface,
        local_directory=config.local_directory,
        log_directory=config.log_directory,
        python=config.python,
        job_extra_directives=directives,
        job_script_prologue=list(config.job_script_prologue),
        worker_extra_args=["--resources", resources],
        security=security,
        protocol="tls://" if security is not None else None,
        scheduler_options={"dashboard_address": config.dashboard_address},
    )


def _import_slurm_cluster() -> type[SLURMCluster]:
    """dask-jobqueue's SLURMCluster, leaving this process's Ctrl-C handling as it was.

    Importing dask-jobqueue (its ``runner`` module) makes SIGINT call ``sys.exit()``: an
    interrupted run would then exit with status 0 as if it had succeeded, and skip the code that
    reports the interruption. The previous handler is put back.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise HoverdaskError(
            "SLURM clusters need dask-jobqueue: pip install 'hoverdask[slurm]'"
        ) from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
    return SLURMCluster


def job_script(config: SlurmConfig) -> str:
    """The sbatch script each worker job runs (starts and stops a scheduler to render it)."""
    cluster = slurm_cluster(config)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def start_slurm_cluster(config: SlurmConfig) -> SLURMCluster:
    """Start the cluster and let it grow and shrink between the configured job counts."""
    cluster = slurm_cluster(config)
    cluster.adapt(minimum_jobs=config.minimum_jobs, maximum_jobs=config.maximum_jobs)
    return cluster


def slurm_client(path: str | Path, *, quiet: bool = False) -> Client:
    """Start the adaptive SLURM cluster that the config file ``path`` describes, for one run.

    The client's ``cluster`` is the SLURMCluster: closing it (``cluster.close_client``) cancels
    every worker job it submitted. Security comes from the config's ``[tls]`` table.
    """
    from distributed import Client

    config = load_slurm_config(path)
    cluster = start_slurm_cluster(config)
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise
    if not quiet:
        print(f"SLURM: {config.minimum_jobs}..{config.maximum_jobs} worker job(s) on partition "
              f"{config.partition}; scheduler {cluster.scheduler_address}; dashboard "
              f"{dashboard_link(cluster, config)}", flush=True)
    return client


def dashboard_link(cluster: SLURMCluster, config: SlurmConfig) -> str:
    """The dashboard URL on the interface it really listens on (dask reports the public host)."""
    host = config.dashboard_address.rpartition(":")[0]
    if host in ("", "0.0.0.0"):
        return cluster.dashboard_link
    return f"http://{host}:{cluster.scheduler.http_server.port}/status"


@dataclass(frozen=True)
class _Where:
    """Field readers that name the file and the field in every message."""

    source: str

    def _get(self, table: dict[str, Any], name: str, required: bool) -> Any:
        key = name.rsplit(".", 1)[-1]
        if key not in table:
            if required:
                raise HoverdaskError(f"{self.source}: missing required field {name}")
            return None
        return table[key]

    def string(self, table: dict[str, Any], name: str, required: bool = False) -> Any:
        value = self._get(table, name, required)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise HoverdaskError(f"{self.source}: {name} must be a non-empty string")
        return value

    def integer(
        self, table: dict[str, Any], name: str, default: int | None, minimum: int
    ) -> int:
        value = self._get(table, name, required=default is None)
        if value is None:
            return int(default)  # type: ignore[arg-type]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise HoverdaskError(f"{self.source}: {name} must be an integer >= {minimum}")
        return value

    def strings(self, table: dict[str, Any], name: str) -> tuple[str, ...]:
        value = self._get(table, name, required=False)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise HoverdaskError(f"{self.source}: {name} must be a list of strings")
        return tuple(value)


def _tls_paths(table: dict[str, Any], where: _Where) -> tuple[Path, Path, Path]:
    base = Path(where.source).parent
    paths = [
        Path(where.string(table, f"tls.{key}", required=True)).expanduser()
        for key in ("ca_file", "cert_file", "key_file")
    ]
    return tuple(path if path.is_absolute() else base / path for path in paths)  # type: ignore[return-value]
