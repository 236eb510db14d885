"""Read path for inference: tiffslide's view of the TIFF vs converting to OME-Zarr first.

For each slide this times reading every map-tile window the inference tasks read (tile plus the
patch margin, at 0.25 µm/px, through :func:`hoverdask.pipeline.tasks.read_rgb`), once straight
from the slide file and once from an OME-Zarr written by ``hoverdask convert``, whose conversion
time is reported separately. Each measurement is repeated and the best of ``--repeat`` runs is
printed, with the window reads done by ``--threads`` threads (as one worker's threads would).

    python benchmarks/read_paths.py tests/data/cmu-1-small-region.svs --synthetic 6000x5000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hoverdask.pipeline import tasks
from hoverdask.pipeline.grid import TileGrid, window_indices
from hoverdask.pipeline.tasks import SlideSource


def read_all_windows(path: Path, tile: int, threads: int, mpp: float | None) -> tuple[float, int]:
    """Seconds to read every window of the slide's map tiles, and the megapixels read."""
    from hoverdask.slide import open_slide
    from hoverdask.slide.resample import processing_array

    tasks.processing_view.cache_clear()
    source = SlideSource(str(path), mpp, 0.25)
    view = processing_array(open_slide(path, mpp), target_mpp=0.25)
    height, width = view.array.shape[:2]
    grid = TileGrid.for_chunk_size(height, width, tile, output=164, margin=46)

    def read(unit: tuple[int, int]) -> int:
        rows, cols = window_indices(grid, *unit)
        return tasks.read_rgb(source, rows, cols).shape[0] * len(cols)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        pixels = sum(pool.map(read, list(grid.tiles())))
    return time.perf_counter() - start, pixels // 1_000_000


def best_of(repeat: int, func, *args):  # type: ignore[no-untyped-def]
    runs = [func(*args) for _ in range(repeat)]
    return min(runs, key=lambda r: r[0])


def measure(path: Path, tile: int, threads: int, repeat: int, mpp: float | None) -> None:
    from hoverdask.slide.convert import convert_to_omezarr

    seconds, mpix = best_of(repeat, read_all_windows, path, tile, threads, mpp)
    print(f"{path.name}: tiffslide view  {seconds:7.2f} s for {mpix} Mpx of windows "
          f"({mpix / seconds:6.1f} Mpx/s)")
    scratch = Path(tempfile.mkdtemp(prefix="read-paths-"))
    try:
        store = scratch / f"{path.stem}.ome.zarr"
        start = time.perf_counter()
        convert_to_omezarr(path, store, mpp=mpp, tissue=False, scheduler="threads",
                           num_workers=threads)
        convert = time.perf_counter() - start
        seconds_z, _ = best_of(repeat, read_all_windows, store, tile, threads, None)
        print(f"{path.name}: zarr first     {seconds_z:7.2f} s to read + {convert:.2f} s to "
              f"convert = {seconds_z + convert:.2f} s ({mpix / seconds_z:6.1f} Mpx/s reading)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="*", type=Path)
    parser.add_argument("--synthetic", default="", help="also a synthetic slide WxH at 0.25 µm/px")
    parser.add_argument("--tile", type=int, default=1968, help="map tile size (processing px)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--mpp", type=float, default=None)
    args = parser.parse_args()
    slides = list(args.slides)
    scratch = Path(tempfile.mkdtemp(prefix="read-paths-synth-"))
    try:
        if args.synthetic:
            from hoverdask.slide.synthetic import write_synthetic_slide

            width, height = (int(n) for n in args.synthetic.lower().split("x"))
            path = scratch / "synthetic.tif"
            write_synthetic_slide(path, width, height, mpp=0.25, seed=0)
            slides.append(path)
        for path in slides:
            measure(path, args.tile, args.threads, args.repeat, args.mpp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
