"""glibc malloc settings for worker processes: keep freed memory for the next tile.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which returns freed memory to
the system at once and also turns off glibc's adaptive mmap threshold, so every allocation over
128 KiB is a fresh ``mmap``. The network's activations (tens of MB per layer) and the
post-processing windows are allocated and freed once per tile, so each tile pays again for
zeroing new pages: measured on the lite network, a quarter of a worker's CPU time went to page
faults in the kernel. With one arena, no mmap'd chunks and a trim threshold above a worker's
working set, freed blocks are reused instead. A worker's peak memory is unchanged (it is what
the largest tile needs); its resident memory simply stays at that peak between tiles.

A variable already set in the environment of the process that starts the cluster wins over
these (distributed's rule for ``distributed.nanny.pre-spawn-environ``), so a user can still
choose otherwise.
"""

from __future__ import annotations

GIB = 1 << 30

WORKER_ALLOCATOR_ENV: dict[str, str] = {
    # one arena: allocations from worker threads come from the brk heap too (a thread arena's
    # 64 MiB heaps cannot hold an activation, so it would mmap again)
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",  # no chunk gets its own mapping, so none is unmapped on free
    "MALLOC_TRIM_THRESHOLD_": str(4 * GIB),  # keep up to this much free memory for reuse
}
