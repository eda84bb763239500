"""``pairing:`` and ``consistency:`` signals into one preference, pairs, and which pairs are kept."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from schemas.recipe.base import Strict
from schemas.recipe.models import ScorerModelConfig


class PairJudgeConfig(Strict):
    """Judge the chosen/rejected candidate pair in both orders after pairing."""

    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)


class LengthControl(Strict):
    """Length is the best-known confounder of preference labels (docs/design.md, Length control)."""

    residual: bool = Field(
        False,
        description="take out of each signal's score what response length predicts (a slope per signal "
        "on log characters, fitted within prompts over the whole run) before aggregating",
    )
    max_ratio: float | None = Field(
        None,
        gt=1.0,
        description="never pair responses whose lengths (characters) differ by more than this ratio; "
        "the next-best candidate is tried instead",
    )


class WeightsFit(Strict):
    """Where fitted weights came from (``eval_labelers --fit --write-recipe``); the card shows it.

    Fitted weights belong to the domain of the pairs they were fitted on: a signal that
    agrees with people on harmlessness can be inverted on helpfulness.
    """

    pairs: str = Field(description="the human-labelled pairs file the weights were fitted on")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    domain: str = Field(min_length=1, description="what kind of preference those pairs express")
    n: int = Field(ge=1)
    folds: int = Field(ge=2)
    cv_accuracy: float = Field(ge=0.0, le=1.0, description="cross-validated accuracy, never in-sample")
    ci_low: float = Field(ge=0.0, le=1.0)
    ci_high: float = Field(ge=0.0, le=1.0)
    best_single: str = Field(description="the best single signal on those pairs, for comparison")
    best_single_accuracy: float = Field(ge=0.0, le=1.0)
    equal_weights_accuracy: float = Field(ge=0.0, le=1.0)


class PairingConfig(Strict):
    rule: Literal["best_vs_worst", "best_vs_random"] = "best_vs_worst"
    scale: Literal["zscore", "spread"] = Field(
        "zscore",
        description="each signal's within-prompt difference over its within-prompt spread (zscore: a vote "
        "when a prompt has two responses) or over its spread across the whole run (spread: keeps magnitude)",
    )
    length_control: LengthControl | None = None
    weights_fit: WeightsFit | None = Field(None, description="provenance of fitted labeler weights")
    min_margin: float = Field(0.0, ge=0.0, description="chosen must beat rejected by more than this")
    judge: PairJudgeConfig | None = Field(None, description="pairwise verdict on each candidate pair")
    finished_only: bool = Field(
        False,
        description="answers cut at max_tokens are never chosen or rejected (judges would compare "
        "unfinished texts, and DPO would teach the model to stop mid-sentence)",
    )


class LengthGuard(Strict):
    max_ratio: float = Field(gt=1.0, description="drop pairs whose chosen is this many times longer")
    unless_agreement: float = Field(
        1.0, ge=0.0, le=1.0, description="...unless at least this share of signals prefer chosen"
    )


class ConsistencyConfig(Strict):
    """Which pairs deserve to be kept (docs/design.md, Aggregation and consistency). Each rule is optional."""

    min_agree: int | None = Field(None, ge=1, description="at least k signals prefer chosen")
    require_swap_agreement: bool = False
    drop_mislabeled: bool = Field(True, description="drop pairs whose mean z-scored difference is <= 0")
    ambiguous_below: float | None = Field(None, ge=0.0, description="drop strength_mean below this")
    ambiguous_quantile: float | None = Field(None, gt=0.0, lt=1.0, description="drop the lowest share")
    rank_signals: tuple[str, str] | None = Field(None, description="two signals for rank consistency C")
    min_rank_consistency: float | None = Field(None, ge=0.0, le=1.0)
    length_guard: LengthGuard | None = None

    @model_validator(mode="after")
    def _rank_rule_has_signals(self) -> ConsistencyConfig:
        if self.min_rank_consistency is not None and self.rank_signals is None:
            raise ValueError("min_rank_consistency needs rank_signals: [signal_a, signal_b]")
        return self
