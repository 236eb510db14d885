"""Helpers for the tests that run hoverdask on live clusters (SLURM jobs, network namespaces).

Not a test module: it holds what tests/test_slurm.py and tests/test_netns.py share: waiting
for the first committed map tile (the moment a fault is injected "mid-run"), counting the tasks
a scheduler ran more than once, and the nucleus sets written to an output folder.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent


def job_pythonpath() -> str:
    """PYTHONPATH for processes started elsewhere (SLURM jobs, namespaces): they unpickle the
    test modules' predictor factories, and import hoverdask from wherever this process does."""
    return os.pathsep.join([str(TESTS), *(p for p in sys.path if p)])


def wait_for(condition: Callable[[], bool], seconds: float, what: str,
             alive: Callable[[], bool] = lambda: True,
             log: Callable[[], str] = lambda: "") -> float:
    """Poll ``condition`` until it holds; the seconds it took. Fails naming ``what``, with
    ``log()`` (e.g. the tail of the log of the process that should have made it happen)."""
    start = time.monotonic()
    while not condition():
        if not alive():
            raise AssertionError(f"gave up waiting for {what}: the process it needs has "
                                 f"ended\n{log()}")
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what} did not happen within {seconds:.0f} s\n{log()}")
        time.sleep(0.2)
    return time.monotonic() - start


def committed_tiles(out: Path) -> list[Path]:
    """Map tiles whose inference result is committed (the ledger's tile records)."""
    return list(out.glob("*/.work/tiles/*.json"))


def processing_counts(transitions: Iterable[Any]) -> collections.Counter[str]:
    """How many times each task key was sent to a worker (``transition_log`` entries)."""
    return collections.Counter(str(t[0]) for t in transitions if t[2] == "processing")


def reruns(counts: collections.Counter[str]) -> dict[str, int]:
    """Tasks (by key prefix) that were sent to a worker more than once, and how often again."""
    again: dict[str, int] = collections.defaultdict(int)
    for key, count in counts.items():
        if count > 1:
            again[key.strip("('").split("-")[0]] += count - 1
    return dict(again)


def nucleus_sets(out: Path, names: Iterable[str]) -> dict[str, frozenset[tuple]]:
    import geopandas as gpd
    from test_drills import nucleus_set

    return {name: nucleus_set(gpd.read_parquet(out / name / "nuclei.parquet")) for name in names}


def record(name: str, values: dict[str, object]) -> None:
    """Show a measurement in the test output (-s) and keep it in $HOVERDASK_MEASURE_DIR."""
    print(f"{name}: {json.dumps(values)}")
    folder = os.environ.get("HOVERDASK_MEASURE_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(values, indent=2))


def tls_handshake(host: str, port: str | int, ca: str, cert: str, key: str) -> bool:
    """Whether a mutual-TLS handshake with ``host:port`` succeeds (the peer holds a certificate
    of the CA). A TCP connect alone proves nothing: some sandboxes accept every connection."""
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    try:
        with socket.create_connection((host, int(port)), timeout=3) as raw, \
                context.wrap_socket(raw) as tls:
            return tls.getpeercert() is not None
    except OSError:
        return False
