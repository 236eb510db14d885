"""Peak memory of `hoverdask convert` on synthetic slides of growing size.

Conversion holds one chunk per worker thread (four for a halving step), so its peak RSS should
stay flat as slides grow. The tissue mask that `convert` computes afterwards is reported apart:
it works on a thumbnail at 8 µm/px, whose size follows the slide's physical area. Each conversion runs in a fresh Python process, which reports its own
peak RSS (Linux ``VmHWM``) and the peak after imports, so the figures are not polluted by making
the slides. Linux only.

    python benchmarks/convert_memory.py                    # 8192^2 and 16384^2 px
    python benchmarks/convert_memory.py --sizes 4096 8192 --chunk 512 --workers 2
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

from hoverdask.slide.synthetic import write_synthetic_slide

# VmHWM (peak RSS of this process image) rather than ru_maxrss, which a child inherits from
# the parent that made the slide.
CHILD = """
import json, re, sys, time
import dask, dask.array, numcodecs, tiffslide, zarr  # imported before the baseline is taken
from hoverdask.slide.convert import convert_to_omezarr
from hoverdask.slide.omezarr import open_omezarr
from hoverdask.slide.tissue import tissue_mask, tissue_path
def hwm():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
baseline = hwm()
start = time.perf_counter()
result = convert_to_omezarr(sys.argv[1], sys.argv[2], chunk=int(sys.argv[3]),
                            num_workers=int(sys.argv[4]), scheduler="threads", tissue=False)
seconds = time.perf_counter() - start
converted = hwm()
with open_omezarr(result.path) as slide:  # what `convert` does next, timed apart
    mask = tissue_mask(slide)
mask.save(tissue_path(result.path))
print(json.dumps({"baseline_kib": baseline, "peak_kib": converted, "seconds": seconds,
                  "tissue_peak_kib": hwm(), "thumbnail": list(mask.mask.shape),
                  "levels": len(result.levels)}))
"""

def _size_mib(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def measure(
    size: int, chunk: int, workers: int, workdir: Path, env: dict[str, str]
) -> dict[str, float]:
    slide = workdir / f"synthetic-{size}.svs"
    store = workdir / f"synthetic-{size}.zarr"
    started = time.perf_counter()
    write_synthetic_slide(slide, size, size, seed=size, keep_instances=False, nucleus_fraction=0.05)
    made = time.perf_counter() - started
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(slide), str(store), str(chunk), str(workers)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    row = {
        "size": size,
        "megapixels": size * size / 1e6,
        "slide_mib": _size_mib(slide),
        "store_mib": _size_mib(store),
        "synth_s": made,
        **figures,
    }
    slide.unlink()
    shutil.rmtree(store, ignore_errors=True)
    store.with_name(store.name.removesuffix(".zarr") + ".tissue.npz").unlink(missing_ok=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="run conversions with MALLOC_MMAP_THRESHOLD_=1 MiB: chunk buffers then go back to "
        "the system when freed, instead of fragmenting glibc's heap (shows what is really held)",
    )
    args = parser.parse_args()
    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20)} if args.fixed_mmap_threshold else {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hoverdask-convert-") as tmp:
        for size in args.sizes:
            rows.append(measure(size, args.chunk, args.workers, Path(tmp), env))
            r = rows[-1]
            print(
                f"{r['size']:>6}^2 px ({r['megapixels']:7.1f} Mpx, svs {r['slide_mib']:6.1f} MiB, "
                f"zarr {r['store_mib']:6.1f} MiB, {r['levels']} levels): convert "
                f"{r['seconds']:6.1f} s, peak RSS {r['peak_kib'] / 1024:6.1f} MiB "
                f"(after imports {r['baseline_kib'] / 1024:5.1f} MiB); "
                f"with the {r['thumbnail'][1]}x{r['thumbnail'][0]} tissue mask "
                f"{r['tissue_peak_kib'] / 1024:6.1f} MiB",
                flush=True,
            )
    allocator = ", MALLOC_MMAP_THRESHOLD_=1MiB" if env else ""
    print(f"chunk {args.chunk}, {args.workers} worker threads{allocator}")


if __name__ == "__main__":
    main()
