"""Publication order in one place: mark incomplete, shards, pictures, card, manifest last."""

from __future__ import annotations

import json
from typing import Any

from schemas.recipe import Recipe
from schemas.records import dropped_schema, pairs_schema
from steps import plots
from steps.base import read_table
from steps.card import render_card, write_card
from steps.engines import resolve_model
from steps.labeling import labeler_settings
from steps.writer import begin_publication, score_summary, write_extra, write_manifest, write_split

IMAGES_DIR = "images"
STATS_FILE = "stats.json"


def funnel_steps(stats: dict[str, Any], kept: int) -> list[tuple[str, int]]:
    stages = stats["stages"]
    steps = [
        ("prompts read", stages["prompts"]["rows_in"]),
        ("unique prompts", stages["prompts"]["rows_out"]),
    ]
    if "sampling" in stages:
        steps.append(("responses", stages["sampling"]["rows_out"]))
    if "pairing" in stages:
        steps.append(("candidate pairs", stages["pairing"]["rows_out"]))
    steps.append(("kept pairs", kept))
    return steps


def all_drops(stats: dict[str, Any]) -> dict[str, int]:
    """Every drop of the run by reason, labelled with its stage (prompts, responses or pairs)."""
    out: dict[str, int] = {}
    for stage, data in stats["stages"].items():
        for reason, count in data["drops"].items():
            out[f"{stage}: {reason}"] = count
    return out


def publish(
    recipe: Recipe,
    output: str,
    kept_uris: list[str],
    stats: dict[str, Any],
    dropped_uris: list[str] | None = None,
) -> dict[str, Any]:
    """Write the dataset (kept pairs + dropped config), its pictures, card and finally its manifest."""
    begin_publication(output)
    files = {}
    files["train"], sample = write_split(output, "train", kept_uris, recipe, pairs_schema(recipe.signals))
    dropped_schema_ = dropped_schema(recipe.signals)
    if dropped_uris:
        files["dropped"], _ = write_split(output, "dropped", dropped_uris, recipe, dropped_schema_)
    scores = score_summary(kept_uris, recipe)
    kept_rows = sum(f.rows for f in files["train"])
    kept = _concat(
        [read_table(u, pairs_schema(recipe.signals)) for u in kept_uris], pairs_schema(recipe.signals)
    )
    dropped = _concat([read_table(u, dropped_schema_) for u in dropped_uris or []], dropped_schema_)
    images, figures = plots.render_all(
        kept, dropped, recipe.signals, funnel_steps(stats, kept_rows), all_drops(stats)
    )
    stats = {**stats, "scores": scores, **figures}
    extras = [write_extra(output, f"{IMAGES_DIR}/{name}", data) for name, data in images.items()]
    blob = json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    extras.append(write_extra(output, STATS_FILE, blob))
    engine = {
        "model_id": resolve_model(recipe.policy.model, recipe.policy.engine).model_id,
        "engine": recipe.policy.engine,
    }
    labelers = {cfg.name: labeler_settings(cfg) for cfg in recipe.labelers}
    image_paths = {name: f"{IMAGES_DIR}/{name}" for name in images}
    card = render_card(recipe, files, stats, scores, sample, engine, labelers, image_paths)
    write_card(output, card)
    return write_manifest(output, files, recipe, stats, extras)


def _concat(tables: list[Any], schema: Any) -> Any:
    import pyarrow as pa

    return pa.concat_tables(tables) if tables else schema.empty_table()
