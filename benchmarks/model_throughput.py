"""HoVer-Net network throughput on this machine: every layout/batch tried, and the best.

    python benchmarks/model_throughput.py [--device cpu|cuda|auto] [--seconds 20]
    python benchmarks/model_throughput.py --variants [--rounds 3] [--batch 1] [--jit] [--compile]
                                          [--pair] [--threads 1] [--cpu-time]

Prints the analytic GFLOP per patch of each layout, each timed variant, the best GFLOP/s,
output megapixels/s and the utilisation of the large-matmul peak measured in the same run.

``--variants`` compares, on CPU, what ``predict_patches`` runs (the fused form of
:mod:`hoverdask.model.fused`, all cores) with the alternatives: the inference copy used before it
(channels_last, layout-preserving upsampling), that copy with BatchNorm folded by
``fuse_conv_bn_eval``, the reference upsampling (also in the default layout), one thread, oneDNN
off, with ``--jit`` a frozen TorchScript trace and with ``--compile`` ``torch.compile`` (their
start-up is printed). The variants are timed in turns, ``--rounds`` times, and the best of each
is kept, so that changes in machine load hit all of them alike; the matmul peak is measured in
every round. The load average is printed before and after. ``--pair`` times only
predict_patches and the copy used before it (a short before/after run; with ``--jit`` and
``--compile`` those too). ``--cpu-time --threads 1`` gives ratios that other processes on the
same cores hardly disturb.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import time
from collections.abc import Callable, Iterator

import torch

from hoverdask.bench import MatmulPeak, bench_model, conv_gflop
from hoverdask.model.infer import cpu_inference_model, layout_network
from hoverdask.model.network import HoVerNet


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every BatchNorm that directly follows a conv folded into it (eval mode)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, torch.nn.Sequential):
            for first, second in itertools.pairwise(list(module._modules)):
                conv, norm = module._modules[first], module._modules[second]
                if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                    module._modules[first] = fuse_conv_bn_eval(conv, norm)
                    module._modules[second] = torch.nn.Identity()
    return folded


def _compiled(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # folds BN and prepacks weights for oneDNN
    start = time.perf_counter()
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(x)
        compiled(x)
    print(f"torch.compile (inductor, freezing) + 2 calls: {time.perf_counter() - start:.1f} s start-up")
    return lambda: compiled(x)


def _variants(
    batch: int, jit: bool, compile_: bool
) -> dict[str, tuple[Callable[[], object], Callable]]:
    torch.manual_seed(0)
    plain = HoVerNet("fast", 6).eval()
    used = cpu_inference_model(plain)
    before = layout_network(plain)  # the CPU inference copy before the fused form
    folded = fold_batchnorm(before)
    reference_up = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    contiguous = copy.deepcopy(plain)
    x = torch.rand(batch, 3, 256, 256) * 255
    x_last = x.contiguous(memory_format=torch.channels_last)
    cores = torch.get_num_threads()
    variants = {
        "predict_patches": (lambda: used(x_last), contextlib.nullcontext),
        "before: layout copy": (lambda: before(x_last), contextlib.nullcontext),
        "before, BN folded into the convs": (lambda: folded(x_last), contextlib.nullcontext),
        "reference upsampling": (lambda: reference_up(x_last), contextlib.nullcontext),
        "reference upsampling, contiguous": (lambda: contiguous(x), contextlib.nullcontext),
        "1 thread": (lambda: used(x_last), lambda: _threads(1)),
        "before, oneDNN off": (
            lambda: before(x_last), lambda: torch.backends.mkldnn.flags(enabled=False)
        ),
    }
    if jit:
        start = time.perf_counter()
        traced_model = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        with torch.no_grad():  # freezing folds the BNs itself
            frozen = torch.jit.freeze(torch.jit.trace(traced_model, x_last, strict=False))
            frozen(x_last)
            frozen(x_last)  # the profiling executor optimises on the first calls
        print(f"jit trace + freeze + 2 calls: {time.perf_counter() - start:.1f} s start-up")
        variants["jit.freeze"] = (lambda: frozen(x_last), contextlib.nullcontext)
    if compile_:
        variants["torch.compile"] = (_compiled(before, x_last), contextlib.nullcontext)
    print(f"{cores} threads by default")
    return variants


_PAIR = ("predict_patches", "before: layout copy")
_OPTIONAL = ("jit.freeze", "torch.compile")  # only there when asked for


def compare_variants(
    rounds: int,
    batch: int,
    jit: bool,
    compile_: bool = False,
    pair: bool = False,
    cpu_time: bool = False,
) -> None:
    """Best of ``rounds`` interleaved runs of each variant; ``cpu_time`` times this process's
    CPU seconds instead of wall seconds (with 1 thread, the work itself: other processes on
    shared cores hardly change it; the GFLOP/s are then per busy core, not against the peak)."""
    clock = time.process_time if cpu_time else time.perf_counter
    gflop = conv_gflop("fast", 6) * batch
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    variants = _variants(batch, jit, compile_)
    if pair:
        variants = {k: v for k, v in variants.items() if k in (*_PAIR, *_OPTIONAL)}
    best = dict.fromkeys(variants, float("inf"))
    peak = MatmulPeak(torch.device("cpu"))
    with torch.inference_mode():
        for step, context in variants.values():
            with context():
                step()  # warm-up: oneDNN picks kernels on the first call
        for index in range(rounds):
            for name, (step, context) in variants.items():
                with context():
                    start = clock()
                    step()
                    best[name] = min(best[name], clock() - start)
            peak.sample()
            print(f"round {index}: matmul peak {peak.best}")
    reference = best["predict_patches"]
    unit = "GFLOP per CPU s" if cpu_time else "GFLOP/s"
    for name, seconds in best.items():
        of_peak = "" if cpu_time else f" = {gflop / seconds / peak.gflop_per_s:.0%} of peak"
        print(f"{name:36s} batch {batch}: {gflop / seconds:6.1f} {unit}{of_peak}, "
              f"{reference / seconds:.2f}x of predict_patches")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--variants", action="store_true", help="compare CPU alternatives")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--jit", action="store_true", help="also time torch.jit.freeze")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--pair", action="store_true", help=f"time only {' and '.join(_PAIR)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--cpu-time", action="store_true", help="time CPU seconds, not wall")
    args = parser.parse_args()
    if args.variants:
        if args.threads:
            torch.set_num_threads(args.threads)
        compare_variants(
            args.rounds, args.batch, args.jit, args.compile, args.pair, args.cpu_time
        )
        return

    for mode, nr_types in (("fast", 6), ("fast", 5), ("original", 5), ("original", None)):
        print(f"{mode:8s} nr_types={nr_types!s:4s} {conv_gflop(mode, nr_types):7.1f} GFLOP/patch")
    result = bench_model(args.device, seconds=args.seconds)
    for variant in result["tried"]:
        print("tried", variant)
    print(
        f"device {result['device']} threads {result['threads']}: best batch "
        f"{result['batch_size']} {result['memory_format']}: {result['gflop_per_s']:.1f} GFLOP/s, "
        f"peak {result['peak_gflop_per_s']:.1f} GFLOP/s, utilisation "
        f"{result['utilisation']:.1%}, {result['mpix_per_s']:.4f} output Mpx/s"
    )


if __name__ == "__main__":
    main()
