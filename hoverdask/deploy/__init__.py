"""Where the work runs: a local cluster or an external scheduler, TLS, SLURM, the Dask log
files and this machine's last bench figures. May import :mod:`hoverdask.core` only; knows
nothing of segmentation."""
