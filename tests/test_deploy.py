"""deploy/: what can be checked without Docker, SLURM or Kubernetes at hand.

The compose file, manifests and Dockerfile are parsed and held to the properties the guides
promise (GPU reservations, `GPU=1` worker resources, localhost-only ports, one shared volume);
the SLURM job script is rendered by dask-jobqueue from the example config; and the multi-process
path (scheduler and workers as separate processes, as on a real cluster) runs a job on localhost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.core.errors import HoverdaskError
from hoverdask.deploy.jobqueue import job_script, load_slurm_config, parse_slurm_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
SLURM_EXAMPLE = DEPLOY / "slurm" / "cluster.toml"


def _flags(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else list(command)


def _option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


# --- docker ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_workers_claim_one_distinct_gpu_each(compose: dict) -> None:
    workers = {name: s for name, s in compose["services"].items() if name.startswith("worker")}
    assert len(workers) >= 2
    device_ids = []
    for service in workers.values():
        args = _flags(service["command"])
        assert args[:2] == ["dask", "worker"]
        assert args[2] == "tcp://scheduler:8786"
        assert _option(args, "--resources") == "GPU=1"
        assert _option(args, "--nworkers") == "1"  # GPU=1 is per process: one process per GPU
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        device_ids += device["device_ids"]
    assert len(device_ids) == len(set(device_ids)) == len(workers)


def test_compose_publishes_ports_on_localhost_only(compose: dict) -> None:
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert {p.split(":")[-1] for p in published} == {"8786", "8787"}
    assert all(p.startswith("127.0.0.1:") for p in published)


def test_compose_services_share_one_data_volume(compose: dict) -> None:
    mounts = {
        name: [(v["source"], v["target"]) for v in service["volumes"]]
        for name, service in compose["services"].items()
    }
    assert len({tuple(m) for m in mounts.values()}) == 1
    assert next(iter(mounts.values()))[0][1] == "/data"
    build = compose["services"]["scheduler"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
        DEPLOY / "docker" / "Dockerfile"
    )


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_file_validates_with_compose() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    done = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_dockerfile_builds_one_cuda_image_with_the_gpu_extra() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    args = {
        line.split()[1].split("=")[0]: line.split("=", 1)[1]
        for line in lines
        if line.startswith("ARG ") and "=" in line
    }
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "runtime" in args["CUDA_IMAGE"]
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM ${CUDA_IMAGE}"]
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    assert 'pip install ".[gpu]"' in text
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().split()
    copied = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    for sources in copied:
        for source in sources:
            assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore


def test_cluster_extras_stay_out_of_core_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for package in ("dask-cuda", "dask-jobqueue", "dask-kubernetes"):
        assert package not in core
    assert any(dep.startswith("dask-cuda") for dep in extras["gpu"])
    assert any(dep.startswith("dask-jobqueue") for dep in extras["slurm"])
    assert any(dep.startswith("dask-jobqueue") for dep in extras["dev"])


# --- kubernetes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    return {doc["kind"]: doc for doc in docs}


def test_daskcluster_workers_have_gpu_limits_and_resources(manifests: dict[str, dict]) -> None:
    cluster = manifests["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # the CRD wants strings
    assert worker["args"][:2] == ["dask", "worker"]
    assert _option(worker["args"], "--resources") == "GPU=1"
    assert cluster["spec"]["worker"]["replicas"] >= 1


def test_cpu_worker_group_joins_the_cluster_without_a_gpu(manifests: dict[str, dict]) -> None:
    group = manifests["DaskWorkerGroup"]
    assert group["apiVersion"] == manifests["DaskCluster"]["apiVersion"]
    assert group["spec"]["cluster"] == manifests["DaskCluster"]["metadata"]["name"]
    pod = group["spec"]["worker"]["spec"]
    (worker,) = pod["containers"]
    assert "nvidia.com/gpu" not in str(worker["resources"])
    assert "--resources" not in worker["args"]  # never offered inference tasks
    assert _option(worker["args"], "--nthreads") == "1"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]]
    assert claims == [manifests["PersistentVolumeClaim"]["metadata"]["name"]]
    assert {m["mountPath"] for m in worker["volumeMounts"]} == {"/data"}


def test_daskcluster_mounts_the_shared_claim(manifests: dict[str, dict]) -> None:
    pvc = manifests["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    pod = manifests["DaskCluster"]["spec"]["worker"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert list(claims.values()) == [pvc["metadata"]["name"]]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[next(iter(claims))] == "/data"


def test_daskcluster_scheduler_service_is_internal_and_matches_ports(
    manifests: dict[str, dict],
) -> None:
    cluster = manifests["DaskCluster"]
    scheduler = cluster["spec"]["scheduler"]
    service = scheduler["service"]
    assert service["type"] == "ClusterIP"
    assert service["selector"]["dask.org/cluster-name"] == cluster["metadata"]["name"]
    (container,) = scheduler["spec"]["containers"]
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= set(named_ports)
    assert named_ports["tcp-comm"] == int(_option(container["args"], "--port"))


def _daskcluster_crd() -> Path:
    """The operator's DaskCluster CRD: from HOVERDASK_DASKCLUSTER_CRD, or the one the
    dask-kubernetes package ships (the `[k8s]` extra)."""
    if "HOVERDASK_DASKCLUSTER_CRD" in os.environ:
        return Path(os.environ["HOVERDASK_DASKCLUSTER_CRD"])
    package = pytest.importorskip("dask_kubernetes", reason="dask-kubernetes ships the CRD")
    crds = Path(package.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator"
    return crds / "crds" / "daskcluster.yaml"


def _schema_errors(value: object, schema: dict, where: str = "") -> list[str]:
    """What an API server with strict field validation would reject: unknown fields, wrong
    types, missing required fields (a structural OpenAPI v3 schema, as CRDs carry)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if schema.get("x-kubernetes-int-or-string") or schema.get("format") == "int-or-string":
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{where}: not an int or string"]
    kind = schema.get("type")
    python = {"object": dict, "array": list, "string": str, "boolean": bool,
              "integer": int, "number": int | float}.get(kind)  # fmt: skip
    if python and (not isinstance(value, python) or (kind in ("integer", "number") and
                                                     isinstance(value, bool))):  # fmt: skip
        return [f"{where}: {value!r} is not of type {kind}"]
    errors = []
    if kind == "array":
        for index, item in enumerate(value):  # type: ignore[arg-type]
            errors += _schema_errors(item, schema.get("items", {}), f"{where}[{index}]")
    if kind == "object":
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():  # type: ignore[union-attr]
            if properties and key in properties:
                errors += _schema_errors(item, properties[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                errors += _schema_errors(item, extra, f"{where}.{key}")
            elif properties is not None and extra is not True:
                errors.append(f"{where}.{key}: unknown field")
        errors += [f"{where}.{key}: required" for key in schema.get("required", [])
                   if key not in value]  # type: ignore[operator]  # fmt: skip
    return errors


def test_daskcluster_validates_against_the_operator_crd(manifests: dict[str, dict]) -> None:
    crd = yaml.safe_load(_daskcluster_crd().read_text())
    assert crd["spec"]["names"]["kind"] == "DaskCluster"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    cluster = manifests["DaskCluster"]
    assert cluster["apiVersion"] == f"{crd['spec']['group']}/v1"
    schema = version["schema"]["openAPIV3Schema"]
    assert _schema_errors({"spec": cluster["spec"]}, schema) == []
    broken = {"spec": {**cluster["spec"], "workers": {}}}  # the checker does catch a typo
    assert _schema_errors(broken, schema) == [".spec.workers: unknown field"]


# --- slurm -------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """dask-jobqueue creates the log directory relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_example_config_renders_the_expected_job_script(in_tmp: Path) -> None:
    raw = tomllib.loads(SLURM_EXAMPLE.read_text())
    config = load_slurm_config(SLURM_EXAMPLE)
    script = job_script(config)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    slurm = raw["slurm"]
    assert f"#SBATCH -p {slurm['partition']}" in directives
    assert f"#SBATCH -A {slurm['account']}" in directives
    assert f"#SBATCH -t {slurm['walltime']}" in directives
    assert f"#SBATCH --cpus-per-task={slurm['cores']}" in directives
    assert f"#SBATCH --gres=gpu:{slurm['gpus_per_job']}" in directives
    assert any(d.startswith("#SBATCH --mem=") for d in directives)
    for line in slurm["job_script_prologue"]:
        assert line in script.splitlines()
    worker_line = script.strip().splitlines()[-1].split()
    assert "distributed.cli.dask_worker" in worker_line
    assert _option(worker_line, "--resources") == "GPU=1"
    assert _option(worker_line, "--nthreads") == str(slurm["cores"])
    assert (in_tmp / slurm["log_directory"]).is_dir()


def test_several_gpus_per_job_start_one_worker_process_per_gpu(in_tmp: Path) -> None:
    config = dataclasses.replace(load_slurm_config(SLURM_EXAMPLE), gpus_per_job=4, cores=16)
    script = job_script(config)
    worker_line = script.strip().splitlines()[-1].split()
    assert "#SBATCH --gres=gpu:4" in script.splitlines()
    assert _option(worker_line, "--nworkers") == "4"
    assert _option(worker_line, "--nthreads") == "4"
    assert _option(worker_line, "--resources") == "GPU=1"


def test_cpu_only_jobs_ask_for_no_gpus(in_tmp: Path) -> None:
    config = dataclasses.replace(load_slurm_config(SLURM_EXAMPLE), gpus_per_job=0)
    assert "--gres" not in job_script(config)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_tls_config_reaches_the_worker_command(in_tmp: Path) -> None:
    from hoverdask.deploy.security import make_self_signed

    tls = make_self_signed(in_tmp / "tls")
    config = dataclasses.replace(
        load_slurm_config(SLURM_EXAMPLE), tls=(tls.ca_file, tls.cert_file, tls.key_file)
    )
    worker_line = job_script(config).strip().splitlines()[-1].split()
    assert worker_line[worker_line.index("distributed.cli.dask_worker") + 1].startswith("tls://")
    assert _option(worker_line, "--tls-ca-file") == str(tls.ca_file)
    assert _option(worker_line, "--protocol") == "tls://"


MINIMAL = {"partition": "gpu", "walltime": "01:00:00", "cores": 4, "memory": "16GB"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "missing the [slurm] section"),
        ({"slurm": {k: v for k, v in MINIMAL.items() if k != "partition"}}, "slurm.partition"),
        ({"slurm": {**MINIMAL, "walltime": "4h"}}, "slurm.walltime"),
        ({"slurm": {**MINIMAL, "memory": "lots"}}, "slurm.memory"),
        ({"slurm": {**MINIMAL, "cores": "4"}}, "slurm.cores must be an integer"),
        ({"slurm": {**MINIMAL, "gpus_per_job": -1}}, "slurm.gpus_per_job"),
        ({"slurm": MINIMAL, "adaptive": {"minimum_jobs": 0}}, "adaptive.minimum_jobs"),
        ({"slurm": {**MINIMAL, "queue": "gpu"}}, "unknown field(s) queue in [slurm]"),
        ({"slurm": MINIMAL, "adapt": {}}, "unknown section [adapt]"),
        (
            {"slurm": MINIMAL, "adaptive": {"minimum_jobs": 3, "maximum_jobs": 2}},
            "maximum_jobs (2) is below minimum_jobs (3)",
        ),
        ({"slurm": MINIMAL, "worker": {"resources": {"GPU": "one"}}}, "worker.resources"),
        ({"slurm": MINIMAL, "worker": {"threads": 8}}, "exceeds slurm.cores (4)"),
        ({"slurm": MINIMAL, "tls": {"ca_file": "ca.pem"}}, "tls.cert_file"),
        ({"slurm": {**MINIMAL, "job_script_prologue": "module load cuda"}}, "list of strings"),
    ],
)
def test_bad_config_names_the_field(raw: dict, message: str) -> None:
    with pytest.raises(HoverdaskError) as err:
        parse_slurm_config(raw, source="site.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("site.toml: ")


def test_minimal_config_defaults() -> None:
    config = parse_slurm_config({"slurm": MINIMAL})
    assert (config.gpus_per_job, config.processes, config.threads) == (1, 1, 4)
    assert (config.minimum_jobs, config.maximum_jobs) == (1, 1)
    assert config.worker_resources == {"GPU": 1}
    assert config.dashboard_address.startswith("127.0.0.1:")


def test_cli_prints_the_job_script(in_tmp: Path) -> None:
    result = CliRunner().invoke(app, ["cluster", "slurm", "--config", str(SLURM_EXAMPLE),
                                      "--print-script"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/usr/bin/env bash")
    assert "#SBATCH --gres=gpu:1" in result.output


def test_cli_bad_config_is_one_line_and_exit_2(in_tmp: Path) -> None:
    bad = in_tmp / "bad.toml"
    bad.write_text('[slurm]\npartition = "gpu"\n')
    result = CliRunner().invoke(app, ["cluster", "slurm", "--config", str(bad)])
    assert result.exit_code == 2
    assert "missing required field slurm.walltime" in result.output
    assert "Traceback" not in result.output


def test_slurm_scheduler_dashboard_listens_on_localhost_only(in_tmp: Path) -> None:
    from hoverdask.deploy.jobqueue import dashboard_link, slurm_cluster

    config = dataclasses.replace(parse_slurm_config({"slurm": MINIMAL}),
                                 dashboard_address="127.0.0.1:0")  # fmt: skip
    cluster = slurm_cluster(config)
    try:
        port = cluster.scheduler.http_server.port
        assert _listening_hosts(port) == {"127.0.0.1"}
        assert dashboard_link(cluster, config) == f"http://127.0.0.1:{port}/status"
    finally:
        cluster.close()


def test_started_cluster_submits_its_minimum_jobs(in_tmp: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The start path with adaptive scaling, against stand-in sbatch/scancel commands that keep
    the scripts they are given."""
    import time

    from hoverdask.deploy.jobqueue import start_slurm_cluster

    bin_dir = in_tmp / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "sbatch": 'cp "$1" "$JOBS/job-$(date +%s%N).sh"\necho "Submitted batch job 4242"',
        "scancel": 'echo "$@" >> "$JOBS/cancelled"',
    }
    for name, body in stand_ins.items():
        command = bin_dir / name
        command.write_text(f"#!/bin/sh\n{body}\n")
        command.chmod(0o755)
    jobs = in_tmp / "jobs"
    jobs.mkdir()
    monkeypatch.setenv("JOBS", str(jobs))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = dataclasses.replace(load_slurm_config(SLURM_EXAMPLE), minimum_jobs=2,
                                 maximum_jobs=3, dashboard_address="127.0.0.1:0")  # fmt: skip
    cluster = start_slurm_cluster(config)
    try:
        deadline = time.monotonic() + 30
        while len(list(jobs.glob("job-*.sh"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        cluster.close()
    scripts = [p.read_text() for p in jobs.glob("job-*.sh")]
    assert len(scripts) == 2  # adaptive scaling asked for the minimum, not the maximum
    assert all("#SBATCH --gres=gpu:1" in script for script in scripts)
    assert all(cluster.scheduler_address in script for script in scripts)
    assert "4242" in (jobs / "cancelled").read_text()  # closing cancels the jobs


def _listening_hosts(port: int, pid: int | None = None) -> set[str]:
    import psutil

    connections = psutil.Process(pid or os.getpid()).net_connections(kind="inet")
    return {c.laddr.ip for c in connections if c.status == "LISTEN" and c.laddr.port == port}


# --- the multi-process path on localhost --------------------------------------------------------


def start_process(args: list[str], log: Path) -> subprocess.Popen:
    """Start a Dask process that can import the test modules (tasks may live there)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    handle = log.open("w")
    return subprocess.Popen(
        args, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent, env=env
    )


def wait_for_file(path: Path, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path.name} not written; log:\n{log.read_text()}")
        time.sleep(0.2)


@pytest.fixture
def process_cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A scheduler and two `GPU=1` workers, each its own OS process, as on separate hosts."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = start_process(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
        tmp_path / "scheduler.log",
    )  # fmt: skip
    processes = [scheduler]
    try:
        wait_for_file(scheduler_file, scheduler, tmp_path / "scheduler.log")
        address = json.loads(scheduler_file.read_text())["address"]
        for index in range(2):
            processes.append(
                start_process(
                    [sys.executable, "-m", "distributed.cli.dask_worker", address,
                     "--host", "127.0.0.1", "--nthreads", "1", "--resources", "GPU=1",
                     "--name", f"gpu-{index}", "--no-dashboard", "--no-nanny"],
                    tmp_path / f"worker-{index}.log",
                )
            )  # fmt: skip
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield str(scheduler_file), processes
    finally:
        stop_processes(processes[1:])  # workers first: a worker closing while its scheduler goes may hang
        stop_processes(processes[:1])


def stop_processes(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _pid_after(seconds: float) -> int:
    import time

    time.sleep(seconds)
    return os.getpid()


@pytest.mark.slow
def test_scheduler_and_workers_as_separate_processes(
    process_cluster: tuple[str, list[subprocess.Popen]],
) -> None:
    from hoverdask.deploy.cluster import describe, make_client

    scheduler_file, processes = process_cluster
    client = make_client(scheduler=scheduler_file, quiet=True)
    try:
        info = describe(client)
        assert (info.n_workers, info.gpu_workers) == (2, 2)
        # four half-second tasks that each hold the only GPU slot of a worker: both workers work
        futures = client.map(_pid_after, [0.5] * 4, pure=False, resources={"GPU": 1})
        pids = set(client.gather(futures))
        assert pids == {p.pid for p in processes[1:]}
        assert os.getpid() not in pids
    finally:
        client.close()


@pytest.mark.slow
def test_run_cohort_through_an_external_gpu_cluster(
    process_cluster: tuple[str, list[subprocess.Popen]], tmp_path: Path
) -> None:
    """`hoverdask run --scheduler FILE`: inference tasks ask for GPU=1 (the workers offer it) and
    the nuclei equal whole-map post-processing of the same maps."""
    import geopandas as gpd
    import numpy as np

    from hoverdask.pipeline import maps_store, nuclei_from_maps
    from hoverdask.pipeline.predictors import ArrayPredictorFactory
    from hoverdask.pipeline.run import RunOptions, run_cohort
    from hoverdask.slide.synthetic import synthetic_pred_map, write_synthetic_slide

    scheduler_file, _ = process_cluster
    size, nr_types = 328, 6
    slide = tmp_path / "slide.svs"
    write_synthetic_slide(slide, size, size, mpp=0.25, seed=3, keep_instances=False)
    maps = synthetic_pred_map(size, size, nr_types, seed=3)
    np.save(tmp_path / "maps.npy", maps)
    factory = ArrayPredictorFactory(str(tmp_path / "maps.npy"), margin=46, output=164,
                                    nr_types=nr_types)  # fmt: skip
    result = run_cohort([slide], tmp_path / "out", predictor_factory=factory,
                        scheduler=scheduler_file, progress=False,
                        options=RunOptions(chunk_size=164, tissue_mask=False))  # fmt: skip
    assert result.slides[0].status == "ok", result.slides[0].error
    names = maps_store.channel_names(nr_types)
    stored = np.stack([maps_store.dequantise(n, maps_store.quantise(n, maps[..., i]))
                       for i, n in enumerate(names)], axis=-1)  # fmt: skip
    want = nuclei_from_maps(stored, size, nr_types)
    got = gpd.read_parquet(tmp_path / "out" / "slide" / "nuclei.parquet")
    assert len(want) > 20
    assert sorted(got["nucleus_id"]) == sorted(want["nucleus_id"])
    assert sorted(got["area_px"]) == sorted(want["area_px"])


def test_importing_dask_jobqueue_leaves_ctrl_c_to_us() -> None:
    """dask-jobqueue makes SIGINT call sys.exit() on import; an interrupted `hoverdask run
    --slurm` would then exit 0. In a fresh process, since the import happens only once."""
    # the probe starts from Python's own handler, also when the suite runs with SIGINT ignored
    probe = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "from hoverdask.deploy.jobqueue import _import_slurm_cluster\n"
             "_import_slurm_cluster()\n"
             "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
