"""Publication order in one place: mark incomplete, shards, card, manifest last."""

from __future__ import annotations

from typing import Any

from schemas.recipe import Recipe
from steps.card import render_card, write_card
from steps.engines import resolve_model
from steps.labeling import labeler_settings
from steps.writer import begin_publication, score_summary, write_manifest, write_split


def publish(recipe: Recipe, output: str, pair_uris: list[str], stats: dict[str, Any]) -> dict[str, Any]:
    """Write the dataset, its card and finally its manifest; returns the manifest."""
    begin_publication(output)
    files, sample = write_split(output, "train", pair_uris, recipe)
    scores = score_summary(pair_uris, recipe)
    stats = {**stats, "scores": scores}
    engine = {
        "model_id": resolve_model(recipe.policy.model, recipe.policy.engine).model_id,
        "engine": recipe.policy.engine,
    }
    labelers = {cfg.name: labeler_settings(cfg) for cfg in recipe.labelers}
    card = render_card(recipe, {"train": files}, stats, scores, sample, engine, labelers)
    write_card(output, card)
    return write_manifest(output, {"train": files}, recipe, stats)
