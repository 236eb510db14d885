"""Speed work that must not change results, and the bench figures' bookkeeping.

The CPU inference copy (what ``predict_patches`` runs there) is checked against the reference
logits of the parity fixtures; the end-to-end figures against the slide's known size and tiles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hoverdask.bench import (
    bench_end_to_end,
    bench_model,
    conv_gflop,
    latest_figures,
    latest_figures_path,
    remember_figures,
)
from hoverdask.model import HoVerNet
from hoverdask.model.infer import NearestUpSample2x, cpu_inference_model
from hoverdask.model.network import UpSample2x
from tests.conftest import PARITY, cpu_client, parity_npz
from tests.parity_weights import parity_model


def test_cpu_inference_model_matches_reference_logits() -> None:
    model = parity_model("fast_t6")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    used = cpu_inference_model(model)  # nearest upsampling, channels_last
    assert isinstance(used.upsample2x, NearestUpSample2x)
    images = torch.from_numpy(np.load(PARITY / "input_fast_256.npy")).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        got, plain = used(images), model(images)
    reference = parity_npz("forward_fast_t6.npz")
    for head in ("tp", "np", "hv"):
        error = float(np.abs(got[head].numpy() - reference[f"logits_{head}"]).max())
        drift = float(np.abs(got[head].numpy() - plain[head].numpy()).max())
        print(f"{head}: max abs error to the reference {error:.2e}, to the model {drift:.2e}")
        assert error < 1e-4, (head, error)  # the parity tolerance
        assert drift < 1e-4, (head, drift)
    after = model.state_dict()  # the checkpoint layout is untouched
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not isinstance(model.upsample2x, NearestUpSample2x)


def test_nearest_upsampling_equals_the_reference_unpooling() -> None:
    x = torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last)
    want = UpSample2x()(x)
    got = NearestUpSample2x()(x)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)  # what makes it faster


def test_cpu_inference_model_follows_weight_changes() -> None:
    torch.manual_seed(0)
    model, other = HoVerNet("fast", 3).eval(), HoVerNet("fast", 3).eval()
    with torch.no_grad():
        for m in (model, other):
            for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 96, 96) * 255
    first = cpu_inference_model(model)
    assert cpu_inference_model(model) is first  # cached while nothing changes
    model.load_state_dict(other.state_dict())  # in-place copies: a new inference copy is due
    refreshed = cpu_inference_model(model)
    assert refreshed is not first
    with torch.inference_mode():
        want, got = other(x), refreshed(x)
    for head in want:
        np.testing.assert_allclose(got[head].numpy(), want[head].numpy(), atol=1e-4, rtol=1e-4)


def test_bench_model_figures_are_consistent() -> None:
    result = bench_model("cpu", seconds=1.0, batch_sizes=(1, 2), input_size=96)
    gflop = conv_gflop("fast", 6, 96)
    assert result["gflop_per_patch"] == pytest.approx(gflop)
    timed = [t for t in result["tried"] if "seconds" in t]
    assert {t["memory_format"] for t in timed} == {"channels_last", "contiguous"}
    same_layout = {t["batch_size"]: t["seconds"] for t in timed
                   if t["memory_format"] == result["memory_format"]}
    assert set(same_layout) == {1, 2}
    best = min(same_layout, key=lambda b: same_layout[b] / b)
    assert result["batch_size"] == best
    assert result["gflop_per_s"] == pytest.approx(gflop * best / same_layout[best])
    assert result["utilisation"] == pytest.approx(result["gflop_per_s"] / result["peak_gflop_per_s"])
    assert result["mpix_per_s"] == pytest.approx(best * 4**2 / same_layout[best] / 1e6)


def test_latest_figures_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert latest_figures_path().is_relative_to(tmp_path)
    assert latest_figures() is None
    results = {
        "measured_at": "2026-01-01T00:00:00+00:00",
        "model": {"device": "cpu", "gflop_per_s": 120.0, "peak_gflop_per_s": 200.0,
                  "mpix_per_s": 0.01},
        "postproc": {"mpix_per_s": 5.0},
        "end_to_end": {"mpix_per_s": 0.008, "slide_mpix_per_s": 0.006, "tissue_fraction": 0.75},
    }
    path = remember_figures(results)
    assert json.loads(path.read_text()) == results
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    figures = latest_figures()
    assert figures is not None
    assert figures["model_gflop_per_s"] == 120.0
    assert figures["model_peak_gflop_per_s"] == 200.0
    assert figures["postproc_mpix_per_s"] == 5.0
    assert figures["end_to_end_mpix_per_s"] == 0.008
    assert figures["end_to_end_slide_mpix_per_s"] == 0.006
    assert figures["tissue_fraction"] == 0.75
    path.write_text("{not json")
    assert latest_figures() is None


@pytest.fixture(scope="module")
def client():
    with cpu_client(workers=1, threads=2) as client:
        yield client


@pytest.mark.slow
@pytest.mark.parametrize("glass", [0.0, 0.5])
def test_end_to_end_counts_processed_and_slide_pixels(client, tmp_path: Path, glass: float):
    from hoverdask.pipeline.predictors import ArrayPredictorFactory
    from hoverdask.slide.synthetic import synthetic_pred_map

    size, chunk = 984, 328  # a 3 x 3 grid of 328-pixel map tiles (2 patch outputs each)
    np.save(tmp_path / "maps.npy", synthetic_pred_map(size, size, 6, seed=1))
    factory = ArrayPredictorFactory(str(tmp_path / "maps.npy"), margin=46, output=164, nr_types=6)
    result = bench_end_to_end(None, "cpu", size, glass_fraction=glass, predictor_factory=factory,
                              client=client, chunk_size=chunk)
    assert result["map_tiles"] == 9
    assert result["slide_megapixels"] == pytest.approx(size * size / 1e6)
    # glass patches of tissue tiles are not processed
    assert result["patches_total"] == result["tissue_tiles"] * 4
    assert result["processed_megapixels"] == pytest.approx(result["patches_run"] * 164**2 / 1e6)
    assert result["tissue_fraction"] == pytest.approx(
        result["processed_megapixels"] / result["slide_megapixels"])
    assert result["synthetic_glass_fraction"] == glass
    assert result["random_weights"] is False
    assert result["mpix_per_s"] * result["seconds"] == pytest.approx(
        result["processed_megapixels"])
    assert result["slide_mpix_per_s"] * result["seconds"] == pytest.approx(size * size / 1e6)
    if glass == 0.0:
        assert result["tissue_tiles"] == 9
        assert result["patches_run"] == result["patches_total"]
        assert result["nuclei"] > 100
    else:
        assert 0 < result["tissue_tiles"] < 9  # 7 at this seed
    # the tissue mask sees about as much tissue as the synthetic picture holds
    assert result["tissue_mask_fraction"] == pytest.approx(1 - glass, abs=0.1)
    assert result["seconds_per_mm2"] * result["processed_megapixels"] * 0.0625 == pytest.approx(
        result["seconds"])
    assert 0.0 < result["inference_busy_fraction"] <= 1.0  # one worker: its tiles, back to back
    breakdown = result["breakdown"]  # the run's run.json breakdown
    assert breakdown["worker_threads"] == 2
    assert breakdown["processed_mm2"] == pytest.approx(result["processed_megapixels"] * 0.0625)
    assert breakdown["s_per_mm2"] == pytest.approx(breakdown["wall_s"] / breakdown["tissue_mm2"])
    assert sum(breakdown["shares"].values()) == pytest.approx(1.0, abs=1e-6)


def test_bench_model_measures_the_network_it_is_given() -> None:
    from hoverdask.model import LiteHoVerNet
    from hoverdask.model.lite import LiteShape

    network = LiteHoVerNet(5, LiteShape((8, 16), 1))
    result = bench_model("cpu", seconds=1.0, batch_sizes=(1,), input_size=96, network=network)
    output = 96 - 2 * 32  # the lite margin
    gflop = conv_gflop(size=96, network=network)
    assert (result["mode"], result["nr_types"]) == ("lite", 5)
    assert result["gflop_per_patch"] == pytest.approx(gflop)
    assert result["mflop_per_px"] == pytest.approx(gflop * 1e3 / output**2)
    assert result["mpix_per_s"] == pytest.approx(output**2 / result["seconds_per_batch"] / 1e6)


def test_bench_model_autocast_on_cpu_is_bfloat16_only_where_the_cpu_has_it() -> None:
    from hoverdask.model import LiteHoVerNet
    from hoverdask.model.infer import cpu_has_native_bfloat16
    from hoverdask.model.lite import LiteShape

    network = LiteHoVerNet(5, LiteShape((8, 16), 1))
    fp32 = bench_model("cpu", seconds=1.0, batch_sizes=(1,), input_size=96, network=network)
    low = bench_model("cpu", seconds=1.0, batch_sizes=(1,), input_size=96, network=network,
                      autocast=True)
    assert fp32["autocast"] is False
    assert low["autocast"] is cpu_has_native_bfloat16()


def test_bench_rows_show_the_end_to_end_breakdown() -> None:
    from hoverdask.bench import bench_rows
    from hoverdask.pipeline.breakdown import breakdown

    stages = {"inference": 8.0, "pass2_read": 1.0, "pass3_segment": 2.0, "oversized": 1.0,
              "features": 4.0, "writing": 2.0, "plan": 2.0}
    results = {
        "model": {"name": "m", "mode": "fast", "gflop_per_s": 1.0, "peak_gflop_per_s": 2.0,
                  "utilisation": 0.5, "mpix_per_s": 0.1, "batch_size": 1,
                  "memory_format": "channels_last"},
        "postproc": {"mpix_per_s": 5.0},
        "end_to_end": {"mpix_per_s": 0.1, "slide_mpix_per_s": 0.1, "tissue_fraction": 1.0,
                       "synthetic_glass_fraction": 0.25, "seconds_per_mm2": 9.0,
                       "inference_busy_fraction": 0.9,
                       "breakdown": breakdown(stages, wall_s=10.0, worker_threads=4,
                                              tissue_mm2=0.5, processed_mm2=0.6)},
    }
    rows = dict(bench_rows(results))
    assert "post-processing Mpx/s per core, as run (passes 1-3 + features)" not in rows
    results["postproc"]["run_mpix_per_s_per_core"] = 4.5
    rows = dict(bench_rows(results))
    assert rows["post-processing Mpx/s per core, as run (passes 1-3 + features)"] == "4.50"
    assert rows["end-to-end s per tissue mm²"] == "20.0"
    label = "share of wall x 4 threads: "
    assert rows[label + "inference"] == "20.0%"
    assert rows[label + "post-processing (passes 1-3, refit, their map reads)"] == "10.0%"
    assert rows[label + "features"] == "10.0%"
    assert rows[label + "writing the files"] == "5.0%"
    assert rows[label + "overhead (scheduling, waiting)"] == "50.0%"
    del results["end_to_end"]["breakdown"]  # figures of earlier versions
    assert not any(name.startswith("share") for name, _ in bench_rows(results))
