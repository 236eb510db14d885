"""Fault drills: the pipeline under a killed worker, a killed run, bad slides, a full disk, OOM.

Every drill compares against an oracle, never against "it ran": the nucleus set of a clean run
of the same slides (ids, centroids, areas, types and exact outlines), the slide's summary row, or
the files left on disk. Slides are tiny synthetic ones and the predictor replays known maps
(:class:`ArrayPredictorFactory`), so a drill costs seconds; the wrappers below add the fault.
They live in this module, which the worker processes import (pytest puts tests/ on sys.path and
spawned workers inherit it).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
from typer.testing import CliRunner

from hoverdask.pipeline.predictors import ArrayPredictorFactory, PatchPredictor
from hoverdask.pipeline.run import RunOptions, run_cohort

TESTS = Path(__file__).resolve().parent
WIDTH, HEIGHT = 656, 492
NR_TYPES = 6
MARGIN, OUTPUT = 46, 164
OPTIONS = RunOptions(chunk_size=2 * OUTPUT, tissue_mask=False)  # 2 x 2 map tiles per slide


# --- fault-injecting predictors (picklable; built on the workers) ---------------------------------


@dataclasses.dataclass(frozen=True)
class KillOnceFactory:
    """Replays the maps, but the first worker to reach its ``after``-th tile dies by SIGKILL."""

    inner: ArrayPredictorFactory
    marker: str
    after: int = 2

    def __call__(self) -> Any:
        return _KillOncePredictor(self.inner(), self.marker, self.after)


class _KillOncePredictor:
    def __init__(self, inner: Any, marker: str, after: int) -> None:
        self.inner, self.marker, self.after, self.calls = inner, marker, after, 0
        self.margin, self.output, self.nr_types = inner.margin, inner.output, inner.nr_types

    def predict_tile(self, window: np.ndarray, tile_origin_yx: tuple[int, int]) -> np.ndarray:
        self.calls += 1
        if self.calls == self.after:
            try:  # O_EXCL: exactly one worker process in the whole cluster dies, once
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.predict_tile(window, tile_origin_yx)


@dataclasses.dataclass(frozen=True)
class SlowFactory:
    """Replays the maps slowly, so that a run can be killed halfway. The delay is not part of
    the model's identity (repr), as it does not change the maps."""

    inner: ArrayPredictorFactory
    seconds: float = dataclasses.field(default=0.0, repr=False, compare=False)

    def __call__(self) -> Any:
        return _SlowPredictor(self.inner(), self.seconds)


class _SlowPredictor:
    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        self.margin, self.output, self.nr_types = inner.margin, inner.output, inner.nr_types

    def predict_tile(self, window: np.ndarray, tile_origin_yx: tuple[int, int]) -> np.ndarray:
        time.sleep(self.seconds)
        return self.inner.predict_tile(window, tile_origin_yx)


@dataclasses.dataclass(frozen=True)
class OomAboveFactory:
    """A patch network that runs out of GPU memory on batches larger than ``limit``.

    Its maps come from the patch pixels alone (dark blobs become nuclei), so they do not depend on
    how patches are batched; every call is logged as ``pid size ok|oom``.
    """

    limit: int
    batch_size: int
    log: str

    def __call__(self) -> PatchPredictor:
        return PatchPredictor(functools.partial(_blob_maps, limit=self.limit, log=self.log),
                              margin=MARGIN, output=OUTPUT, nr_types=NR_TYPES,
                              batch_size=self.batch_size)  # fmt: skip


def _blob_maps(patches: np.ndarray, *, limit: int, log: str) -> np.ndarray:
    import torch
    from scipy import ndimage

    from hoverdask.slide.synthetic import hv_maps

    too_big = len(patches) > limit
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()} {len(patches)} {'oom' if too_big else 'ok'}\n")
    if too_big:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    core = patches[:, MARGIN : MARGIN + OUTPUT, MARGIN : MARGIN + OUTPUT].mean(axis=3)
    out = np.zeros((len(patches), OUTPUT, OUTPUT, 4), np.float32)
    for index, gray in enumerate(core):
        labels, count = ndimage.label(ndimage.binary_opening(gray < 150, iterations=1))
        if count:
            h, v = hv_maps(labels)
            out[index] = np.stack([labels > 0, labels > 0, h, v], axis=-1)
    return out


# --- shared slides, client and the clean run ----------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hoverdask.slide.synthetic import synthetic_pred_map, write_synthetic_slide

    folder = tmp_path_factory.mktemp("drill-cohort")
    paths = {}
    for name, seed in (("s1", 1), ("s2", 2)):
        paths[name] = folder / f"{name}.svs"
        write_synthetic_slide(paths[name], WIDTH, HEIGHT, mpp=0.25, seed=seed,
                              keep_instances=False)  # fmt: skip
    np.save(folder / "maps.npy", synthetic_pred_map(HEIGHT, WIDTH, NR_TYPES, seed=7))
    paths["maps"] = folder / "maps.npy"
    return paths


def _maps(cohort: dict[str, Path]) -> ArrayPredictorFactory:
    return ArrayPredictorFactory(str(cohort["maps"]), margin=MARGIN, output=OUTPUT,
                                 nr_types=NR_TYPES)  # fmt: skip


@pytest.fixture(scope="module")
def client():
    from tests.conftest import cpu_client  # not at the top: worker processes import this module

    with cpu_client(workers=2, threads=1) as client:
        yield client


def nucleus_set(table: gpd.GeoDataFrame) -> frozenset[tuple]:
    """Each nucleus as (id, centroid, area, type, outline WKB): equal sets = same nuclei."""
    columns = zip(table["nucleus_id"], table["centroid_x"], table["centroid_y"],
                  table["area_px"], table["type"], table.geometry.to_wkb(), strict=True)  # fmt: skip
    return frozenset(columns)


@pytest.fixture(scope="module")
def clean(client, cohort, tmp_path_factory) -> dict[str, frozenset[tuple]]:
    out = tmp_path_factory.mktemp("drill-clean")
    result = run_cohort([cohort["s1"], cohort["s2"]], out, predictor_factory=_maps(cohort),
                        client=client, options=OPTIONS, progress=False)  # fmt: skip
    assert [s.status for s in result.slides] == ["ok", "ok"]
    sets = {name: nucleus_set(gpd.read_parquet(out / name / "nuclei.parquet"))
            for name in ("s1", "s2")}  # fmt: skip
    assert all(len(s) > 100 for s in sets.values())
    return sets


def _summary(out: Path) -> dict[str, dict[str, str]]:
    return {row["slide"]: row for row in csv.DictReader((out / "summary.csv").open())}


# --- (a) a worker killed mid-run ----------------------------------------------------------------


@pytest.mark.slow
def test_a_worker_killed_mid_run_gives_the_clean_nucleus_set(client, cohort, clean, tmp_path):
    marker = tmp_path / "killed.pid"
    before = set(client.run(os.getpid).values())
    factory = KillOnceFactory(_maps(cohort), str(marker))
    result = run_cohort([cohort["s1"], cohort["s2"]], tmp_path / "out", predictor_factory=factory,
                        client=client, options=OPTIONS, progress=False)  # fmt: skip
    assert marker.exists(), "no worker was killed: the drill did not happen"
    killed = int(marker.read_text())
    assert killed in before
    client.wait_for_workers(2, timeout=60)
    assert killed not in set(client.run(os.getpid).values())  # the nanny started a new one
    assert [s.status for s in result.slides] == ["ok", "ok"]
    for name in ("s1", "s2"):
        got = nucleus_set(gpd.read_parquet(tmp_path / "out" / name / "nuclei.parquet"))
        assert got == clean[name]


# --- (b) the whole run killed mid-way -----------------------------------------------------------

RUN_SCRIPT = """
import sys
from pathlib import Path
import test_drills as d
from hoverdask.pipeline.run import run_cohort
maps, out, *slides = sys.argv[1:]
factory = d.SlowFactory(d.ArrayPredictorFactory(maps, margin=d.MARGIN, output=d.OUTPUT,
                                                nr_types=d.NR_TYPES), seconds=0.4)
if __name__ == "__main__":
    run_cohort(slides, Path(out), predictor_factory=factory, workers=1, options=d.OPTIONS,
               progress=False)
"""


def _python(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_clean_output(client, cohort, clean, tmp_path):
    out = tmp_path / "out"
    tiles = out / "s1" / ".work" / "tiles"
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, str(cohort["maps"]), str(out), str(cohort["s1"]),
         str(cohort["s2"])],
        env=_python(tmp_path), start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "run.log").open("w"),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not list(tiles.glob("*.json")):
            assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no tile was committed in time"
            time.sleep(0.1)
    finally:  # SIGKILL to the whole process group: client, scheduler and worker processes
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "s1" / "run.json").exists(), "the run finished before it was killed"
    committed = {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.json")}
    assert 1 <= len(committed) < 4

    factory = SlowFactory(_maps(cohort))  # the same model identity, no delay
    result = run_cohort([str(cohort["s1"]), str(cohort["s2"])], out, predictor_factory=factory,
                        client=client, options=dataclasses.replace(OPTIONS, keep_work=True),
                        progress=False)  # fmt: skip
    assert [s.status for s in result.slides] == ["ok", "ok"]
    for name, mtime in committed.items():  # committed tiles were reused, not recomputed
        assert (tiles / name).stat().st_mtime_ns == mtime
    assert len(list(tiles.glob("*.json"))) == 4
    for name in ("s1", "s2"):
        assert nucleus_set(gpd.read_parquet(out / name / "nuclei.parquet")) == clean[name]


# --- (c) a cohort with bad slides ---------------------------------------------------------------


def _bad_slides(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Broken slides and the words their summary row must carry."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffFile(good) as tiff:  # cut inside the full-resolution pixels
        page = tiff.pages[0]
        end = max(o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True))
    (folder / "empty.svs").write_bytes(b"")
    (folder / "truncated.svs").write_bytes(good.read_bytes()[: end // 2])
    (folder / "notes.svs").write_text("Patient notes, not an image\n")
    tifffile.imwrite(folder / "nompp.tif", np.full((300, 400, 3), 180, np.uint8),
                     tile=(256, 256), photometric="rgb")  # fmt: skip
    return {
        "empty": (folder / "empty.svs", "empty"),
        "truncated": (folder / "truncated.svs", "truncated"),
        "notes": (folder / "notes.svs", "not a readable slide"),
        "nompp": (folder / "nompp.tif", "--mpp"),
    }


def _cli_with_stub(monkeypatch: pytest.MonkeyPatch, factory: Any, client: Any) -> None:
    """`hoverdask run` with the stub predictor and the test's cluster instead of a checkpoint."""
    import hoverdask.pipeline.run as run_module

    original = run_module.run_cohort

    def stubbed(slides, out, **kwargs):
        kwargs.update(model=None, predictor_factory=factory, client=client, progress=False)
        return original(slides, out, **kwargs)

    monkeypatch.setattr(run_module, "run_cohort", stubbed)


@pytest.mark.slow
def test_bad_slides_are_named_with_a_reason_and_good_ones_written(client, cohort, clean,
                                                                   tmp_path, monkeypatch):
    from hoverdask import cli

    bad = _bad_slides(tmp_path / "bad", cohort["s1"])
    _cli_with_stub(monkeypatch, _maps(cohort), client)
    monkeypatch.setattr(cli.console, "width", 1000)
    slides = [cohort["s1"], *(path for path, _ in bad.values()), cohort["s2"]]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["run", *map(str, slides), "--out", str(out),
                                          "--chunk-size", str(OUTPUT), "--no-tissue-mask"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    rows = _summary(out)
    assert set(rows) == {"s1", "s2", *bad}
    for name, (_, reason) in bad.items():
        assert rows[name]["status"] == "failed"
        assert reason in rows[name]["error"], rows[name]
        assert name in result.output
        assert not (out / name / "nuclei.parquet").exists()
    for name in ("s1", "s2"):
        assert rows[name]["status"] == "ok"
        assert nucleus_set(gpd.read_parquet(out / name / "nuclei.parquet")) == clean[name]


# --- (d) the output folder cannot be written ----------------------------------------------------


def test_output_folder_that_cannot_be_made_is_one_clear_line(cohort, tmp_path, monkeypatch):
    from hoverdask import cli

    monkeypatch.setattr(cli.console, "width", 1000)
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should go")
    result = CliRunner().invoke(cli.app, ["run", str(cohort["s1"]),
                                          "--out", str(blocker / "out")])  # fmt: skip
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: cannot create output folder")
    assert str(blocker / "out") in line
    assert blocker.read_text().startswith("a file")


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """Make an existing folder unwritable for real: chmod for users, the immutable flag for root
    (who ignores permission bits)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = functools.partial(folder.chmod, 0o755)
    else:
        chattr = shutil.which("chattr")
        locked = chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True,
                                           check=False)  # fmt: skip
        if not locked or locked.returncode != 0:
            pytest.skip("root, and the file system has no immutable flag (chattr +i)")
        undo = functools.partial(subprocess.run, [chattr, "-i", str(folder)], check=True)
    try:
        probe = folder / "probe"
        with pytest.raises(PermissionError):
            probe.write_text("x")
        yield
    finally:
        undo()


@pytest.mark.slow
def test_read_only_output_folder_is_one_clear_line(client, cohort, tmp_path, monkeypatch):
    from hoverdask import cli

    _cli_with_stub(monkeypatch, _maps(cohort), client)
    monkeypatch.setattr(cli.console, "width", 1000)
    out = tmp_path / "out"
    out.mkdir()
    with _read_only(out):
        result = CliRunner().invoke(cli.app, ["run", str(cohort["s1"]), "--out", str(out),
                                              "--no-tissue-mask"])  # fmt: skip
    assert list(out.iterdir()) == []
    assert result.exit_code == 2, repr(result.exception)
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error:")
    assert str(out) in line


def _limit_file_size(limit: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))


@pytest.mark.slow
def test_full_disk_fails_the_slide_cleanly_and_a_rerun_completes(client, cohort, clean,
                                                                  tmp_path):
    """RLIMIT_FSIZE on the worker processes makes their writes past a size fail (EFBIG) the way
    a full disk does (ENOSPC), also for root and without mounting anything. The limit lets the
    map tiles and block parts through, but not the slide's nuclei table."""
    out = tmp_path / "out"
    options = dataclasses.replace(OPTIONS, chunk_size=OUTPUT)  # small parts, 12 tiles
    client.run(_limit_file_size, 96 * 1024)
    try:
        result = run_cohort([cohort["s1"]], out, predictor_factory=_maps(cohort),
                            client=client, options=options, progress=False)  # fmt: skip
    finally:
        client.run(_limit_file_size, resource.RLIM_INFINITY)
    assert result.exit_code == 1
    row = _summary(out)["s1"]
    assert row["status"] == "failed"
    assert "File too large" in row["error"]
    slide = out / "s1"
    assert not (slide / "run.json").exists()
    assert not (slide / "nuclei.parquet").exists()
    assert not list(slide.glob("*.geojson*"))
    assert not list(out.rglob("*.tmp"))  # no temporary file left behind
    assert len(list((slide / ".work" / "tiles").glob("*.json"))) == 12  # the maps were written

    result = run_cohort([cohort["s1"]], out, predictor_factory=_maps(cohort), client=client,
                        options=options, progress=False)  # space is back: resume  # fmt: skip
    assert result.slides[0].status == "ok"
    assert nucleus_set(gpd.read_parquet(slide / "nuclei.parquet")) == clean["s1"]
    assert _summary(out)["s1"]["status"] == "ok"


# --- (e) a worker out of GPU memory -------------------------------------------------------------


@pytest.mark.slow
def test_out_of_gpu_memory_retries_with_smaller_batches(client, cohort, tmp_path):
    runs = {}
    options = dataclasses.replace(OPTIONS, chunk_size=4 * OUTPUT)  # 16 patches a tile
    for name, batch in (("roomy", 2), ("tight", 8)):
        log = tmp_path / f"{name}.log"
        factory = OomAboveFactory(limit=2, batch_size=batch, log=str(log))
        result = run_cohort([cohort["s1"]], tmp_path / name, predictor_factory=factory,
                            client=client, options=options, progress=False)  # fmt: skip
        assert result.slides[0].status == "ok", result.slides[0].error
        calls = [line.split() for line in log.read_text().splitlines()]
        runs[name] = (nucleus_set(gpd.read_parquet(tmp_path / name / "s1" / "nuclei.parquet")),
                      calls)  # fmt: skip
    roomy, tight = runs["roomy"], runs["tight"]
    assert all(outcome == "ok" for _, _, outcome in roomy[1])
    assert len(roomy[0]) > 50
    assert tight[0] == roomy[0]  # the same nuclei, whatever the batch size
    tried = [(int(size), outcome) for _, size, outcome in tight[1]]
    assert (8, "oom") in tried
    assert (4, "oom") in tried
    assert max(size for size, outcome in tried if outcome == "ok") == 2
    for pid in {p for p, _, _ in tight[1]}:  # a worker halves at most twice, then stays at 2
        calls = [(int(s), outcome) for p, s, outcome in tight[1] if p == pid]
        ooms = [i for i, (_, outcome) in enumerate(calls) if outcome == "oom"]
        assert len(ooms) <= 3  # 8 -> (4 -> 2 + 2) + (4 -> 2 + 2)
        assert all(size <= 2 for size, _ in calls[ooms[-1] + 1 :]) if ooms else True
