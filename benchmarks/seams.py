"""Cost of the seam-stable whole-slide post-processing against one reference ``process()`` pass.

    python benchmarks/seams.py [--repeats 3] [--tiles 2]

Map: the parity WSI fixture (1000x1400, dequantised) tiled ``--tiles`` x ``--tiles`` times.
Timings (best of ``--repeats``, single-threaded dask scheduler so the figures compare CPU work):

* ``reference``: ``hoverdask.nuclei.postproc.process(maps, 6, method="fast")`` on the whole map at once
  (the reference steps with the one-pass record builder; ``method="reference"`` builds records
  in O(nuclei x pixels) and would flatter the seam-stable figures);
* ``passes 1+2``: the two range reductions alone;
* ``untiled``: ``nuclei_from_maps`` with one block (all three passes, table included);
* ``chunk N``: ``nuclei_from_maps`` with N px blocks and the default halo.

The script also checks that every chunking returns the same nucleus ids as the untiled run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import dask
import dask.array as da
import numpy as np

from hoverdask.nuclei.postproc import process
from hoverdask.nuclei.seams import BlockGrid
from hoverdask.pipeline.local import nuclei_from_maps, slide_ranges
from hoverdask.slide.synthetic import dequantised_pred_map

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "parity" / "wsi_synth_input.npz"


def load_maps(tiles: int) -> np.ndarray:
    with np.load(FIXTURE) as data:
        maps = dequantised_pred_map(data)
    return np.tile(maps, (tiles, tiles, 1))


def best_of(repeats: int, run: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=2)
    args = parser.parse_args()
    maps = load_maps(args.tiles)
    height, width = maps.shape[:2]
    mpix = height * width / 1e6
    print(f"map {height}x{width} ({mpix:.1f} Mpx)")
    with dask.config.set(scheduler="synchronous"):
        ref_s, (_, info) = best_of(args.repeats, lambda: process(maps, 6, method="fast"))
        print(f"{'reference':>12}: {ref_s:6.2f} s  {len(info)} nuclei")
        grid = BlockGrid(height, width, max(height, width))
        lazy = da.from_array(maps, chunks=(height, width, 4))
        ranges_s, _ = best_of(args.repeats, lambda: slide_ranges(lazy, grid))
        print(f"{'passes 1+2':>12}: {ranges_s:6.2f} s  ({ranges_s / ref_s:.2f}x reference)")
        whole_s, whole = best_of(
            args.repeats, lambda: nuclei_from_maps(maps, max(height, width), 6)
        )
        print(f"{'untiled':>12}: {whole_s:6.2f} s  ({whole_s / ref_s:.2f}x)  {len(whole)} nuclei")
        for chunk in (1024, 512, 256):
            seconds, table = best_of(args.repeats, lambda c=chunk: nuclei_from_maps(maps, c, 6))
            same = np.array_equal(table["nucleus_id"].to_numpy(), whole["nucleus_id"].to_numpy())
            print(
                f"{'chunk ' + str(chunk):>12}: {seconds:6.2f} s  ({seconds / ref_s:.2f}x)  "
                f"same ids as untiled: {same}  oversized: {len(table.attrs['oversized_clusters'])}"
            )


if __name__ == "__main__":
    main()
