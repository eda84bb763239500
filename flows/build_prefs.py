"""``python -m flows.build_prefs``: prompts → samples → labels → pairs → dataset + card.

Each stage runs as one Prefect task per shard and hands the next stage a URI.
The recipe, the model spec and the output location are validated before
Prefect starts or any model loads, so a typo costs a second.

What runs before it (``flows.checks``), where the stages run (``flows.placement``), the run
summary (``flows.summary``) and the console filter (``flows.console``) have their own modules;
this one reads as the data path, then the CLI.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.checks import preflight_run, require_responses
from flows.placement import (
    DEFAULT_BATCH_SHARDS,
    DEFAULT_START_TIMEOUT_S,
    Placement,
    dask_runner,
    run_model_batches,
)
from flows.summary import summary_markdown
from schemas import stage_names
from schemas.locks import LockSettings
from schemas.recipe import Recipe
from schemas.statistics import RunStatistics
from steps.base import ShardResult, StageStats, merge_stats
from steps.engines.llama_build import cache_root
from steps.pairing.aggregate import Aggregation
from steps.prompts.sources import source_label
from steps.publish.cost import cost_summary
from steps.publish.hub import push_dataset
from steps.publish.release import publish
from steps.quality.evaluate import measure_recipe
from steps.run import lease, stages
from steps.run.resume import WorkArea
from steps.run.work_gc import RECORD_EVERY_S, GcError, RunRecord, collect


def _log_progress(stage: str, done: int, total: int, result: ShardResult, started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    drops = ", ".join(f"{k}={v}" for k, v in sorted(result.stats.drops.items())) or "none"
    how = "found finished earlier, reused" if result.resumed else f"in {result.stats.seconds:.1f}s"
    get_run_logger().info(
        f"{stage} shard {done}/{total}: {result.stats.rows_in} in → {result.rows} out "
        f"(drops: {drops}) {how}; elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
    )


@task(name="load-prompts", cache_policy=NO_CACHE)
def prompts_task(
    recipe: Recipe, area: WorkArea, entries: set[str]
) -> tuple[list[ShardResult], StageStats, dict[str, Any]]:
    filters: dict[str, Any] = {}
    shards, stats = stages.prompt_shards(recipe, area, filters, entries)
    added = "".join(f", {name} {secs:.1f}s" for name, secs in sorted(stats.timings.items()))
    get_run_logger().info(
        f"prompts: {stats.rows_out} kept of {stats.rows_in} read from {source_label(recipe.prompts)} "
        f"(drops: {dict(stats.drops) or 'none'}{added}) → {len(shards)} shard(s)"
    )
    return shards, stats, filters


# One task per shard; the shard jobs themselves (keys, resume) are steps.run.stages.
sample_task = task(stages.sample, name="sample", cache_policy=NO_CACHE)
label_task = task(stages.label, name="label", cache_policy=NO_CACHE)
pair_task = task(stages.pair, name="pair", cache_policy=NO_CACHE)


@task(name="consistency", cache_policy=NO_CACHE)
def consistency_task(
    recipe: Recipe, area: WorkArea, pairs: list[ShardResult]
) -> tuple[ShardResult, ShardResult, dict[str, Any]]:
    kept, dropped, length = stages.filter_pairs(recipe, area, pairs)
    drops = ", ".join(f"{k}={v}" for k, v in sorted(kept.stats.drops.items())) or "none"
    how = " (found finished earlier, reused)" if kept.resumed else ""
    get_run_logger().info(
        f"consistency: {kept.stats.rows_in} candidate pairs → {kept.rows} kept (drops: {drops}){how}"
    )
    return kept, dropped, length


@task(name="label-quality", cache_policy=NO_CACHE)
def eval_task(recipe: Recipe, area: WorkArea) -> dict[str, Any] | None:
    """The recipe's signals against its human pairs, first: a failed ``min_accuracy`` costs no sampling."""
    result = measure_recipe(recipe, area)
    if result is not None:
        for s in result["sets"]:
            row = next(r for r in s["rows"] if r["labeler"] == "aggregate")
            get_run_logger().info(
                f"label quality on {s['name']} ({s['n']} pairs): aggregate {row['accuracy']:.3f} "
                f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] ({result['seconds']:.1f} s)"
            )
    return result


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(
    recipe: Recipe,
    output: str,
    kept: ShardResult,
    dropped: ShardResult,
    stats: RunStatistics,
) -> dict[str, Any]:
    manifest = publish(recipe, output, [kept.uri], stats, [dropped.uri])
    get_run_logger().info(f"published run {manifest['run_id']} to {output} (manifest written last)")
    return manifest


@task(name="gc", cache_policy=NO_CACHE)
def gc_task(work_uri: str, keep_runs: int, held: lease.Lease) -> None:
    """After publishing, under the run's own lease on the work location: nothing else can be using it.

    Housekeeping: a GC that cannot go on (an unreadable run record, a lost lease) warns and leaves
    the work location as a killed GC would, which the next one completes; the run itself published.
    """
    try:
        collect(work_uri, keep_runs, check=held.check, report=get_run_logger().info)
    except (GcError, lease.LeaseLostError, OSError) as exc:
        get_run_logger().warning(
            f"gc of {work_uri} stopped: {exc}. The dataset is published; the next GC retries."
        )


@task(name="push-to-hub", cache_policy=NO_CACHE, retries=0)
def push_task(output: str, repo_id: str, private: bool) -> str:
    url = push_dataset(output, repo_id, private=private)
    get_run_logger().info(f"pushed {output} to {repo_id} as one commit: {url}")
    return url


def _run_stage(name: str, shards: list[tuple[Any, ...]], fn: Any, record: RunRecord) -> list[ShardResult]:
    """Each shard in turn, its work entries recorded as it ends (so GC spares what a killed run made)."""
    started = time.perf_counter()
    results = []
    for i, args in enumerate(shards, start=1):
        result = fn(*args)
        results.append(result)
        # At most one record write per RECORD_EVERY_S; the stage's last shard is written by ``record``.
        record.add(result.entries, at_most_every_s=RECORD_EVERY_S)
        _log_progress(name, i, len(shards), result, started)
    record.flush()
    return results


def _resolved(item: Any) -> ShardResult:
    """A finished shard: a task's future waited for, or a shard already in hand."""
    return item if isinstance(item, ShardResult) else item.result()


@flow(name="cpu-stages")
def cpu_stages(
    config: Recipe,
    area: WorkArea,
    model_area: WorkArea,
    prompts: list[ShardResult],
    responses: list[ShardResult],
    labels: list[ShardResult] | None,
) -> tuple[list[ShardResult], list[ShardResult]]:
    """Labeling (when ``labels`` is None) and pairing, every shard submitted at once to the task runner.

    Run with a ``DaskTaskRunner``: the shards of a stage spread over the cluster, and each shard's
    pairing starts as soon as its labels exist, unless pairing needs run-wide numbers (a spread
    scale, length control): then every shard's labels come first.
    """
    if labels is None:
        label_futures: Any = label_task.map(
            unmapped(config), unmapped(area), prompts, responses, unmapped(model_area)
        )
    else:
        label_futures = labels
    stats_of_run = None
    if Aggregation.of(config).needs_run_stats:
        # A run-wide scale or length slope: every shard's labels first, then pairing.
        label_futures = [_resolved(f) for f in label_futures]
        stats_of_run = stages.aggregation_stats(config, responses, label_futures)
    pair_futures = pair_task.map(
        unmapped(config), unmapped(area), prompts, responses, label_futures, unmapped(stats_of_run)
    )
    started = time.perf_counter()
    done_labels = labels if labels is not None else [_resolved(f) for f in label_futures]
    if labels is None:
        for i, result in enumerate(done_labels, start=1):
            _log_progress(stage_names.LABELING, i, len(done_labels), result, started)
    done_pairs = []
    for i, future in enumerate(pair_futures, start=1):
        done_pairs.append(future.result())
        _log_progress(stage_names.PAIRING, i, len(pair_futures), done_pairs[-1], started)
    return done_labels, done_pairs


@flow(name="build-prefs", log_prints=True)
def build_prefs(
    recipe: str = "default",
    output: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    work: str | None = None,
    fresh: bool = False,
    model_deployment: str | None = None,
    batch_shards: int = DEFAULT_BATCH_SHARDS,
    model_job_variables: dict[str, Any] | None = None,
    dask: str | None = None,
    lock: LockSettings | None = None,
    gc_keep_runs: int | None = None,
    model_start_timeout: float = DEFAULT_START_TIMEOUT_S,
) -> str:
    """Build a preference dataset from a recipe name or path; returns the output URI.

    Finished shards under the work location are reused (a rerun after a crash redoes
    only what was not finished); ``fresh`` recomputes everything.
    ``model_deployment`` (e.g. ``model-stage``) sends sampling and the model-reading labelers
    to that deployment's work pool, ``batch_shards`` shards per run (``model_job_variables``
    are passed to those runs, e.g. ``{"env": {...}}``); the work location must then be storage
    the pool's workers share. Batches that no worker starts for ``model_start_timeout`` seconds are
    cancelled and fail the run. ``dask`` (``local`` or a scheduler address) runs the CPU stages on Dask.
    The run holds a lease on its output and its work location while it lives (``lock`` says whether
    to wait for another run's); ``gc_keep_runs`` N removes, after publishing, the work entries that
    none of the last N runs of any recipe used.
    """
    placement = Placement(model_deployment, batch_shards, model_job_variables, model_start_timeout, dask)
    config, out, work_uri = preflight_run(
        recipe, output, limit, seed, work, placement, gc_keep_runs, report=get_run_logger().info
    )
    settings, purpose, say = lock or LockSettings(), f"build-prefs {config.name}", get_run_logger().warning
    with lease.held_each([("output", out), ("work location", work_uri)], settings, purpose, say) as leases:
        return _build(
            config,
            out,
            work_uri,
            (leases[0], leases[1]),
            placement,
            push_to_hub=push_to_hub,
            private=private,
            fresh=fresh,
            gc_keep_runs=gc_keep_runs,
        )


@dataclass(frozen=True)
class _Run:
    """What every part of one run's data path needs: its recipe, where its work lives, where it runs."""

    config: Recipe
    work_uri: str
    area: WorkArea
    # What a model pool just computed (recomputed, with ``fresh``) is found here, never redone locally.
    model_area: WorkArea
    placement: Placement
    record: RunRecord  # every stage's work entries, for GC
    fresh: bool


def _build(
    config: Recipe,
    out: str,
    work_uri: str,
    leases: tuple[lease.Lease, lease.Lease],
    placement: Placement,
    *,
    push_to_hub: str | None,
    private: bool,
    fresh: bool,
    gc_keep_runs: int | None,
) -> str:
    """The data path, under the run's leases; every stage's entries go into the run's record for GC."""
    area = WorkArea(work_uri, fresh=fresh)
    model_area = WorkArea(work_uri) if placement.model_deployment else area
    run = _Run(config, work_uri, area, model_area, placement, RunRecord(work_uri, config.name, out), fresh)
    # Eval scores depend on the labelers and the pairs only, not on this run: one cache for every run.
    quality = eval_task(config, WorkArea(str(cache_root() / "label-quality"), fresh=fresh))
    filter_entries: set[str] = set()
    prompts, prompt_stats, prompt_filters = prompts_task(config, area, filter_entries)
    run.record.add([*filter_entries, *(entry for p in prompts for entry in p.entries)])
    responses = _sample(run, prompts)
    sampled = merge_stats(stage_names.SAMPLING, [r.stats for r in responses])
    require_responses(sampled)
    labels, pairs, stats_of_run = _label_and_pair(run, prompts, responses)
    kept, dropped, length = consistency_task(config, area, pairs)
    run.record.add(kept.entries)
    stages_ = {
        stage_names.PROMPTS: prompt_stats,
        stage_names.SAMPLING: sampled,
        stage_names.LABELING: merge_stats(stage_names.LABELING, [r.stats for r in labels]),
        stage_names.PAIRING: merge_stats(stage_names.PAIRING, [r.stats for r in pairs]),
        stage_names.CONSISTENCY: kept.stats,
    }
    stats: RunStatistics = {
        "prompts": {"source": source_label(config.prompts), **prompt_filters},
        "stages": {name: s.to_dict() for name, s in stages_.items()},
        "length": length,
        "aggregation": stats_of_run,
        "eval": quality,
        "cost": cost_summary(stages_, kept.rows, None if quality is None else quality["seconds"]),
    }
    lease.check_all(leases)  # a run that lost its output's lease must not publish over its new holder
    manifest = publish_task(config, out, kept, dropped, stats)
    run.record.finish()
    create_markdown_artifact(
        key="build-prefs-summary", markdown=summary_markdown(out, manifest), description="Run summary"
    )
    if push_to_hub:
        push_task(out, push_to_hub, private)
    if gc_keep_runs is not None:  # last: housekeeping never holds up the push
        gc_task(work_uri, gc_keep_runs, leases[1])
    return out


def _sample(run: _Run, prompts: list[ShardResult]) -> list[ShardResult]:
    """Sampling, on the model pool first when there is one (this process then finds its shards)."""
    if run.placement.model_deployment:
        run_model_batches(run.placement, run.config, run.work_uri, stage_names.SAMPLING, prompts, run.fresh)
    shards = [(run.config, run.model_area, p) for p in prompts]
    return _run_stage(stage_names.SAMPLING, shards, sample_task, run.record)


def _label_and_pair(
    run: _Run, prompts: list[ShardResult], responses: list[ShardResult]
) -> tuple[list[ShardResult], list[ShardResult], dict[str, Any] | None]:
    """Labels, then pairs: the model labelers on the pool or here, the CPU work here or on Dask."""
    config, area, record, placement = run.config, run.area, run.record, run.placement
    model_deployment, dask = placement.model_deployment, placement.dask
    model_labelers = any(stages.reads_a_model(labeler) for labeler in config.labelers)
    if model_deployment and model_labelers:
        run_model_batches(placement, config, run.work_uri, stage_names.LABELING, prompts, run.fresh)
    labels_on_dask = dask is not None and (model_deployment is not None or not model_labelers)
    pairs_on_dask = dask is not None and config.pairing.judge is None
    labels: list[ShardResult] | None = None
    if not labels_on_dask:
        shards = [(config, area, p, r, run.model_area) for p, r in zip(prompts, responses, strict=True)]
        labels = _run_stage(stage_names.LABELING, shards, label_task, record)
    if pairs_on_dask:
        assert dask is not None
        labels, pairs = cpu_stages.with_options(task_runner=dask_runner(dask))(
            config, area, run.model_area, prompts, responses, labels
        )
        stats_of_run = stages.aggregation_stats(config, responses, labels)  # seconds; for stats.json
    else:
        assert labels is not None  # labels go to Dask only together with pairing
        stats_of_run = stages.aggregation_stats(config, responses, labels)
        shards = [
            (config, area, p, r, lab, stats_of_run)
            for p, r, lab in zip(prompts, responses, labels, strict=True)
        ]
        pairs = _run_stage(stage_names.PAIRING, shards, pair_task, record)
    if pairs_on_dask:  # what Dask made is recorded here; what this process made, as each shard ended
        record.add(entry for shard in [*labels, *pairs] for entry in shard.entries)
    return labels, pairs, stats_of_run


if __name__ == "__main__":  # the command line lives in flows.cli; this keeps `python -m flows.build_prefs`
    from flows.cli import build_prefs_main

    sys.exit(build_prefs_main())
