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
import yaml

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
    RecipeError,
)
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats, read_table, write_table
from steps.bleu import BleuScorer
from steps.engines.context import truncated


@dataclass(frozen=True)
class Score:
    """A response's score, or None with the reason; ``counts`` are events worth a line in the stats.

    (A judge that parsed 2 of 3 sampled verdicts still scores, but the third
    verdict is dropped, never defaulted: ``counts={"judgement_unparseable": 1}``.)
    """

    value: float | None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


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
        turns_dropped: dict[str, int] = {}
        for pid, rid, text, dropped in zip(
            responses.column(c.PROMPT_ID).to_pylist(),
            responses.column(c.RESPONSE_ID).to_pylist(),
            responses.column(c.TEXT).to_pylist(),
            responses.column(c.PROMPT_TURNS_DROPPED).to_pylist(),
            strict=True,
        ):
            by_prompt.setdefault(pid, []).append((rid, text))
            turns_dropped[pid] = dropped
        rows: dict[str, list[Any]] = {name: [] for name in LABELS.names}
        items = [
            (as_seen(p, turns_dropped[p[c.PROMPT_ID]]), by_prompt[p[c.PROMPT_ID]])
            for p in prompts.to_pylist()
            if p[c.PROMPT_ID] in by_prompt
        ]
        all_scores = self.score_prompts([(p, [text for _, text in group]) for p, group in items])
        for (prompt, group), scores in zip(items, all_scores, strict=True):
            if len(scores) != len(group):
                raise RuntimeError(f"labeler {self.signal} returned {len(scores)} scores for {len(group)}")
            for (rid, _), score in zip(group, scores, strict=True):
                stats.counts.update(score.counts)
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


def as_seen(prompt: dict[str, Any], turns_dropped: int) -> dict[str, Any]:
    """The prompt row with the conversation the policy answered (its oldest turns left out, if any)."""
    if not turns_dropped:
        return prompt
    return {**prompt, c.MESSAGES: truncated(prompt[c.MESSAGES], turns_dropped)}


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


# n_ctx stays: a scorer fails responses past it as too_long, so it shapes the labels.
_CARD_SKIP = {"n_threads", "batch_tokens", "trust_remote_code", "device"}
# Settings that do nothing unless the model runs on vLLM: a card listing them for transformers would mislead.
_VLLM_ONLY = {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager"}
# A pointwise judge in expected mode reads score probabilities; it samples nothing.
_SAMPLED_JUDGE_ONLY = {"n", "temperature", "max_tokens"}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    skip = set(_CARD_SKIP)
    if "engine" in data:  # a model's settings: show the window option its engine reads
        skip |= _VLLM_ONLY if data["engine"] != "vllm" else {"n_ctx"}
    for key, value in data.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


def labeler_settings(config: LabelerConfig) -> dict[str, Any]:
    """What the card says about a labeler (flat ``key=value`` pairs), without loading its model."""
    exclude = {"name"}
    if isinstance(config, PointwiseJudgeLabeler) and config.mode == "expected":
        exclude |= _SAMPLED_JUDGE_ONLY
    data = _flatten(config.model_dump(mode="json", exclude=exclude))
    if isinstance(config, FollowUpLabeler):
        from steps.follow_up import load_followups

        sets = load_followups(config)
        data["followups_used"] = sum(len(d.positive) + len(d.negative) for d in sets.values())
    return data


def preflight(recipe: Recipe) -> None:
    """Everything the run needs that can be checked without loading a model; errors name the recipe key.

    Covers every model of the recipe (policy, labelers, pair judge) and the
    follow-up sets, so a typo in the fourth labeler fails in milliseconds, not
    after the policy has sampled every prompt.
    """
    from steps.engines import ModelSpecError, resolve_model
    from steps.follow_up import load_followups

    for key, model in recipe_models(recipe):
        try:
            resolve_model(model.model, model.engine)
        except ModelSpecError as exc:
            raise ModelSpecError(f"{key}: {exc}") from None
    for i, config in enumerate(recipe.labelers):
        if isinstance(config, FollowUpLabeler):
            try:
                load_followups(config)
            except yaml.YAMLError as exc:
                raise RecipeError(
                    f"labelers.{i}.followups: {config.followups!r} is not valid YAML "
                    f"(only plain YAML is read, no Python tags): {exc}"
                ) from None


def recipe_models(recipe: Recipe) -> list[tuple[str, ModelConfig]]:
    """Every model the recipe would load, with the key path that names it."""
    found = [("policy.model", recipe.policy)]
    for i, config in enumerate(recipe.labelers):
        if isinstance(config, DensityRatioLabeler):
            found += [
                (f"labelers.{i}.strong.model.model ({config.name})", config.strong.model),
                (f"labelers.{i}.weak.model.model ({config.name})", config.weak.model),
            ]
        elif isinstance(config, FollowUpLabeler | PointwiseJudgeLabeler | PairwiseJudgeLabeler):
            found.append((f"labelers.{i}.model.model ({config.name})", config.model))
    if recipe.pairing.judge is not None:
        found.append(("pairing.judge.model.model", recipe.pairing.judge.model))
    return found


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
        total.counts.update({f"{config.name}:{k}": v for k, v in stats.counts.items() if k != "scored"})
    labels = pa.concat_tables(tables) if tables else LABELS.empty_table()
    write_table(labels, out_uri, LABELS, what="labels")
    total.rows_out = labels.num_rows
    total.seconds = time.perf_counter() - start
    return ShardResult(out_uri, labels.num_rows, total)
