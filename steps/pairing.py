"""Aggregate the signals and turn each prompt's scored responses into one chosen/rejected pair.

All per-prompt work (pivot, z-scores, ranking, joins) is polars over Arrow.
Ties never make a pair: rejected must score strictly below chosen by more than
``min_margin``, and differ from chosen in id and in (whitespace/case-normalised)
text. A prompt that yields no pair gets exactly one reason code.
"""

from __future__ import annotations

import math
import time

import polars as pl
import pyarrow as pa

from schemas import columns as c
from schemas import reasons as r
from schemas.recipe import ModelConfig, Recipe
from schemas.records import CONVERSATION, LABELS, PROMPTS, RESPONSES, pairs_schema
from steps.base import ShardResult, StageStats, read_table, write_table
from steps.consistency import evidence
from steps.engines import derive_seed
from steps.engines.context import truncated

AGG = "_aggregate"
NORM = "_norm_text"


def aggregate_scores(labels: pa.Table, weights: dict[str, float]) -> pl.DataFrame:
    """One row per response: each signal's raw score plus the aggregate used for pairing.

    With one signal the aggregate is its raw score, so ``score_chosen`` reads in
    that signal's units. With several, it is the weighted mean of within-prompt
    z-scores; a signal that does not vary within a prompt contributes 0 there.
    """
    signals = list(weights)
    frame = pl.from_arrow(labels).select(c.PROMPT_ID, c.RESPONSE_ID, c.SIGNAL, c.SCORE)
    assert isinstance(frame, pl.DataFrame)
    wide = frame.pivot(on=c.SIGNAL, index=[c.PROMPT_ID, c.RESPONSE_ID], values=c.SCORE)
    for signal in signals:
        if signal not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(signal))
    wide = wide.select(c.PROMPT_ID, c.RESPONSE_ID, *[pl.col(s).cast(pl.Float64) for s in signals])
    if len(signals) == 1:
        return wide.with_columns(pl.col(signals[0]).alias(AGG))
    weighted, total_weight = [], []
    for signal, weight in weights.items():
        col = pl.col(signal)
        std = col.std(ddof=0).over(c.PROMPT_ID)
        z = pl.when(std > 0).then((col - col.mean().over(c.PROMPT_ID)) / std).otherwise(0.0)
        z = pl.when(col.is_null()).then(None).otherwise(z)
        weighted.append(z * weight)
        total_weight.append(pl.when(col.is_null()).then(0.0).otherwise(weight))
    numerator = pl.sum_horizontal(weighted)
    denominator = pl.sum_horizontal(total_weight)
    agg = pl.when(denominator > 0).then(numerator / denominator).otherwise(None)
    return wide.with_columns(agg.alias(AGG))


def zero_variance_counts(scores: pl.DataFrame, signals: list[str]) -> dict[str, int]:
    """Per signal, how many prompts it could not rank (all its scores equal): it contributed 0 there."""
    per_prompt = scores.group_by(c.PROMPT_ID).agg(
        [(pl.col(s).drop_nulls().n_unique() == 1).alias(s) for s in signals]
    )
    return {s: int(per_prompt.get_column(s).sum()) for s in signals}


def judge_candidates(table: pa.Table, model: ModelConfig, stats: StageStats) -> pa.Table:
    """Fill the judge columns of each pair: both orders, P(chosen wins), agreement of the orders."""
    from steps.engines import Failed
    from steps.judges import PairJudge, Verdict

    if table.num_rows == 0:
        return table
    jobs = [
        (row[c.PROMPT], row[c.CHOSEN][0][c.CONTENT], row[c.REJECTED][0][c.CONTENT])
        for row in table.select([c.PROMPT, c.CHOSEN, c.REJECTED]).to_pylist()
    ]
    verdicts = [
        v if not isinstance(v, Verdict) or math.isfinite(v.p_first) else Failed(r.NON_FINITE_VERDICT, "")
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
        table.schema.get_field_index(c.JUDGE_P_CHOSEN), c.JUDGE_P_CHOSEN, pa.array(p_chosen, pa.float64())
    )
    return table.set_column(
        table.schema.get_field_index(c.JUDGE_SWAP_AGREE), c.JUDGE_SWAP_AGREE, pa.array(agree, pa.bool_())
    )


def _conversation(texts: pa.Array) -> pa.Array:
    """Each text → a one-message assistant conversation, built column-wise."""
    n = len(texts)
    roles = pa.array(["assistant"] * n, pa.string())
    messages = pa.StructArray.from_arrays([roles, texts.cast(pa.string())], [c.ROLE, c.CONTENT])
    offsets = pa.array(range(n + 1), pa.int32())
    return pa.ListArray.from_arrays(offsets, messages).cast(CONVERSATION)


def _no_pair_reasons(
    responses: pl.DataFrame,
    scored: pl.DataFrame,
    labels: pl.DataFrame,
    paired: pl.DataFrame,
    margin: float,
    finished_only: bool = False,
) -> pl.DataFrame:
    """One reason code per prompt that had responses but produced no pair."""
    texts = responses.group_by(c.PROMPT_ID).agg(
        pl.col(NORM).n_unique().alias("distinct_texts"),
        (pl.col(AGG).is_not_null() & pl.col(c.TRUNCATED)).sum().alias("cut"),
    )
    unpaired = texts.join(paired.select(c.PROMPT_ID), on=c.PROMPT_ID, how="anti")
    per_prompt = scored.group_by(c.PROMPT_ID).agg(
        pl.len().alias("n"),
        (pl.col(AGG).max() - pl.col(AGG).min()).alias("spread"),
        pl.col(AGG).max().alias("top"),
        ((pl.col(AGG).max() - pl.col(AGG)) > margin).sum().alias("beyond_margin"),
    )
    label_reason = (
        labels.filter(pl.col(c.REASON).is_not_null())
        .group_by(c.PROMPT_ID)
        .agg(pl.col(c.REASON).sort().first().alias("label_reason"))
    )
    frame = unpaired.join(per_prompt, on=c.PROMPT_ID, how="left").join(
        label_reason, on=c.PROMPT_ID, how="left"
    )
    reason = (
        pl.when(pl.col("distinct_texts") == 1)
        .then(pl.lit(r.IDENTICAL_SAMPLES))
        .when((pl.col("n").fill_null(0) < 2) & (pl.col("cut") > 0) & finished_only)
        .then(pl.lit(r.FEWER_THAN_TWO_FINISHED))
        .when(pl.col("n").is_null() | (pl.col("n") == 0))
        .then(pl.concat_str(pl.lit(r.UNSCORED_PREFIX), pl.col("label_reason").fill_null("unknown")))
        .when(pl.col("n") < 2)
        .then(pl.lit(r.FEWER_THAN_TWO_SCORED))
        .when(pl.col("spread") == 0)
        .then(pl.lit(r.ALL_TIED))
        .when(pl.col("beyond_margin") == 0)
        .then(pl.lit(r.BELOW_MARGIN))
        .otherwise(pl.lit(r.IDENTICAL_TEXT))
    )
    return frame.with_columns(reason.alias(c.REASON)).select(c.PROMPT_ID, c.REASON).sort(c.PROMPT_ID)


def make_pairs(
    prompts: pa.Table, responses: pa.Table, labels: pa.Table, recipe: Recipe
) -> tuple[pa.Table, StageStats]:
    weights = {labeler.name: labeler.weight for labeler in recipe.labelers}
    rule, margin = recipe.pairing.rule, recipe.pairing.min_margin
    stats = StageStats("pairing", rows_in=prompts.num_rows)
    resp = pl.from_arrow(responses)
    labels_df = pl.from_arrow(labels)
    assert isinstance(resp, pl.DataFrame) and isinstance(labels_df, pl.DataFrame)
    scores = aggregate_scores(labels, weights)
    joined = resp.join(scores, on=[c.PROMPT_ID, c.RESPONSE_ID], how="left").with_columns(
        pl.col(c.TEXT)
        .str.to_lowercase()
        .str.split(" ")
        .list.join(" ")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
        .alias(NORM)
    )
    scored = joined.filter(pl.col(AGG).is_not_null())
    if recipe.pairing.finished_only:
        # Left out after aggregation: the z-scores still see every answer the policy gave.
        stats.counts[r.CUT_ANSWERS_NOT_PAIRED] = int(scored.get_column(c.TRUNCATED).sum())
        scored = scored.filter(~pl.col(c.TRUNCATED))

    chosen = (
        scored.sort([c.PROMPT_ID, AGG, c.SAMPLE_INDEX], descending=[False, True, False])
        .group_by(c.PROMPT_ID, maintain_order=True)
        .first()
    )
    candidates = scored.join(chosen, on=c.PROMPT_ID, suffix="_c").filter(
        (pl.col(c.RESPONSE_ID) != pl.col(f"{c.RESPONSE_ID}_c"))
        & (pl.col(NORM) != pl.col(f"{NORM}_c"))
        & ((pl.col(f"{AGG}_c") - pl.col(AGG)) > margin)
    )
    if rule == "best_vs_random":
        seed = recipe.sampling.seed
        keys = [derive_seed("pair", seed, rid) for rid in candidates.get_column(c.RESPONSE_ID).to_list()]
        candidates = candidates.with_columns(pl.Series("_key", keys, dtype=pl.UInt64))
        order, descending = [c.PROMPT_ID, "_key"], [False, False]
    else:
        order, descending = [c.PROMPT_ID, AGG, c.SAMPLE_INDEX], [False, False, False]
    picked = candidates.sort(order, descending=descending).group_by(c.PROMPT_ID, maintain_order=True).first()

    picked = picked.join(
        evidence(scores, picked, list(weights), recipe.consistency.rank_signals), on=c.PROMPT_ID, how="left"
    )
    reasons = _no_pair_reasons(joined, scored, labels_df, picked, margin, recipe.pairing.finished_only)
    for reason, count in reasons.group_by(c.REASON).len().iter_rows():
        stats.drop(reason, count)
    for pid, reason in reasons.head(50).iter_rows():
        stats.examples.setdefault(reason, f"prompt {pid}")
    stats.counts["prompts_with_responses"] = resp.get_column(c.PROMPT_ID).n_unique()
    if len(weights) > 1:
        for signal, count in zero_variance_counts(scores, list(weights)).items():
            stats.counts[f"zero_variance:{signal}"] = count

    table = _pairs_table(prompts, picked, recipe)
    stats.rows_out = table.num_rows
    return table, stats


def _prompts_as_seen(messages: pa.ChunkedArray, ordered: pl.DataFrame) -> pa.Array:
    """The pair's prompt is the conversation the policy answered: truncated ones lose their oldest turns."""
    dropped = ordered.get_column(c.PROMPT_TURNS_DROPPED).to_list()
    if not any(dropped):
        return messages.combine_chunks()
    seen = [truncated(m, k) for m, k in zip(messages.to_pylist(), dropped, strict=True)]
    return pa.array(seen, CONVERSATION)


def _pairs_table(prompts: pa.Table, picked: pl.DataFrame, recipe: Recipe) -> pa.Table:
    signals = recipe.signals
    prompt_frame = pl.from_arrow(prompts.select([c.PROMPT_ID]))
    assert isinstance(prompt_frame, pl.DataFrame)
    # Keep the prompts' source order so outputs read in the order the user gave.
    ordered = prompt_frame.with_row_index("_order").join(picked, on=c.PROMPT_ID, how="inner").sort("_order")
    index = {pid: i for i, pid in enumerate(prompts.column(c.PROMPT_ID).to_pylist())}
    take = pa.array([index[pid] for pid in ordered.get_column(c.PROMPT_ID).to_list()], pa.int64())
    out: dict[str, pa.Array] = {
        c.PROMPT_ID: ordered.get_column(c.PROMPT_ID).to_arrow(),
        c.PROMPT: _prompts_as_seen(prompts.column(c.MESSAGES).take(take), ordered),
        c.CHOSEN: _conversation(ordered.get_column(f"{c.TEXT}_c").to_arrow()),
        c.REJECTED: _conversation(ordered.get_column(c.TEXT).to_arrow()),
        c.SCORE_CHOSEN: ordered.get_column(f"{AGG}_c").to_arrow(),
        c.SCORE_REJECTED: ordered.get_column(AGG).to_arrow(),
        c.MARGIN: (ordered.get_column(f"{AGG}_c") - ordered.get_column(AGG)).to_arrow(),
        c.CHOSEN_ID: ordered.get_column(f"{c.RESPONSE_ID}_c").to_arrow(),
        c.REJECTED_ID: ordered.get_column(c.RESPONSE_ID).to_arrow(),
    }
    for signal in signals:
        out[c.signal_column(signal, c.CHOSEN)] = ordered.get_column(f"{signal}_c").to_arrow()
        out[c.signal_column(signal, c.REJECTED)] = ordered.get_column(signal).to_arrow()
    for name in (c.FINISH_REASON, c.NUM_TOKENS, c.SEED):
        out[c.side_column(name, c.CHOSEN)] = ordered.get_column(f"{name}_c").to_arrow()
        out[c.side_column(name, c.REJECTED)] = ordered.get_column(name).to_arrow()
    for name in (c.POLICY_MODEL, c.ENGINE, c.TEMPERATURE, c.TOP_P, c.MAX_TOKENS, c.PROMPT_TURNS_DROPPED):
        out[name] = ordered.get_column(name).to_arrow()
    n = ordered.height
    for name in (c.AGREEMENT, c.STRENGTH_MEAN, c.STRENGTH_STD, c.CONSISTENCY, c.P_CHOSEN):
        out[name] = ordered.get_column(name).to_arrow()
    out[c.JUDGE_P_CHOSEN] = pa.nulls(n, pa.float64())
    out[c.JUDGE_SWAP_AGREE] = pa.nulls(n, pa.bool_())
    out[c.PAIR_RULE] = pa.array([recipe.pairing.rule] * n, pa.string())
    # Stamped at publication (steps.writer): a shard's pairs must not depend on, say, the filter settings,
    # or changing the filter would redo the pairing (and its judge) on resume.
    out[c.RECIPE_HASH] = pa.array([""] * n, pa.string())
    schema = pairs_schema(signals)
    return pa.Table.from_pydict({name: out[name] for name in schema.names}).cast(schema)


def pair_shard(
    recipe: Recipe, prompts_uri: str, responses_uri: str, labels_uri: str, out_uri: str
) -> ShardResult:
    start = time.perf_counter()
    table, stats = make_pairs(
        read_table(prompts_uri, PROMPTS),
        read_table(responses_uri, RESPONSES),
        read_table(labels_uri, LABELS),
        recipe,
    )
    if recipe.pairing.judge is not None:
        table = judge_candidates(table, recipe.pairing.judge.model, stats)
    write_table(table, out_uri, pairs_schema(recipe.signals), what="pairs")
    stats.seconds = time.perf_counter() - start
    return ShardResult(out_uri, table.num_rows, stats)
