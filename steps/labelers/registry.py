"""Which labeler runs each kind of labeler config: the one place that knows every kind."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from schemas import stage_names
from schemas.recipe import (
    BleuConfig,
    DensityRatioConfig,
    FollowUpConfig,
    LabelerConfig,
    PairwiseJudgeConfig,
    PointwiseJudgeConfig,
    Recipe,
    RewardModelConfig,
)
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats
from steps.labelers.base import Labeler
from steps.labelers.bleu import BleuLabeler
from steps.labelers.density_ratio import DensityRatioLabeler
from steps.labelers.follow_up import FollowUpLabeler
from steps.labelers.joint import label_jointly
from steps.labelers.judge_pairwise import PairwiseJudgeLabeler
from steps.labelers.judge_pointwise import PointwiseJudgeLabeler
from steps.labelers.reward_model import RewardModelLabeler
from steps.run.files import read_table, write_table

KINDS: dict[type, Callable[[Any], Labeler]] = {
    BleuConfig: BleuLabeler,
    DensityRatioConfig: DensityRatioLabeler,
    FollowUpConfig: FollowUpLabeler,
    PointwiseJudgeConfig: PointwiseJudgeLabeler,
    PairwiseJudgeConfig: PairwiseJudgeLabeler,
    RewardModelConfig: RewardModelLabeler,
}


def build_labeler(config: LabelerConfig) -> Labeler:
    """The labeler for a config; model-reading ones load their engine here (once per process)."""
    for config_type, labeler in KINDS.items():
        if isinstance(config, config_type):
            return labeler(config)
    raise ValueError(f"unknown labeler kind {config.kind!r}")


def label_shard(recipe: Recipe, prompts_uri: str, responses_uri: str, out_uri: str) -> ShardResult:
    """Run every labeler of the recipe over one shard, model reads pooled per engine; one LABELS table."""
    start = time.perf_counter()
    prompts = read_table(prompts_uri, PROMPTS)
    responses = read_table(responses_uri, RESPONSES)
    tables, total = [], StageStats(stage_names.LABELING, rows_in=responses.num_rows)
    labelers = [build_labeler(config) for config in recipe.labelers]
    for config, done in zip(recipe.labelers, label_jointly(labelers, prompts, responses), strict=True):
        table, stats = done.table, done.stats
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
