"""Per-core throughput of the post-processing block tasks (pass 2 ``sobel_block``, pass 3
``nuclei_block``), run as the pipeline runs them, one after the other in this process.

    python benchmarks/block_task.py [--repeats 3] [--chunk 512] [--baseline REV]

Two slides: a synthetic 2048x2048 map (``postproc.synthetic.synthetic_pred_map``) and the parity
WSI fixture's maps (1000x1400), each written to a real map cache (Zarr) under a plan made from a
synthetic slide of the same size (its RGB feeds the features). The tasks read the cache, segment,
build polygons, measure and write their part files, as in a run. Throughput is processed map
pixels (block cores) per CPU second of the tasks (``time.process_time``, which a busy shared
machine disturbs far less than wall time): Mpx/s per core. The segmentation / features split is
the tasks' own wall-clock split (``postprocess_s`` / ``features_s`` of their markers).

``--baseline REV`` also runs the same measurement with the package as of git revision ``REV``
(extracted to a temporary folder), interleaved with the working tree, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "parity" / "wsi_synth_input.npz"
NR_TYPES = 6
OUTPUT, MARGIN = 164, 46  # the fast network's geometry, which sizes the map tiles
# what distributed's nannies set for their workers (pre-spawn-environ): one BLAS/OpenMP thread;
# measured without it, a (N, 3) x (3, 3) product can spin for 30-90 ms on a busy 2-core machine
WORKER_ENVIRON = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def load_maps(name: str) -> np.ndarray:
    from hoverdask.slide.synthetic import dequantised_pred_map, synthetic_pred_map

    if name == "wsi":
        with np.load(FIXTURE) as data:
            return dequantised_pred_map(data)
    return synthetic_pred_map(2048, 2048, NR_TYPES, seed=3)


def prepare(name: str, folder: Path, chunk: int) -> Any:
    """A plan over a synthetic slide of the maps' size, with the maps in its cache."""
    from hoverdask.pipeline import maps_store
    from hoverdask.pipeline.plan import plan_slide
    from hoverdask.slide.synthetic import write_synthetic_slide

    maps = load_maps(name)
    height, width = maps.shape[:2]
    slide = folder / f"{name}.svs"
    write_synthetic_slide(slide, width, height, mpp=0.25, seed=1, keep_instances=False)
    plan, _ = plan_slide(str(slide), folder / "out", mpp=None, target_mpp=0.25,
                         chunk_size=chunk, output=OUTPUT, margin=MARGIN, use_tissue_mask=False)
    store = plan.ledger.maps_store
    tile = plan.grid.tile
    maps_store.create_store(store, (height, width), tile, NR_TYPES)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            maps_store.write_tile(store, y, x, maps[y : y + tile, x : x + tile], NR_TYPES)
    return plan


def hv_of(plan: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    from hoverdask.nuclei.stable import value_range
    from hoverdask.pipeline import maps_store

    height, width = plan.grid.blocks.height, plan.grid.blocks.width
    whole = maps_store.read_window(plan.ledger.maps_store, 0, 0, height, width, NR_TYPES)
    return value_range(whole[..., -2]), value_range(whole[..., -1])


def run_passes(plan: Any) -> dict[str, float]:
    """CPU seconds of pass 2 and pass 3 over every block (committed parts removed first)."""
    from hoverdask.pipeline import postprocess

    work = plan.ledger.work
    for stage in ("sobel", "blocks"):
        shutil.rmtree(work / stage, ignore_errors=True)
    blocks = list(postprocess.block_grid(plan).blocks())
    hv = hv_of(plan)
    cpu, wall = time.process_time(), time.perf_counter()
    sobel = [postprocess.sobel_block(plan, b, hv, NR_TYPES) for b in blocks]
    pass2, pass2_wall = time.process_time() - cpu, time.perf_counter() - wall
    ranges = postprocess.slide_norm_ranges(hv, sobel, False)
    cpu, wall = time.process_time(), time.perf_counter()
    summaries = [postprocess.nuclei_block(plan, b, ranges, NR_TYPES) for b in blocks]
    pass3, pass3_wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "pass2_s": pass2,
        "pass3_s": pass3,
        "pass2_wall_s": pass2_wall,
        "pass3_wall_s": pass3_wall,
        "segment_s": sum(s["postprocess_s"] for s in summaries),
        "features_s": sum(s["features_s"] for s in summaries),
        "nuclei": sum(s["nuclei"] for s in summaries),
        "fragments": sum(len(s["fragments"]) for s in summaries),
    }


def measure(name: str, chunk: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hoverdask-block-task-") as scratch:
        plan = prepare(name, Path(scratch), chunk)
        runs = [run_passes(plan) for _ in range(repeats)]
    best = {key: min(r[key] for r in runs) for key in runs[0]}
    grid = plan.grid.blocks
    best["mpx"] = grid.height * grid.width / 1e6
    best["blocks"] = grid.shape[0] * grid.shape[1]
    return best


def describe(label: str, name: str, figures: dict[str, Any]) -> str:
    mpx = figures["mpx"]
    return (
        f"{label:>9} {name:>9}: pass 2 {mpx / figures['pass2_s']:6.2f} Mpx/s "
        f"({figures['pass2_s']:.2f} s)   pass 3 {mpx / figures['pass3_s']:5.2f} Mpx/s "
        f"({figures['pass3_s']:.2f} s)   wall s: pass 2 {figures['pass2_wall_s']:.2f}, pass 3 "
        f"{figures['pass3_wall_s']:.2f} (segmentation {figures['segment_s']:.2f}, polygons+features "
        f"{figures['features_s']:.2f})   {figures['nuclei']} nuclei"
    )


def ratio(then: dict[str, Any], now: dict[str, Any], *keys: str) -> float:
    return sum(then[k] for k in keys) / sum(now[k] for k in keys)


def child(package_root: Path | None, name: str, chunk: int, repeats: int) -> dict[str, Any]:
    env = dict(os.environ, **WORKER_ENVIRON)
    if package_root is not None:
        env["PYTHONPATH"] = str(package_root)
    command = [sys.executable, __file__, "--child", name, "--chunk", str(chunk),
               "--repeats", str(repeats)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many per pass")
    parser.add_argument("--chunk", type=int, default=512, help="pipeline chunk size")
    parser.add_argument("--baseline", help="git revision to compare against, e.g. 7ef543a")
    parser.add_argument("--maps", nargs="+", default=["synthetic", "wsi"],
                        choices=["synthetic", "wsi"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.chunk, args.repeats)))
        return
    print(f"chunk {args.chunk}, best of {args.repeats}; Mpx/s per core = map px / CPU seconds of the tasks")
    with tempfile.TemporaryDirectory(prefix="hoverdask-baseline-") as old:
        if args.baseline:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "hoverdask"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        for name in args.maps:
            now = child(None, name, args.chunk, args.repeats)
            print(describe("this tree", name, now), flush=True)
            if args.baseline:
                then = child(Path(old), name, args.chunk, args.repeats)
                print(describe(args.baseline[:9], name, then))
                print(f"{'speed-up':>9} {name:>9}: pass 2 {ratio(then, now, 'pass2_s'):.2f}x"
                      f"   pass 3 {ratio(then, now, 'pass3_s'):.2f}x"
                      f"   passes 2+3 {ratio(then, now, 'pass2_s', 'pass3_s'):.2f}x   (wall: passes 2+3 "
                      f"{ratio(then, now, 'pass2_wall_s', 'pass3_wall_s'):.2f}x, segmentation + "
                      f"features {ratio(then, now, 'segment_s', 'features_s'):.2f}x)", flush=True)


if __name__ == "__main__":
    main()
