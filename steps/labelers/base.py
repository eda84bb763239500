"""The labeler base: one score per response and signal, or None with a reason.

The base class owns the loop over a shard's prompts, the NaN/inf guard, the counts and the
LABELS contract; a labeler only says how to score a prompt's responses (a ``PromptGroup``), or,
reading a model, which requests it needs and how their answers score (a ``Plan``).
"""

from __future__ import annotations

import json
import math
from abc import ABC
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas import columns, reasons
from schemas.records import LABELS
from steps.base import StageStats
from steps.engines.base import ReadRequest, ReadResult, read_requests
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


@dataclass(frozen=True)
class PromptGroup:
    """One prompt row, with the conversation as the policy saw it, and the texts of its responses."""

    prompt: dict[str, Any]
    responses: list[str]


def regroup(groups: list[PromptGroup], flat: list[Score]) -> list[list[Score]]:
    """Split a flat list of scores (all responses of all prompts, in order) back per prompt."""
    out, start = [], 0
    for group in groups:
        out.append(flat[start : start + len(group.responses)])
        start += len(group.responses)
    return out


@dataclass(frozen=True)
class Plan:
    """What a labeler needs read for some prompts, and how the answers become its scores.

    ``reads`` pairs an engine with the requests for it; ``finish`` gets the results of each
    entry of ``reads``, in order. Asking and scoring are apart so that a runner can put the
    requests of every labeler reading one engine into a single pass (``read_plans``), where
    the prefixes they share run once.
    """

    reads: list[tuple[Any, list[ReadRequest]]]
    finish: Callable[[list[list[ReadResult]]], list[list[Score]]]


def read_plans(plans: Sequence[Plan]) -> list[list[list[ReadResult]]]:
    """Every plan's results, read with one call per engine object over all plans' requests."""
    pooled: dict[int, tuple[Any, list[ReadRequest]]] = {}
    spans: list[list[tuple[int, int, int]]] = []
    for plan in plans:
        spans.append([])
        for engine, requests in plan.reads:
            queue = pooled.setdefault(id(engine), (engine, []))[1]
            spans[-1].append((id(engine), len(queue), len(queue) + len(requests)))
            queue += requests
    answers = {key: read_requests(engine, queue) for key, (engine, queue) in pooled.items() if queue}
    return [[answers[key][a:b] if b > a else [] for key, a, b in plan] for plan in spans]


@dataclass(frozen=True)
class Shard:
    """A shard's prompts (as the policy saw them) with their responses: what every labeler reads."""

    items: list[tuple[dict[str, Any], list[tuple[str, str]]]]  # (prompt, [(response id, text)])
    rows_in: int

    @classmethod
    def of(cls, prompts: pa.Table, responses: pa.Table) -> Shard:
        by_prompt: dict[str, list[tuple[str, str]]] = {}
        turns_dropped: dict[str, int] = {}
        for pid, rid, text, dropped in zip(
            responses.column(columns.PROMPT_ID).to_pylist(),
            responses.column(columns.RESPONSE_ID).to_pylist(),
            responses.column(columns.TEXT).to_pylist(),
            responses.column(columns.PROMPT_TURNS_DROPPED).to_pylist(),
            strict=True,
        ):
            by_prompt.setdefault(pid, []).append((rid, text))
            turns_dropped[pid] = dropped
        items = [
            (as_seen(p, turns_dropped[p[columns.PROMPT_ID]]), by_prompt[p[columns.PROMPT_ID]])
            for p in prompts.to_pylist()
            if p[columns.PROMPT_ID] in by_prompt
        ]
        return cls(items, responses.num_rows)

    @property
    def groups(self) -> list[PromptGroup]:
        return [PromptGroup(p, [text for _, text in group]) for p, group in self.items]


class Labeler(ABC):
    """Scores the responses of a shard's prompts; subclasses say how, the base keeps the contract.

    Reference-based labelers override ``score_prompt`` (one prompt at a time); model-reading
    labelers override ``plan`` (the requests for a whole shard and how their answers score), or
    ``score_prompts`` when they must do more than read their engine (generate, classify).
    """

    signal: str

    def score_prompt(self, group: PromptGroup) -> list[Score]:
        raise NotImplementedError

    def plan(self, groups: list[PromptGroup]) -> Plan | None:
        """The reads these prompts need, or None for a labeler that cannot say in advance."""
        return None

    def score_prompts(self, groups: list[PromptGroup]) -> list[list[Score]]:
        plan = self.plan(groups)
        if plan is None:
            return [self.score_prompt(group) for group in groups]
        [answers] = read_plans([plan])
        return plan.finish(answers)

    def label(self, prompts: pa.Table, responses: pa.Table) -> tuple[pa.Table, StageStats]:
        shard = Shard.of(prompts, responses)
        return self.tabulate(shard, self.score_prompts(shard.groups))

    def tabulate(self, shard: Shard, all_scores: list[list[Score]]) -> tuple[pa.Table, StageStats]:
        """The LABELS rows of a shard's scores, with every null given a reason and counted."""
        stats = StageStats(f"label:{self.signal}", rows_in=shard.rows_in)
        rows: dict[str, list[Any]] = {name: [] for name in LABELS.names}
        for (prompt, group), scores in zip(shard.items, all_scores, strict=True):
            if len(scores) != len(group):
                raise RuntimeError(f"labeler {self.signal} returned {len(scores)} scores for {len(group)}")
            for (rid, _), score in zip(group, scores, strict=True):
                stats.counts.update(score.counts)
                value, reason = score.value, score.reason
                if value is not None and not math.isfinite(value):
                    value, reason = None, reasons.NON_FINITE_SCORE
                if value is None:
                    reason = reason or reasons.UNSCORED
                    stats.drop(reason, example=f"response {rid}")
                rows[columns.PROMPT_ID].append(prompt[columns.PROMPT_ID])
                rows[columns.RESPONSE_ID].append(rid)
                rows[columns.SIGNAL].append(self.signal)
                rows[columns.SCORE].append(value)
                rows[columns.REASON].append(reason if value is None else None)
                rows[columns.DETAILS].append(
                    json.dumps(score.details, sort_keys=True) if score.details else None
                )
        table = pa.Table.from_pydict(rows, schema=LABELS)
        stats.rows_out = table.num_rows - table.column(columns.SCORE).null_count
        stats.counts["scored"] = stats.rows_out
        return table, stats


def as_seen(prompt: dict[str, Any], turns_dropped: int) -> dict[str, Any]:
    """The prompt row with the conversation the policy answered (its oldest turns left out, if any)."""
    if not turns_dropped:
        return prompt
    return {**prompt, columns.MESSAGES: truncated(prompt[columns.MESSAGES], turns_dropped)}
