"""Publication order in one place: run-prefixed shards, pictures and stats, then card, manifest last."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from schemas import reasons, stage_names
from schemas.recipe import Recipe
from schemas.records import dropped_schema, pairs_schema
from schemas.statistics import RunStatistics
from steps.engines import resolve_model
from steps.labelers.settings import labeler_settings
from steps.publish import plots
from steps.publish.card import render_card
from steps.publish.writer import (
    FORMAT_VERSION,
    RUNS_DIR,
    read_manifest,
    remove_old_runs,
    score_summary,
    verify,
    write_card_atomic,
    write_extra,
    write_manifest,
    write_split,
)
from steps.run import faults
from steps.run.resume import CODE_VERSIONS, sha256_of

IMAGES_DIR = "images"
STATS_FILE = "stats.json"


def funnel_steps(stats: RunStatistics, kept: int) -> list[tuple[str, int]]:
    """Rows left after each step; a prompt filter has its own bar when it ran (``stats["prompts"]``)."""
    stages = stats["stages"]
    prompts = stages[stage_names.PROMPTS]
    contaminated = sum(n for k, n in prompts["drops"].items() if k.startswith(reasons.CONTAMINATED_PREFIX))
    unique = prompts["rows_out"] + contaminated + prompts["drops"].get(reasons.NEAR_DUPLICATE, 0)
    steps = [("prompts read", prompts["rows_in"]), ("unique prompts", unique)]
    filters = stats.get(stage_names.PROMPTS, {})
    if "decontamination" in filters:
        steps.append(("not contaminated", unique - contaminated))
    if "near_duplicates" in filters:
        steps.append(("not near-duplicates", prompts["rows_out"]))
    if stage_names.SAMPLING in stages:
        steps.append(("responses", stages[stage_names.SAMPLING]["rows_out"]))
    if stage_names.PAIRING in stages:
        steps.append(("candidate pairs", stages[stage_names.PAIRING]["rows_out"]))
    steps.append(("kept pairs", kept))
    return steps


def all_drops(stats: RunStatistics) -> dict[str, int]:
    """Every drop of the run by reason, labelled with its stage (prompts, responses or pairs)."""
    out: dict[str, int] = {}
    for stage, data in stats["stages"].items():
        for reason, count in data["drops"].items():
            out[f"{stage}: {reason}"] = count
    return out


def content_id(recipe: Recipe, uris: list[str]) -> str:
    """The run id: what is published (recipe and input checksums), never when or by whom."""
    digest = hashlib.sha256(f"{FORMAT_VERSION}:{CODE_VERSIONS['publish']}:{recipe.fingerprint()}".encode())
    for uri in uris:
        digest.update(f":{sha256_of(uri)}".encode())
    return digest.hexdigest()[:16]


def publish(
    recipe: Recipe,
    output: str,
    kept_uris: list[str],
    stats: RunStatistics,
    dropped_uris: list[str] | None = None,
) -> dict[str, Any]:
    """Publish one dataset version under ``runs/<run id>/``: data, pictures, stats, then card, manifest.

    The run id names the content: publishing the same content again finds it already
    there and writes nothing; a crashed attempt is redone into the same prefix,
    overwriting its own partial files.
    """
    run_id = content_id(recipe, kept_uris + (dropped_uris or []))
    previous = read_manifest(output)
    if previous is not None and previous.get("run_id") == run_id:
        try:
            return verify(output)
        except (OSError, ValueError):
            pass  # a listed file changed since: publish again
    prefix = f"{RUNS_DIR}/{run_id}"
    files = {}
    pairs = pairs_schema(recipe.signals)
    files["train"], sample = write_split(output, "train", kept_uris, recipe, pairs, prefix)
    dropped_schema_ = dropped_schema(recipe.signals)
    if dropped_uris:
        files["dropped"], _ = write_split(output, "dropped", dropped_uris, recipe, dropped_schema_, prefix)
    scores = score_summary(kept_uris, recipe)
    kept_rows = sum(f.rows for f in files["train"])
    kept = plots.read_plot_table(kept_uris, pairs, recipe.signals)
    dropped = plots.read_plot_table(dropped_uris or [], dropped_schema_, recipe.signals)
    images, figures = plots.render_all(
        kept, dropped, recipe.signals, funnel_steps(stats, kept_rows), all_drops(stats)
    )
    stats = {**stats, "scores": scores, **figures}
    extras = [write_extra(output, f"{prefix}/{IMAGES_DIR}/{name}", data) for name, data in images.items()]
    blob = json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    extras.append(write_extra(output, f"{prefix}/{STATS_FILE}", blob))
    faults.checkpoint("publish:data")
    engine = {
        "model_id": resolve_model(recipe.policy.model, recipe.policy.engine).model_id,
        "engine": recipe.policy.engine,
    }
    labelers = {cfg.name: labeler_settings(cfg) for cfg in recipe.labelers}
    image_paths = {name: f"{prefix}/{IMAGES_DIR}/{name}" for name in images}
    card = render_card(recipe, files, stats, scores, sample, engine, labelers, image_paths)
    write_card_atomic(output, card)
    faults.checkpoint("publish:card")
    manifest = write_manifest(output, files, recipe, stats, extras, run_id)
    faults.checkpoint("publish:manifest")
    keep = {run_id} | ({previous["run_id"]} if previous and previous.get("run_id") else set())
    remove_old_runs(output, keep)
    return manifest
