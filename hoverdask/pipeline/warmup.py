"""Get a worker process ready before its first task: imports and compiled kernels.

A fresh worker spends about two seconds importing torch, the network code and the task modules
(geopandas, zarr, scikit-image...), and loading the compiled post-processing kernels. Paid
inside the first task it runs, that delays the slide's plan and leaves a second worker idle
while the first one already predicts; the kernels would load at the post-processing barrier,
where every worker waits for the slowest. Started on all workers at once, as soon as the
cluster is up, it overlaps with the client's own checks and with the other workers.
"""

from __future__ import annotations


async def prepare_worker() -> None:
    """Import what tasks need and load the compiled kernels, off the worker's event loop.

    A coroutine because ``client.run(..., wait=False)`` takes only coroutine functions; the
    plugin's ``setup`` and the first tasks simply find the modules imported (Python's import
    lock makes them wait for an import still under way).
    """
    import asyncio

    await asyncio.get_running_loop().run_in_executor(None, import_worker_modules)


def import_worker_modules() -> None:
    import torch  # noqa: F401

    import hoverdask.model.infer
    import hoverdask.pipeline.plan
    import hoverdask.pipeline.postprocess
    import hoverdask.pipeline.tasks  # noqa: F401
    from hoverdask.nuclei.compiled import warm

    warm()
