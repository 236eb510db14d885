"""CUDA inference: reduced-precision drift on the parity fixtures, then tile throughput per batch
size, precision, staging and torch.compile.

    python benchmarks/gpu_inference.py [--batches 8,16,32,64] [--tile 12] [--rounds 3]
                                       [--compile] [--checkpoint model.pt] [--skip-drift]

Drift: :func:`hoverdask.model.gpu.precision_drift` of bfloat16 and float16 against fp32 on each
parity configuration's fixture inputs (weights from tests/parity_weights.py; with --checkpoint,
that network's on the inputs of its mode), and how far CUDA fp32 (TF32 convolutions by default)
is from the reference logits.

Throughput: patches/s for one map tile of --tile x --tile patches of the fast network (the
pipeline's default 1968 px tile is 12 x 12), through ``PatchPredictor.predict_tile`` as the
pipeline calls it. Variants, timed in turns and best of --rounds: ``sequential`` (predict_patches
batch by batch, as before the staged runner), ``staged x1`` (pinned buffers and side streams, one
batch in flight: no overlap) and ``staged x2`` (batch i+1 uploaded while batch i computes);
--compile adds ``compiled x2`` and prints its first (compiling) and a steady tile's seconds. For each
precision the batch size that "auto" picks is printed and timed too. Needs CUDA.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/parity_weights.py regenerates the fixture weights

from hoverdask.model import load_model, patch_geometry, predict_patches
from hoverdask.model.gpu import StagedPatchRunner, precision_drift
from hoverdask.model.infer import AUTOCAST_DTYPES
from hoverdask.pipeline.predictors import PatchPredictor
from tests.conftest import PARITY, parity_npz
from tests.parity_weights import parity_model

INPUTS = {"fast": "input_fast_256.npy", "original": "input_original_270.npy"}
PRECISIONS = {"fp32": None, **AUTOCAST_DTYPES}


def drift_report(checkpoint: Path | None) -> None:
    print("== precision drift vs fp32 on CUDA (parity fixture inputs) ==")
    print(f"{'network':<16}{'dtype':<10}{'np max':>9}{'np mean':>10}{'hv max':>9}{'hv mean':>10}"
          f"{'tp max':>9}{'tp mean':>10}{'np flip':>9}{'tp flip':>9}{'inf/nan':>9}")
    networks: dict[str, tuple[torch.nn.Module, str]] = {}
    if checkpoint is not None:
        model = load_model(checkpoint, "cuda")
        networks[checkpoint.name] = (model, model.mode)
    else:
        for config in ("fast_t6", "original_t5", "original_tnone"):
            networks[config] = (parity_model(config).cuda(), config.split("_")[0])
            reference = parity_npz(f"forward_{config}.npz")
            with torch.inference_mode():
                x = torch.from_numpy(np.load(PARITY / INPUTS[config.split("_")[0]])).cuda()
                logits = networks[config][0](x.permute(0, 3, 1, 2).float())
            worst = max(float(np.abs(v.float().cpu().numpy() - reference[f"logits_{k}"]).max())
                        for k, v in logits.items())
            print(f"{config:<16}fp32 CUDA vs reference logits: max |diff| {worst:.2e}")
    for name, (model, mode) in networks.items():
        patches = np.load(PARITY / INPUTS[mode])
        for dtype in AUTOCAST_DTYPES:
            d = precision_drift(model, patches, device="cuda", dtype=dtype)
            tp = (f"{d.tp_max:>9.4f}{d.tp_mean:>10.5f}" if d.tp_max is not None
                  else f"{'-':>9}{'-':>10}")
            tp_flip = f"{d.tp_changed:>9.3%}" if d.tp_changed is not None else f"{'-':>9}"
            print(f"{name:<16}{dtype:<10}{d.np_max:>9.4f}{d.np_mean:>10.5f}{d.hv_max:>9.4f}"
                  f"{d.hv_mean:>10.5f}{tp}{d.np_changed:>9.3%}{tp_flip}{d.nonfinite:>9}")


def timed(run: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> None:
    model = (load_model(args.checkpoint, "cuda") if args.checkpoint
             else parity_model("fast_t6").cuda())
    geometry = patch_geometry(model.mode)
    side = args.tile * geometry.output + 2 * geometry.margin
    window = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    count = args.tile**2
    print(f"\n== throughput: one tile of {args.tile}x{args.tile} = {count} {model.mode} patches, "
          f"best of {args.rounds} ==")
    print(f"{'precision':<10}{'batch':>7}  {'variant':<13}{'patches/s':>10}{'peak GiB':>10}")
    for label, dtype in PRECISIONS.items():
        runner = StagedPatchRunner(model, "cuda", dtype=dtype)
        # one compiled runner per precision: later batch sizes show what recompiling costs
        compiled = (StagedPatchRunner(model, "cuda", dtype=dtype, compile=True)
                    if args.compile else None)
        auto = runner.auto_batch_size(geometry.input)
        print(f"{label:<10}auto batch size: {auto}")
        batches = sorted({*args.batches, auto})
        for batch in batches:
            variants = _variants(model, dtype, label, batch, runner, compiled)
            best = dict.fromkeys(variants, float("inf"))
            peaks: dict[str, float] = {}
            for name, predictor in variants.items():  # warm-up, compile, peak memory
                torch.cuda.reset_peak_memory_stats()
                first = timed(lambda p=predictor: p.predict_tile(window, (0, 0)))
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
                if name.startswith("compiled"):
                    steady = timed(lambda p=predictor: p.predict_tile(window, (0, 0)))
                    print(f"{label:<10}{batch:>7}  {name:<13}first tile {first:.1f} s, "
                          f"then {steady:.2f} s")
            for _ in range(args.rounds):
                for name, predictor in variants.items():
                    best[name] = min(best[name],
                                     timed(lambda p=predictor: p.predict_tile(window, (0, 0))))
            for name, seconds in best.items():
                note = " (auto)" if batch == auto else ""
                if variants[name].batch_size != batch:  # out of memory: halved on the way
                    note += f" (ran at batch {variants[name].batch_size})"
                print(f"{label:<10}{batch:>7}  {name:<13}{count / seconds:>10.1f}"
                      f"{peaks[name]:>10.2f}{note}")


def _variants(
    model: torch.nn.Module,
    dtype: torch.dtype | None,
    label: str,
    batch: int,
    runner: StagedPatchRunner,
    compiled: StagedPatchRunner | None,
) -> dict[str, PatchPredictor]:
    geometry = patch_geometry(model.mode)
    make = functools.partial(PatchPredictor, margin=geometry.margin, output=geometry.output,
                             nr_types=model.nr_types, batch_size=batch)
    sequential = functools.partial(predict_patches, model, device="cuda",
                                   autocast=dtype is not None,
                                   autocast_dtype=label if dtype is not None else "bfloat16")
    variants = {
        "sequential": make(sequential, in_flight=1),
        "staged x1": make(runner, in_flight=1),
        "staged x2": make(runner, in_flight=2),
    }
    if compiled is not None:
        variants["compiled x2"] = make(compiled, in_flight=2)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,16,32,64",
                        type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--tile", type=int, default=12, help="patches per tile side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--checkpoint", type=Path, help="a trained network instead of the "
                        "parity weights")
    parser.add_argument("--skip-drift", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_inference.py needs CUDA, and torch.cuda.is_available() "
                         "is false here; on CPU see benchmarks/model_throughput.py")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"TF32 convolutions: {torch.backends.cudnn.allow_tf32}")
    if not args.skip_drift:
        drift_report(args.checkpoint)
    throughput(args)


if __name__ == "__main__":
    main()
