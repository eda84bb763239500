"""What a dataset cost to make: time per stage and per labeler, tokens generated and read, per kept pair.

A team budgets with the cost of a pair that survives filtering, not with throughput: the same
tokens/s can mean very different bills when most pairs are dropped. The numbers come from each
shard's statistics, so a shard reused from an earlier run reports what it cost when it was made.
"""

from __future__ import annotations

from typing import Any

from schemas import stage_names
from steps.base import StageStats

SCORED = "tokens_scored"
JOINTLY = "scored_jointly"  # shards where the labeler shared a model pass with others
PASS_TOKENS = "joint_pass_tokens"  # the tokens of those whole passes


def cost_summary(stages: dict[str, StageStats], kept: int, eval_seconds: float | None) -> dict[str, Any]:
    """Seconds and tokens per stage and labeler, their totals, and the same per kept pair (None if none)."""
    labeling = stages.get(stage_names.LABELING, StageStats(stage_names.LABELING))
    labelers = {name: _labeler(labeling, name, seconds) for name, seconds in sorted(labeling.timings.items())}
    seconds = {name: round(s.seconds, 3) for name, s in stages.items()}
    if eval_seconds is not None:
        seconds["label_quality"] = round(eval_seconds, 3)
    judge = int(stages.get(stage_names.PAIRING, StageStats(stage_names.PAIRING)).counts.get(SCORED, 0))
    sampled = stages.get(stage_names.SAMPLING, StageStats(stage_names.SAMPLING))
    totals = {
        "seconds": round(sum(seconds.values()), 3),
        "tokens_generated": int(sampled.counts.get("tokens", 0)),
        SCORED: sum(v[SCORED] for v in labelers.values()) + judge,
    }
    return {
        "kept_pairs": kept,
        "seconds": seconds,
        "labelers": labelers,
        "pair_judge_tokens_scored": judge,
        "total": totals,
        "per_kept_pair": {name: round(value / kept, 3) for name, value in totals.items()} if kept else None,
    }


def _labeler(labeling: StageStats, name: str, seconds: float) -> dict[str, Any]:
    """A labeler's seconds and tokens; where it shared a model pass with others, that it did and how big.

    Labelers reading one model are scored in one pass (``steps.labelers.joint``), where a shared
    prefix runs once for all: its seconds and tokens are split equally between them, which keeps
    the totals exact but is no measurement of what each would cost alone.
    """
    counts = labeling.counts
    entry: dict[str, Any] = {"seconds": round(seconds, 3), SCORED: int(counts.get(f"{name}:{SCORED}", 0))}
    shared = int(counts.get(f"{name}:{JOINTLY}", 0))
    if shared:
        entry["shared_pass"] = {"shards": shared, "pass_tokens": int(counts.get(f"{name}:{PASS_TOKENS}", 0))}
    return entry
