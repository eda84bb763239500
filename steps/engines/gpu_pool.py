"""Several GPUs on one host: one worker process per GPU, shard jobs spread over them.

vLLM does one engine per process and refuses ``data_parallel_size > 1`` in
``LLM``, so data parallelism is processes: each worker is started with the
``spawn`` method (a forked CUDA context is unusable), sets
``CUDA_VISIBLE_DEVICES`` to its own GPU(s) before anything imports vllm or
initialises CUDA, and then runs whichever jobs it is handed. A job function that
calls ``load_engine`` loads its model once per worker, because engines are
cached per process. Jobs go to whichever worker is free, so uneven shards
balance themselves; results come back in job order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

J = TypeVar("J")
R = TypeVar("R")

_WORKER_GPUS: str | None = None  # what this worker process was given, e.g. "3" or "2,3"


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_groups(gpus: Sequence[str], per_worker: int = 1) -> list[str]:
    """Consecutive GPUs in groups of ``per_worker`` (tensor parallelism), as CUDA_VISIBLE_DEVICES values."""
    if per_worker < 1:
        raise ValueError(f"per_worker must be >= 1, got {per_worker}")
    if len(gpus) < per_worker:
        raise ValueError(f"{per_worker} GPU(s) per worker, but only {len(gpus)} visible: {list(gpus)}")
    usable = len(gpus) - len(gpus) % per_worker
    return [",".join(gpus[i : i + per_worker]) for i in range(0, usable, per_worker)]


def worker_gpus() -> str | None:
    """The GPU(s) this worker process was given (None outside ``run_on_gpus`` workers)."""
    return _WORKER_GPUS


def _claim_gpus(free: Any) -> None:
    """Worker initializer: take one GPU group and pin it before CUDA can be initialised."""
    global _WORKER_GPUS
    _WORKER_GPUS = free.get(timeout=60)
    os.environ["CUDA_VISIBLE_DEVICES"] = _WORKER_GPUS


def run_on_gpus(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    gpus: Sequence[str] | None = None,
    gpus_per_worker: int = 1,
) -> list[R]:
    """``[fn(job) for job in jobs]``, run by one spawned worker process per GPU group.

    ``fn`` and the jobs must be picklable (``fn`` a module-level function; pass
    recipes and shard URIs, not models or tables). ``gpus`` defaults to
    ``visible_gpus()``; ``gpus_per_worker`` is the recipe's
    ``tensor_parallel_size``. The first job that raises stops the run: jobs not
    yet started are cancelled and its exception is raised here.
    """
    groups = gpu_groups(list(visible_gpus() if gpus is None else gpus), gpus_per_worker)
    if not jobs:
        return []
    workers = min(len(groups), len(jobs))
    context = multiprocessing.get_context("spawn")
    free = context.Queue()
    for group in groups[:workers]:
        free.put(group)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_claim_gpus, initargs=(free,)
    ) as pool:
        futures: list[Future[R]] = [pool.submit(fn, job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
