"""Aggregate the signals and turn each prompt's scored responses into one chosen/rejected pair.

All per-prompt work (pivot, z-scores, ranking, joins) is polars over Arrow.
Ties never make a pair: rejected must score strictly below chosen by more than
``min_margin``, and differ from chosen in id and in (whitespace/case-normalised)
text. A prompt that yields no pair gets exactly one reason code.
"""

from __future__ import annotations

import math
import time
from typing import Any

import polars as pl
import pyarrow as pa

from schemas import columns, reasons, stage_names
from schemas.recipe import ModelConfig, Recipe
from schemas.records import CONVERSATION, LABELS, PROMPTS, RESPONSES, pairs_schema
from steps.base import ShardResult, StageStats
from steps.engines import derive_seed
from steps.engines.context import truncated
from steps.pairing.aggregate import (
    AGG,
    LOG_CHARS,
    Aggregation,
    RunStats,
    aggregate_scores,
    run_stats,
    wide_scores,
)
from steps.pairing.consistency import evidence
from steps.run.files import read_table, write_table

NORM = "_norm_text"
_CHARS = "_chars"
_RANK = "_rank"


def zero_variance_counts(scores: pl.DataFrame, signals: list[str]) -> dict[str, int]:
    """Per signal, how many prompts it could not rank (all its scores equal): it contributed 0 there."""
    per_prompt = scores.group_by(columns.PROMPT_ID).agg(
        [(pl.col(s).drop_nulls().n_unique() == 1).alias(s) for s in signals]
    )
    return {s: int(per_prompt.get_column(s).sum()) for s in signals}


def judge_candidates(table: pa.Table, model: ModelConfig, stats: StageStats) -> pa.Table:
    """Fill the judge columns of each pair: both orders, P(chosen wins), agreement of the orders."""
    from steps.engines import Failed
    from steps.labelers.judging import PairJudge, Verdict

    if table.num_rows == 0:
        return table
    jobs = [
        (
            row[columns.PROMPT],
            row[columns.CHOSEN][0][columns.CONTENT],
            row[columns.REJECTED][0][columns.CONTENT],
        )
        for row in table.select([columns.PROMPT, columns.CHOSEN, columns.REJECTED]).to_pylist()
    ]
    verdicts = [
        v
        if not isinstance(v, Verdict) or math.isfinite(v.p_first)
        else Failed(reasons.NON_FINITE_VERDICT, "")
        for v in PairJudge(model).judge(jobs)
    ]
    p_chosen = [v.p_first if isinstance(v, Verdict) else None for v in verdicts]
    agree = [v.swap_agree if isinstance(v, Verdict) else None for v in verdicts]
    for v in verdicts:
        if not isinstance(v, Verdict):
            stats.counts[f"pair_judge_failed:{v.reason}"] += 1  # the pair is kept, its verdict is null
    stats.counts["pair_judge_swap_disagree"] = sum(1 for a in agree if a is False)
    stats.counts["pair_judge_prefers_rejected"] = sum(1 for p in p_chosen if p is not None and p < 0.5)
    table = table.set_column(
        table.schema.get_field_index(columns.JUDGE_P_CHOSEN),
        columns.JUDGE_P_CHOSEN,
        pa.array(p_chosen, pa.float64()),
    )
    return table.set_column(
        table.schema.get_field_index(columns.JUDGE_SWAP_AGREE),
        columns.JUDGE_SWAP_AGREE,
        pa.array(agree, pa.bool_()),
    )


def _conversation(texts: pa.Array) -> pa.Array:
    """Each text → a one-message assistant conversation, built column-wise."""
    n = len(texts)
    roles = pa.array(["assistant"] * n, pa.string())
    messages = pa.StructArray.from_arrays([roles, texts.cast(pa.string())], [columns.ROLE, columns.CONTENT])
    offsets = pa.array(range(n + 1), pa.int32())
    return pa.ListArray.from_arrays(offsets, messages).cast(CONVERSATION)


def _no_pair_reasons(
    responses: pl.DataFrame,
    scored: pl.DataFrame,
    labels: pl.DataFrame,
    paired: pl.DataFrame,
    margin: float,
    finished_only: bool = False,
    ratio_blocked: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One reason code per prompt that had responses but produced no pair.

    ``ratio_blocked`` lists the prompts that had a candidate pair before
    ``length_control.max_ratio`` ruled every one out.
    """
    texts = responses.group_by(columns.PROMPT_ID).agg(
        pl.col(NORM).n_unique().alias("distinct_texts"),
        (pl.col(AGG).is_not_null() & pl.col(columns.TRUNCATED)).sum().alias("cut"),
    )
    unpaired = texts.join(paired.select(columns.PROMPT_ID), on=columns.PROMPT_ID, how="anti")
    per_prompt = scored.group_by(columns.PROMPT_ID).agg(
        pl.len().alias("n"),
        (pl.col(AGG).max() - pl.col(AGG).min()).alias("spread"),
        pl.col(AGG).max().alias("top"),
        ((pl.col(AGG).max() - pl.col(AGG)) > margin).sum().alias("beyond_margin"),
    )
    label_reason = (
        labels.filter(pl.col(columns.REASON).is_not_null())
        .group_by(columns.PROMPT_ID)
        .agg(pl.col(columns.REASON).sort().first().alias("label_reason"))
    )
    frame = unpaired.join(per_prompt, on=columns.PROMPT_ID, how="left").join(
        label_reason, on=columns.PROMPT_ID, how="left"
    )
    blocked = (
        ratio_blocked
        if ratio_blocked is not None
        else pl.DataFrame({columns.PROMPT_ID: []}, {columns.PROMPT_ID: pl.String})
    )
    frame = frame.with_columns(
        pl.col(columns.PROMPT_ID).is_in(blocked.get_column(columns.PROMPT_ID).implode()).alias("_ratio")
    )
    reason = (
        pl.when(pl.col("distinct_texts") == 1)
        .then(pl.lit(reasons.IDENTICAL_SAMPLES))
        .when((pl.col("n").fill_null(0) < 2) & (pl.col("cut") > 0) & finished_only)
        .then(pl.lit(reasons.FEWER_THAN_TWO_FINISHED))
        .when(pl.col("n").is_null() | (pl.col("n") == 0))
        .then(pl.concat_str(pl.lit(reasons.UNSCORED_PREFIX), pl.col("label_reason").fill_null("unknown")))
        .when(pl.col("n") < 2)
        .then(pl.lit(reasons.FEWER_THAN_TWO_SCORED))
        .when(pl.col("spread") == 0)
        .then(pl.lit(reasons.ALL_TIED))
        .when(pl.col("beyond_margin") == 0)
        .then(pl.lit(reasons.BELOW_MARGIN))
        .when(pl.col("_ratio"))
        .then(pl.lit(reasons.LENGTH_RATIO))
        .otherwise(pl.lit(reasons.IDENTICAL_TEXT))
    )
    return (
        frame.with_columns(reason.alias(columns.REASON))
        .select(columns.PROMPT_ID, columns.REASON)
        .sort(columns.PROMPT_ID)
    )


def make_pairs(
    prompts: pa.Table,
    responses: pa.Table,
    labels: pa.Table,
    recipe: Recipe,
    stats_of_run: RunStats | None = None,
) -> tuple[pa.Table, StageStats]:
    """One chosen/rejected pair per prompt, or one reason why not.

    ``stats_of_run`` are the run-wide numbers a spread scale or length control needs
    (``steps.pairing.aggregate.run_stats`` over every shard); without them this shard stands for the run.
    """
    aggregation = Aggregation.of(recipe)
    margin = recipe.pairing.min_margin
    control = recipe.pairing.length_control
    max_ratio = control.max_ratio if control is not None else None
    stats = StageStats(stage_names.PAIRING, rows_in=prompts.num_rows)
    resp = pl.from_arrow(responses)
    labels_df = pl.from_arrow(labels)
    assert isinstance(resp, pl.DataFrame) and isinstance(labels_df, pl.DataFrame)
    lengths = resp.select(columns.RESPONSE_ID, columns.TEXT)
    if aggregation.needs_run_stats and stats_of_run is None:
        stats_of_run = run_stats(wide_scores(labels, aggregation.signals, lengths), aggregation)
    scores = aggregate_scores(labels, aggregation, stats_of_run, lengths)
    joined = resp.join(
        scores.drop(LOG_CHARS, strict=False), on=[columns.PROMPT_ID, columns.RESPONSE_ID], how="left"
    )
    joined = joined.with_columns(
        pl.col(columns.TEXT)
        .str.to_lowercase()
        .str.split(" ")
        .list.join(" ")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
        .alias(NORM),
        pl.col(columns.TEXT).str.len_chars().cast(pl.Int64).alias(_CHARS),
    )
    scored = joined.filter(pl.col(AGG).is_not_null())
    if recipe.pairing.finished_only:
        # Left out after aggregation: the z-scores still see every answer the policy gave.
        stats.counts[reasons.CUT_ANSWERS_NOT_PAIRED] = int(scored.get_column(columns.TRUNCATED).sum())
        scored = scored.filter(~pl.col(columns.TRUNCATED))

    picked, blocked = _pick(scored, recipe, max_ratio, margin, stats)

    picked = picked.join(
        evidence(scores, picked, aggregation, recipe.consistency.rank_signals),
        on=columns.PROMPT_ID,
        how="left",
    )
    no_pair = _no_pair_reasons(
        joined, scored, labels_df, picked, margin, recipe.pairing.finished_only, blocked
    )
    for reason, count in no_pair.group_by(columns.REASON).len().iter_rows():
        stats.drop(reason, count)
    for pid, reason in no_pair.head(50).iter_rows():
        stats.examples.setdefault(reason, f"prompt {pid}")
    stats.counts["prompts_with_responses"] = resp.get_column(columns.PROMPT_ID).n_unique()
    if len(aggregation.signals) > 1:
        for signal, count in zero_variance_counts(scores, aggregation.signals).items():
            stats.counts[f"zero_variance:{signal}"] = count

    table = _pairs_table(prompts, picked, recipe)
    stats.rows_out = table.num_rows
    return table, stats


def _pick(
    scored: pl.DataFrame, recipe: Recipe, max_ratio: float | None, margin: float, stats: StageStats
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Each prompt's chosen and rejected response, and the prompts the length ratio left without one.

    Chosen is the best response (with a length ratio, the best one that has a partner within it);
    rejected is the worst, or a seeded random one, that is far enough below it and not the same text.
    """
    rule = recipe.pairing.rule
    ranked = scored.sort(
        [columns.PROMPT_ID, AGG, columns.SAMPLE_INDEX], descending=[False, True, False]
    ).with_columns((pl.int_range(pl.len()).over(columns.PROMPT_ID) + 1).alias(_RANK))
    chosen = ranked if max_ratio is not None else ranked.filter(pl.col(_RANK) == 1)
    candidates = scored.join(chosen, on=columns.PROMPT_ID, suffix="_c").filter(
        (pl.col(columns.RESPONSE_ID) != pl.col(f"{columns.RESPONSE_ID}_c"))
        & (pl.col(NORM) != pl.col(f"{NORM}_c"))
        & ((pl.col(f"{AGG}_c") - pl.col(AGG)) > margin)
    )
    blocked = None
    if max_ratio is not None:
        longer = pl.max_horizontal(_CHARS, f"{_CHARS}_c").cast(pl.Float64)
        shorter = pl.max_horizontal(pl.min_horizontal(_CHARS, f"{_CHARS}_c"), pl.lit(1)).cast(pl.Float64)
        within = candidates.filter(longer / shorter <= max_ratio)
        blocked = (
            candidates.select(columns.PROMPT_ID)
            .unique()
            .join(within.select(columns.PROMPT_ID), on=columns.PROMPT_ID, how="anti")
        )
        candidates = within.filter(pl.col(_RANK) == pl.col(_RANK).min().over(columns.PROMPT_ID))
        stats.counts[reasons.LENGTH_RATIO_NEXT_BEST] = (
            candidates.filter(pl.col(_RANK) > 1).get_column(columns.PROMPT_ID).n_unique()
        )
    if rule == "best_vs_random":
        seed = recipe.sampling.seed
        keys = [
            derive_seed("pair", seed, rid) for rid in candidates.get_column(columns.RESPONSE_ID).to_list()
        ]
        candidates = candidates.with_columns(pl.Series("_key", keys, dtype=pl.UInt64))
        order, descending = [columns.PROMPT_ID, "_key"], [False, False]
    else:
        order, descending = [columns.PROMPT_ID, AGG, columns.SAMPLE_INDEX], [False, False, False]
    picked = (
        candidates.sort(order, descending=descending).group_by(columns.PROMPT_ID, maintain_order=True).first()
    )
    return picked, blocked


def _prompts_as_seen(messages: pa.ChunkedArray, ordered: pl.DataFrame) -> pa.Array:
    """The pair's prompt is the conversation the policy answered: truncated ones lose their oldest turns."""
    dropped = ordered.get_column(columns.PROMPT_TURNS_DROPPED).to_list()
    if not any(dropped):
        return messages.combine_chunks()
    seen = [truncated(m, k) for m, k in zip(messages.to_pylist(), dropped, strict=True)]
    return pa.array(seen, CONVERSATION)


def _pairs_table(prompts: pa.Table, picked: pl.DataFrame, recipe: Recipe) -> pa.Table:
    signals = recipe.signals
    prompt_frame = pl.from_arrow(prompts.select([columns.PROMPT_ID]))
    assert isinstance(prompt_frame, pl.DataFrame)
    # Keep the prompts' source order so outputs read in the order the user gave.
    ordered = (
        prompt_frame.with_row_index("_order").join(picked, on=columns.PROMPT_ID, how="inner").sort("_order")
    )
    index = {pid: i for i, pid in enumerate(prompts.column(columns.PROMPT_ID).to_pylist())}
    take = pa.array([index[pid] for pid in ordered.get_column(columns.PROMPT_ID).to_list()], pa.int64())
    out: dict[str, pa.Array] = {
        columns.PROMPT_ID: ordered.get_column(columns.PROMPT_ID).to_arrow(),
        columns.PROMPT: _prompts_as_seen(prompts.column(columns.MESSAGES).take(take), ordered),
        columns.CHOSEN: _conversation(ordered.get_column(f"{columns.TEXT}_c").to_arrow()),
        columns.REJECTED: _conversation(ordered.get_column(columns.TEXT).to_arrow()),
        columns.SCORE_CHOSEN: ordered.get_column(f"{AGG}_c").to_arrow(),
        columns.SCORE_REJECTED: ordered.get_column(AGG).to_arrow(),
        columns.MARGIN: (ordered.get_column(f"{AGG}_c") - ordered.get_column(AGG)).to_arrow(),
        columns.CHOSEN_ID: ordered.get_column(f"{columns.RESPONSE_ID}_c").to_arrow(),
        columns.REJECTED_ID: ordered.get_column(columns.RESPONSE_ID).to_arrow(),
    }
    for signal in signals:
        out[columns.signal_column(signal, columns.CHOSEN)] = ordered.get_column(f"{signal}_c").to_arrow()
        out[columns.signal_column(signal, columns.REJECTED)] = ordered.get_column(signal).to_arrow()
    for name in (columns.FINISH_REASON, columns.NUM_TOKENS, columns.SEED):
        out[columns.side_column(name, columns.CHOSEN)] = ordered.get_column(f"{name}_c").to_arrow()
        out[columns.side_column(name, columns.REJECTED)] = ordered.get_column(name).to_arrow()
    for name in (
        columns.POLICY_MODEL,
        columns.ENGINE,
        columns.TEMPERATURE,
        columns.TOP_P,
        columns.MAX_TOKENS,
        columns.PROMPT_TURNS_DROPPED,
    ):
        out[name] = ordered.get_column(name).to_arrow()
    n = ordered.height
    for name in (
        columns.AGREEMENT,
        columns.STRENGTH_MEAN,
        columns.STRENGTH_STD,
        columns.CONSISTENCY,
        columns.P_CHOSEN,
    ):
        out[name] = ordered.get_column(name).to_arrow()
    out[columns.JUDGE_P_CHOSEN] = pa.nulls(n, pa.float64())
    out[columns.JUDGE_SWAP_AGREE] = pa.nulls(n, pa.bool_())
    out[columns.PAIR_RULE] = pa.array([recipe.pairing.rule] * n, pa.string())
    # Stamped at publication (steps.publish.writer): a shard's pairs must not depend on, say, the filter
    # settings, or changing the filter would redo the pairing (and its judge) on resume.
    out[columns.RECIPE_HASH] = pa.array([""] * n, pa.string())
    schema = pairs_schema(signals)
    return pa.Table.from_pydict({name: out[name] for name in schema.names}).cast(schema)


def pair_shard(
    recipe: Recipe,
    prompts_uri: str,
    responses_uri: str,
    labels_uri: str,
    out_uri: str,
    stats_of_run: dict[str, Any] | None = None,
) -> ShardResult:
    start = time.perf_counter()
    table, stats = make_pairs(
        read_table(prompts_uri, PROMPTS),
        read_table(responses_uri, RESPONSES),
        read_table(labels_uri, LABELS),
        recipe,
        None if stats_of_run is None else RunStats.from_dict(stats_of_run),
    )
    if recipe.pairing.judge is not None:
        table = judge_candidates(table, recipe.pairing.judge.model, stats)
    write_table(table, out_uri, pairs_schema(recipe.signals), what="pairs")
    stats.seconds = time.perf_counter() - start
    return ShardResult(out_uri, table.num_rows, stats)
