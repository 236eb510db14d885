"""Peak memory of the nucleus exports for 100k and 1M synthetic nuclei.

Each (count, format) runs in a fresh process: it builds a synthetic nuclei table (16-gon
"nuclei" on a grid, with every feature column), records the resident memory, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), exports, and reads the peak (``VmHWM``). The
difference is what the export itself costs; for the streamed GeoJSON it stays flat as the count
grows. Linux only.

    python benchmarks/export_memory.py            # 100k and 1M, both formats
    python benchmarks/export_memory.py --counts 100000 --formats qupath
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def synthetic_nuclei(count: int, seed: int = 0):
    import geopandas as gpd
    import shapely

    from hoverdask.nuclei.features import FEATURE_COLUMNS

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(count)))
    index = np.arange(count)
    cx = (index % side) * 20.0 + 10.0 + rng.uniform(-2, 2, count)
    cy = (index // side) * 20.0 + 10.0 + rng.uniform(-2, 2, count)
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    radius = rng.uniform(4, 8, (count, 1)) * (1 + 0.15 * np.cos(2 * angles))
    ring = np.stack([cx[:, None] + radius * np.cos(angles), cy[:, None] + radius * np.sin(angles)], -1)
    ring = np.concatenate([ring, ring[:, :1]], axis=1)
    table = {name: rng.uniform(0, 1, count) for name in FEATURE_COLUMNS}
    table.update(
        centroid_x=cx,
        centroid_y=cy,
        type=rng.integers(0, 6, count).astype(np.int16),
        type_prob=rng.uniform(0.5, 1, count).astype(np.float32),
        area_px=rng.integers(50, 200, count).astype(np.int32),
        nucleus_id=index.astype(np.int64),
        slide_id="synthetic",
    )
    return gpd.GeoDataFrame(table, geometry=shapely.polygons(ring), crs=None)


def run_one(count: int, fmt: str) -> dict[str, float | int | str]:
    from hoverdask.export import validate_qupath, write_geoparquet, write_qupath

    types = {i: (name, color) for i, name, color in [
        (1, "Neoplastic", (255, 0, 0)), (2, "Inflammatory", (0, 255, 0)),
        (3, "Connective", (0, 0, 255)), (4, "Dead", (255, 255, 0)),
        (5, "Epithelial", (255, 165, 0))]}  # fmt: skip
    nuclei = synthetic_nuclei(count)
    gc.collect()
    before = _status_mib("VmRSS")
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        if fmt == "qupath":
            path = Path(folder) / "nuclei.geojson.gz"
            write_qupath(nuclei, path, type_table=types)
        else:
            path = Path(folder) / "nuclei.parquet"
            write_geoparquet(nuclei, path)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        after = _status_mib("VmHWM")
        checked = {}
        if fmt == "qupath":  # the validator streams too: its peak over the same baseline
            gc.collect()
            reset_peak_rss()
            start = time.perf_counter()
            report = validate_qupath(path)
            if not report.ok or report.count != count:
                raise RuntimeError(f"validation failed: {report.problems}")
            checked = {"validate_extra_mib": round(_status_mib("VmHWM") - before, 1),
                       "validate_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    return {"nuclei": count, "format": fmt, "table_rss_mib": round(before, 1),
            "export_peak_mib": round(after, 1), "export_extra_mib": round(after - before, 1),
            "seconds": round(seconds, 1), "file_mib": round(size / 2**20, 1), **checked}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--formats", nargs="+", default=["qupath", "parquet"])
    parser.add_argument("--one", nargs=2, metavar=("COUNT", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1])))
        return
    header = f"{'nuclei':>9} {'format':>8} {'table MiB':>10} {'peak MiB':>9} {'extra MiB':>10}"
    print(f"{header} {'s':>6} {'file MiB':>9} {'validate extra MiB':>19} {'validate s':>11}")
    for count in args.counts:
        for fmt in args.formats:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(count), fmt],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{r['nuclei']:>9} {r['format']:>8} {r['table_rss_mib']:>10} "
                f"{r['export_peak_mib']:>9} {r['export_extra_mib']:>10} {r['seconds']:>6} "
                f"{r['file_mib']:>9} {r.get('validate_extra_mib', '-'):>19} "
                f"{r.get('validate_s', '-'):>11}",
                flush=True,
            )


if __name__ == "__main__":
    main()
