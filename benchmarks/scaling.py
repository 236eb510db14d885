"""CPU scaling and memory of the pipeline: 1 vs 2 Dask workers, peak RSS against slide size.

    python benchmarks/scaling.py [--size 2048] [--slides 3] [--chunk 512] [--memory-sizes 2048 4096]
    python benchmarks/scaling.py --network [--size 656] [--chunk 328]
    python benchmarks/scaling.py --model default --size 1792 --chunk 896 --slides 4 \
        --memory-sizes 1792 3584 --repeats 1
    python benchmarks/scaling.py --model default --size 3584 --chunk 896 --slides 4 \
        --memory-sizes 1792 3584 --repeats 2

The network is replaced by a stub that replays a synthetic ``[tp, np, h, v]`` map (periodic, so
it needs no memory that grows with the slide), so what is timed is the pipeline's own CPU work:
reading, the three post-processing passes, features and writing. With ``--model`` (a checkpoint,
or ``default`` for the bundled hoverdask-lite) that network runs on every tile instead of the
stub, for the cohort speed-up and the memory runs alike. With ``--network`` the real
fast HoVer-Net (random weights, every tile processed) runs instead, on a small slide: the CPU
work of a real CPU run, which the network dominates. Slides are written first;
every measurement runs in a fresh Python process (the client) with a fresh LocalCluster. Peak RSS
is Linux's ``VmHWM`` of each process image: ``ru_maxrss`` would also count the parent that wrote
the slides, since it survives fork and exec.
Prints the speed-up of 2 workers over 1 for one slide and for a cohort of ``--slides`` slides (with
the summed seconds of the Dask tasks per stage, from run.json: what is not in them ran on the
client or waited; and the workers' idle seconds before their first task, between tasks and
after their last, from Dask's task stream), and the peak RSS of the workers and of the client
for each slide size (flat in slide size is the goal). No assertions: figures only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PERIOD = 1024  # side of the replayed map; nuclei cut by its edges are fine for timing
NR_TYPES = 6
MARGIN, OUTPUT = 46, 164  # the fast network's geometry


class PeriodicMapPredictor:
    """``predict_tile`` that returns a window of one periodic synthetic map, whatever the pixels."""

    def __init__(self, maps: np.ndarray) -> None:
        self.maps = maps
        self.margin, self.output, self.nr_types = MARGIN, OUTPUT, NR_TYPES

    def predict_tile(self, window: np.ndarray, tile_origin_yx: tuple[int, int]) -> np.ndarray:
        height = window.shape[0] - 2 * self.margin
        width = window.shape[1] - 2 * self.margin
        y, x = tile_origin_yx
        rows = np.arange(y, y + height) % PERIOD
        cols = np.arange(x, x + width) % PERIOD
        return self.maps[np.ix_(rows, cols)]


@dataclass(frozen=True)
class PeriodicMapFactory:
    seed: int = 3

    def __call__(self) -> PeriodicMapPredictor:
        from hoverdask.slide.synthetic import synthetic_pred_map

        return PeriodicMapPredictor(synthetic_pred_map(PERIOD, PERIOD, NR_TYPES, seed=self.seed))


def _max_rss_mib() -> float:
    """Peak resident memory of this process image (``VmHWM``), MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def measure_once(slides: list[Path], workers: int, chunk: int, model: str | None = None
                 ) -> dict[str, Any]:
    """One timed ``run_cohort`` of ``slides`` on a fresh cluster (this process is the client)."""
    from distributed import get_task_stream

    from hoverdask.deploy.cluster import make_client
    from hoverdask.pipeline.run import RunOptions, run_cohort

    with tempfile.TemporaryDirectory(prefix="hoverdask-scaling-") as scratch_dir:
        scratch = Path(scratch_dir)
        client = make_client(workers, 1, device="cpu", quiet=True, dashboard=False)
        try:
            client.run(_max_rss_mib)  # workers are up before the clock starts
            start, wall_start = time.perf_counter(), time.time()
            options = RunOptions(device="cpu", chunk_size=chunk, tissue_mask=model is None)
            with get_task_stream(client) as stream:
                result = run_cohort(slides, scratch / "out", model=model,
                                    predictor_factory=None if model else PeriodicMapFactory(),
                                    client=client, options=options, progress=False)
            seconds = time.perf_counter() - start
            idle = worker_idle(stream.data, wall_start, wall_start + seconds)
            worker_rss = list(client.run(_max_rss_mib).values())
            task_seconds: dict[str, float] = {}
            for record in (scratch / "out").glob("*/run.json"):
                for name, value in json.loads(record.read_text())["timings_s"].items():
                    task_seconds[name] = task_seconds.get(name, 0.0) + value
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
    failed = [s.error for s in result.slides if s.status != "ok"]
    if failed:
        raise SystemExit(f"run failed: {failed[0]}")
    task_seconds.pop("wall", None)
    return {"workers": workers, "seconds": seconds,
            "nuclei": sum(s.nuclei for s in result.slides),
            "task_seconds": task_seconds, "idle": idle,
            "worker_peak_rss_mib": max(worker_rss), "client_peak_rss_mib": _max_rss_mib()}


def worker_idle(tasks: list[dict[str, Any]], begin: float, end: float) -> dict[str, float]:
    """Seconds the worker threads sat idle during the run, summed over workers (one thread
    each): before their first task, between tasks, after their last one."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for task in tasks:
        for part in task.get("startstops", ()):
            if part.get("action") == "compute":
                spans.setdefault(task["worker"], []).append((part["start"], part["stop"]))
    idle = {"before_first": 0.0, "between": 0.0, "after_last": 0.0}
    for runs in spans.values():
        runs.sort()
        idle["before_first"] += max(runs[0][0] - begin, 0.0)
        idle["after_last"] += max(end - max(stop for _, stop in runs), 0.0)
        reach = runs[0][1]
        for run_start, run_stop in runs[1:]:
            idle["between"] += max(run_start - reach, 0.0)
            reach = max(reach, run_stop)
    return idle


def _brief(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_s')} {value:.1f}" for name, value in seconds.items())


def _in_child(slides: list[Path], workers: int, chunk: int, model: str | None = None
              ) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(workers), str(chunk), model or "-",
               *map(str, slides)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, help="slide side for the speed-up (2048; 656 with "
                        "--network)")
    parser.add_argument("--slides", type=int, default=3, help="slides in the cohort speed-up")
    parser.add_argument("--network", action="store_true",
                        help="run the real fast network (random weights) instead of the stub")
    parser.add_argument("--model", help="a checkpoint, or 'default' (the bundled model), run "
                        "instead of the stub")
    parser.add_argument("--chunk", type=int, help="pipeline chunk size (512; 328 with --network)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many per setting")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (656 if args.network else 2048)
    args.chunk = args.chunk or (328 if args.network else 512)
    if args.child:
        workers, chunk, model, *slides = args.child
        print(json.dumps(measure_once([Path(s) for s in slides], int(workers), int(chunk),
                                      None if model == "-" else model)))
        return
    if args.model == "default":
        from hoverdask.model.catalog import default_model_path

        args.model = str(default_model_path())
    with tempfile.TemporaryDirectory(prefix="hoverdask-scaling-slides-") as folder:
        run_all(args, Path(folder))


def _slide(folder: Path, size: int, seed: int = 0) -> Path:
    """A synthetic slide, written here, outside the measured processes."""
    from hoverdask.slide.synthetic import write_synthetic_slide

    path = folder / f"slide-{size}-{seed}.svs"
    if not path.exists():
        write_synthetic_slide(path, size, size, mpp=0.25, seed=seed, keep_instances=False)
    return path


def run_network(args: argparse.Namespace, folder: Path) -> None:
    """1 vs 2 workers on one slide with the real network: the CPU work of a CPU run."""
    import torch

    from hoverdask.model.checkpoints import save_checkpoint
    from hoverdask.model.network import HoVerNet

    torch.manual_seed(0)
    model = str(save_checkpoint(HoVerNet("fast", NR_TYPES), folder / "net.tar"))
    slide = [_slide(folder, args.size)]
    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for workers in (1, 2):
            run = _in_child(slide, workers, args.chunk, model)
            best[workers] = min(best.get(workers, float("inf")), run["seconds"])
            print(f"network, {args.size}² slide, {workers} worker(s) x 1 thread: "
                  f"{run['seconds']:.1f} s ({_brief(run['task_seconds'])})", flush=True)
    print(f"network: speed-up 2 workers / 1 worker: {best[1] / best[2]:.2f}x", flush=True)


def run_all(args: argparse.Namespace, folder: Path) -> None:
    if args.network:
        run_network(args, folder)
        return
    single = [_slide(folder, args.size)]
    cohort = [_slide(folder, args.size, seed) for seed in range(args.slides)]
    mpix = args.size**2 / 1e6
    for label, slides in (("1 slide", single), (f"cohort of {len(cohort)}", cohort)):
        best: dict[int, float] = {}
        for _ in range(args.repeats):
            for workers in (1, 2):  # interleaved, so that a change in machine load hits both
                run = _in_child(slides, workers, args.chunk, args.model)
                best[workers] = min(best.get(workers, float("inf")), run["seconds"])
                tasks = sum(run["task_seconds"].values())
                print(f"{label} of {args.size}², {workers} worker(s) x 1 thread: "
                      f"{run['seconds']:.1f} s, {run['nuclei']} nuclei; task seconds {tasks:.1f} "
                      f"({_brief(run['task_seconds'])}); worker idle s: "
                      f"{_brief(run['idle'])}", flush=True)
        for workers, seconds in sorted(best.items()):
            print(f"{label}: best {workers} worker(s): {seconds:.1f} s = "
                  f"{mpix * len(slides) / seconds:.3f} Mpx/s")
        print(f"{label}: speed-up 2 workers / 1 worker: {best[1] / best[2]:.2f}x", flush=True)

    for size in args.memory_sizes:
        run = _in_child([_slide(folder, size)], 2, args.chunk, args.model)
        print(f"{size}² slide, 2 workers: {run['seconds']:.1f} s; peak RSS worker "
              f"{run['worker_peak_rss_mib']:.0f} MiB, client {run['client_peak_rss_mib']:.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
