"""The model-bound part of ``build-prefs`` for one batch of shards, run where the GPUs are.

``build-prefs`` with a model pool triggers this flow's deployment once per batch
of prompt shards (``flows.build_prefs.run_model_batches``). It computes the
shards into the shared work location through ``steps.run.stages``, which writes the
completion markers; the main flow then calls the same stage functions and finds
every shard finished. Nothing is returned but counts: the data travels through
the work location, so a batch that dies halfway leaves its finished shards for
the rerun.

The model is loaded once per worker process (``steps.engines.load_engine``
caches it) and reused for every shard of the batch. On a host with several GPUs and vLLM
models, the batch's shards are spread over one process per GPU group.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from schemas import stage_names
from schemas.errors import RunError
from schemas.recipe import ModelConfig, Recipe
from steps.base import ShardResult, StageStats
from steps.engines.gpu_pool import run_on_gpus, visible_gpus
from steps.engines.native_check import check_models
from steps.labelers.checks import recipe_models
from steps.run import stages
from steps.run.resume import WorkArea, sha256_of

MODEL_STAGES = stage_names.MODEL_BOUND


class MissingShardError(RunError):
    """A prompt shard the batch names is not (or no longer) finished in the work location."""


def prompt_shard(shard: dict[str, Any]) -> ShardResult:
    """The prompt shard a batch names, checked against its checksum before any model time is spent."""
    if sha256_of(shard["uri"]) != shard["sha256"]:
        raise MissingShardError(
            f"prompt shard {shard['uri']} is missing here or differs from the one the flow wrote. "
            "The model pool must see the same work location as the flow that triggered it: use a "
            "shared fsspec URI (s3://…, a shared mount) for --work."
        )
    slot = str(shard.get("slot", ""))  # absent in batches from before prompt filters: no slot reuse
    return ShardResult(
        shard["uri"], int(shard["rows"]), StageStats(stage_names.PROMPTS), shard["sha256"], slot=slot
    )


def shard_ref(shard: ShardResult) -> dict[str, Any]:
    """What a batch parameter carries per prompt shard: JSON, so it travels through the Prefect API."""
    return {"uri": shard.uri, "rows": shard.rows, "sha256": shard.sha256, "slot": shard.slot}


def stage_models(config: Recipe, stage: str) -> list[ModelConfig]:
    """The models a stage loads: the policy for sampling, the model-reading labelers' for labeling."""
    if stage == stage_names.SAMPLING:
        return [config.policy]
    return [model for key, model in recipe_models(config) if key.startswith("labelers.")]


def gpu_workers(config: Recipe, stage: str, gpus: list[str] | None) -> tuple[list[str], int] | None:
    """The GPUs to spread this stage's shards over, one worker per group, or None to run in process.

    Only vLLM models use a pool: vLLM runs one engine per process and will not split data over GPUs
    itself. A group is ``tensor_parallel_size`` GPUs; with fewer than two groups there is nothing to
    spread.
    """
    vllm = [model for model in stage_models(config, stage) if model.engine == "vllm"]
    if not vllm:
        return None
    per_worker = max(model.tensor_parallel_size for model in vllm)
    visible = list(gpus) if gpus is not None else visible_gpus()
    if len(visible) // per_worker < 2:
        return None
    return visible, per_worker


def stage_shard(job: tuple[dict[str, Any], str, str, dict[str, Any], bool]) -> bool:
    """One prompt shard of a model stage; True when it was computed now, False when found finished.

    Module-level and given plain data, so a GPU pool worker (another process) can run it; engines
    are cached per process, so each worker loads its model once for all the shards it takes.
    """
    recipe, work, stage, shard, fresh = job
    config = Recipe.model_validate(recipe)
    area = WorkArea(work, fresh=fresh)
    # Labeling reads the responses sampling just wrote; with ``fresh`` they must be found, not redone.
    responses_area = WorkArea(work) if stage == stage_names.LABELING else area
    prompts = prompt_shard(shard)
    responses = stages.sample(config, responses_area, prompts)
    if stage == stage_names.SAMPLING:
        return not responses.resumed
    return stages.label_models(config, area, prompts, responses) > 0


@flow(name="model-stage", log_prints=True)
def model_stage(
    recipe: dict[str, Any],
    work: str,
    stage: str,
    prompt_shards: list[dict[str, Any]],
    fresh: bool = False,
    gpus: list[str] | None = None,
) -> dict[str, int]:
    """Run ``stage`` (``sampling`` or ``labeling`` with the model-reading labelers) for these prompt shards.

    ``recipe`` is the validated recipe as data (overrides applied), so the worker needs no access to
    the recipe file; ``prompt_shards`` name the prompt shards in ``work`` (``shard_ref``);
    ``fresh`` recomputes this stage's shards (the triggering flow's ``--fresh``). On a host with
    several GPUs and vLLM models, the shards are spread over one process per GPU group
    (``steps.engines.gpu_pool``); ``gpus`` overrides the visible GPUs (default: all of them).
    """
    if stage not in MODEL_STAGES:
        raise ValueError(f"stage must be one of {MODEL_STAGES}, got {stage!r}")
    config = Recipe.model_validate(recipe)
    logger = get_run_logger()
    # The worker's llama.cpp may be another build than the triggering machine's: check it here too,
    # so a broken build fails the batch with the guard's message instead of crashing the worker.
    engine_check = check_models([model for _, model in recipe_models(config)])
    if engine_check is not None:
        logger.info(engine_check.describe())
    for shard in prompt_shards:
        prompt_shard(shard)  # every shard checked before any model time is spent
    jobs = [(recipe, work, stage, shard, fresh) for shard in prompt_shards]
    pool = gpu_workers(config, stage, gpus)
    if pool is None:
        computed = [stage_shard(job) for job in jobs]
    else:
        visible, per_worker = pool
        logger.info(
            f"{stage}: {len(jobs)} shard(s) over {len(visible) // per_worker} GPU worker(s) {visible}"
        )
        computed = run_on_gpus(stage_shard, jobs, gpus=visible, gpus_per_worker=per_worker)
    for i, (shard, fresh_now) in enumerate(zip(prompt_shards, computed, strict=True), start=1):
        how = "computed" if fresh_now else "found finished earlier, reused"
        logger.info(f"{stage} shard {i}/{len(prompt_shards)} ({shard['uri']}): {how}")
    done = sum(computed)
    return {"shards": len(prompt_shards), "computed": done, "reused": len(prompt_shards) - done}
