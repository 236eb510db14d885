"""Checkpoint layouts, safe loading, broken files, type tables and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.core.errors import CheckpointError, HoverdaskError
from hoverdask.core.types import CONSEP, MONUSAC, PANNUKE, load_type_table, select_type_table
from hoverdask.model import (
    HoVerNet,
    load_model,
    model_from_state_dict,
    save_checkpoint,
    sha256_of,
)
from tests.parity_weights import CONFIGS, config_model_args, parity_state_dict

SEG_ONLY = "original_tnone"  # the smallest layout: keeps the files written here small


def _without_counters(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """What the tf2pytorch conversion writes: no BatchNorm ``num_batches_tracked``."""
    return OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))


def _assert_state_equal(model: HoVerNet, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key].cpu(), value), key


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "hovernet_original_kumar_notype_tf2pytorch.tar"
    torch.save({"desc": dict(_without_counters(parity_state_dict(SEG_ONLY)))}, path)
    return path


@pytest.mark.parametrize("config", CONFIGS)
def test_layout_is_read_from_tensor_shapes(config: str) -> None:
    mode, nr_types = config_model_args(config)
    model = model_from_state_dict(HoVerNet(mode, nr_types).state_dict())
    assert (model.mode, model.nr_types, model.training) == (mode, nr_types, False)


def test_official_layout_without_batch_counters_loads(official_file: Path) -> None:
    model = load_model(official_file)
    assert (model.mode, model.nr_types, model.metadata) == ("original", None, {})
    _assert_state_equal(model, parity_state_dict(SEG_ONLY))


def test_repo_trained_layout_with_module_prefix_and_optimizer(tmp_path: Path) -> None:
    state = parity_state_dict(SEG_ONLY)
    path = tmp_path / "net_epoch=50.tar"
    torch.save(
        {
            "desc": OrderedDict((f"module.{k}", v) for k, v in state.items()),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "lr_scheduler": {"step_size": 25, "gamma": 0.1, "last_epoch": 50},
        },
        path,
    )
    model = load_model(path)
    _assert_state_equal(model, state)
    assert model.metadata == {}


def test_tiatoolbox_bare_state_dict(tmp_path: Path) -> None:
    state = parity_state_dict(SEG_ONLY)
    path = tmp_path / "hovernet_original-kumar.pth"
    torch.save(state, path)
    _assert_state_equal(load_model(path), state)


def test_save_checkpoint_round_trip_and_reference_reader(tmp_path: Path) -> None:
    model = model_from_state_dict(parity_state_dict(SEG_ONLY))
    extra = {"hoverdask": {"type_names": None, "mpp": 0.25, "epochs": [1, 2]}}
    path = save_checkpoint(model, tmp_path / "sub" / "trained.tar", extra=extra)
    assert sorted(p.name for p in path.parent.iterdir()) == ["trained.tar"]  # no temp left
    # the reference reader: torch.load(p)["desc"] into a fresh net, strict
    reference_net = HoVerNet("original", None)
    reference_net.load_state_dict(torch.load(path)["desc"], strict=True)
    _assert_state_equal(reference_net, parity_state_dict(SEG_ONLY))
    loaded = load_model(path)
    assert loaded.metadata == extra
    assert sha256_of(path) == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_save_checkpoint_refuses_non_plain_metadata(tmp_path: Path) -> None:
    model = HoVerNet("original", None)
    with pytest.raises(CheckpointError, match="ndarray"):
        save_checkpoint(model, tmp_path / "x.tar", extra={"a": np.zeros(2)})
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(model, tmp_path / "x.tar", extra={"desc": 1})
    assert not list(tmp_path.iterdir())


# ---- broken and hostile files -------------------------------------------------------------


def _mutated(tmp_path: Path, change: str) -> Path:
    state = dict(HoVerNet("original", None).state_dict())
    if change == "missing":
        del state["d2.units.3.conv2.weight"]
    elif change == "unexpected":
        state["decoder.tp.u0.conv.bias"] = torch.zeros(5)
    elif change == "shape":
        state["d1.shortcut.weight"] = torch.zeros(512, 256, 3, 3)
    path = tmp_path / f"{change}.tar"
    torch.save({"desc": state}, path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", r"1 missing key\(s\): d2\.units\.3\.conv2\.weight"),
        ("unexpected", r"1 unexpected key\(s\): decoder\.tp\.u0\.conv\.bias"),
        (
            "shape",
            r"d1\.shortcut\.weight has shape \(512, 256, 3, 3\), expected \(512, 256, 1, 1\)",
        ),
    ],
)
def test_state_dicts_that_do_not_fit(tmp_path: Path, change: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_model(_mutated(tmp_path, change))


def test_broken_files(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    torch.save({"desc": {"x": torch.zeros(100_000)}}, good)
    blob = good.read_bytes()
    cases = {
        "empty.tar": (b"", "empty"),
        "truncated.tar": (blob[: len(blob) // 2], "truncated or corrupt"),
        "random.tar": (np.random.default_rng(0).bytes(4096), "not a (complete )?torch checkpoint"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"no tensor 'decoder\.np\.u3\.conva\.weight'"):
        load_model(good)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent.tar")
    torch.save([torch.zeros(1)], tmp_path / "list.tar")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_model(tmp_path / "list.tar")
    torch.save({"epoch": 3, "weights": {}}, tmp_path / "other.tar")
    with pytest.raises(CheckpointError, match="found keys epoch, weights"):
        load_model(tmp_path / "other.tar")


class _Payload:
    """Pickles into a call that creates a marker file when unpickled without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.tar"
    torch.save({"desc": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)
    assert not marker.exists()
    # the payload is live: an unrestricted load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_cli_reports_a_bad_checkpoint_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    from hoverdask import cli

    monkeypatch.setattr(cli.console, "width", 1000)  # rich wraps at the terminal width

    image = tmp_path / "tile.png"
    cv2.imwrite(str(image), np.full((40, 40, 3), 200, np.uint8))
    (tmp_path / "model.tar").write_bytes(b"not a checkpoint at all")
    result = CliRunner().invoke(
        app, ["segment", str(image), "--model", str(tmp_path / "model.tar"), "--out", "o"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error:")
    assert "model.tar" in lines[0]
    assert "Traceback" not in result.output


# ---- type tables --------------------------------------------------------------------------


def test_type_table_selection_rules() -> None:
    assert select_type_table(6, "fast")[0] is PANNUKE
    assert select_type_table(5, "fast")[0] is MONUSAC
    table, reason = select_type_table(5, "original")
    assert table is CONSEP
    assert "CoNSeP" in reason
    assert [CONSEP.name_of(k) for k in range(5)] == [
        "Background",
        "Miscellaneous",
        "Inflammatory",
        "Epithelial",
        "Spindle",
    ]
    assert select_type_table(None, "original") == (None, "the model has no type branch")
    generic = select_type_table(8, "fast")[0]
    assert generic is not None
    assert generic.name_of(7) == "Type 7"
    stored = {"hoverdask": {"type_names": ["bg", "tumour", "immune"]}}
    from_ckpt, reason = select_type_table(3, "fast", stored)
    assert from_ckpt is not None
    assert [from_ckpt.name_of(k) for k in range(3)] == ["bg", "tumour", "immune"]
    assert "checkpoint" in reason
    # metadata naming a known table beats the mode rule for the ambiguous 5-type layout
    assert select_type_table(5, "fast", {"hoverdask": {"type_table": "consep"}})[0] is CONSEP


def test_user_type_table(tmp_path: Path) -> None:
    path = tmp_path / "types.json"
    path.write_text(
        json.dumps(
            {
                "1": {"name": "Tumour", "color": [255, 0, 0]},
                "2": {"name": "Immune", "color": [0, 255, 0]},
            }
        )
    )
    table = load_type_table(path, nr_types=3)
    assert table.name_of(0) == "Background"
    assert (table.name_of(1), table.color_of(2)) == ("Tumour", (0, 255, 0))
    with pytest.raises(HoverdaskError, match=r"no entry for type id\(s\) \[3\]"):
        load_type_table(path, nr_types=4)
    with pytest.raises(HoverdaskError, match=r"ids \[2\] exceed"):
        load_type_table(path, nr_types=2)
    bad = {
        '{"1": {"name": "x", "color": [300, 0, 0]}}': "0..255",
        '{"one": {"name": "x", "color": [1, 2, 3]}}': "non-negative integers",
        '{"1": {"name": "", "color": [1, 2, 3]}}': "non-empty string",
        '{"1": {"name": "x"}}': "each entry",
        "[1, 2]": "JSON object",
        "{not json": "not valid JSON",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(HoverdaskError, match=message):
            load_type_table(path)
    os.remove(path)
    with pytest.raises(HoverdaskError, match="does not exist"):
        load_type_table(path)
