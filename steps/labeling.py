"""Labelers: one score per response and signal, or None with a reason.

The base class owns the loop over a shard's prompts, the NaN/inf guard and the
LABELS contract; a labeler only says how to score one prompt's responses.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas import columns as c
from schemas.recipe import BleuLabeler, LabelerConfig, Recipe
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats, read_table, write_table
from steps.bleu import BleuScorer


@dataclass(frozen=True)
class Score:
    value: float | None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Labeler(ABC):
    """Scores all responses of one prompt at a time (references and models are per prompt)."""

    signal: str

    @abstractmethod
    def score_prompt(self, prompt: dict[str, Any], responses: list[str]) -> list[Score]: ...

    def settings(self) -> dict[str, Any]:
        """What the data card says about how this signal was computed."""
        return {}

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
        for prompt in prompts.to_pylist():
            group = by_prompt.get(prompt[c.PROMPT_ID], [])
            if not group:
                continue
            scores = self.score_prompt(prompt, [text for _, text in group])
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

    def settings(self) -> dict[str, Any]:
        return {"kind": "bleu", "variant": self.variant, "max_order": 4, "scale": "0-100"}

    def score_prompt(self, prompt: dict[str, Any], responses: list[str]) -> list[Score]:
        references = prompt[c.REFERENCES] or []
        if not references:
            return [Score(None, "no_references")] * len(responses)
        scorer = BleuScorer(references, variant=self.variant)
        return [Score(scorer.score(text)) for text in responses]


def build_labeler(config: LabelerConfig) -> Labeler:
    if isinstance(config, BleuLabeler):
        return BleuLabel(config)
    raise ValueError(f"unknown labeler kind {config.kind!r}")


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
