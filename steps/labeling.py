"""Labelers: one score per response and signal, or None with a reason.

The base class owns the loop over a shard's prompts, the NaN/inf guard and the
LABELS contract; a labeler only says how to score one prompt's responses.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas import columns as c
from schemas.recipe import (
    BleuLabeler,
    DensityRatioLabeler,
    FollowUpLabeler,
    LabelerConfig,
    ModelConfig,
    PairwiseJudgeLabeler,
    PointwiseJudgeLabeler,
    Recipe,
)
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats, read_table, write_table
from steps.bleu import BleuScorer


@dataclass(frozen=True)
class Score:
    value: float | None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def regroup(items: list[tuple[dict[str, Any], list[str]]], flat: list[Score]) -> list[list[Score]]:
    """Split a flat list of scores (all responses of all prompts, in order) back per prompt."""
    out, start = [], 0
    for _, responses in items:
        out.append(flat[start : start + len(responses)])
        start += len(responses)
    return out


class Labeler(ABC):
    """Scores the responses of a shard's prompts; subclasses say how, the base keeps the contract.

    Reference-based labelers override ``score_prompt`` (one prompt at a time);
    model-reading labelers override ``score_prompts`` to batch a whole shard
    through their engine in one go.
    """

    signal: str

    def score_prompt(self, prompt: dict[str, Any], responses: list[str]) -> list[Score]:
        raise NotImplementedError

    def score_prompts(self, items: list[tuple[dict[str, Any], list[str]]]) -> list[list[Score]]:
        return [self.score_prompt(prompt, responses) for prompt, responses in items]

    def label(self, prompts: pa.Table, responses: pa.Table) -> tuple[pa.Table, StageStats]:
        stats = StageStats(f"label:{self.signal}", rows_in=responses.num_rows)
        by_prompt: dict[str, list[tuple[str, str]]] = {}
        for pid, rid, text in zip(
            responses.column(c.PROMPT_ID).to_pylist(),
            responses.column(c.RESPONSE_ID).to_pylist(),
            responses.column(c.TEXT).to_pylist(),
            strict=True,
        ):
            by_prompt.setdefault(pid, []).append((rid, text))
        rows: dict[str, list[Any]] = {name: [] for name in LABELS.names}
        items = [(p, by_prompt[p[c.PROMPT_ID]]) for p in prompts.to_pylist() if p[c.PROMPT_ID] in by_prompt]
        all_scores = self.score_prompts([(p, [text for _, text in group]) for p, group in items])
        for (prompt, group), scores in zip(items, all_scores, strict=True):
            if len(scores) != len(group):
                raise RuntimeError(f"labeler {self.signal} returned {len(scores)} scores for {len(group)}")
            for (rid, _), score in zip(group, scores, strict=True):
                value, reason = score.value, score.reason
                if value is not None and not math.isfinite(value):
                    value, reason = None, "non_finite_score"
                if value is None:
                    reason = reason or "unscored"
                    stats.drop(reason, example=f"response {rid}")
                rows[c.PROMPT_ID].append(prompt[c.PROMPT_ID])
                rows[c.RESPONSE_ID].append(rid)
                rows[c.SIGNAL].append(self.signal)
                rows[c.SCORE].append(value)
                rows[c.REASON].append(reason if value is None else None)
                rows[c.DETAILS].append(json.dumps(score.details, sort_keys=True) if score.details else None)
        table = pa.Table.from_pydict(rows, schema=LABELS)
        stats.rows_out = table.num_rows - table.column(c.SCORE).null_count
        stats.counts["scored"] = stats.rows_out
        return table, stats


class BleuLabel(Labeler):
    """BLEU of each response against the prompt's references (DESIGN.md §2, BLEUBERI)."""

    def __init__(self, config: BleuLabeler) -> None:
        self.signal = config.name
        self.variant = config.variant

    def score_prompt(self, prompt: dict[str, Any], responses: list[str]) -> list[Score]:
        references = prompt[c.REFERENCES] or []
        if not references:
            return [Score(None, "no_references")] * len(responses)
        scorer = BleuScorer(references, variant=self.variant)
        return [Score(scorer.score(text)) for text in responses]


def build_labeler(config: LabelerConfig) -> Labeler:
    """The labeler for a config; model-reading ones load their engine here (once per process)."""
    from steps import density_ratio, follow_up, judges

    if isinstance(config, BleuLabeler):
        return BleuLabel(config)
    if isinstance(config, DensityRatioLabeler):
        return density_ratio.DensityRatio(config)
    if isinstance(config, FollowUpLabeler):
        return follow_up.FollowUp(config)
    if isinstance(config, PointwiseJudgeLabeler):
        return judges.PointwiseJudge(config)
    if isinstance(config, PairwiseJudgeLabeler):
        return judges.PairwiseJudge(config)
    raise ValueError(f"unknown labeler kind {config.kind!r}")


_CARD_SKIP = {"n_ctx", "n_threads", "batch_tokens", "trust_remote_code", "device"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in _CARD_SKIP:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


def labeler_settings(config: LabelerConfig) -> dict[str, Any]:
    """What the card says about a labeler (flat ``key=value`` pairs), without loading its model."""
    data = _flatten(config.model_dump(mode="json", exclude={"name"}))
    if isinstance(config, FollowUpLabeler):
        from steps.follow_up import load_followups

        sets = load_followups(config)
        data["followups_used"] = sum(len(d.positive) + len(d.negative) for d in sets.values())
    return data


def preflight(recipe: Recipe) -> None:
    """Everything a labeler needs that can be checked without loading a model."""
    from steps.engines import resolve_model
    from steps.follow_up import load_followups

    for config in recipe.labelers:
        if isinstance(config, FollowUpLabeler):
            load_followups(config)
        for model in models_of(config):
            resolve_model(model.model, model.engine)
    if recipe.pairing.judge is not None:
        resolve_model(recipe.pairing.judge.model.model, recipe.pairing.judge.model.engine)


def models_of(config: LabelerConfig) -> list[ModelConfig]:
    if isinstance(config, DensityRatioLabeler):
        return [config.strong.model, config.weak.model]
    if isinstance(config, FollowUpLabeler | PointwiseJudgeLabeler | PairwiseJudgeLabeler):
        return [config.model]
    return []


def label_shard(recipe: Recipe, prompts_uri: str, responses_uri: str, out_uri: str) -> ShardResult:
    """Run every labeler of the recipe over one shard; one LABELS table holds all signals."""
    start = time.perf_counter()
    prompts = read_table(prompts_uri, PROMPTS)
    responses = read_table(responses_uri, RESPONSES)
    tables, total = [], StageStats("labeling", rows_in=responses.num_rows)
    for config in recipe.labelers:
        table, stats = build_labeler(config).label(prompts, responses)
        tables.append(table)
        total.drops.update({f"{config.name}:{k}": v for k, v in stats.drops.items()})
        total.examples.update({f"{config.name}:{k}": v for k, v in stats.examples.items()})
        total.counts[f"{config.name}:scored"] += stats.rows_out
    labels = pa.concat_tables(tables) if tables else LABELS.empty_table()
    write_table(labels, out_uri, LABELS, what="labels")
    total.rows_out = labels.num_rows
    total.seconds = time.perf_counter() - start
    return ShardResult(out_uri, labels.num_rows, total)
