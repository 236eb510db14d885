"""Shared test fixtures: where the parity fixtures, test slides and shared datasets live."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
PARITY = DATA / "parity"
SHARED = TESTS.parent.parent / "shared"
SHARED_DATA = SHARED / "data"
CMU_SLIDE = DATA / "cmu-1-small-region.svs"


def parity_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(PARITY / name) as data:
        return {key: data[key] for key in data.files}


def parity_json(name: str) -> Any:
    return json.loads((PARITY / name).read_text())


def shared_dataset(name: str) -> Path:
    """A folder of ../shared/data, or skip: the annotated sets are never copied into the repo."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is not available")
    return path


@contextlib.contextmanager
def cpu_client(workers: int, threads: int) -> Iterator[Any]:
    """A local cluster of CPU worker processes (quiet, no dashboard port), closed afterwards."""
    from hoverdask.deploy.cluster import make_client

    client = make_client(workers=workers, threads_per_worker=threads, device="cpu", quiet=True,
                         dashboard=False)
    try:
        yield client
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
