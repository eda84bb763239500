"""Consistency: the evidence that a pair deserves to be kept, and the rules that decide.

Evidence is computed per shard while pairing (it is per prompt): for each pair,
the share of signals that prefer chosen (``agreement``), the mean and spread of
the within-prompt z-scored differences (``strength_mean``/``strength_std``,
Secrets of RLHF II), the rank consistency C = (Kendall τ-b + 1)/2 of two named
signals over the prompt's responses (CREAM), and a soft label. Rules are judged
over all pairs (a quantile band needs the whole distribution, which a first pass
reads as one numeric column) but applied one shard at a time; every pair that is
not kept leaves with exactly one reason code, the first rule it fails.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import ExitStack
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import columns, reasons, stage_names
from schemas.recipe import ConsistencyConfig, Recipe
from schemas.records import conform, dropped_schema, pairs_schema
from steps.base import StageStats
from steps.pairing.aggregate import Aggregation, feature, features
from steps.run.files import read_table


def kendall_consistency(scores: pl.DataFrame, a: str, b: str) -> pl.DataFrame:
    """C = (τ_b + 1) / 2 per prompt between signals ``a`` and ``b``; null where τ is undefined."""
    both = scores.filter(pl.col(a).is_not_null() & pl.col(b).is_not_null()).select(
        columns.PROMPT_ID, columns.RESPONSE_ID, pl.col(a).alias("_a"), pl.col(b).alias("_b")
    )
    pairs = both.join(both, on=columns.PROMPT_ID, suffix="_2").filter(
        pl.col(columns.RESPONSE_ID) < pl.col(f"{columns.RESPONSE_ID}_2")
    )
    dx = (pl.col("_a") - pl.col("_a_2")).sign()
    dy = (pl.col("_b") - pl.col("_b_2")).sign()
    per_prompt = pairs.group_by(columns.PROMPT_ID).agg(
        pl.len().alias("n0"),
        (dx == 0).sum().alias("n1"),
        (dy == 0).sum().alias("n2"),
        (dx * dy).sum().alias("s"),
    )
    denominator = ((pl.col("n0") - pl.col("n1")) * (pl.col("n0") - pl.col("n2"))).cast(pl.Float64).sqrt()
    tau = pl.when(denominator > 0).then(pl.col("s") / denominator).otherwise(None)
    return per_prompt.select(columns.PROMPT_ID, ((tau + 1) / 2).alias(columns.CONSISTENCY))


def evidence(
    scores: pl.DataFrame,
    picked: pl.DataFrame,
    aggregation: Aggregation | list[str],
    rank_signals: tuple[str, str] | None,
) -> pl.DataFrame:
    """Per picked pair (one per prompt): agreement, strength mean/std, consistency, soft label.

    Each signal's evidence is its signed feature difference chosen − rejected (the weight's
    sign times ``f:<signal>``, ``steps.pairing.aggregate``), so a negatively weighted signal agrees
    when it prefers rejected. ``strength_mean`` is the |weight|-weighted mean of those
    differences, which is the aggregate margin when every signal scored both sides;
    ``agreement`` counts signals, so ``min_agree`` stays a number of signals. A plain list of
    signals means equal weights on z-scores; ``scores`` without feature columns gets them.
    """
    if not isinstance(aggregation, Aggregation):
        aggregation = Aggregation(dict.fromkeys(aggregation, 1.0))
    if any(feature(s) not in scores.columns for s in aggregation.signals):
        scores = features(scores, aggregation)
    signals = aggregation.voting
    signed = [(pl.col(feature(s)) * aggregation.sign(s)).alias(s) for s in signals]
    z = scores.select(columns.RESPONSE_ID, *signed)
    chosen = z.rename({name: f"{name}|c" for name in z.columns})
    rejected = z.rename({name: f"{name}|r" for name in z.columns})
    frame = (
        picked.select(
            columns.PROMPT_ID,
            pl.col(f"{columns.RESPONSE_ID}_c").alias("cid"),
            pl.col(columns.RESPONSE_ID).alias("rid"),
        )
        .join(chosen, left_on="cid", right_on=f"{columns.RESPONSE_ID}|c")
        .join(rejected, left_on="rid", right_on=f"{columns.RESPONSE_ID}|r")
    )
    diffs = {s: pl.col(f"{s}|c") - pl.col(f"{s}|r") for s in signals}
    weight = {s: abs(aggregation.weights[s]) for s in signals}
    present = [d.is_not_null().cast(pl.Float64) for d in diffs.values()]
    total = pl.sum_horizontal([p * weight[s] for p, s in zip(present, signals, strict=True)])
    mean = pl.sum_horizontal([d.fill_null(0.0) * weight[s] for s, d in diffs.items()]) / total
    frame = frame.with_columns(
        pl.when(total > 0).then(mean).otherwise(None).alias(columns.STRENGTH_MEAN),
        pl.when(pl.sum_horizontal(present) > 0)
        .then(
            pl.sum_horizontal([(d > 0).fill_null(False).cast(pl.Float64) for d in diffs.values()])
            / pl.sum_horizontal(present)
        )
        .otherwise(None)
        .alias(columns.AGREEMENT),
    )
    spread = pl.sum_horizontal(
        [((d - pl.col(columns.STRENGTH_MEAN)) ** 2).fill_null(0.0) * weight[s] for s, d in diffs.items()]
    )
    frame = frame.with_columns(
        pl.when(total > 0).then((spread / total).sqrt()).otherwise(None).alias(columns.STRENGTH_STD),
        (1 / (1 + (-pl.col(columns.STRENGTH_MEAN)).exp())).alias(columns.P_CHOSEN),
    )
    if rank_signals is not None:
        a, b = rank_signals
        ranked = scores.select(
            columns.PROMPT_ID,
            columns.RESPONSE_ID,
            (pl.col(feature(a)) * aggregation.sign(a)).alias("_rank_a"),
            (pl.col(feature(b)) * aggregation.sign(b)).alias("_rank_b"),
        )
        frame = frame.join(
            kendall_consistency(ranked, "_rank_a", "_rank_b"), on=columns.PROMPT_ID, how="left"
        )
    else:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(columns.CONSISTENCY))
    numbers = [
        columns.AGREEMENT,
        columns.STRENGTH_MEAN,
        columns.STRENGTH_STD,
        columns.CONSISTENCY,
        columns.P_CHOSEN,
    ]
    return frame.select(columns.PROMPT_ID, *[pl.col(name).cast(pl.Float64) for name in numbers])


def _normalised(column: str) -> pl.Expr:
    text = pl.col(column).list.first().struct.field(columns.CONTENT)
    return text.str.to_lowercase().str.replace_all(r"\s+", " ").str.strip_chars()


def ambiguous_threshold(config: ConsistencyConfig, strengths: pl.Series) -> float | None:
    """The "ambiguous" cut: ``ambiguous_below`` raised to the quantile of ``strengths`` (all pairs')."""
    threshold = config.ambiguous_below
    if config.ambiguous_quantile is not None and strengths.len():
        quantile = strengths.drop_nulls().quantile(config.ambiguous_quantile)
        floor = -math.inf if threshold is None else threshold  # 0.0 is a threshold, not "unset"
        threshold = max(floor, quantile if quantile is not None else -math.inf)
    return threshold


def rule_reasons(frame: pl.DataFrame, config: ConsistencyConfig, signals: list[str]) -> pl.Expr:
    """The first failed rule's code for each pair, null when the pair is kept (quantile over ``frame``)."""
    return rules_expr(config, signals, ambiguous_threshold(config, frame.get_column(columns.STRENGTH_MEAN)))


def rules_expr(config: ConsistencyConfig, signals: list[str], threshold: float | None) -> pl.Expr:
    """The rules as one row-wise expression; the only global number, the ambiguous cut, is given.

    Being row-wise is what lets the stage apply it one shard at a time.
    """
    m = len(signals)
    checks: list[tuple[pl.Expr, str]] = [
        (_normalised(columns.CHOSEN) == _normalised(columns.REJECTED), reasons.IDENTICAL_PAIR)
    ]
    if config.min_agree is not None:
        agreeing = (pl.col(columns.AGREEMENT) * m).round(0)
        checks.append((agreeing.is_null() | (agreeing < config.min_agree), reasons.SIGN_DISAGREEMENT))
    if config.require_swap_agreement:
        checks.append(
            (pl.col(columns.JUDGE_SWAP_AGREE).fill_null(False).not_(), reasons.JUDGE_SWAP_DISAGREEMENT)
        )
    if config.drop_mislabeled:
        checks.append((pl.col(columns.STRENGTH_MEAN).fill_null(0.0) <= 0, reasons.LIKELY_MISLABELED))
    if threshold is not None and math.isfinite(threshold):
        checks.append((pl.col(columns.STRENGTH_MEAN).fill_null(0.0) < threshold, reasons.AMBIGUOUS))
    if config.min_rank_consistency is not None:
        low = pl.col(columns.CONSISTENCY).is_null() | (
            pl.col(columns.CONSISTENCY) < config.min_rank_consistency
        )
        checks.append((low, reasons.RANK_INCONSISTENT))
    if config.length_guard is not None:
        guard = config.length_guard
        ratio = _length(columns.CHOSEN) / pl.max_horizontal(_length(columns.REJECTED), pl.lit(1))
        checks.append(
            (
                (ratio >= guard.max_ratio) & (pl.col(columns.AGREEMENT) < guard.unless_agreement),
                reasons.LENGTH_ONLY,
            )
        )
    reason = pl.lit(None, dtype=pl.String)
    for condition, code in reversed(checks):
        reason = pl.when(condition).then(pl.lit(code)).otherwise(reason)
    return reason


def _length(column: str) -> pl.Expr:
    # Signed: len_chars is unsigned, and chosen − rejected would wrap around instead of going negative.
    return pl.col(column).list.first().struct.field(columns.CONTENT).str.len_chars().cast(pl.Int64)


LENGTH_DIFF = "_length_diff"  # chosen minus rejected characters: a working column, never written


def length_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """The two numbers per pair that the length report needs, so the texts need not be kept."""
    diff = (_length(columns.CHOSEN) - _length(columns.REJECTED)).cast(pl.Float64)
    return frame.select(diff.alias(LENGTH_DIFF), pl.col(columns.MARGIN))


def length_summary(lengths: pl.DataFrame) -> dict[str, Any]:
    """How much of the preference is length: correlation of length difference and margin."""
    if lengths.height < 2:
        return {"pairs": lengths.height, "chosen_longer_share": None, "corr_length_diff_margin": None}
    diff = pl.col(LENGTH_DIFF)
    out = lengths.select(
        (diff > 0).mean().alias("share"),
        pl.corr(diff, pl.col(columns.MARGIN), method="spearman").alias("corr"),
    ).row(0)
    corr = out[1]
    return {
        "pairs": lengths.height,
        "chosen_longer_share": float(out[0]),
        "corr_length_diff_margin": None if corr is None or math.isnan(corr) else float(corr),
    }


def length_report(frame: pl.DataFrame) -> dict[str, Any]:
    """The length report of a whole pair table (see ``length_summary``)."""
    return length_summary(length_columns(frame))


def apply_rules(
    pairs: pa.Table, config: ConsistencyConfig, signals: list[str]
) -> tuple[pa.Table, pa.Table, StageStats, dict[str, Any]]:
    """Split all candidate pairs into kept and dropped (with ``drop_reason``), all in memory at once."""
    stats = StageStats(stage_names.CONSISTENCY, rows_in=pairs.num_rows)
    frame = pl.from_arrow(pairs)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(rule_reasons(frame, config, signals).alias(columns.DROP_REASON))
    kept = frame.filter(pl.col(columns.DROP_REASON).is_null()).drop(columns.DROP_REASON)
    dropped = frame.filter(pl.col(columns.DROP_REASON).is_not_null())
    for reason, count in dropped.group_by(columns.DROP_REASON).len().sort(columns.DROP_REASON).iter_rows():
        stats.drop(reason, count)
    stats.rows_out = kept.height
    report = {"before": length_report(frame), "kept": length_report(kept)}
    return kept.to_arrow(), dropped.to_arrow(), stats, report


def read_columns(uri: str, names: list[str], schema: pa.Schema) -> pa.Table:
    """Only ``names`` of a pair shard, typed as the contract says; the whole contract is still checked."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        conform(parquet.schema_arrow.empty_table(), schema, uri)  # raises naming a missing/mistyped column
        table = parquet.read(columns=names)
    return table.cast(pa.schema([schema.field(name) for name in names]))


def _open_writer(stack: ExitStack, uri: str, schema: pa.Schema) -> pq.ParquetWriter:
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    handle = stack.enter_context(fs.open(path, "wb"))
    return stack.enter_context(pq.ParquetWriter(handle, schema))


def consistency_stage(
    recipe: Recipe, pair_uris: list[str], kept_uri: str, dropped_uri: str
) -> tuple[StageStats, dict[str, Any]]:
    """All candidate pairs in, one kept and one dropped file out, one pair shard in memory at a time.

    The rules are row-wise except the ambiguous quantile, so a first pass reads only the
    strength column of every shard; the second applies the rules shard by shard and appends
    to both files, keeping shard order and row order within a shard (as ``apply_rules`` on
    the concatenation would). The length report keeps two numbers per pair, not the texts.
    """
    start = time.perf_counter()
    config, signals = recipe.consistency, recipe.signals
    schema, dropped_schema_ = pairs_schema(signals), dropped_schema(signals)
    strengths = pl.Series(columns.STRENGTH_MEAN, [], dtype=pl.Float64)
    if config.ambiguous_quantile is not None:
        parts = [read_columns(uri, [columns.STRENGTH_MEAN], schema).column(0) for uri in pair_uris]
        strengths = pl.Series(
            columns.STRENGTH_MEAN, pa.chunked_array(parts, schema.field(columns.STRENGTH_MEAN).type)
        )
    drop_rule = rules_expr(config, recipe.voting_signals, ambiguous_threshold(config, strengths))
    stats = StageStats(stage_names.CONSISTENCY)
    drops: Counter[str] = Counter()
    before: list[pl.DataFrame] = []
    after: list[pl.DataFrame] = []
    with ExitStack() as stack:
        kept_writer = _open_writer(stack, kept_uri, schema)
        dropped_writer = _open_writer(stack, dropped_uri, dropped_schema_)
        for uri in pair_uris:
            frame = pl.from_arrow(read_table(uri, schema))
            assert isinstance(frame, pl.DataFrame)
            frame = frame.with_columns(drop_rule.alias(columns.DROP_REASON))
            kept = frame.filter(pl.col(columns.DROP_REASON).is_null()).drop(columns.DROP_REASON)
            dropped = frame.filter(pl.col(columns.DROP_REASON).is_not_null())
            drops.update(dict(dropped.group_by(columns.DROP_REASON).len().iter_rows()))
            stats.rows_in += frame.height
            stats.rows_out += kept.height
            before.append(length_columns(frame))
            after.append(length_columns(kept))
            kept_writer.write_table(conform(kept.to_arrow(), schema, "kept pairs"))
            dropped_writer.write_table(conform(dropped.to_arrow(), dropped_schema_, "dropped pairs"))
    for reason in sorted(drops):
        stats.drop(reason, drops[reason])
    report = {"before": length_summary(_stack(before)), "kept": length_summary(_stack(after))}
    stats.seconds = time.perf_counter() - start
    return stats, report


def _stack(frames: list[pl.DataFrame]) -> pl.DataFrame:
    if not frames:
        return pl.DataFrame(schema={LENGTH_DIFF: pl.Float64, columns.MARGIN: pl.Float64})
    return pl.concat(frames, rechunk=True)
