"""CPU scaling and memory of the pipeline: 1 vs 2 Dask workers, peak RSS against slide size.

    python benchmarks/scaling.py [--size 2048] [--chunk 512] [--memory-sizes 2048 4096]

The network is replaced by a stub that replays a synthetic ``[tp, np, h, v]`` map (periodic, so
it needs no memory that grows with the slide), so what is timed is the pipeline's own CPU work:
reading, the three post-processing passes, features and writing. Every measurement runs in a
fresh Python process with a fresh LocalCluster, so peak RSS (``ru_maxrss``) is that run's alone.
Prints the speed-up of 2 workers over 1 and the peak RSS of the workers and of the client for
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


def measure_once(size: int, workers: int, chunk: int) -> dict[str, float]:
    """One timed ``run_cohort`` on a fresh ``size``² synthetic slide and a fresh cluster."""
    from hoverdask.cluster import make_client
    from hoverdask.pipeline.run import RunOptions, run_cohort
    from hoverdask.synth import write_synthetic_slide

    with tempfile.TemporaryDirectory(prefix="hoverdask-scaling-") as scratch_dir:
        scratch = Path(scratch_dir)
        slide = scratch / "slide.svs"
        write_synthetic_slide(slide, size, size, mpp=0.25, seed=0, keep_instances=False)
        client = make_client(workers, 1, device="cpu", quiet=True, dashboard=False)
        try:
            client.run(_max_rss_mib)  # workers are up before the clock starts
            start = time.perf_counter()
            result = run_cohort([slide], scratch / "out", predictor_factory=PeriodicMapFactory(),
                                client=client, options=RunOptions(device="cpu", chunk_size=chunk),
                                progress=False)
            seconds = time.perf_counter() - start
            worker_rss = list(client.run(_max_rss_mib).values())
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
    outcome = result.slides[0]
    if outcome.status != "ok":
        raise SystemExit(f"run failed: {outcome.error}")
    return {"size": size, "workers": workers, "seconds": seconds, "nuclei": outcome.nuclei,
            "worker_peak_rss_mib": max(worker_rss), "client_peak_rss_mib": _max_rss_mib()}


def _in_child(size: int, workers: int, chunk: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(size), str(workers), str(chunk)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="slide side for the speed-up")
    parser.add_argument("--chunk", type=int, default=512, help="pipeline chunk size")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many per setting")
    parser.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_once(*args.child)))
        return

    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for workers in (1, 2):  # interleaved, so that a change in machine load hits both
            run = _in_child(args.size, workers, args.chunk)
            best[workers] = min(best.get(workers, float("inf")), run["seconds"])
            print(f"{args.size}² slide, {workers} worker(s) x 1 thread: {run['seconds']:.1f} s, "
                  f"{run['nuclei']} nuclei", flush=True)
    mpix = args.size**2 / 1e6
    for workers, seconds in sorted(best.items()):
        print(f"best {workers} worker(s): {seconds:.1f} s = {mpix / seconds:.3f} Mpx/s")
    print(f"speed-up 2 workers / 1 worker: {best[1] / best[2]:.2f}x")

    for size in args.memory_sizes:
        run = _in_child(size, 2, args.chunk)
        print(f"{size}² slide, 2 workers: {run['seconds']:.1f} s; peak RSS worker "
              f"{run['worker_peak_rss_mib']:.0f} MiB, client {run['client_peak_rss_mib']:.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
