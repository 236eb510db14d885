"""HoVer-Net network throughput on this machine: every layout/batch tried, and the best.

    python benchmarks/model_throughput.py [--device cpu|cuda|auto] [--seconds 20]

Prints the analytic GFLOP per patch of each layout, each timed variant, the best GFLOP/s,
output megapixels/s and the utilisation of the large-matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse

from hoverdask.bench import bench_model, conv_gflop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

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
