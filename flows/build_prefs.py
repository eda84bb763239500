"""``python -m flows.build_prefs``: prompts → samples → labels → pairs → dataset + card.

Each stage runs as one Prefect task per shard and hands the next stage a URI.
The recipe, the model spec and the output location are validated before
Prefect starts or any model loads, so a typo costs a second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from schemas.recipe import Recipe, RecipeError, load_recipe
from schemas.records import PROMPTS
from steps.base import ShardResult, StageStats, join_uri, merge_stats, shard_uri, write_table
from steps.consistency import consistency_stage
from steps.engines import ModelSpecError, resolve_model
from steps.hub import push_dataset
from steps.labeling import label_shard, preflight
from steps.pairing import pair_shard
from steps.prompts import PromptSourceError, load_prompts, source_label
from steps.publish import funnel_steps, publish
from steps.sampling import sample_shard

WORK_DIR = ".work"


def prepare(
    recipe: str = "default", output: str | None = None, limit: int | None = None, seed: int | None = None
) -> tuple[Recipe, str]:
    """Everything that can be wrong with the request, checked without loading a model."""
    loaded = load_recipe(recipe).with_overrides(
        **{"limit": limit, "sampling.seed": seed, "output.uri": output}
    )
    resolve_model(loaded.policy.model, loaded.policy.engine)
    preflight(loaded)
    return loaded, loaded.output_uri()


def _log_progress(stage: str, done: int, total: int, result: ShardResult, started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    drops = ", ".join(f"{k}={v}" for k, v in sorted(result.stats.drops.items())) or "none"
    get_run_logger().info(
        f"{stage} shard {done}/{total}: {result.stats.rows_in} in → {result.rows} out "
        f"(drops: {drops}) in {result.stats.seconds:.1f}s; elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
    )


@task(name="load-prompts", cache_policy=NO_CACHE)
def prompts_task(recipe: Recipe, work: str) -> tuple[list[str], StageStats]:
    table, stats = load_prompts(recipe.prompts, recipe.limit)
    size = recipe.output.prompts_per_shard
    uris = [
        write_table(table.slice(start, size), shard_uri(work, "prompts", i), PROMPTS, what="prompts")
        for i, start in enumerate(range(0, table.num_rows, size))
    ]
    get_run_logger().info(
        f"prompts: {stats.rows_out} unique of {stats.rows_in} read from {source_label(recipe.prompts)} "
        f"(drops: {dict(stats.drops) or 'none'}) → {len(uris)} shard(s)"
    )
    return uris, stats


@task(name="sample", cache_policy=NO_CACHE)
def sample_task(recipe: Recipe, prompts_uri: str, out_uri: str) -> ShardResult:
    return sample_shard(recipe, prompts_uri, out_uri)


@task(name="label", cache_policy=NO_CACHE)
def label_task(recipe: Recipe, prompts_uri: str, responses_uri: str, out_uri: str) -> ShardResult:
    return label_shard(recipe, prompts_uri, responses_uri, out_uri)


@task(name="pair", cache_policy=NO_CACHE)
def pair_task(
    recipe: Recipe, prompts_uri: str, responses_uri: str, labels_uri: str, out_uri: str
) -> ShardResult:
    return pair_shard(recipe, prompts_uri, responses_uri, labels_uri, out_uri)


@task(name="consistency", cache_policy=NO_CACHE)
def consistency_task(
    recipe: Recipe, pair_uris: list[str], work: str
) -> tuple[list[str], list[str], StageStats, dict[str, Any]]:
    kept, dropped = shard_uri(work, "kept", 0), shard_uri(work, "dropped", 0)
    stats, report = consistency_stage(recipe, pair_uris, kept, dropped)
    drops = ", ".join(f"{k}={v}" for k, v in sorted(stats.drops.items())) or "none"
    get_run_logger().info(
        f"consistency: {stats.rows_in} candidate pairs → {stats.rows_out} kept (drops: {drops})"
    )
    return [kept], [dropped], stats, report


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(
    recipe: Recipe, output: str, kept: list[str], dropped: list[str], stats: dict[str, Any]
) -> dict[str, Any]:
    return publish(recipe, output, kept, stats, dropped)


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
) -> str:
    """Build a preference dataset from a recipe name or path; returns the output URI."""
    config, out = prepare(recipe, output, limit, seed)
    work = join_uri(out, WORK_DIR, config.fingerprint())
    prompt_uris, prompt_stats = prompts_task(config, work)
    indices = range(len(prompt_uris))
    responses = _run_stage(
        "sampling", [(config, prompt_uris[i], shard_uri(work, "responses", i)) for i in indices], sample_task
    )
    labels = _run_stage(
        "labeling",
        [(config, prompt_uris[i], responses[i].uri, shard_uri(work, "labels", i)) for i in indices],
        label_task,
    )
    pairs = _run_stage(
        "pairing",
        [
            (config, prompt_uris[i], responses[i].uri, labels[i].uri, shard_uri(work, "pairs", i))
            for i in indices
        ],
        pair_task,
    )
    kept, dropped, consistency_stats, length = consistency_task(config, [r.uri for r in pairs], work)
    stages = {
        "prompts": prompt_stats,
        "sampling": merge_stats("sampling", [r.stats for r in responses]),
        "labeling": merge_stats("labeling", [r.stats for r in labels]),
        "pairing": merge_stats("pairing", [r.stats for r in pairs]),
        "consistency": consistency_stats,
    }
    stats = {
        "prompts": {"source": source_label(config.prompts)},
        "stages": {name: s.to_dict() for name, s in stages.items()},
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepare(args.recipe, args.output, args.limit, args.seed)
        if args.limit is not None and args.limit < 1:
            raise RecipeError("--limit must be at least 1")
    except (RecipeError, ModelSpecError, PromptSourceError) as exc:
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
        )
    except (RecipeError, ModelSpecError, PromptSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = str(Path(result).resolve()) if "://" not in result else result
    print(f"\nDataset ready: {where}\n  load it with: datasets.load_dataset({where!r}, split='train')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
