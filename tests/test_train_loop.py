"""The training loop: schedule, loss going down, frozen encoder, checkpoints, resume, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_dataset
from typer.testing import CliRunner

from hoverdask.cli import app
from hoverdask.model import HoVerNet
from hoverdask.model.checkpoints import load_model, save_checkpoint
from hoverdask.train.batches import WindowSource
from hoverdask.train.datasets import open_dataset
from hoverdask.train.loop import (
    LOG_COLUMNS,
    TrainConfig,
    _train_step,
    initialise_from,
    schedule,
    train,
)

TINY = 96  # training window for CPU tests: the fast network gives 4x4 outputs


def test_schedule_two_stages_with_a_late_drop() -> None:
    config = TrainConfig(data=(), out=Path("x.tar"), steps=8)
    got = [schedule(config, step) for step in range(8)]
    assert got == [(1, 1e-4)] * 2 + [(1, 1e-5)] * 2 + [(2, 1e-4)] * 2 + [(2, 1e-5)] * 2


def test_a_few_steps_on_one_batch_reduce_the_loss() -> None:
    data = open_dataset(shared_dataset("consep-train-tiles"))
    source = WindowSource(
        [data], input_size=TINY, output_size=4, nr_types=5, batch_size=2, seed=1, augment=False
    )
    batch = next(b for b in (source[k] for k in range(50)) if 8 < int(b["np"].sum()) < 24)
    torch.manual_seed(0)
    model = HoVerNet("fast", 5).set_freeze(True)
    encoder_before = model.d2.units[0].conv1.weight.detach().clone()
    decoder_before = model.decoder.np.u0.conv.weight.detach().clone()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    config = TrainConfig(data=(), out=Path("x.tar"))
    device = torch.device("cpu")
    losses = [_train_step(model, batch, optimiser, config, device, None, None)[0] for _ in range(3)]
    assert losses[2] < losses[0]
    assert torch.equal(model.d2.units[0].conv1.weight, encoder_before)  # frozen in stage one
    assert not torch.equal(model.decoder.np.u0.conv.weight, decoder_before)


def test_initialise_from_another_type_layout(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = HoVerNet("fast", 6)
    save_checkpoint(source, tmp_path / "pannuke.tar")
    target = HoVerNet("fast", 3)
    note = initialise_from(target, tmp_path / "pannuke.tar")
    assert torch.equal(target.d3.units[1].conv2.weight, source.d3.units[1].conv2.weight)
    assert torch.equal(target.decoder.np.u0.conv.weight, source.decoder.np.u0.conv.weight)
    # only the last tp conv depends on the number of types; it starts fresh
    assert torch.equal(target.decoder.tp.u1.conva.weight, source.decoder.tp.u1.conva.weight)
    assert target.decoder.tp.u0.conv.weight.shape[0] == 3
    assert "2 tensors start fresh (decoder.tp)" in note


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    data = (shared_dataset("consep-train-tiles"),)
    common = {"data": data, "mode": "fast", "nr_types": 5, "steps": 2, "batch_size": 1,
              "device": "cpu", "input_size": TINY, "seed": 4}
    straight = TrainConfig(out=tmp_path / "a.tar", **common)
    train(straight)

    class Stop(Exception):
        pass

    def stop_after_one(log: object) -> None:
        if getattr(log, "step", 0) == 1:
            raise Stop

    interrupted = TrainConfig(out=tmp_path / "b.tar", **common)
    with pytest.raises(Stop):
        train(interrupted, progress=stop_after_one)  # stage one ends at step 1: saved
    assert load_model(interrupted.out).metadata["hoverdask"]["training"]["step"] == 1
    with interrupted.log_path.open("a") as log:  # a step logged after the last save
        log.write("2,2,0.0001,99,,,,,,,1\n")
    train(TrainConfig(out=tmp_path / "b.tar", resume=True, **common))

    a, b = load_model(straight.out), load_model(interrupted.out)
    assert a.metadata["hoverdask"]["training"]["step"] == 2
    assert a.metadata["hoverdask"]["type_table"] == "consep"
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    rows = _rows(interrupted.log_path)
    assert list(rows[0]) == list(LOG_COLUMNS)
    assert [r["step"] for r in rows] == ["1", "2"]
    assert [r["stage"] for r in rows] == ["1", "2"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(straight.log_path)]


@pytest.mark.slow
def test_cli_train_writes_a_checkpoint_load_model_reads(tmp_path: Path) -> None:
    out = tmp_path / "m.tar"
    result = CliRunner().invoke(app, [
        "train", "--data", str(shared_dataset("cpm15")), "--mode", "fast", "--steps", "2",
        "--batch-size", "1", "--device", "cpu", "--out", str(out), "--input-size", str(TINY),
        "--log-every", "1", "--val", str(shared_dataset("cpm15")), "--val-windows", "1",
    ])
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert (model.mode, model.nr_types) == ("fast", None)
    rows = _rows(out.with_name("m.tar.csv"))
    assert [r["stage"] for r in rows] == ["1", "val1", "2", "val2"]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert rows[0]["tp_ce"] == ""


def test_cli_train_refuses_types_for_untyped_data(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "train", "--data", str(shared_dataset("cpm15")), "--nr-types", "5", "--steps", "1",
        "--device", "cpu", "--out", str(tmp_path / "m.tar"),
    ])
    assert result.exit_code == 2
    assert "no dataset has nucleus types" in result.output
    assert not (tmp_path / "m.tar").exists()


def test_cosine_schedule_for_lite_warms_up_then_decays_to_the_floor() -> None:
    config = TrainConfig(data=(), out=Path("x.tar"), mode="lite", steps=200)
    assert (config.schedule_name, config.peak_lr, config.stage_one_steps) == ("cosine", 2e-3, 0)
    lrs = [schedule(config, step) for step in range(200)]
    assert {stage for stage, _ in lrs} == {2}  # one stage: nothing frozen
    rates = np.array([lr for _, lr in lrs])
    warmup = 6  # 3 % of the steps
    np.testing.assert_allclose(rates[:warmup], 2e-3 * np.arange(1, warmup + 1) / warmup)
    assert rates[warmup] == pytest.approx(2e-3)
    assert (np.diff(rates[warmup:]) <= 0).all()
    assert rates[-1] == pytest.approx(2e-3 * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * 193 / 194))))
    assert config.window_sizes() == (256, 224)  # lite: a 16 px border when training
    assert TrainConfig(data=(), out=Path("x.tar"), mode="lite", lr=1e-3).peak_lr == 1e-3
    paper = TrainConfig(data=(), out=Path("x.tar"), mode="lite", schedule="paper", steps=8)
    assert paper.stage_one_steps == 4


def test_cli_train_lite_validates_on_held_out_images_only(tmp_path: Path) -> None:
    consep, cpm = shared_dataset("consep-train-tiles"), shared_dataset("cpm15")
    holdout = tmp_path / "holdout.json"
    holdout.write_text(json.dumps({"held_out": {consep.name: ["train_3_*"], cpm.name: ["image02"]}}))
    out = tmp_path / "lite.tar"
    result = CliRunner().invoke(app, [
        "train", "--data", str(consep), "--data", str(cpm), "--mode", "lite", "--nr-types", "5",
        "--steps", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out),
        "--input-size", "64", "--holdout", str(holdout), "--val-windows", "2",
        "--loss-weight", "hv_msge=4",
    ])
    assert result.exit_code == 0, result.output
    assert "consep-tiles, 416 images" in result.output  # 432 less the 16 tiles of train_3
    assert "held out for validation" in result.output
    model = load_model(out)
    assert (model.mode, model.nr_types) == ("lite", 5)
    assert model.metadata["hoverdask"]["type_table"] == "consep"
    rows = _rows(out.with_name("lite.tar.csv"))
    assert [r["stage"] for r in rows] == ["2", "2", "val2"]
    assert rows[0]["lr"] == str(2e-3 * 1 / 1)  # one warm-up step of two: straight to the peak
