"""Where the model-bound and CPU stages run: a model deployment's work pool, a Dask cluster, or here.

With a model deployment, sampling and the model-reading labelers run as one run of the
``model-stage`` deployment per batch of shards, on whichever work pool it is bound to; they write
into the shared work location and the pipeline then finds those shards finished. With ``dask``,
the CPU stages (BLEU labeling, pairing) run concurrently on a Dask cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.task_runners import TaskRunner

from flows.model_stage import shard_ref
from schemas.recipe import Recipe
from steps.base import ShardResult


class PlacementError(ValueError):
    """``--model-deployment``/``--dask`` cannot work as given; raised before any model loads."""


class ModelPoolError(RuntimeError):
    """A model-stage batch did not complete on its work pool; its finished shards are kept."""


MODEL_FLOW = "model-stage"
WAIT_WARNING_S = 120


DEFAULT_BATCH_SHARDS = 8


def deployment_name(model_deployment: str) -> str:
    """``flow/deployment`` as Prefect wants it; a bare name means a deployment of ``model-stage``."""
    return model_deployment if "/" in model_deployment else f"{MODEL_FLOW}/{model_deployment}"


def check_placement(model_deployment: str | None, batch_shards: int, dask: str | None, work_uri: str) -> str:
    """Validate where stages run; returns the work location as every worker must name it.

    A model pool's workers run in their own processes (other machines, usually), so a relative
    local path would point somewhere else for them: it is made absolute here, and the work
    location must be storage they share (an object store URI or a shared mount).
    """
    if batch_shards < 1:
        raise PlacementError(f"--batch-shards must be at least 1, got {batch_shards}")
    if dask is not None and dask != "local" and not dask.strip():
        raise PlacementError("--dask takes 'local' or a scheduler address such as tcp://10.0.0.5:8786")
    if model_deployment is None:
        return work_uri
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise PlacementError(
            f"--model-deployment {model_deployment} needs a Prefect server that the work pool's workers "
            "poll: start one (prefect server start) and set PREFECT_API_URL, see README "
            "'Run on a schedule and on GPU pools'"
        )
    if "://" not in work_uri or work_uri.startswith("file://"):
        return str(Path(work_uri.removeprefix("file://")).resolve())
    return work_uri


def dask_runner(dask: str) -> TaskRunner[Any]:
    """A LocalCluster (one thread per worker process, so models and BLEU never share a GIL) or a scheduler."""
    from prefect_dask import DaskTaskRunner

    if dask == "local":
        workers = max(1, min(4, os.cpu_count() or 1))
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1})
    return DaskTaskRunner(address=dask)


def run_model_batches(
    deployment: str,
    config: Recipe,
    work_uri: str,
    stage: str,
    prompts: list[ShardResult],
    batch_shards: int,
    fresh: bool,
    job_variables: dict[str, Any] | None,
) -> None:
    """One ``model-stage`` deployment run per batch of shards: submit them all, then wait for all.

    The runs write into the shared work location; nothing comes back but their states. A batch
    that failed fails this flow with a message naming it; its finished shards stay for the rerun.
    """
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    logger = get_run_logger()
    name = deployment_name(deployment)
    recipe = config.model_dump(mode="json")
    batches = [prompts[i : i + batch_shards] for i in range(0, len(prompts), batch_shards)]
    submitted = []
    for i, batch in enumerate(batches, start=1):
        run = run_deployment(
            name,
            parameters={
                "recipe": recipe,
                "work": work_uri,
                "stage": stage,
                "prompt_shards": [shard_ref(shard) for shard in batch],
                "fresh": fresh,
            },
            flow_run_name=f"{config.name}-{stage}-batch-{i}-of-{len(batches)}",
            timeout=0,
            job_variables=job_variables,
        )
        submitted.append(run)
    logger.info(
        f"{stage}: {len(batches)} batch(es) of up to {batch_shards} shard(s) submitted to deployment "
        f"{name!r}; waiting for its work pool's workers"
    )
    failures: list[str] = []

    def finished(i: int, run: Any) -> None:
        first = (i - 1) * batch_shards + 1
        what = f"batch {i}/{len(batches)} (shards {first}-{first + len(batches[i - 1]) - 1})"
        if run.state is not None and run.state.is_completed():
            logger.info(f"{stage} {what} finished on the pool (flow run {run.name})")
        else:
            state = run.state.name if run.state is not None else "without a state"
            message = (run.state.message if run.state is not None else None) or "no message"
            failures.append(f"{what}: flow run {run.name} ({run.id}) ended {state}: {message}")

    run_coro_as_sync(_await_runs([run.id for run in submitted], finished, stage, logger))
    if failures:
        raise ModelPoolError(
            f"{stage} on deployment {name!r}: {len(failures)} of {len(batches)} batch(es) failed:\n  "
            + "\n  ".join(failures)
            + "\nShards those batches finished are kept; rerun the same command to do the rest."
        )


async def _await_runs(
    run_ids: list[Any], finished: Callable[[int, Any], None], stage: str, logger: Any
) -> None:
    """Wait for every run with Prefect's own ``wait_for_flow_run`` (its state events, no polling).

    ``finished(i, run)`` is called as each ends (1-based, in submission order of ``run_ids``). A
    run still waiting after ``WAIT_WARNING_S`` gets one warning for all: runs that stay Scheduled
    mean no worker polls the deployment's work pool.
    """
    import asyncio

    from prefect.exceptions import FlowRunWaitTimeout
    from prefect.flow_runs import wait_for_flow_run

    warned = False

    async def one(i: int, run_id: Any) -> None:
        nonlocal warned
        try:
            run = await wait_for_flow_run(run_id, timeout=WAIT_WARNING_S)
        except FlowRunWaitTimeout:
            if not warned:
                warned = True
                logger.warning(
                    f"{stage}: batch(es) still waiting after {WAIT_WARNING_S} s; if their runs stay "
                    "Scheduled, no worker polls the deployment's work pool (prefect worker start --pool …)"
                )
            run = await wait_for_flow_run(run_id, timeout=None)
        finished(i, run)

    await asyncio.gather(*(one(i, run_id) for i, run_id in enumerate(run_ids, start=1)))
