"""The model-bound part of ``build-prefs`` for one batch of shards, run where the GPUs are.

``build-prefs`` with a model pool triggers this flow's deployment once per batch
of prompt shards (``flows.build_prefs.run_model_batches``). It computes the
shards into the shared work location through ``steps.stages``, which writes the
completion markers; the main flow then calls the same stage functions and finds
every shard finished. Nothing is returned but counts: the data travels through
the work location, so a batch that dies halfway leaves its finished shards for
the rerun.

The model is loaded once per worker process (``steps.engines.load_engine``
caches it) and reused for every shard of the batch.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from schemas.recipe import Recipe
from steps import stages
from steps.base import ShardResult, StageStats
from steps.engines.native_check import check_models
from steps.labelers.checks import recipe_models
from steps.resume import WorkArea, sha256_of

MODEL_STAGES = ("sampling", "labeling")


class MissingShardError(RuntimeError):
    """A prompt shard the batch names is not (or no longer) finished in the work location."""


def prompt_shard(shard: dict[str, Any]) -> ShardResult:
    """The prompt shard a batch names, checked against its checksum before any model time is spent."""
    if sha256_of(shard["uri"]) != shard["sha256"]:
        raise MissingShardError(
            f"prompt shard {shard['uri']} is missing here or differs from the one the flow wrote. "
            "The model pool must see the same work location as the flow that triggered it: use a "
            "shared fsspec URI (s3://…, a shared mount) for --work."
        )
    return ShardResult(shard["uri"], int(shard["rows"]), StageStats("prompts"), shard["sha256"])


def shard_ref(shard: ShardResult) -> dict[str, Any]:
    """What a batch parameter carries per prompt shard: JSON, so it travels through the Prefect API."""
    return {"uri": shard.uri, "rows": shard.rows, "sha256": shard.sha256}


@flow(name="model-stage", log_prints=True)
def model_stage(
    recipe: dict[str, Any],
    work: str,
    stage: str,
    prompt_shards: list[dict[str, Any]],
    fresh: bool = False,
) -> dict[str, int]:
    """Run ``stage`` (``sampling`` or ``labeling`` with the model-reading labelers) for these prompt shards.

    ``recipe`` is the validated recipe as data (overrides applied), so the worker needs no access to
    the recipe file; ``prompt_shards`` name the prompt shards in ``work`` (``shard_ref``);
    ``fresh`` recomputes this stage's shards (the triggering flow's ``--fresh``).
    """
    if stage not in MODEL_STAGES:
        raise ValueError(f"stage must be one of {MODEL_STAGES}, got {stage!r}")
    config = Recipe.model_validate(recipe)
    # The worker's llama.cpp may be another build than the triggering machine's: check it here too,
    # so a broken build fails the batch with the guard's message instead of crashing the worker.
    engine_check = check_models([model for _, model in recipe_models(config)])
    if engine_check is not None:
        get_run_logger().info(engine_check.describe())
    area = WorkArea(work, fresh=fresh)
    # Labeling reads the responses sampling just wrote; with ``fresh`` they must be found, not redone.
    responses_area = WorkArea(work) if stage == "labeling" else area
    logger = get_run_logger()
    computed = reused = 0
    for i, shard in enumerate(prompt_shards, start=1):
        prompts = prompt_shard(shard)
        responses = stages.sample(config, responses_area, prompts)
        fresh = (
            not responses.resumed
            if stage == "sampling"
            else stages.label_models(config, area, prompts, responses) > 0
        )
        computed += fresh
        reused += not fresh
        how = "computed" if fresh else "found finished earlier, reused"
        logger.info(f"{stage} shard {i}/{len(prompt_shards)} ({prompts.uri}): {how}")
    return {"shards": len(prompt_shards), "computed": computed, "reused": reused}
