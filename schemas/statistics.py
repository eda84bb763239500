"""What ``stats.json`` holds: one run's statistics, as the card, the manifest and the run summary read them.

Typed records of plain JSON values (``TypedDict``): the run writes exactly this dict, and readers of a
published ``stats.json`` (the Hub, a later run, a test) get the same shape back from ``json.load``.
"""

from __future__ import annotations

from typing import Any, TypedDict


class StageRecord(TypedDict):
    """One stage over the whole run (``steps.base.StageStats.to_dict``)."""

    stage: str
    rows_in: int
    rows_out: int
    drops: dict[str, int]  # reason code -> rows dropped for it
    counts: dict[str, int]  # what the stage counted besides rows (tokens, reused shards, ...)
    examples: dict[str, str]  # reason code -> one example row, for the card
    seconds: float
    timings: dict[str, float]  # named parts of the stage (a prompt filter, a labeler)


class RunStatistics(TypedDict):
    prompts: dict[str, Any]  # the source, and what each prompt filter did
    stages: dict[str, StageRecord]  # by ``schemas.stage_names``, in data-path order
    length: dict[str, Any]  # how much of the preference is length, before and after consistency
    aggregation: dict[str, Any] | None  # the run-wide numbers a spread scale or length control used
    eval: dict[str, Any] | None  # agreement with human pairs, when the recipe has ``eval``
    cost: dict[str, Any]  # seconds and tokens per stage and labeler, per kept pair
