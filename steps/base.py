"""What every stage shares: shard I/O through fsspec and statistics with drop reasons.

A stage works on one shard at a time and hands the next stage a URI, never a
table, so a shard can be computed anywhere (thread, process, another machine)
and read back by whoever needs it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from schemas.statistics import StageRecord


@dataclass
class StageStats:
    """Counts a stage reports for one shard; merged across shards into run statistics.

    ``drops`` maps a reason code to how many items were dropped for it, so that
    every row that does not reach the output is accounted for by name.
    """

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # Seconds of named parts of the stage (each labeler of the labeling stage), summed over shards.
    timings: dict[str, float] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1, example: str | None = None) -> None:
        """Count a drop; the first example per reason is kept so a person can see why."""
        self.drops[reason] += count
        if example is not None:
            self.examples.setdefault(reason, example)

    def merge(self, other: StageStats) -> StageStats:
        merged = StageStats(self.stage)
        for part in (self, other):
            merged.rows_in += part.rows_in
            merged.rows_out += part.rows_out
            merged.drops.update(part.drops)
            merged.counts.update(part.counts)
            for reason, example in part.examples.items():
                merged.examples.setdefault(reason, example)
            merged.seconds += part.seconds
            for name, seconds in part.timings.items():
                merged.timings[name] = merged.timings.get(name, 0.0) + seconds
        return merged

    def to_dict(self) -> StageRecord:
        return {
            "stage": self.stage,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "drops": dict(sorted(self.drops.items())),
            "counts": dict(sorted(self.counts.items())),
            "examples": dict(sorted(self.examples.items())),
            "seconds": round(self.seconds, 3),
            "timings": {name: round(value, 3) for name, value in sorted(self.timings.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageStats:
        return cls(
            stage=data["stage"],
            rows_in=data["rows_in"],
            rows_out=data["rows_out"],
            drops=Counter(data.get("drops", {})),
            counts=Counter(data.get("counts", {})),
            examples=dict(data.get("examples", {})),
            seconds=data.get("seconds", 0.0),
            timings=dict(data.get("timings", {})),
        )


def merge_stats(stage: str, parts: list[StageStats]) -> StageStats:
    total = StageStats(stage)
    for part in parts:
        total = total.merge(part)
    return total


@dataclass(frozen=True)
class ShardResult:
    """What a shard task returns: where its table lives and what happened to its rows.

    ``sha256`` is the file's checksum (the next stage's keys are built from it);
    ``resumed`` says the shard was found finished from an earlier run, not computed now.
    ``slot`` (prompt shards) names the prompts the shard was cut from before the prompt filters
    dropped any: shards of one slot hold subsets of the same prompts, so when only a filter setting
    changed, sampling finds each surviving prompt's samples in the slot's earlier shard.
    """

    uri: str
    rows: int
    stats: StageStats
    sha256: str = ""
    resumed: bool = False
    slot: str = ""
    # The work entries this shard made or read (its own files, a labeler's parts, a slot list): what
    # the run's record lists so that GC keeps them. Filled by ``steps.run.stages``.
    entries: tuple[str, ...] = ()
