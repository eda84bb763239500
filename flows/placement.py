"""Where the model-bound and CPU stages run: a model deployment's work pool, a Dask cluster, or here.

With a model deployment, sampling and the model-reading labelers run as one run of the
``model-stage`` deployment per batch of shards, on whichever work pool it is bound to; they write
into the shared work location and the pipeline then finds those shards finished. With ``dask``,
the CPU stages (BLEU labeling, pairing) run concurrently on a Dask cluster.
"""

from __future__ import annotations

import os
import time
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
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

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
    started = time.monotonic()
    pending = {run.id: i for i, run in enumerate(submitted, start=1)}
    failures, warned = [], False
    with get_client(sync_client=True) as client:
        while pending:
            for run_id, i in list(pending.items()):
                run = client.read_flow_run(run_id)
                if run.state is None or not run.state.is_final():
                    continue
                del pending[run_id]
                first = (i - 1) * batch_shards + 1
                what = f"batch {i}/{len(batches)} (shards {first}-{first + len(batches[i - 1]) - 1})"
                if run.state.is_completed():
                    logger.info(f"{stage} {what} finished on the pool (flow run {run.name})")
                else:
                    failures.append(
                        f"{what}: flow run {run.name} ({run.id}) ended {run.state.name}: "
                        f"{run.state.message or 'no message'}"
                    )
            if pending and not warned and time.monotonic() - started > 120:
                logger.warning(
                    f"{stage}: {len(pending)} batch(es) still waiting after 120 s; if their runs stay "
                    "Scheduled, no worker polls the deployment's work pool (prefect worker start --pool …)"
                )
                warned = True
            if pending:
                time.sleep(1.0)
    if failures:
        raise ModelPoolError(
            f"{stage} on deployment {name!r}: {len(failures)} of {len(batches)} batch(es) failed:\n  "
            + "\n  ".join(failures)
            + "\nShards those batches finished are kept; rerun the same command to do the rest."
        )
