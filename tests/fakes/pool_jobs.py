"""Job functions for the GPU pool test: module-level, so spawned workers can import them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from steps.engines.gpu_pool import worker_gpus


def record(job: tuple[str, int, int]) -> dict[str, Any]:
    """Leave a trace of the job, then wait until ``wait_for`` workers have shown up.

    The wait makes the test deterministic: a worker holding job 0 cannot also
    take job 1, so every worker gets work no matter how fast each one starts.
    """
    folder, k, wait_for = job
    root = Path(folder)
    (root / "jobs").mkdir(exist_ok=True)
    (root / "workers").mkdir(exist_ok=True)
    (root / "jobs" / f"job-{k}").write_text(str(os.getpid()))
    (root / "workers" / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list((root / "workers").iterdir())) < wait_for:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(list((root / 'workers').iterdir()))} of {wait_for} workers started"
            )
        time.sleep(0.01)
    return {
        "job": k,
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "worker_gpus": worker_gpus(),
    }


def fail_on_one(job: int) -> int:
    if job == 1:
        raise RuntimeError("job 1 failed")
    return job
