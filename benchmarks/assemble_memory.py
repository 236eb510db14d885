"""Peak memory of a slide's last task, assembling its files from block parts: whole table vs
streamed, for 100k and 1M synthetic nuclei.

The parts are written first (export_memory's 16-gon nuclei with every feature column, cut into
1024-px blocks, rows shuffled in each, plus a 2% "oversized" part). Each (count, path) then runs
in a fresh process that imports everything, records its resident memory, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``) and writes the slide's files as the pipeline does:

* ``whole``: the parts concatenated into one table, ``finish_slide`` (what ``assemble_slide`` did);
* ``streamed``: ``index_parts`` + ``finish_slide_parts`` (what it does now).

Peak is ``VmHWM``, "extra" the peak minus the RSS before assembling. Linux only.

    python benchmarks/assemble_memory.py                      # 100k and 1M, Parquet + QuPath
    python benchmarks/assemble_memory.py --counts 100000 --formats parquet
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
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from export_memory import _status_mib, reset_peak_rss, synthetic_nuclei

BLOCK_PX = 1024
TYPES = {1: ("Neoplastic", (255, 0, 0)), 2: ("Inflammatory", (0, 255, 0)),
         3: ("Connective", (0, 0, 255)), 4: ("Dead", (255, 255, 0)),
         5: ("Epithelial", (255, 165, 0))}  # fmt: skip


def write_parts(count: int, folder: Path) -> dict:
    """The slide's parts and tissue file; returns the extent and the part paths."""
    nuclei = synthetic_nuclei(count).drop(columns=["slide_id"])
    rng = np.random.default_rng(1)
    side = float(np.ceil(np.sqrt(count)) * 20.0)
    nuclei["nucleus_id"] = (np.floor(nuclei["centroid_y"]) * side
                            + np.floor(nuclei["centroid_x"])).astype(np.int64)  # fmt: skip
    oversized = rng.random(count) < 0.02
    columns = int(np.ceil(side / BLOCK_PX))
    block = (nuclei["centroid_y"] // BLOCK_PX).astype(int) * columns + (
        nuclei["centroid_x"] // BLOCK_PX
    ).astype(int)
    paths = []
    for index in np.unique(block.to_numpy()):
        rows = np.flatnonzero((block.to_numpy() == index) & ~oversized)
        path = folder / f"block_{index}.parquet"
        nuclei.iloc[rng.permutation(rows)].to_parquet(path, index=False)
        paths.append(str(path))
    path = folder / "oversized.parquet"
    nuclei[oversized].to_parquet(path, index=False)
    paths.append(str(path))
    downsample = 32.0
    size = int(np.ceil(side / downsample))
    mask = np.zeros((size // 4, size // 4), bool)
    mask[1:-1, 1:-1] = True
    np.savez_compressed(folder / "tissue.npz", mask=mask, thumbnail_downsample=downsample,
                        thumbnail=rng.integers(0, 256, (size, size, 3), dtype=np.uint8))  # fmt: skip
    return {"extent": [0.0, 0.0, side, side], "parts": paths}


def run_one(folder: Path, path_kind: str, formats: tuple[str, ...]) -> dict:
    import geopandas as gpd
    import pandas as pd

    import hoverdask.export.summary  # noqa: F401  (imported before the baseline, as in a worker)
    from hoverdask.export.parts import index_parts
    from hoverdask.export.qc import QcDots  # noqa: F401
    from hoverdask.pipeline.outputs import finish_slide, finish_slide_parts

    layout = json.loads((folder / "layout.json").read_text())
    plan = SimpleNamespace(
        slide_id="synthetic", slide_dir=folder / f"out_{path_kind}", type_table=TYPES,
        tissue_mm2=10.0, extent=tuple(layout["extent"]), slide_mpp=0.25, scale=1.0,
        slide_path="synthetic.svs", ledger=SimpleNamespace(work=folder),
    )  # fmt: skip
    gc.collect()
    before = _status_mib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    if path_kind == "whole":
        tables = [gpd.read_parquet(p) for p in layout["parts"]]
        table = gpd.GeoDataFrame(pd.concat([t for t in tables if len(t)], ignore_index=True))
        del tables
        outcome = finish_slide(plan, table, formats, oversized=[])
    else:
        parts = index_parts(layout["parts"], extent=plan.extent)
        outcome = finish_slide_parts(plan, parts, formats, oversized=[])
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    return {"nuclei": outcome["nuclei"], "path": path_kind, "rss_before_mib": round(before, 1),
            "peak_mib": round(peak, 1), "extra_mib": round(peak - before, 1),
            "seconds": round(seconds, 1), "parts": len(layout["parts"])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--formats", default="parquet,qupath")
    parser.add_argument("--paths", nargs="+", default=["whole", "streamed"])
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    formats = tuple(args.formats.split(","))
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), args.one[1], formats)))
        return
    print(f"formats {','.join(formats)}")
    print(f"{'nuclei':>9} {'parts':>6} {'path':>9} {'RSS before MiB':>15} {'peak MiB':>9} "
          f"{'extra MiB':>10} {'s':>6}")  # fmt: skip
    for count in args.counts:
        with tempfile.TemporaryDirectory() as folder:
            layout = write_parts(count, Path(folder))
            (Path(folder) / "layout.json").write_text(json.dumps(layout))
            for path_kind in args.paths:
                out = subprocess.run(
                    [sys.executable, __file__, "--formats", args.formats,
                     "--one", folder, path_kind],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{r['nuclei']:>9} {r['parts']:>6} {r['path']:>9} {r['rss_before_mib']:>15} "
                      f"{r['peak_mib']:>9} {r['extra_mib']:>10} {r['seconds']:>6}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
