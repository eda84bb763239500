"""``python -m flows.build_prefs``: prompts → samples → labels → pairs → dataset + card.

Each stage runs as one Prefect task per shard and hands the next stage a URI.
The recipe, the model spec and the output location are validated before
Prefect starts or any model loads, so a typo costs a second.

What runs before it (``flows.checks``), where the stages run (``flows.placement``), the run
summary (``flows.summary``) and the console filter (``flows.console``) have their own modules;
this one reads as the data path, then the CLI.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.checks import WORK_DIR, NothingSampledError, OutputError, prepare, require_responses
from flows.console import quiet_console
from flows.eval_labelers import LabelQualityError, PairsFileError, check_eval_sets, measure_recipe
from flows.placement import (
    DEFAULT_BATCH_SHARDS,
    DEFAULT_START_TIMEOUT_S,
    ModelPoolError,
    PlacementError,
    check_placement,
    dask_runner,
    run_model_batches,
)
from flows.summary import summary_markdown
from flows.temp_server import TemporaryServerError, ensure_server
from schemas.recipe import LockSettings, Recipe, RecipeError, load_recipe, lock_settings
from steps import lease, stages
from steps.aggregate import Aggregation
from steps.base import ShardResult, StageStats, join_uri, merge_stats
from steps.cost import cost_summary
from steps.engines import ModelSpecError
from steps.engines.llama_build import cache_root
from steps.engines.native_check import EngineCrashError, check_models
from steps.hub import HubError, push_dataset
from steps.labelers.checks import recipe_models
from steps.prompts import PromptSourceError, source_label
from steps.publish import publish
from steps.resume import WorkArea
from steps.work_gc import DEFAULT_KEEP_RUNS, RECORD_EVERY_S, GcError, RunRecord, check_keep_runs, collect


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


@task(name="sample", cache_policy=NO_CACHE)
def sample_task(recipe: Recipe, area: WorkArea, prompts: ShardResult) -> ShardResult:
    return stages.sample(recipe, area, prompts)


@task(name="label", cache_policy=NO_CACHE)
def label_task(
    recipe: Recipe,
    area: WorkArea,
    prompts: ShardResult,
    responses: ShardResult,
    model_area: WorkArea | None = None,
) -> ShardResult:
    return stages.label(recipe, area, prompts, responses, model_area)


@task(name="pair", cache_policy=NO_CACHE)
def pair_task(
    recipe: Recipe,
    area: WorkArea,
    prompts: ShardResult,
    responses: ShardResult,
    labels: ShardResult,
    stats_of_run: dict[str, Any] | None = None,
) -> ShardResult:
    return stages.pair(recipe, area, prompts, responses, labels, stats_of_run)


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
    stats: dict[str, Any],
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


def _run_stage(
    name: str, shards: list[tuple[Any, ...]], fn: Any, note: Callable[[int, ShardResult], None] | None = None
) -> list[ShardResult]:
    """Each shard in turn; ``note`` hears of each finished one (its index and result)."""
    started = time.perf_counter()
    results = []
    for i, args in enumerate(shards, start=1):
        result = fn(*args)
        results.append(result)
        if note is not None:
            note(i - 1, result)
        _log_progress(name, i, len(shards), result, started)
    return results


def _label_entries(
    config: Recipe,
    area: WorkArea,
    prompts: list[ShardResult],
    responses: list[ShardResult],
    labels: list[ShardResult],
) -> list[str]:
    """The merged label shards and the per-labeler parts they were made from, as run-record entries."""
    parts = [
        e for p, r in zip(prompts, responses, strict=True) for e in stages.label_entries(config, area, p, r)
    ]
    return parts + [area.entry_of(s.uri) for s in labels]


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
            _log_progress("labeling", i, len(done_labels), result, started)
    done_pairs = []
    for i, future in enumerate(pair_futures, start=1):
        done_pairs.append(future.result())
        _log_progress("pairing", i, len(pair_futures), done_pairs[-1], started)
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
    config, out, work_uri = prepare(recipe, output, limit, seed, work, report=get_run_logger().info)
    work_uri = check_placement(model_deployment, batch_shards, dask, work_uri, model_start_timeout, config)
    if gc_keep_runs is not None:  # found now, not after the run has published
        check_keep_runs(gc_keep_runs, "gc_keep_runs")
    settings, purpose, say = lock or LockSettings(), f"build-prefs {config.name}", get_run_logger().warning
    with lease.held_each([("output", out), ("work location", work_uri)], settings, purpose, say) as leases:
        return _build(
            config,
            out,
            work_uri,
            (leases[0], leases[1]),
            push_to_hub=push_to_hub,
            private=private,
            fresh=fresh,
            model_deployment=model_deployment,
            batch_shards=batch_shards,
            model_job_variables=model_job_variables,
            dask=dask,
            gc_keep_runs=gc_keep_runs,
            model_start_timeout=model_start_timeout,
        )


def _build(
    config: Recipe,
    out: str,
    work_uri: str,
    leases: tuple[lease.Lease, lease.Lease],
    *,
    push_to_hub: str | None,
    private: bool,
    fresh: bool,
    model_deployment: str | None,
    batch_shards: int,
    model_job_variables: dict[str, Any] | None,
    dask: str | None,
    gc_keep_runs: int | None,
    model_start_timeout: float,
) -> str:
    """The data path, under the run's leases; every stage's entries go into the run's record for GC."""
    area = WorkArea(work_uri, fresh=fresh)
    record = RunRecord(work_uri, config.name, out)
    # What a model pool just computed (recomputed, with ``fresh``) is found here, never redone locally.
    model_area = WorkArea(work_uri) if model_deployment else area
    # Eval scores depend on the labelers and the pairs only, not on this run: one cache for every run.
    quality = eval_task(config, WorkArea(str(cache_root() / "label-quality"), fresh=fresh))
    filter_entries: set[str] = set()
    prompts, prompt_stats, prompt_filters = prompts_task(config, area, filter_entries)
    slots = stages.slot_entries(config, area, prompts)
    record.add([*filter_entries, *(area.entry_of(p.uri) for p in prompts), *slots])
    if model_deployment:
        run_model_batches(
            model_deployment,
            config,
            work_uri,
            "sampling",
            prompts,
            batch_shards,
            fresh,
            model_job_variables,
            model_start_timeout,
        )
    # A killed run's record keeps what it finished (to within RECORD_EVERY_S), so GC spares it.
    responses = _run_stage(
        "sampling",
        [(config, model_area, p) for p in prompts],
        sample_task,
        lambda _, r: record.add([area.entry_of(r.uri)], at_most_every_s=RECORD_EVERY_S),
    )
    record.add(area.entry_of(r.uri) for r in responses)
    sampled = merge_stats("sampling", [r.stats for r in responses])
    require_responses(sampled)
    model_labelers = any(stages.reads_a_model(labeler) for labeler in config.labelers)
    if model_deployment and model_labelers:
        run_model_batches(
            model_deployment,
            config,
            work_uri,
            "labeling",
            prompts,
            batch_shards,
            fresh,
            model_job_variables,
            model_start_timeout,
        )
    labels_on_dask = dask is not None and (model_deployment is not None or not model_labelers)
    pairs_on_dask = dask is not None and config.pairing.judge is None
    labels: list[ShardResult] | None = None
    if not labels_on_dask:
        labels = _run_stage(
            "labeling",
            [(config, area, p, r, model_area) for p, r in zip(prompts, responses, strict=True)],
            label_task,
            lambda i, r: record.add(
                _label_entries(config, area, prompts[i : i + 1], responses[i : i + 1], [r]),
                at_most_every_s=RECORD_EVERY_S,
            ),
        )
        record.add(_label_entries(config, area, prompts, responses, labels))
    if pairs_on_dask:
        assert dask is not None
        labels, pairs = cpu_stages.with_options(task_runner=dask_runner(dask))(
            config, area, model_area, prompts, responses, labels
        )
        stats_of_run = stages.aggregation_stats(config, responses, labels)  # seconds; for stats.json
    else:
        assert labels is not None  # labels go to Dask only together with pairing
        stats_of_run = stages.aggregation_stats(config, responses, labels)
        pairs = _run_stage(
            "pairing",
            [
                (config, area, p, r, lab, stats_of_run)
                for p, r, lab in zip(prompts, responses, labels, strict=True)
            ],
            pair_task,
        )
    # Labels made on Dask are recorded here; those made in this process were recorded as they ended.
    made_on_dask = _label_entries(config, area, prompts, responses, labels) if labels_on_dask else []
    record.add(made_on_dask + [area.entry_of(s.uri) for s in pairs])
    kept, dropped, length = consistency_task(config, area, pairs)
    record.add([area.entry_of(kept.uri)])
    stages_ = {
        "prompts": prompt_stats,
        "sampling": sampled,
        "labeling": merge_stats("labeling", [r.stats for r in labels]),
        "pairing": merge_stats("pairing", [r.stats for r in pairs]),
        "consistency": kept.stats,
    }
    stats = {
        "prompts": {"source": source_label(config.prompts), **prompt_filters},
        "stages": {name: s.to_dict() for name, s in stages_.items()},
        "length": length,
        "aggregation": stats_of_run,
        "eval": quality,
        "cost": cost_summary(stages_, kept.rows, None if quality is None else quality["seconds"]),
    }
    lease.check_all(leases)  # a run that lost its output's lease must not publish over its new holder
    manifest = publish_task(config, out, kept, dropped, stats)
    record.finish()
    create_markdown_artifact(
        key="build-prefs-summary", markdown=summary_markdown(out, manifest), description="Run summary"
    )
    if push_to_hub:
        push_task(out, push_to_hub, private)
    if gc_keep_runs is not None:  # last: housekeeping never holds up the push
        gc_task(work_uri, gc_keep_runs, leases[1])
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flows.build_prefs", description="Build an on-policy preference dataset."
    )
    parser.add_argument("--recipe", default="default", help="recipe name in pipelines/ or a YAML path")
    parser.add_argument("--output", help="output directory or fsspec URI (default ./outputs/<recipe>)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, help="override sampling.seed")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the dataset as one commit")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--work", metavar="URI", help="where finished shards live (default <output>/.work)")
    parser.add_argument(
        "--fresh", action="store_true", help="recompute every shard instead of reusing finished ones"
    )
    parser.add_argument(
        "--model-deployment",
        metavar="NAME",
        help="run sampling and model labelers as runs of this deployment (e.g. model-stage, bound to a "
        "GPU work pool); needs PREFECT_API_URL and a work location the pool's workers share",
    )
    parser.add_argument(
        "--batch-shards",
        type=int,
        default=DEFAULT_BATCH_SHARDS,
        help=f"shards per model-stage run (default {DEFAULT_BATCH_SHARDS})",
    )
    parser.add_argument(
        "--model-start-timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT_S,
        metavar="SECONDS",
        help="cancel model-stage batches and fail when no worker has started any of them for this long, "
        f"e.g. because none polls the pool (default {DEFAULT_START_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS|local",
        help="run the CPU stages (BLEU labeling, pairing) on Dask: a new LocalCluster or a scheduler address",
    )
    locking = parser.add_argument_group("locking (one run at a time per output and work location)")
    locking.add_argument(
        "--on-busy",
        choices=["wait", "fail"],
        help="when another live run holds the output or work location: wait for it (default) or stop",
    )
    locking.add_argument("--max-wait", type=float, metavar="S", help="stop waiting after S seconds")
    locking.add_argument(
        "--lock-expiry",
        type=float,
        metavar="S",
        help="a lease not renewed for S seconds is stale (default 60)",
    )
    locking.add_argument(
        "--lock-renew", type=float, metavar="S", help="renew the lease every S seconds (default 10)"
    )
    gc = parser.add_argument_group("garbage collection of the work location (instead of a run)")
    gc.add_argument(
        "--gc",
        action="store_true",
        help="remove work entries none of the last --keep-runs runs of any recipe used, then stop",
    )
    gc.add_argument("--dry-run", action="store_true", help="with --gc: report what would go, remove nothing")
    gc.add_argument(
        "--keep-runs",
        type=int,
        default=None,
        metavar="N",
        help=f"with --gc: keep the entries of the last N runs per recipe (default {DEFAULT_KEEP_RUNS})",
    )
    return parser.parse_args(argv)


def collect_garbage(args: argparse.Namespace, settings: LockSettings) -> int:
    """``--gc``: under the work location's lease, so it never races a live run (which it waits for)."""
    try:
        keep_runs = DEFAULT_KEEP_RUNS if args.keep_runs is None else args.keep_runs
        check_keep_runs(keep_runs, "--keep-runs")
        work = args.work or join_uri(args.output or load_recipe(args.recipe).output_uri(), WORK_DIR)
        with lease.held(work, settings, "gc (python -m flows.build_prefs --gc)", "work location") as held:
            collect(work, keep_runs, dry_run=args.dry_run, check=held.check)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (lease.LeaseBusyError, lease.LeaseLostError, GcError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_console()
    try:
        settings = lock_settings(
            on_busy=args.on_busy, max_wait_s=args.max_wait, expiry_s=args.lock_expiry, renew_s=args.lock_renew
        )
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.gc:
        return collect_garbage(args, settings)
    if args.dry_run or args.keep_runs is not None:
        print("error: --dry-run and --keep-runs go with --gc (a build collects nothing)", file=sys.stderr)
        return 2

    try:
        if args.limit is not None and args.limit < 1:
            raise RecipeError("--limit must be at least 1")
        loaded, _, work_uri = prepare(args.recipe, args.output, args.limit, args.seed, args.work)
        engine_check = check_models([model for _, model in recipe_models(loaded)])  # prepare's result
        if engine_check is not None:
            print(engine_check.describe(), file=sys.stderr)
        check_placement(
            args.model_deployment, args.batch_shards, args.dask, work_uri, args.model_start_timeout, loaded
        )
        check_eval_sets(loaded)
    except (
        RecipeError, ModelSpecError, PromptSourceError, OutputError, PlacementError, EngineCrashError,
        PairsFileError,
    ) as exc:  # fmt: skip
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # Prefect's own temporary server would outlive a run killed by a signal; this one dies with it.
        ensure_server()
        result = build_prefs(
            recipe=args.recipe,
            output=args.output,
            limit=args.limit,
            seed=args.seed,
            push_to_hub=args.push_to_hub,
            private=args.private,
            work=args.work,
            fresh=args.fresh,
            model_deployment=args.model_deployment,
            batch_shards=args.batch_shards,
            dask=args.dask,
            lock=settings,
            model_start_timeout=args.model_start_timeout,
        )
    except (
        RecipeError,
        ModelSpecError,
        PromptSourceError,
        OutputError,
        PlacementError,
        PairsFileError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (
        ModelPoolError, NothingSampledError, LabelQualityError, lease.LeaseBusyError, lease.LeaseLostError,
        GcError, TemporaryServerError,
    ) as exc:  # fmt: skip
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except HubError as exc:
        print(
            f"error: {exc}\nThe dataset itself is complete; rerun the same command to push again "
            "(finished work is reused, nothing is recomputed).",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"error: {write_failure_message(exc)}", file=sys.stderr)
        return 1
    where = str(Path(result).resolve()) if "://" not in result else result
    print(f"\nDataset ready: {where}\n  load it with: datasets.load_dataset({where!r}, split='train')")
    return 0


def write_failure_message(exc: OSError) -> str:
    """After a failed write a user needs: what happened, that nothing half-done was published, what next."""
    cause = "no space left on device" if exc.errno == errno.ENOSPC else f"{type(exc).__name__}: {exc}"
    where = f" while writing {exc.filename}" if exc.filename else ""
    return (
        f"{cause}{where}. Nothing partial was published: the previous dataset (if any) is intact. "
        "Fix the cause and rerun the same command; finished shards are reused."
    )


if __name__ == "__main__":
    sys.exit(main())
