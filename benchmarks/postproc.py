"""Post-processing speed: reference vs fast, in megapixels per second (same maps, same output).

    python benchmarks/postproc.py [--repeats 3]

Maps: the parity WSI fixture (1000x1400, dequantised), the same tiled 2x2 (2000x2800), and a
synthetic 2048x2048 map. Each timing is the best of ``--repeats`` runs; the script also checks
that both methods return the same instance map and records.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hoverdask.nuclei.postproc import inst_info_to_json, process
from hoverdask.slide.synthetic import dequantised_pred_map, synthetic_pred_map

FIXTURE = Path(__file__).resolve().parents[1] / "tests/data/parity/wsi_synth_input.npz"


def wsi_fixture_map() -> np.ndarray:
    with np.load(FIXTURE) as stored:
        return dequantised_pred_map(stored)


def best_seconds(run: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Best wall-clock and best CPU seconds over ``repeats`` runs, and the last result.

    CPU time (all threads of this process) is the steadier figure on a shared machine.
    """
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fixture = wsi_fixture_map()
    maps = {
        "wsi fixture 1000x1400": fixture,
        "wsi fixture tiled 2000x2800": np.tile(fixture, (2, 2, 1)),
        "synthetic 2048x2048": synthetic_pred_map(2048, 2048, nr_types=6, seed=0),
    }
    print(
        f"{'map':28s} {'MP':>5s} {'nuclei':>6s} | wall MP/s: {'ref':>5s} {'fast':>6s} {'ratio':>5s}"
        f" | cpu MP/s: {'ref':>5s} {'fast':>6s} {'ratio':>5s}"
    )
    for name, pred_map in maps.items():
        mpix = pred_map.shape[0] * pred_map.shape[1] / 1e6
        ref_wall, ref_cpu, (ref_map, ref_info) = best_seconds(
            lambda m=pred_map: process(m, 6), args.repeats
        )
        fast_wall, fast_cpu, (fast_map, fast_info) = best_seconds(
            lambda m=pred_map: process(m, 6, method="fast"), args.repeats
        )
        same = np.array_equal(ref_map, fast_map) and inst_info_to_json(
            ref_info
        ) == inst_info_to_json(fast_info)
        print(
            f"{name:28s} {mpix:5.2f} {len(ref_info):6d} | {'':10s} {mpix / ref_wall:5.2f} "
            f"{mpix / fast_wall:6.2f} {ref_wall / fast_wall:5.2f} | {'':9s} {mpix / ref_cpu:5.2f} "
            f"{mpix / fast_cpu:6.2f} {ref_cpu / fast_cpu:5.2f}{'' if same else '  OUTPUTS DIFFER'}"
        )


if __name__ == "__main__":
    main()
