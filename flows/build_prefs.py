"""``python -m flows.build_prefs``: prompts → samples → labels → pairs → dataset + card.

Each stage runs as one Prefect task per shard and hands the next stage a URI.
The recipe, the model spec and the output location are validated before
Prefect starts or any model loads, so a typo costs a second.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from schemas.recipe import Recipe, RecipeError, load_recipe
from steps import stages
from steps.base import ShardResult, StageStats, join_uri, merge_stats
from steps.engines import ModelSpecError, resolve_model
from steps.hub import HubError, push_dataset
from steps.labeling import preflight
from steps.prompts import PromptSourceError, source_label
from steps.publish import funnel_steps, publish
from steps.resume import WorkArea

WORK_DIR = ".work"


class OutputError(RuntimeError):
    """The output or work location cannot be written; raised before any model loads."""


def check_writable(uri: str, what: str) -> None:
    """Create the location and write/remove a probe, so a read-only target fails now, not after hours."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.prefsmith-probe-{os.getpid()}"
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except (OSError, ValueError) as exc:
        raise OutputError(
            f"{what} {uri!r} is not writable ({type(exc).__name__}: {exc}); "
            f"choose another location with --output/--work or fix its permissions"
        ) from exc


def prepare(
    recipe: str = "default",
    output: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    work: str | None = None,
) -> tuple[Recipe, str, str]:
    """Everything that can be wrong with the request, checked without loading a model."""
    loaded = load_recipe(recipe).with_overrides(
        **{"limit": limit, "sampling.seed": seed, "output.uri": output}
    )
    resolve_model(loaded.policy.model, loaded.policy.engine)
    preflight(loaded)
    out = loaded.output_uri()
    work_uri = work or join_uri(out, WORK_DIR)
    check_writable(out, "output")
    check_writable(work_uri, "work location")
    return loaded, out, work_uri


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
def prompts_task(recipe: Recipe, area: WorkArea) -> tuple[list[ShardResult], StageStats]:
    shards, stats = stages.prompt_shards(recipe, area)
    get_run_logger().info(
        f"prompts: {stats.rows_out} unique of {stats.rows_in} read from {source_label(recipe.prompts)} "
        f"(drops: {dict(stats.drops) or 'none'}) → {len(shards)} shard(s)"
    )
    return shards, stats


@task(name="sample", cache_policy=NO_CACHE)
def sample_task(recipe: Recipe, area: WorkArea, prompts: ShardResult) -> ShardResult:
    return stages.sample(recipe, area, prompts)


@task(name="label", cache_policy=NO_CACHE)
def label_task(recipe: Recipe, area: WorkArea, prompts: ShardResult, responses: ShardResult) -> ShardResult:
    return stages.label(recipe, area, prompts, responses)


@task(name="pair", cache_policy=NO_CACHE)
def pair_task(
    recipe: Recipe, area: WorkArea, prompts: ShardResult, responses: ShardResult, labels: ShardResult
) -> ShardResult:
    return stages.pair(recipe, area, prompts, responses, labels)


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


@task(name="push-to-hub", cache_policy=NO_CACHE, retries=0)
def push_task(output: str, repo_id: str, private: bool) -> str:
    url = push_dataset(output, repo_id, private=private)
    get_run_logger().info(f"pushed {output} to {repo_id} as one commit: {url}")
    return url


def _run_stage(name: str, shards: list[tuple[Any, ...]], fn: Any) -> list[ShardResult]:
    started = time.perf_counter()
    results = []
    for i, args in enumerate(shards, start=1):
        result = fn(*args)
        results.append(result)
        _log_progress(name, i, len(shards), result, started)
    return results


def summary_markdown(output: str, manifest: dict[str, Any]) -> str:
    """The card's headline numbers for the Prefect UI: funnel, drops per stage, length bias."""
    stages = manifest["stats"]["stages"]
    kept = manifest["splits"].get("train", 0)
    lines = [
        f"# Preference dataset `{manifest['recipe']['name']}`",
        "",
        f"Output: `{output}` — **{manifest['splits'].get('train', 0)} pairs** kept, "
        f"{manifest['splits'].get('dropped', 0)} dropped (config `dropped`), recipe hash "
        f"`{manifest['recipe']['hash']}`.",
        "",
        "Funnel: " + " → ".join(f"{n} {label}" for label, n in funnel_steps(manifest["stats"], kept)),
        "",
        "| stage | in | out | drops | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        drops = ", ".join(f"{k}: {v}" for k, v in s["drops"].items()) or "none"
        lines.append(f"| {name} | {s['rows_in']} | {s['rows_out']} | {drops} | {s['seconds']:.1f} |")
    length = manifest["stats"].get("length", {}).get("before", {})
    if length.get("corr_length_diff_margin") is not None:
        lines += [
            "",
            f"Chosen is longer in {100 * length['chosen_longer_share']:.0f}% of candidate pairs; "
            f"Spearman(length difference, margin) = {length['corr_length_diff_margin']:.3f}.",
        ]
    return "\n".join(lines) + "\n"


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
) -> str:
    """Build a preference dataset from a recipe name or path; returns the output URI.

    Finished shards under the work location are reused (a rerun after a crash redoes
    only what was not finished); ``fresh`` recomputes everything.
    """
    config, out, work_uri = prepare(recipe, output, limit, seed, work)
    area = WorkArea(work_uri, fresh=fresh)
    prompts, prompt_stats = prompts_task(config, area)
    responses = _run_stage("sampling", [(config, area, p) for p in prompts], sample_task)
    labels = _run_stage(
        "labeling", [(config, area, p, r) for p, r in zip(prompts, responses, strict=True)], label_task
    )
    pairs = _run_stage(
        "pairing",
        [(config, area, p, r, lab) for p, r, lab in zip(prompts, responses, labels, strict=True)],
        pair_task,
    )
    kept, dropped, length = consistency_task(config, area, pairs)
    stages_ = {
        "prompts": prompt_stats,
        "sampling": merge_stats("sampling", [r.stats for r in responses]),
        "labeling": merge_stats("labeling", [r.stats for r in labels]),
        "pairing": merge_stats("pairing", [r.stats for r in pairs]),
        "consistency": kept.stats,
    }
    stats = {
        "prompts": {"source": source_label(config.prompts)},
        "stages": {name: s.to_dict() for name, s in stages_.items()},
        "length": length,
    }
    manifest = publish_task(config, out, kept, dropped, stats)
    create_markdown_artifact(
        key="build-prefs-summary", markdown=summary_markdown(out, manifest), description="Run summary"
    )
    if push_to_hub:
        push_task(out, push_to_hub, private)
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise RecipeError("--limit must be at least 1")
        prepare(args.recipe, args.output, args.limit, args.seed, args.work)
    except (RecipeError, ModelSpecError, PromptSourceError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = build_prefs(
            recipe=args.recipe,
            output=args.output,
            limit=args.limit,
            seed=args.seed,
            push_to_hub=args.push_to_hub,
            private=args.private,
            work=args.work,
            fresh=args.fresh,
        )
    except (RecipeError, ModelSpecError, PromptSourceError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
