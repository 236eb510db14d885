"""CPU scaling and memory of the pipeline: 1 vs 2 Dask workers, peak RSS against slide size.

    python benchmarks/scaling.py [--size 2048] [--chunk 512] [--memory-sizes 2048 4096]

The network is replaced by a stub that replays a synthetic ``[tp, np, h, v]`` map (periodic, so
it needs no memory that grows with the slide), so what is timed is the pipeline's own CPU work:
reading, the three post-processing passes, features and writing. Slides are written first;
every measurement runs in a fresh Python process (the client) with a fresh LocalCluster, so peak
RSS (``ru_maxrss``) is that run's alone.
Prints the speed-up of 2 workers over 1 (with the summed seconds of the Dask tasks per stage,
from run.json: what is not in them ran on the client) and the peak RSS of the workers and of the client for
each slide size (flat in slide size is the goal). No assertions: figures only.
"""

from __future__ import annotations

import argparse
import json
import resource
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
        from hoverdask.postproc.synthetic import synthetic_pred_map

        return PeriodicMapPredictor(synthetic_pred_map(PERIOD, PERIOD, NR_TYPES, seed=self.seed))


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_once(slide: Path, workers: int, chunk: int) -> dict[str, Any]:
    """One timed ``run_cohort`` of ``slide`` on a fresh cluster (this process is the client)."""
    from hoverdask.cluster import make_client
    from hoverdask.pipeline.run import RunOptions, run_cohort

    with tempfile.TemporaryDirectory(prefix="hoverdask-scaling-") as scratch_dir:
        scratch = Path(scratch_dir)
        client = make_client(workers, 1, device="cpu", quiet=True, dashboard=False)
        try:
            client.run(_max_rss_mib)  # workers are up before the clock starts
            start = time.perf_counter()
            result = run_cohort([slide], scratch / "out", predictor_factory=PeriodicMapFactory(),
                                client=client, options=RunOptions(device="cpu", chunk_size=chunk),
                                progress=False)
            seconds = time.perf_counter() - start
            worker_rss = list(client.run(_max_rss_mib).values())
            (record,) = (scratch / "out").glob("*/run.json")
            task_seconds = json.loads(record.read_text())["timings_s"]
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
    outcome = result.slides[0]
    if outcome.status != "ok":
        raise SystemExit(f"run failed: {outcome.error}")
    task_seconds.pop("wall", None)
    return {"workers": workers, "seconds": seconds, "nuclei": outcome.nuclei,
            "task_seconds": task_seconds,
            "worker_peak_rss_mib": max(worker_rss), "client_peak_rss_mib": _max_rss_mib()}


def _brief(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_s')} {value:.1f}" for name, value in seconds.items())


def _in_child(slide: Path, workers: int, chunk: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(slide), str(workers), str(chunk)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="slide side for the speed-up")
    parser.add_argument("--chunk", type=int, default=512, help="pipeline chunk size")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many per setting")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        slide, workers, chunk = args.child
        print(json.dumps(measure_once(Path(slide), int(workers), int(chunk))))
        return
    with tempfile.TemporaryDirectory(prefix="hoverdask-scaling-slides-") as folder:
        run_all(args, Path(folder))


def _slide(folder: Path, size: int) -> Path:
    """The synthetic slide, written here, outside the measured processes."""
    from hoverdask.synth import write_synthetic_slide

    path = folder / f"slide-{size}.svs"
    if not path.exists():
        write_synthetic_slide(path, size, size, mpp=0.25, seed=0, keep_instances=False)
    return path


def run_all(args: argparse.Namespace, folder: Path) -> None:

    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for workers in (1, 2):  # interleaved, so that a change in machine load hits both
            run = _in_child(_slide(folder, args.size), workers, args.chunk)
            best[workers] = min(best.get(workers, float("inf")), run["seconds"])
            tasks = sum(run["task_seconds"].values())
            print(f"{args.size}² slide, {workers} worker(s) x 1 thread: {run['seconds']:.1f} s, "
                  f"{run['nuclei']} nuclei; task seconds {tasks:.1f} "
                  f"({_brief(run['task_seconds'])})", flush=True)
    mpix = args.size**2 / 1e6
    for workers, seconds in sorted(best.items()):
        print(f"best {workers} worker(s): {seconds:.1f} s = {mpix / seconds:.3f} Mpx/s")
    print(f"speed-up 2 workers / 1 worker: {best[1] / best[2]:.2f}x")

    for size in args.memory_sizes:
        run = _in_child(_slide(folder, size), 2, args.chunk)
        print(f"{size}² slide, 2 workers: {run['seconds']:.1f} s; peak RSS worker "
              f"{run['worker_peak_rss_mib']:.0f} MiB, client {run['client_peak_rss_mib']:.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
