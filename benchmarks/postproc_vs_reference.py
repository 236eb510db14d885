"""The pipeline's post-processing against the reference algorithm, on the same maps, one core.

    python benchmarks/postproc_vs_reference.py [--pairs 5] [--tiles 1]

Maps: the parity WSI fixture (1000x1400, dequantised), tiled ``--tiles`` x ``--tiles`` times;
RGB: random pixels of the same size (the features' cost does not depend on what they show).

* ``reference``: ``hoverdask.nuclei.postproc.process(maps, 6)``, the reference algorithm
  (``method="reference"``): instance map and per-nucleus records.
* ``pipeline``: what a slide's blocks run after inference, on blocks of the run's default
  chunk size: passes 1-2 (slide-wide ranges), pass 3 (seam-stable watershed and ownership)
  and the per-nucleus features (``measure``), with dask's synchronous scheduler.

One untimed run of each side comes first (imports, loading the compiled flood: a worker pays
that once). Each side is timed from the maps to its own output (the reference's instance map and records,
the pipeline's nuclei table with features); turning both into comparable outlines for the check
is not timed. Timings are CPU seconds of this process (steadier than wall time on a shared
machine), taken in ``--pairs`` alternating pairs; the median pair ratio is printed with min and
max, and Mpx/s per core for each side. The nuclei must be identical: the script checks that
both give the same outlines, centroids and types (as ``tests/test_seams.py`` compares them) and
stops if not.
No thread pools: torch, BLAS and OpenCV are held to one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import dask
import geopandas as gpd
import numpy as np

from hoverdask.nuclei.features import measure
from hoverdask.nuclei.postproc import process
from hoverdask.nuclei.seams import contour_polygon
from hoverdask.pipeline.local import nuclei_from_maps
from hoverdask.pipeline.spec import DEFAULT_CHUNK_SIZE
from hoverdask.slide.synthetic import dequantised_pred_map

FIXTURE = Path(__file__).resolve().parents[1] / "tests/data/parity/wsi_synth_input.npz"
NR_TYPES = 6


def load_maps(tiles: int) -> np.ndarray:
    with np.load(FIXTURE) as stored:
        return np.tile(dequantised_pred_map(stored), (tiles, tiles, 1))


def reference(maps: np.ndarray) -> dict:
    return process(maps, NR_TYPES)[1]


def reference_nuclei(info: dict) -> list[tuple]:
    return sorted(
        (_outline(contour_polygon(rec["contour"] + 0.5)[0]), rec["centroid"][0] + 0.5,
         rec["centroid"][1] + 0.5, rec["type"])
        for rec in info.values()
    )


def pipeline(maps: np.ndarray, rgb: np.ndarray) -> gpd.GeoDataFrame:
    table = nuclei_from_maps(maps, DEFAULT_CHUNK_SIZE, NR_TYPES)
    return measure(table, rgb, 0.25)


def pipeline_nuclei(table: gpd.GeoDataFrame) -> list[tuple]:
    assert table["area_um2"].notna().all()
    return sorted(
        (_outline(p), cx, cy, t)
        for p, cx, cy, t in zip(table.geometry, table["centroid_x"], table["centroid_y"],
                                table["type"], strict=True)
    )


def _outline(polygon) -> tuple[float, ...]:
    return tuple(np.asarray(polygon.exterior.coords)[:-1].ravel())


def cpu_seconds(run: Callable[[], object]) -> tuple[float, object]:
    start = time.process_time()
    result = run()
    return time.process_time() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--tiles", type=int, default=1)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    maps = load_maps(args.tiles)
    height, width = maps.shape[:2]
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    mpix = height * width / 1e6
    ref_s, ours_s = [], []
    with dask.config.set(scheduler="synchronous"):
        reference(maps), pipeline(maps, rgb)  # untimed: imports and loading compiled code
        for pair in range(args.pairs):
            order = ("ref", "ours") if pair % 2 == 0 else ("ours", "ref")
            for side in order:
                if side == "ref":
                    seconds, info = cpu_seconds(lambda: reference(maps))
                    ref_s.append(seconds)
                else:
                    seconds, table = cpu_seconds(lambda: pipeline(maps, rgb))
                    ours_s.append(seconds)
            want, got = reference_nuclei(info), pipeline_nuclei(table)
            if got != want:
                raise SystemExit("the pipeline's nuclei differ from the reference's")
    ratios = [r / o for r, o in zip(ref_s, ours_s, strict=True)]
    print(f"map {height}x{width} ({mpix:.2f} Mpx), {len(want)} nuclei, identical: yes")
    print(f"reference (process):          median {statistics.median(ref_s):.3f} s CPU, "
          f"{mpix / statistics.median(ref_s):.2f} Mpx/s per core")
    print(f"pipeline (passes 1-3 + features): median {statistics.median(ours_s):.3f} s CPU, "
          f"{mpix / statistics.median(ours_s):.2f} Mpx/s per core")
    print(f"speed-up over the reference: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}; {args.pairs} pairs)")


if __name__ == "__main__":
    main()
