"""Deterministic HoVer-Net weights of the parity fixtures (tests/data/parity/README.md, section 2).

Every tensor of a manifest is filled from a splitmix64 hash of (manifest index, element index), so
the reference logits in ``forward_*.npz`` can be reproduced without shipping any weight file.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict

import numpy as np
import torch

from tests.conftest import PARITY

CONFIGS = ("fast_t6", "fast_t5", "original_t5", "original_tnone")


def config_model_args(config: str) -> tuple[str, int | None]:
    """``"fast_t6"`` -> ``("fast", 6)``; ``"original_tnone"`` -> ``("original", None)``."""
    mode, types = config.split("_")
    return mode, None if types == "tnone" else int(types[1:])


@functools.cache
def manifest(config: str) -> dict:
    return json.loads((PARITY / f"manifest_{config}.json").read_text())


def splitmix_uniform(index: int, count: int) -> np.ndarray:
    """``count`` exact float64 uniforms in [0, 1) for the tensor at manifest ``index``."""
    one = np.uint64(1)
    with np.errstate(over="ignore"):
        z = (np.uint64(index) << np.uint64(32)) + np.arange(count, dtype=np.uint64) + one
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def fill(index: int, key: str, shape: list[int]) -> np.ndarray:
    """The value of one manifest entry (float32, or int64 for ``num_batches_tracked``)."""
    if key.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    if key == "upsample2x.unpool_mat":
        return np.ones(shape, dtype=np.float32)
    count = int(np.prod(shape, dtype=np.int64))
    u = splitmix_uniform(index, count)
    s = 2.0 * u - 1.0
    if key.endswith("running_var"):
        values = 1.0 + 0.5 * u
    elif key.endswith("running_mean"):
        values = 0.1 * s
    elif len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
        values = s * np.sqrt(6.0 / fan_in) * 0.9
    elif key.endswith(".weight"):
        values = 1.0 + 0.1 * s
    elif key.endswith(".bias"):
        values = 0.1 * s
    else:
        raise ValueError(f"no fill rule for {key}")
    return values.astype(np.float32).reshape(shape)


@functools.cache
def _parity_arrays(config: str) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple(
        (e["key"], fill(e["index"], e["key"], e["shape"])) for e in manifest(config)["keys"]
    )


def parity_state_dict(config: str) -> OrderedDict[str, torch.Tensor]:
    """The full state dict (manifest order, with ``num_batches_tracked``) of one configuration."""
    return OrderedDict((key, torch.from_numpy(arr.copy())) for key, arr in _parity_arrays(config))


def parity_model(config: str) -> torch.nn.Module:
    """A :class:`hoverdask.model.HoVerNet` in eval mode holding the parity weights."""
    from hoverdask.model import HoVerNet

    mode, nr_types = config_model_args(config)
    model = HoVerNet(mode=mode, nr_types=nr_types)
    model.load_state_dict(parity_state_dict(config), strict=True)
    return model.eval()
