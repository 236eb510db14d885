"""Reading and writing HoVer-Net checkpoints without ever executing code from the file.

Accepted layouts (all hold the same key names):

* official ``.tar``: ``{"desc": state_dict}`` (tf2pytorch files lack ``num_batches_tracked``);
* files trained with the reference code: ``{"desc": {"module.<key>": ...}, "optimizer": ...,
  "lr_scheduler": ...}``;
* TIAToolbox ``.pth``: the bare state dict.

The network mode and the number of types are read from tensor shapes, so the user never has to
state them: the decoder's first conv is 3x3 in "fast" mode and 5x5 in "original" mode, and the
``tp`` branch's last conv has one output channel per type. The light network ("lite") is known by
its ``heads.np`` tensor, and its widths and depth are read from its tensors too.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hoverdask.core.atomic import atomic_write
from hoverdask.core.errors import CheckpointError
from hoverdask.model.build import Network
from hoverdask.model.infer import resolve_device
from hoverdask.model.lite import LITE_MODE, LiteHoVerNet, is_lite_state, shape_of_state
from hoverdask.model.network import HoVerNet

MODE_KEY = "decoder.np.u3.conva.weight"
TYPES_KEY = "decoder.tp.u0.conv.weight"
_MODE_BY_KSIZE = {3: "fast", 5: "original"}
# top-level entries of a training checkpoint that are not model metadata
_TRAINING_STATE = ("optimizer", "lr_scheduler")


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # garbage bytes, not a refused class
            raise CheckpointError(
                f"cannot read {path}: not a torch checkpoint (corrupt or another file type)"
            ) from None
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain "
            f"data{what}; only weight files are accepted"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt files
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot read {path}: not a complete torch checkpoint (truncated or corrupt?) "
            f"[{type(err).__name__}: {detail}]"
        ) from None


def _split_payload(obj: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (state dict, metadata) from any of the accepted layouts."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a HoVer-Net checkpoint")
    if "desc" in obj:
        state = obj["desc"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: 'desc' is a {type(state).__name__}, not a state dict")
        metadata = {k: v for k, v in obj.items() if k != "desc" and k not in _TRAINING_STATE}
        return dict(state), metadata
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), {}
    some = ", ".join(sorted(map(str, obj))[:5])
    raise CheckpointError(
        f"{path} is not a HoVer-Net checkpoint: expected a 'desc' entry or a bare state dict, "
        f"found keys {some}"
    )


def _strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` that DataParallel adds, when every key carries it."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module.") :]: value for key, value in state.items()}
    return state


def infer_layout(state: Mapping[str, Any], source: str = "checkpoint") -> tuple[str, int | None]:
    """(mode, nr_types) of a state dict, read from tensor shapes."""
    if is_lite_state(state):
        try:
            return LITE_MODE, shape_of_state(state)[1]  # type: ignore[arg-type]
        except (KeyError, AttributeError, IndexError) as err:
            raise CheckpointError(f"{source}: an incomplete lite state dict ({err})") from None
    conva = state.get(MODE_KEY)
    if not isinstance(conva, torch.Tensor) or conva.ndim != 4:
        raise CheckpointError(f"{source} is not a HoVer-Net state dict: no tensor {MODE_KEY!r}")
    mode = _MODE_BY_KSIZE.get(int(conva.shape[-1]))
    if mode is None:
        raise CheckpointError(
            f"{source}: {MODE_KEY} has kernel {tuple(conva.shape[-2:])}, expected 3x3 (fast) "
            "or 5x5 (original)"
        )
    tp = state.get(TYPES_KEY)
    if tp is None:
        return mode, None
    if not isinstance(tp, torch.Tensor) or tp.ndim != 4:
        raise CheckpointError(f"{source}: {TYPES_KEY} is not a 4-D conv kernel")
    return mode, int(tp.shape[0])


def _few(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_fits(model: Network, state: dict[str, Any], source: str) -> dict[str, Any]:
    """Compare keys and shapes with ``model``; fill absent BatchNorm counters like torch does."""
    expected = model.state_dict()
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: entries that are not tensors: {_few(not_tensors)}")
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
        layout = f"{model.mode} mode, nr_types={model.nr_types}"
        raise CheckpointError(f"{source} does not fit HoVer-Net ({layout}): " + "; ".join(parts))
    for key, ref in expected.items():
        if key in state and tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(ref.shape)} (first mismatch)"
            )
    filled = dict(state)
    for key, ref in expected.items():
        filled.setdefault(key, torch.zeros_like(ref))  # only num_batches_tracked can be absent
    return filled


def model_from_state_dict(
    state: Mapping[str, Any], source: str = "state dict", metadata: dict[str, Any] | None = None
) -> Network:
    """Build the network that ``state`` describes and load it (eval mode, CPU)."""
    state = _strip_module_prefix(dict(state))
    mode, nr_types = infer_layout(state, source)
    model: Network
    if mode == LITE_MODE:
        model = LiteHoVerNet(nr_types, shape_of_state(state)[0])
    else:
        model = HoVerNet(mode=mode, nr_types=nr_types)
    model.load_state_dict(_check_fits(model, state, source), strict=True)
    model.metadata = dict(metadata or {})
    return model.eval()


def load_model(path: str | Path, device: str | torch.device | None = "cpu") -> Network:
    """Load any accepted checkpoint layout into a :class:`HoVerNet` in eval mode.

    The file is read with ``weights_only=True``: a pickle that would run code is refused with a
    :class:`CheckpointError`, never executed. Entries stored next to ``desc`` (other than the
    optimizer state) are exposed as ``model.metadata``. ``device`` may be "auto".
    """
    path = Path(path)
    state, metadata = _split_payload(_read_file(path), path)
    model = model_from_state_dict(state, source=str(path), metadata=metadata)
    return model.to(resolve_device(device))


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, str | int | float | bool):
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"metadata key {key!r} in {where} must be a string")
            _check_plain(item, f"{where}.{key}")
        return
    raise CheckpointError(
        f"metadata {where} is a {type(value).__name__}; only str/int/float/bool/list/dict allowed"
    )


def save_checkpoint(
    model: Network, path: str | Path, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``{"desc": state_dict, **extra}`` atomically (temp file in the same folder + rename).

    The layout is the official one, so the reference code (``torch.load(p)["desc"]``),
    TIAToolbox (after taking ``["desc"]``) and :func:`load_model` all read it.
    """
    path = Path(path)
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    reserved = {"desc", *_TRAINING_STATE} & extra.keys()
    if reserved:
        raise CheckpointError(f"extra may not use the reserved key(s) {sorted(reserved)}")
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    payload = {"desc": state, **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path
