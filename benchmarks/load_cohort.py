"""Load test: a cohort of small synthetic slides through a 2-worker cluster, with bounded memory.

Runs `run_cohort` on N slides (default: 10, then 50) with the replay predictor (known maps, no
network, so the figures are the pipeline's own: reading, post-processing, writing, scheduling)
and samples the resident memory of the client process and of every worker process four times a
second. Memory is bounded when the peaks do not grow with the number of slides.

    python benchmarks/load_cohort.py                         # 10 and 50 slides, 2 workers
    python benchmarks/load_cohort.py --slides 50 --workers 2 --size 1024 --chunk 328
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np
import psutil

MIB = 2**20


class RssSampler:
    """Peak RSS of this process and, separately, of each of its child processes (the workers)."""

    def __init__(self, every: float = 0.25) -> None:
        self.every = every
        self.client_peak = 0
        self.worker_peaks: dict[int, int] = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss
            self.client_peak = max(self.client_peak, total)
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                self.worker_peaks[child.pid] = max(self.worker_peaks.get(child.pid, 0), rss)
                total += rss
            self.total_peak = max(self.total_peak, total)
            self._stop.wait(self.every)


def make_cohort(folder: Path, count: int, size: int) -> tuple[list[Path], Path]:
    from hoverdask.slide.synthetic import synthetic_pred_map, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    slides = []
    for index in range(count):
        slides.append(folder / f"slide-{index:03d}.svs")
        write_synthetic_slide(slides[-1], size, size, mpp=0.25, seed=index, keep_instances=False)
    maps = folder / "maps.npy"
    np.save(maps, synthetic_pred_map(size, size, 6, seed=0))
    return slides, maps


def run_once(slides: list[Path], maps: Path, out: Path, workers: int, threads: int,
             chunk: int) -> dict[str, float]:  # fmt: skip
    from hoverdask.deploy.cluster import make_client
    from hoverdask.pipeline.predictors import ArrayPredictorFactory
    from hoverdask.pipeline.run import RunOptions, run_cohort

    factory = ArrayPredictorFactory(str(maps), margin=46, output=164, nr_types=6)
    options = RunOptions(chunk_size=chunk, tissue_mask=False)
    client = make_client(workers, threads, device="cpu", quiet=True, dashboard=False)
    try:
        with RssSampler() as rss:
            started = time.perf_counter()
            result = run_cohort(slides, out, predictor_factory=factory, client=client,
                                options=options, progress=False)  # fmt: skip
            wall = time.perf_counter() - started
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    ok = [s for s in result.slides if s.status == "ok"]
    if len(ok) != len(slides):
        failed = {s.slide_id: s.error for s in result.slides if s.status != "ok"}
        raise SystemExit(f"{len(slides) - len(ok)} slides failed: {failed}")
    workers_peak = sorted(rss.worker_peaks.values(), reverse=True)[:workers]
    return {
        "slides": len(slides),
        "wall_s": round(wall, 1),
        "slides_per_min": round(60 * len(slides) / wall, 1),
        "nuclei": sum(s.nuclei for s in ok),
        "client_peak_mib": round(rss.client_peak / MIB),
        "worker_peak_mib": [round(p / MIB) for p in workers_peak],
        "total_peak_mib": round(rss.total_peak / MIB),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--size", type=int, default=1024, help="slide width = height (px)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--chunk", type=int, default=328, help="map tile size (px)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hoverdask-load-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        slides, maps = make_cohort(folder / "slides", max(args.slides), args.size)
        print(f"made {len(slides)} slides of {args.size}x{args.size} px "
              f"in {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        for count in args.slides:
            row = run_once(slides[:count], maps, folder / f"out-{count}", args.workers,
                           args.threads, args.chunk)  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
