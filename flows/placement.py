"""Where the model-bound and CPU stages run: a model deployment's work pool, a Dask cluster, or here.

With a model deployment, sampling and the model-reading labelers run as one run of the
``model-stage`` deployment per batch of shards, on whichever work pool it is bound to; they write
into the shared work location and the pipeline then finds those shards finished. With ``dask``,
the CPU stages (BLEU labeling, pairing) run concurrently on a Dask cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.task_runners import TaskRunner

from flows.model_stage import shard_ref
from flows.temp_server import is_temporary
from schemas.errors import RunError, UsageError
from schemas.recipe import Recipe
from steps.base import ShardResult
from steps.labelers.checks import check_gpu_shares, recipe_models


class PlacementError(UsageError):
    """``--model-deployment``/``--dask`` cannot work as given; raised before any model loads."""


class ModelPoolError(RunError):
    """A model-stage batch did not complete on its work pool; its finished shards are kept."""


MODEL_FLOW = "model-stage"
# A batch waits this long for a worker to start it (while no batch of its stage runs) before it is
# cancelled: long enough for a GPU node to be provisioned or an image pulled, short of forever.
DEFAULT_START_TIMEOUT_S = 900.0
WAIT_WARNING_S = 120
POLL_S = 2.0


DEFAULT_BATCH_SHARDS = 8


def deployment_name(model_deployment: str) -> str:
    """``flow/deployment`` as Prefect wants it; a bare name means a deployment of ``model-stage``."""
    return model_deployment if "/" in model_deployment else f"{MODEL_FLOW}/{model_deployment}"


@dataclass(frozen=True)
class Placement:
    """Where a run's stages go: one value from the CLI or the flow's parameters to every stage.

    ``model_deployment`` sends sampling and the model-reading labelers to that deployment's work
    pool, ``batch_shards`` shards per run (``job_variables`` go with each, e.g. ``{"env": ...}``);
    batches no worker starts for ``start_timeout`` seconds are cancelled. ``dask`` (``local`` or a
    scheduler address) runs the CPU stages on Dask. The default is everything in this process.
    """

    model_deployment: str | None = None
    batch_shards: int = DEFAULT_BATCH_SHARDS
    job_variables: dict[str, Any] | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT_S
    dask: str | None = None


def check_placement(placement: Placement, work_uri: str, recipe: Recipe | None = None) -> str:
    """Validate where stages run; returns the work location as every worker must name it.

    A model pool's workers run in their own processes (other machines, usually), so a relative
    local path would point somewhere else for them: it is made absolute here, and the work
    location must be storage they share (an object store URI or a shared mount). Without a pool,
    ``recipe``'s vLLM models must fit one process together, the policy's included.
    """
    model_deployment, batch_shards, dask = placement.model_deployment, placement.batch_shards, placement.dask
    start_timeout = placement.start_timeout
    if batch_shards < 1:
        raise PlacementError(f"--batch-shards must be at least 1, got {batch_shards}")
    if not start_timeout > 0:
        raise PlacementError(
            f"--model-start-timeout must be a positive number of seconds, got {start_timeout:g}"
        )
    if dask is not None and dask != "local" and not dask.strip():
        raise PlacementError("--dask takes 'local' or a scheduler address such as tcp://10.0.0.5:8786")
    if model_deployment is None:
        if recipe is not None:
            check_gpu_shares(recipe, policy_resident=True)
        return work_uri
    if recipe is not None and (in_flow := gpu_work_in_flow(recipe)):
        raise PlacementError(
            f"only sampling and the labelers run on --model-deployment {model_deployment}'s pool; "
            f"this recipe also needs a GPU in the flow's own process (a CPU pool's): "
            + "; ".join(in_flow)
            + ". Run without --model-deployment on a GPU machine, or change those keys as suggested"
        )
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value() or is_temporary(PREFECT_API_URL.value()):
        raise PlacementError(
            f"--model-deployment {model_deployment} needs a Prefect server that the work pool's workers "
            "poll: start one (prefect server start) and set PREFECT_API_URL, see README "
            "'Run on a schedule and on GPU pools'"
        )
    if "://" not in work_uri or work_uri.startswith("file://"):
        return str(Path(work_uri.removeprefix("file://")).resolve())
    return work_uri


def gpu_work_in_flow(recipe: Recipe) -> list[str]:
    """What the recipe runs on a GPU in the flow's own process, which a model pool does not take over.

    The pair judge reads pairs in the flow, and the eval block measures the labelers on human
    pairs there before sampling: both would load GPU models on the machine of the CPU pool (and,
    on a GPU node, hold memory the pool's workers count on).
    """

    def gpu(model: Any) -> bool:
        return model.engine == "vllm" or model.device == "cuda"

    found = []
    judge = recipe.pairing.judge
    if judge is not None and gpu(judge.model):
        found.append(
            f"pairing.judge ({judge.model.model}, {judge.model.engine}); score pairs with a "
            "judge_pairwise labeler instead"
        )
    if recipe.eval is not None:
        labelers = [key for key, model in recipe_models(recipe) if key.startswith("labelers.") and gpu(model)]
        if labelers:
            found.append(
                f"eval (it measures {', '.join(labelers)} on human pairs in the flow); remove the eval "
                "block and measure with python -m flows.eval_labelers on a GPU machine"
            )
    return found


def dask_runner(dask: str) -> TaskRunner[Any]:
    """A LocalCluster (one thread per worker process, so models and BLEU never share a GIL) or a scheduler."""
    from prefect_dask import DaskTaskRunner

    if dask == "local":
        workers = max(1, min(4, os.cpu_count() or 1))
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1})
    return DaskTaskRunner(address=dask)


def run_model_batches(
    placement: Placement, config: Recipe, work_uri: str, stage: str, prompts: list[ShardResult], fresh: bool
) -> None:
    """One ``model-stage`` deployment run per batch of shards: submit them all, then wait for all.

    The runs write into the shared work location; nothing comes back but their states. A batch
    that failed fails this flow with a message naming it; its finished shards stay for the rerun.
    Batches that cannot start (no run of the stage has been running for ``start_timeout`` seconds
    while some still wait in Scheduled or Pending) are cancelled, and the message says why the
    pool did not start them.
    """
    from prefect.deployments import run_deployment
    from prefect.utilities.asyncutils import run_coro_as_sync

    assert placement.model_deployment is not None
    batch_shards, start_timeout = placement.batch_shards, placement.start_timeout
    logger = get_run_logger()
    name = deployment_name(placement.model_deployment)
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
            job_variables=placement.job_variables,
        )
        submitted.append(run)
    logger.info(
        f"{stage}: {len(batches)} batch(es) of up to {batch_shards} shard(s) submitted to deployment "
        f"{name!r}; waiting for its work pool's workers (cancelled if none starts for {start_timeout:g} s)"
    )
    failures: list[str] = []

    def what(i: int) -> str:
        first = (i - 1) * batch_shards + 1
        return f"batch {i}/{len(batches)} (shards {first}-{first + len(batches[i - 1]) - 1})"

    def finished(i: int, run: Any) -> None:
        if run.state is not None and run.state.is_completed():
            logger.info(f"{stage} {what(i)} finished on the pool (flow run {run.name})")
        else:
            state = run.state.name if run.state is not None else "without a state"
            message = (run.state.message if run.state is not None else None) or "no message"
            failures.append(f"{what(i)}: flow run {run.name} ({run.id}) ended {state}: {message}")

    def vanished(i: int, run_id: Any) -> None:
        failures.append(
            f"{what(i)}: flow run {submitted[i - 1].name} ({run_id}) is gone from the Prefect server "
            "(deleted while this run waited for it), so it can never report an end"
        )

    stall = run_coro_as_sync(
        _await_runs([run.id for run in submitted], finished, stage, logger, start_timeout, vanished)
    )
    problems = []
    if stall is not None:
        listed = "\n  ".join(
            f"{what(i)}: flow run {run.name} ({run.id}) was {state}" for i, run, state in stall.runs
        )
        problems.append(
            f"{len(stall.runs)} of {len(batches)} batch(es) did not start within {start_timeout:g} s and "
            f"were cancelled: {stall.reason}.\n  {listed}"
        )
    if failures:
        problems.append(f"{len(failures)} of {len(batches)} batch(es) failed:\n  " + "\n  ".join(failures))
    if problems:
        raise ModelPoolError(
            f"{stage} on deployment {name!r}: "
            + "\n".join(problems)
            + "\nShards the finished batches wrote are kept; rerun the same command to do the rest."
        )


@dataclass(frozen=True)
class Stall:
    """Batches cancelled because nothing started them: (batch number, flow run, state it was in), and why."""

    runs: list[tuple[int, Any, str]]
    reason: str


async def _await_runs(
    run_ids: list[Any],
    finished: Callable[[int, Any], None],
    stage: str,
    logger: Any,
    start_timeout: float,
    vanished: Callable[[int, Any], None],
) -> Stall | None:
    """Wait for every run, reading their states every few seconds; cancel them if none can start.

    ``finished(i, run)`` is called as each ends (1-based, in submission order of ``run_ids``);
    ``vanished(i, run_id)`` for a run the server no longer knows (deleted while we waited: it
    will never end, so waiting on would hang the pipeline). Two reads in a row must miss it.
    States are read rather than only final ones awaited, because a stalled pool and a busy one
    differ in what the other runs do: while any batch of the stage runs, waiting ones are queued
    behind it (a pool at its concurrency limit) and wait as long as it takes. The clock restarts
    whenever a batch is seen running or ends; once it has run for ``start_timeout`` with batches
    still Scheduled or Pending, those are cancelled and returned with the pool's diagnosis.
    """
    import asyncio
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.objects import StateType

    waiting_types = {StateType.SCHEDULED, StateType.PENDING}
    poll_s = min(POLL_S, max(0.2, start_timeout / 5))
    index = {run_id: i for i, run_id in enumerate(run_ids, start=1)}
    progress = time.monotonic()
    warned = False
    missing: set[Any] = set()
    async with get_client() as client:
        while index:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(index))), limit=len(index)
            )
            waiting = []
            listed = {run.id for run in runs}
            absent = [run_id for run_id in index if run_id not in listed]
            for run_id in absent:
                if run_id in missing:
                    vanished(index.pop(run_id), run_id)
                    progress = time.monotonic()
            missing = {run_id for run_id in absent if run_id in index}
            for run in runs:
                if run.state is not None and run.state.is_final():
                    finished(index.pop(run.id), run)
                    progress = time.monotonic()
                elif run.state is None or run.state.type in waiting_types:
                    waiting.append(run)
                else:  # Running (or Paused, Cancelling): a worker has this stage in hand
                    progress = time.monotonic()
            idle = time.monotonic() - progress
            if waiting and idle >= start_timeout:
                reason = await _why_not_started(client, waiting)
                stalled = []
                for run in sorted(waiting, key=lambda r: index[r.id]):
                    state = run.state.name if run.state is not None else "without a state"
                    await _cancel(client, run, f"not started within {start_timeout:g} s: {reason}")
                    stalled.append((index[run.id], run, state))
                return Stall(stalled, reason)
            if waiting and not warned and idle >= min(WAIT_WARNING_S, start_timeout / 2):
                warned = True
                logger.warning(
                    f"{stage}: {len(waiting)} batch(es) waiting {idle:.0f} s for a worker to start them; "
                    f"if none does within {start_timeout:g} s they are cancelled and the run fails "
                    f"(is a worker polling the pool? prefect worker start --pool …)"
                )
            if index:
                await asyncio.sleep(poll_s)
    return None


async def _cancel(client: Any, run: Any, message: str) -> None:
    """A Scheduled run is simply cancelled; one a worker has taken meanwhile (Pending, or Running by
    now: its state is read again here) may have a process or container its worker must stop."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Cancelling

    now = (await client.read_flow_run(run.id)).state
    taken = now is not None and now.type in (StateType.PENDING, StateType.RUNNING)
    state = Cancelling(message=message) if taken else Cancelled(message=message)
    await client.set_flow_run_state(run.id, state, force=True)


async def _why_not_started(client: Any, waiting: list[Any]) -> str:
    """What the work pool says about why no worker started these runs, and what to do."""
    from prefect.client.schemas.objects import StateType, WorkerStatus, WorkPoolStatus
    from prefect.exceptions import ObjectNotFound

    pool = next((run.work_pool_name for run in waiting if run.work_pool_name), None)
    if pool is None:
        return "the deployment has no work pool, so only a process serving it starts its runs, and none did"
    try:
        work_pool = await client.read_work_pool(pool)
    except ObjectNotFound:
        return f"work pool {pool!r} does not exist (prefect work-pool create {pool} --type process)"
    if work_pool.is_paused or work_pool.status == WorkPoolStatus.PAUSED:
        return f"work pool {pool!r} is paused (prefect work-pool resume {pool})"
    workers = await client.read_workers_for_work_pool(pool)
    if not any(worker.status == WorkerStatus.ONLINE for worker in workers):
        return (
            f"no worker is polling work pool {pool!r}; start one where the models should run "
            f"(prefect worker start --pool {pool})"
        )
    if any(run.state is not None and run.state.type == StateType.PENDING for run in waiting):
        return (
            f"a worker of work pool {pool!r} took them but they never started running (Pending): it "
            "could not start their process or container; its log says why"
        )
    return (
        f"work pool {pool!r} has online workers but none took them: the pool, its queue or the "
        "deployment may be at its concurrency limit with other runs, or the workers poll another queue"
    )
