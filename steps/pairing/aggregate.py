"""How several signals become one preference: signed weights, a scale, and optional length control.

Each signal's score is first put on a common footing per prompt (its *feature*), then the
features are combined with the labelers' weights. Three choices shape the features:

* ``scale: zscore`` divides each prompt's centred scores by their within-prompt spread. With
  two responses per prompt that is ±1 for every signal, a vote that throws magnitude away;
  ``scale: spread`` divides by the signal's spread over the whole run instead, so a large
  difference counts for more than a small one.
* ``length_control.residual`` first takes out of each score what response length predicts
  (a slope per signal on the log of the character count, fitted within prompts over the run),
  since length is the best-known confounder of preference labels.
* A weight's sign says which way a signal points: a negative weight turns an inverted
  signal into evidence. ``strength_mean``, ``agreement`` and rank consistency read the
  signed features (``steps.pairing.consistency``), so a negatively weighted signal agrees when it
  prefers rejected.

Both run-wide numbers (spread and slope) come from ``run_stats`` over every label of the
run, before any shard is paired; ``flows.eval_labelers`` computes them the same way over
its human pairs, so a fitted weight means the same thing in both places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl
import pyarrow as pa

from schemas import columns
from schemas.recipe import Recipe

AGG = "_aggregate"
LOG_CHARS = "_log_chars"  # log(1 + characters of the response): what length control regresses on
Scale = Literal["zscore", "spread"]


def feature(signal: str) -> str:
    """The working column holding ``signal``'s feature (never written to a dataset)."""
    return f"f:{signal}"


@dataclass(frozen=True)
class Aggregation:
    """Everything about combining signals that a recipe decides (weights, scale, length control)."""

    weights: dict[str, float]
    scale: Scale = "zscore"
    residual: bool = False

    @classmethod
    def of(cls, recipe: Recipe) -> Aggregation:
        control = recipe.pairing.length_control
        return cls(
            {labeler.name: labeler.weight for labeler in recipe.labelers},
            recipe.pairing.scale,
            control is not None and control.residual,
        )

    @property
    def signals(self) -> list[str]:
        return list(self.weights)

    @property
    def needs_run_stats(self) -> bool:
        """Whether pairing needs numbers from the whole run: no shard is paired before all are labelled."""
        return self.scale == "spread" or self.residual

    @property
    def voting(self) -> list[str]:
        """The signals with a non-zero weight: the only ones that count (``agreement`` included)."""
        return [s for s, w in self.weights.items() if w != 0]

    def sign(self, signal: str) -> float:
        """Which way a signal points; a 0-weight one keeps its own direction (rank consistency reads it)."""
        return -1.0 if self.weights[signal] < 0 else 1.0


@dataclass(frozen=True)
class RunStats:
    """Per signal, over the whole run: the spread of its (residual) centred scores and its length slope.

    ``length_corr`` is the Spearman correlation of length difference with aggregate
    difference over every within-prompt pair of scored responses, without and with the
    residual control: how much of the preference length explains, and what is left.
    """

    spread: dict[str, float] = field(default_factory=dict)
    slope: dict[str, float] = field(default_factory=dict)
    length_corr: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"spread": self.spread, "slope": self.slope, "length_corr": self.length_corr}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStats:
        return cls(dict(data["spread"]), dict(data["slope"]), dict(data.get("length_corr", {})))


def wide_scores(labels: pa.Table, signals: list[str], lengths: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per response: each signal's score as a column, plus ``LOG_CHARS`` when lengths are given.

    ``lengths`` has ``response_id`` and ``text``; responses without a label row are left out.
    """
    frame = pl.from_arrow(
        labels.select([columns.PROMPT_ID, columns.RESPONSE_ID, columns.SIGNAL, columns.SCORE])
    )
    assert isinstance(frame, pl.DataFrame)
    wide = frame.pivot(
        on=columns.SIGNAL, index=[columns.PROMPT_ID, columns.RESPONSE_ID], values=columns.SCORE
    )
    for signal in signals:
        if signal not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(signal))
    wide = wide.select(columns.PROMPT_ID, columns.RESPONSE_ID, *[pl.col(s).cast(pl.Float64) for s in signals])
    if lengths is not None:
        chars = (pl.col(columns.TEXT).str.len_chars().cast(pl.Float64) + 1.0).log().alias(LOG_CHARS)
        wide = wide.join(lengths.select(columns.RESPONSE_ID, chars), on=columns.RESPONSE_ID, how="left")
    return wide


def _centred(column: pl.Expr | str) -> pl.Expr:
    col = pl.col(column) if isinstance(column, str) else column
    return col - col.mean().over(columns.PROMPT_ID)


def _slope(wide: pl.DataFrame, signal: str) -> float:
    """Within-prompt least-squares slope of ``signal`` on log length (0 where length does not vary)."""
    both = wide.filter(pl.col(signal).is_not_null() & pl.col(LOG_CHARS).is_not_null())
    moments = both.select(
        (_centred(signal) * _centred(LOG_CHARS)).sum().alias("xy"),
        (_centred(LOG_CHARS) ** 2).sum().alias("yy"),
    ).row(0)
    xy, yy = (0.0 if v is None else float(v) for v in moments)
    return xy / yy if yy > 0 else 0.0


def _fit(wide: pl.DataFrame, aggregation: Aggregation) -> RunStats:
    spread, slope = {}, {}
    for signal in aggregation.signals:
        slope[signal] = _slope(wide, signal) if aggregation.residual else 0.0
        value = pl.col(signal) - slope[signal] * pl.col(LOG_CHARS) if aggregation.residual else pl.col(signal)
        rms = (
            wide.filter(pl.col(signal).is_not_null())
            .filter(pl.len().over(columns.PROMPT_ID) > 1)
            .select((_centred(value) ** 2).mean().sqrt())
            .item()
        )
        spread[signal] = 0.0 if rms is None or not math.isfinite(rms) else float(rms)
    return RunStats(spread, slope)


def run_stats(wide: pl.DataFrame, aggregation: Aggregation) -> RunStats:
    """The run-wide numbers ``features`` needs, from every scored response of the run.

    ``wide`` must carry ``LOG_CHARS`` when the aggregation controls for length. The spread is
    the root mean square of the within-prompt centred (residual) scores, over prompts where
    the signal scored at least two responses (a lone score has nothing to differ from).
    With lengths, the correlation of length with the aggregate is measured without the
    residual control and, when the aggregation has it, with it.
    """
    stats = _fit(wide, aggregation)
    if LOG_CHARS not in wide.columns:
        return stats
    plain = Aggregation(aggregation.weights, aggregation.scale, residual=False)
    plain_stats = _fit(wide, plain) if aggregation.residual else stats
    corr = {"before": length_correlation(aggregate(features(wide, plain, plain_stats), plain, plain_stats))}
    if aggregation.residual:
        corr["after"] = length_correlation(aggregate(features(wide, aggregation, stats), aggregation, stats))
    return RunStats(stats.spread, stats.slope, corr)


def features(wide: pl.DataFrame, aggregation: Aggregation, stats: RunStats | None = None) -> pl.DataFrame:
    """``wide`` plus one ``f:<signal>`` column per signal: its within-prompt centred, scaled score.

    A signal that does not vary within a prompt (or over the run, for ``spread``) gives 0
    there; a missing score stays missing.
    """
    if aggregation.needs_run_stats and stats is None:
        raise ValueError("scale: spread and length_control.residual need run_stats over the whole run")
    exprs = []
    for signal in aggregation.signals:
        col = pl.col(signal)
        if aggregation.residual:
            assert stats is not None
            col = col - stats.slope[signal] * pl.col(LOG_CHARS)
        centred = _centred(col)
        if aggregation.scale == "zscore":
            std = col.std(ddof=0).over(columns.PROMPT_ID)
            value = pl.when(std > 0).then(centred / std).otherwise(0.0)
        else:
            assert stats is not None
            spread = stats.spread[signal]
            value = centred / spread if spread > 0 else centred * 0.0
        exprs.append(pl.when(pl.col(signal).is_null()).then(None).otherwise(value).alias(feature(signal)))
    return wide.with_columns(exprs)


def aggregate(
    featured: pl.DataFrame, aggregation: Aggregation, stats: RunStats | None = None
) -> pl.DataFrame:
    """``featured`` plus ``AGG``: the weighted mean of the signed features over the scored signals.

    With one signal the aggregate is its own score (times the weight's sign, and less its
    length prediction under residual control), so ``score_chosen`` reads in that signal's units.
    Dividing by the sum of |weights| keeps the aggregate on the features' scale, so the margin
    of a pair equals its ``strength_mean`` when every signal scored both sides.
    """
    signals = aggregation.voting
    if len(signals) == 1:
        signal = signals[0]
        value = pl.col(signal)
        if aggregation.residual:
            assert stats is not None
            value = value - stats.slope[signal] * pl.col(LOG_CHARS)
        return featured.with_columns((value * aggregation.sign(signal)).alias(AGG))
    weighted, total = [], []
    for signal in signals:
        weight = aggregation.weights[signal]
        f = pl.col(feature(signal))
        weighted.append(f * weight)
        total.append(pl.when(f.is_null()).then(0.0).otherwise(abs(weight)))
    numerator, denominator = pl.sum_horizontal(weighted), pl.sum_horizontal(total)
    return featured.with_columns(
        pl.when(denominator > 0).then(numerator / denominator).otherwise(None).alias(AGG)
    )


def length_correlation(scored: pl.DataFrame) -> float | None:
    """Spearman correlation of (log) length difference with aggregate difference over within-prompt pairs."""
    both = scored.filter(pl.col(AGG).is_not_null() & pl.col(LOG_CHARS).is_not_null()).select(
        columns.PROMPT_ID, columns.RESPONSE_ID, AGG, LOG_CHARS
    )
    pairs = both.join(both, on=columns.PROMPT_ID, suffix="_2").filter(
        pl.col(columns.RESPONSE_ID) < pl.col(f"{columns.RESPONSE_ID}_2")
    )
    if pairs.height < 3:
        return None
    value = pairs.select(
        pl.corr(
            pl.col(LOG_CHARS) - pl.col(f"{LOG_CHARS}_2"), pl.col(AGG) - pl.col(f"{AGG}_2"), method="spearman"
        )
    ).item()
    return None if value is None or not math.isfinite(value) else float(value)


def aggregate_scores(
    labels: pa.Table,
    aggregation: Aggregation | dict[str, float],
    stats: RunStats | None = None,
    lengths: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per response: each signal's raw score, its feature, and the aggregate used for pairing.

    A plain ``{signal: weight}`` means z-scores without length control (the default recipe's way).
    """
    if not isinstance(aggregation, Aggregation):
        aggregation = Aggregation(dict(aggregation))
    wide = wide_scores(labels, aggregation.signals, lengths if aggregation.residual else None)
    return aggregate(features(wide, aggregation, stats), aggregation, stats)
