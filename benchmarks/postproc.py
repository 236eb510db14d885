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

from hoverdask.postproc import inst_info_to_json, process
from hoverdask.postproc.synthetic import dequantised_pred_map, synthetic_pred_map

FIXTURE = Path(__file__).resolve().parents[1] / "tests/data/parity/wsi_synth_input.npz"


def wsi_fixture_map() -> np.ndarray:
    with np.load(FIXTURE) as stored:
        return dequantised_pred_map(stored)


def best_seconds(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


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
    print(f"{'map':30s} {'MP':>6s} {'nuclei':>7s} {'ref MP/s':>9s} {'fast MP/s':>10s} {'ratio':>6s}")
    for name, pred_map in maps.items():
        mpix = pred_map.shape[0] * pred_map.shape[1] / 1e6
        t_ref, (ref_map, ref_info) = best_seconds(lambda m=pred_map: process(m, 6), args.repeats)
        t_fast, (fast_map, fast_info) = best_seconds(
            lambda m=pred_map: process(m, 6, method="fast"), args.repeats
        )
        same = np.array_equal(ref_map, fast_map) and inst_info_to_json(
            ref_info
        ) == inst_info_to_json(fast_info)
        print(
            f"{name:30s} {mpix:6.2f} {len(ref_info):7d} {mpix / t_ref:9.2f} {mpix / t_fast:10.2f} "
            f"{t_ref / t_fast:6.2f}{'' if same else '  OUTPUTS DIFFER'}"
        )


if __name__ == "__main__":
    main()
