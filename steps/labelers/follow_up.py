"""Follow-up likelihood (FLR): would a user react to this answer like a satisfied user?

After (prompt, response) each follow-up is scored as the next *user* turn; only
its content tokens count (not the template). A follow-up's value is its mean
token log-prob; the response's score is the mean over positive follow-ups
minus the mean over negative ones, and each dimension's own difference is kept
in the details. All follow-ups of one response share the context (prompt +
response), which the engine runs once and reuses through its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import yaml

from schemas import columns, reasons
from schemas.recipe import FollowUpConfig, RecipeError
from steps.engines import Failed, ScoreRequest, load_engine
from steps.engines.base import ReadResult
from steps.labelers.base import Labeler, Plan, PromptGroup, Score, regroup

FOLLOWUPS_DIR = Path(__file__).resolve().parent.parent.parent / "pipelines" / "followups"


@dataclass(frozen=True)
class Dimension:
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def load_followups(config: FollowUpConfig) -> dict[str, Dimension]:
    """The follow-up set a recipe names, checked and trimmed as configured; errors name the problem."""
    path = Path(config.followups)
    if path.suffix not in (".yaml", ".yml"):
        path = FOLLOWUPS_DIR / f"{config.followups}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in FOLLOWUPS_DIR.glob("*.yaml"))
        raise RecipeError(f"labelers.{config.name}.followups: no set {config.followups!r}; shipped: {known}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise RecipeError(f"follow-up set {str(path)!r}: expected a mapping of dimensions")
    wanted = config.dimensions or list(data)
    unknown = [d for d in wanted if d not in data]
    if unknown:
        raise RecipeError(f"labelers.{config.name}.dimensions: unknown {unknown}; the set has {list(data)}")
    dims = {}
    for name in wanted:
        entry = data[name]
        lists = {}
        for polarity in ("positive", "negative"):
            items = entry.get(polarity) if isinstance(entry, dict) else None
            if not items or not all(isinstance(x, str) and x.strip() for x in items):
                raise RecipeError(
                    f"follow-up set {str(path)!r}: {name}.{polarity} must be a non-empty list of text"
                )
            lists[polarity] = tuple(items[: config.per_dimension] if config.per_dimension else items)
        dims[name] = Dimension(name, lists["positive"], lists["negative"])
    return dims


class FollowUpLabeler(Labeler):
    def __init__(self, config: FollowUpConfig) -> None:
        self.signal = config.name
        self.dimensions = load_followups(config)
        self.engine = load_engine(config.model)
        self.followups = [
            (dim.name, polarity, text)
            for dim in self.dimensions.values()
            for polarity, texts in (("positive", dim.positive), ("negative", dim.negative))
            for text in texts
        ]

    def plan(self, groups: list[PromptGroup]) -> Plan:
        requests, owners = [], []
        for group in groups:
            for text in group.responses:
                if not text.strip():
                    owners.append(None)
                    continue
                context = [
                    *group.prompt[columns.MESSAGES],
                    {columns.ROLE: "assistant", columns.CONTENT: text},
                ]
                requests += [ScoreRequest(context, f, "user") for _, _, f in self.followups]
                owners.append(len(requests) - len(self.followups))

        def finish(results: list[list[ReadResult]]) -> list[list[Score]]:
            [read] = results
            flat = [
                Score(None, reasons.EMPTY_RESPONSE)
                if start is None
                else self._score(read[start : start + len(self.followups)])
                for start in owners
            ]
            return regroup(groups, flat)

        return Plan([(self.engine, requests)], finish)

    def _score(self, results: list[Any]) -> Score:
        failed = [r for r in results if isinstance(r, Failed)]
        if failed:
            return Score(None, failed[0].reason)
        by_key: dict[tuple[str, str], list[float]] = {}
        for (dim, polarity, _), scores in zip(self.followups, results, strict=True):
            by_key.setdefault((dim, polarity), []).append(fmean(scores.logprobs))
        positives = [v for (_, pol), vals in by_key.items() if pol == "positive" for v in vals]
        negatives = [v for (_, pol), vals in by_key.items() if pol == "negative" for v in vals]
        per_dimension = {
            dim: fmean(by_key[(dim, "positive")]) - fmean(by_key[(dim, "negative")])
            for dim in self.dimensions
        }
        return Score(fmean(positives) - fmean(negatives), details={"dimensions": per_dimension})
