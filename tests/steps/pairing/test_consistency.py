"""Consistency evidence and rules on synthetic scores: each rule's edges, τ against scipy."""

from __future__ import annotations

import math
import random
from pathlib import Path

import datasets
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import kendalltau

from schemas import columns
from schemas.recipe import ConsistencyConfig
from schemas.records import SchemaMismatch, conform, dropped_schema, pairs_schema
from steps.pairing.consistency import (
    ambiguous_threshold,
    apply_rules,
    consistency_stage,
    evidence,
    kendall_consistency,
)
from steps.pairing.pairs import make_pairs
from steps.publish.release import publish
from steps.run.files import read_table, write_table
from tests.conftest import make_recipe
from tests.steps.labelers.test_labeling import responses
from tests.steps.pairing.test_pairing import labels_for
from tests.steps.test_sampling import prompts_table

SIGNALS3 = [{"kind": "bleu", "name": n} for n in ("s1", "s2", "s3")]


def scores_frame(values: dict[str, list[float | None]], prompt: str = "p") -> pl.DataFrame:
    n = len(next(iter(values.values())))
    return pl.DataFrame(
        {columns.PROMPT_ID: [prompt] * n, columns.RESPONSE_ID: [f"{prompt}-{i}" for i in range(n)], **values},
        schema_overrides={k: pl.Float64 for k in values},
    )


@pytest.mark.parametrize("seed", range(40))
def test_rank_consistency_matches_scipy_kendall_tau_b(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 8)
    a = [float(rng.randint(0, 3)) for _ in range(n)]  # small range: plenty of ties
    b = [float(rng.randint(0, 3)) for _ in range(n)]
    got = (
        kendall_consistency(scores_frame({"a": a, "b": b}), "a", "b")
        .get_column(columns.CONSISTENCY)
        .to_list()
    )
    tau = kendalltau(a, b).statistic
    if math.isnan(tau):
        assert got == [None]
    else:
        assert got == [pytest.approx((tau + 1) / 2)]


def test_rank_consistency_ignores_missing_scores_and_edges() -> None:
    frame = scores_frame({"a": [1.0, 2.0, 3.0, None], "b": [3.0, 2.0, 1.0, 5.0]})
    assert kendall_consistency(frame, "a", "b").get_column(columns.CONSISTENCY).to_list() == [
        0.0
    ]  # perfectly reversed
    same = scores_frame({"a": [1.0, 2.0], "b": [1.0, 2.0]})
    assert kendall_consistency(same, "a", "b").get_column(columns.CONSISTENCY).to_list() == [1.0]
    single = scores_frame({"a": [1.0, None], "b": [1.0, 2.0]})
    assert kendall_consistency(single, "a", "b").height == 0  # fewer than two jointly scored: no value


def picked_frame(chosen: str, rejected: str) -> pl.DataFrame:
    return pl.DataFrame(
        {columns.PROMPT_ID: ["p"], f"{columns.RESPONSE_ID}_c": [chosen], columns.RESPONSE_ID: [rejected]}
    )


def test_evidence_agreement_strength_and_soft_label() -> None:
    values = {"s1": [3.0, 1.0, 2.0], "s2": [1.0, 3.0, 2.0], "s3": [5.0, 5.0, 5.0]}
    ev = evidence(scores_frame(values), picked_frame("p-0", "p-1"), list(values), ("s1", "s2")).row(
        0, named=True
    )
    z1 = 1.224744871391589 * 2  # z(3) - z(1) for 1,2,3
    assert ev[columns.AGREEMENT] == pytest.approx(1 / 3)  # s1 prefers chosen, s2 rejects, s3 ties
    assert ev[columns.STRENGTH_MEAN] == pytest.approx((z1 - z1 + 0) / 3)
    assert ev[columns.STRENGTH_STD] == pytest.approx(math.sqrt((z1**2 + z1**2) / 3))
    assert ev[columns.CONSISTENCY] == pytest.approx(0.0)
    assert ev[columns.P_CHOSEN] == pytest.approx(0.5)


def test_evidence_with_a_single_or_missing_signal() -> None:
    ev = evidence(scores_frame({"s1": [2.0, 1.0]}), picked_frame("p-0", "p-1"), ["s1"], None).row(
        0, named=True
    )
    assert (
        ev[columns.AGREEMENT] == 1.0 and ev[columns.STRENGTH_STD] == 0.0 and ev[columns.CONSISTENCY] is None
    )
    assert ev[columns.P_CHOSEN] == pytest.approx(1 / (1 + math.exp(-2.0)))
    missing = scores_frame({"s1": [2.0, 1.0], "s2": [None, None]})
    ev = evidence(missing, picked_frame("p-0", "p-1"), ["s1", "s2"], None).row(0, named=True)
    assert ev[columns.AGREEMENT] == 1.0 and ev[columns.STRENGTH_MEAN] == pytest.approx(
        2.0
    )  # s2 is left out, not counted as 0


def candidate_pairs(
    score_rows: list[dict[str, list[float | None]]], texts: list[str] | None = None, **recipe: object
):
    """One prompt per entry; each entry maps signal -> scores of 4 responses."""
    prompts = prompts_table([f"p{i}" for i in range(len(score_rows))])
    resp = responses(prompts, texts or ["short", "a bit longer answer", "mid one", "x" * 60])
    signals = list(score_rows[0])
    merged = {s: [v for row in score_rows for v in row[s]] for s in signals}
    config = make_recipe(labelers=[{"kind": "bleu", "name": s} for s in signals], **recipe)
    pairs, _ = make_pairs(prompts, resp, labels_for(resp, merged), config)
    return pairs, config


def rules(config: object, **update: object) -> ConsistencyConfig:
    return ConsistencyConfig.model_validate({**config.consistency.model_dump(), **update})  # type: ignore[attr-defined]


def with_column(table: pa.Table, name: str, values: list[object]) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.float64()))


def test_rules_each_drop_with_their_own_reason() -> None:
    rows = [{"s1": [4.0, 1.0, 2.0, 3.0], "s2": [4.0, 1.0, 2.0, 3.0], "s3": [4.0, 1.0, 2.0, 3.0]}] * 3
    pairs, config = candidate_pairs(rows)
    assert pairs.column(columns.AGREEMENT).to_pylist() == [1.0, 1.0, 1.0]
    # With equal weights the aggregate margin and strength_mean coincide; set the evidence directly.
    pairs = with_column(
        with_column(pairs, columns.AGREEMENT, [1.0, 2 / 3, 1 / 3]), columns.STRENGTH_MEAN, [1.0, 0.0, -0.5]
    )
    kept, dropped, stats, _ = apply_rules(
        pairs, config.consistency, config.signals
    )  # default: mislabeled only
    assert dict(stats.drops) == {"likely_mislabeled": 2} and kept.num_rows == 1  # 0.0 is on the dropped side
    kept, dropped, stats, _ = apply_rules(pairs, rules(config, min_agree=3), config.signals)
    assert dropped.column(columns.DROP_REASON).to_pylist() == [
        "sign_disagreement",
        "sign_disagreement",
    ]  # first rule wins
    assert set(dropped.column_names) == set(dropped_schema(config.signals).names)
    edge = rules(config, min_agree=2, drop_mislabeled=False)
    assert apply_rules(pairs, edge, config.signals)[0].num_rows == 2  # k = 2 of 3 is kept at the edge


def test_pairing_computes_agreement_from_raw_directions() -> None:
    rows = [{"s1": [4.0, 1.0, 2.0, 3.0], "s2": [1.0, 4.0, 2.0, 3.0], "s3": [4.0, 1.0, 2.0, 3.0]}]
    pairs, _ = candidate_pairs(rows)
    assert pairs.column(columns.AGREEMENT).to_pylist() == [pytest.approx(2 / 3)]
    assert pairs.column(columns.STRENGTH_MEAN).to_pylist()[0] == pytest.approx(
        pairs.column(columns.MARGIN).to_pylist()[0]
    )


def test_ambiguous_threshold_and_quantile() -> None:
    rows = [{"s1": [float(k), 0.0, 0.0, 0.0]} for k in (1, 2, 3, 4)]
    pairs, config = candidate_pairs(rows)
    strengths = pairs.column(columns.STRENGTH_MEAN).to_pylist()
    assert len(set(strengths)) == 1  # z-scores: one winner of four always scores the same
    below = rules(config, ambiguous_below=strengths[0] + 1e-9)
    assert dict(apply_rules(pairs, below, config.signals)[2].drops) == {"ambiguous": 4}
    at = rules(config, ambiguous_below=strengths[0])
    assert apply_rules(pairs, at, config.signals)[0].num_rows == 4  # strictly below is ambiguous
    rows = [{"s1": [4.0, 1.0, 2.0, 3.0], "s2": [float(k), 1.0, 2.0, 3.0]} for k in (4, 3.5, 2.5, 0.5)]
    pairs, config = candidate_pairs(rows)
    quantile = rules(config, ambiguous_quantile=0.5)
    kept, dropped, _, _ = apply_rules(pairs, quantile, config.signals)
    assert kept.num_rows == 2 and set(dropped.column(columns.DROP_REASON).to_pylist()) <= {
        "ambiguous",
        "likely_mislabeled",
    }
    assert min(kept.column(columns.STRENGTH_MEAN).to_pylist()) >= max(
        dropped.column(columns.STRENGTH_MEAN).to_pylist()
    )


def test_a_zero_floor_still_counts_under_the_quantile_cut() -> None:
    """ambiguous_below: 0.0 is a real floor: a quantile that falls below zero cannot lower it."""
    strengths = pl.Series([-2.0, -1.0, 0.5, 3.0])
    config = ConsistencyConfig(drop_mislabeled=False, ambiguous_quantile=0.25)
    assert ambiguous_threshold(config, strengths) == pytest.approx(-1.0)
    floored = ConsistencyConfig(drop_mislabeled=False, ambiguous_quantile=0.25, ambiguous_below=0.0)
    assert ambiguous_threshold(floored, strengths) == 0.0
    assert ambiguous_threshold(ConsistencyConfig(ambiguous_below=0.0), strengths) == 0.0


def test_rank_consistency_rule_and_swap_rule() -> None:
    rows = [
        {"a": [4.0, 1.0, 2.0, 3.0], "b": [4.0, 1.0, 2.0, 3.0]},
        {"a": [4.0, 1.0, 2.0, 3.0], "b": [4.0, 3.0, 2.0, 1.0]},
    ]
    pairs, config = candidate_pairs(
        rows, consistency={"rank_signals": ["a", "b"], "min_rank_consistency": 0.6}
    )
    assert pairs.column(columns.CONSISTENCY).to_pylist() == pytest.approx([1.0, 0.5])
    kept, dropped, _, _ = apply_rules(pairs, config.consistency, config.signals)
    assert kept.num_rows == 1 and dropped.column(columns.DROP_REASON).to_pylist() == ["rank_inconsistent"]
    judged = pairs.set_column(
        pairs.schema.get_field_index(columns.JUDGE_SWAP_AGREE),
        columns.JUDGE_SWAP_AGREE,
        pa.array([True, None], pa.bool_()),
    )
    swap = config.consistency.model_copy(
        update={"require_swap_agreement": True, "min_rank_consistency": None}
    )
    kept, dropped, _, _ = apply_rules(judged, swap, config.signals)
    assert kept.num_rows == 1 and dropped.column(columns.DROP_REASON).to_pylist() == [
        "judge_swap_disagreement"
    ]


def test_length_guard_and_report() -> None:
    rows = [{"s1": [4.0, 1.0, 2.0, 3.0]}] * 3
    texts = ["a much much longer answer " * 5, "short", "mid", "other"]
    pairs, config = candidate_pairs(rows, texts)  # chosen: the long text (5x+ longer than "short")
    pairs = with_column(pairs, columns.AGREEMENT, [0.5, 1.0, 0.99])
    guard = rules(config, length_guard={"max_ratio": 2.0, "unless_agreement": 1.0})
    kept, dropped, _, report = apply_rules(pairs, guard, config.signals)
    # only unanimous signals may keep a pair whose chosen is much longer
    assert dropped.column(columns.DROP_REASON).to_pylist() == ["length_only", "length_only"]
    assert kept.column(columns.AGREEMENT).to_pylist() == [1.0]
    assert (
        apply_rules(pairs, rules(config, length_guard={"max_ratio": 100.0}), config.signals)[0].num_rows == 3
    )
    assert report["before"]["pairs"] == 3 and report["before"]["chosen_longer_share"] == 1.0


def test_identical_pairs_are_dropped_even_if_pairing_let_one_through() -> None:
    pairs, config = candidate_pairs([{"s1": [2.0, 1.0, 0.0, 0.0]}])
    same = pairs.set_column(
        pairs.schema.get_field_index(columns.REJECTED), columns.REJECTED, pairs.column(columns.CHOSEN)
    )
    _, dropped, _, _ = apply_rules(same, config.consistency, config.signals)
    assert dropped.column(columns.DROP_REASON).to_pylist() == ["identical_pair"]


def test_dropped_config_loads_and_card_has_pictures(tmp_path: Path) -> None:
    rows = [
        {"s1": [4.0, 1.0, 2.0, 3.0], "s2": [4.0, 1.0, 2.0, 3.0], "s3": [4.0, 1.0, 2.0, 3.0]},
        {"s1": [4.0, 1.0, 2.0, 3.0], "s2": [1.0, 4.0, 2.0, 3.0], "s3": [4.0, 1.0, 2.0, 3.0]},
    ]
    pairs, config = candidate_pairs(rows, consistency={"min_agree": 3})
    kept, dropped, stats, report = apply_rules(pairs, config.consistency, config.signals)
    kept_uri = write_table(kept, str(tmp_path / "w" / "kept.parquet"), pairs_schema(config.signals))
    dropped_uri = write_table(
        dropped, str(tmp_path / "w" / "dropped.parquet"), dropped_schema(config.signals)
    )
    stage = {
        "stage": "x",
        "rows_in": 2,
        "rows_out": 2,
        "drops": {},
        "counts": {},
        "examples": {},
        "seconds": 0.0,
    }
    run_stats = {
        "prompts": {"source": "t"},
        "length": report,
        "stages": {
            "prompts": stage,
            "sampling": stage,
            "labeling": stage,
            "pairing": stage,
            "consistency": stats.to_dict(),
        },
    }
    out = tmp_path / "out"
    manifest = publish(config, str(out), [kept_uri], run_stats, [dropped_uri])
    assert manifest["splits"] == {"train": 1, "dropped": 1}
    assert datasets.load_dataset(str(out), split="train").num_rows == 1
    dropped_ds = datasets.load_dataset(str(out), "dropped", split="train")
    assert dropped_ds[0][columns.DROP_REASON] == "sign_disagreement"
    card = (out / "README.md").read_text()
    for name in ("funnel", "signals", "agreement", "margins", "length_vs_score"):
        png = out / "runs" / manifest["run_id"] / "images" / f"{name}.png"
        assert (
            png.read_bytes().startswith(b"\x89PNG") and f"runs/{manifest['run_id']}/images/{name}.png" in card
        )
    assert "consistency: sign\\_disagreement" in card or "sign\\_disagreement" in card
    stats_file = out / "runs" / manifest["run_id"] / "stats.json"
    assert "agreement_matrix" in stats_file.read_text()


# ----------------------------------------------------------------- streaming over many shards


def random_pairs(seed: int, prompts: int) -> tuple[pa.Table, object]:
    """Candidate pairs with varied evidence, texts of several lengths (one non-ASCII) and some ties."""
    rng = random.Random(seed)
    rows = [
        {s: [float(rng.randint(0, 4)) for _ in range(4)] for s in ("s1", "s2", "s3")} for _ in range(prompts)
    ]
    texts = ["short", "a bit longer answer", "mid ünïcode", "x" * 60]
    return candidate_pairs(rows, texts)


def split_into_shards(pairs: pa.Table, sizes: list[int], folder: Path, signals: list[str]) -> list[str]:
    uris, start = [], 0
    for i, size in enumerate(sizes):
        uris.append(
            write_table(pairs.slice(start, size), str(folder / f"pairs-{i}.parquet"), pairs_schema(signals))
        )
        start += size
    assert start == pairs.num_rows
    return uris


@pytest.mark.parametrize(
    "consistency",
    [
        {
            "min_agree": 2,
            "ambiguous_quantile": 0.3,
            "length_guard": {"max_ratio": 3.0, "unless_agreement": 1.0},
        },
        {"ambiguous_quantile": 0.6, "ambiguous_below": 0.1, "drop_mislabeled": False},
        {"ambiguous_below": 0.5},
    ],
)
def test_stage_over_many_shards_equals_rules_over_the_concatenation(
    tmp_path: Path, consistency: dict[str, object]
) -> None:
    pairs, config = random_pairs(7, 40)
    config = make_recipe(labelers=SIGNALS3, consistency=consistency)
    # Uneven shards, one of them empty: a quantile taken per shard would differ from the global one.
    uris = split_into_shards(pairs, [3, 0, 11, 1, 25], tmp_path, config.signals)
    kept_uri, dropped_uri = str(tmp_path / "out" / "kept.parquet"), str(tmp_path / "out" / "dropped.parquet")
    stats, report = consistency_stage(config, uris, kept_uri, dropped_uri)

    want_kept, want_dropped, want_stats, want_report = apply_rules(pairs, config.consistency, config.signals)
    assert want_kept.num_rows and want_dropped.num_rows  # the case exercises both files
    assert len(set(want_dropped.column(columns.DROP_REASON).to_pylist())) >= 2 or consistency.get(
        "ambiguous_below"
    )
    schema, dschema = pairs_schema(config.signals), dropped_schema(config.signals)
    # Same rows in the same order (shard order, then row order), and the same numbers.
    assert read_table(kept_uri, schema).equals(conform(want_kept, schema, "kept"))
    assert read_table(dropped_uri, dschema).equals(conform(want_dropped, dschema, "dropped"))
    got, want = stats.to_dict(), want_stats.to_dict()
    got.pop("seconds"), want.pop("seconds")
    assert got == want
    assert report == want_report
    assert pq.ParquetFile(kept_uri).num_row_groups == len(uris)  # appended shard by shard, not gathered


def test_stage_with_no_or_empty_shards_writes_empty_readable_files(tmp_path: Path) -> None:
    pairs, config = random_pairs(1, 2)
    for uris in ([], split_into_shards(pairs.slice(0, 0), [0], tmp_path, config.signals)):
        kept_uri, dropped_uri = str(tmp_path / "k.parquet"), str(tmp_path / "d.parquet")
        stats, report = consistency_stage(config, uris, kept_uri, dropped_uri)
        assert read_table(kept_uri, pairs_schema(config.signals)).num_rows == 0
        assert read_table(dropped_uri, dropped_schema(config.signals)).num_rows == 0
        assert stats.rows_in == stats.rows_out == 0 and report["before"]["pairs"] == 0


def test_stage_writes_through_fsspec_and_checks_the_contract(tmp_path: Path) -> None:
    pairs, config = random_pairs(3, 6)
    uris = split_into_shards(pairs, [2, 4], tmp_path, config.signals)
    stats, _ = consistency_stage(config, uris, "memory://cons/kept.parquet", "memory://cons/dropped.parquet")
    kept = read_table("memory://cons/kept.parquet", pairs_schema(config.signals))
    dropped = read_table("memory://cons/dropped.parquet", dropped_schema(config.signals))
    assert kept.num_rows == stats.rows_out and kept.num_rows + dropped.num_rows == 6
    # A shard missing a contract column is an error naming it, even in the numbers-only first pass.
    broken = str(tmp_path / "broken.parquet")
    pq.write_table(pairs.drop_columns([columns.MARGIN]), broken)
    quantile = make_recipe(labelers=SIGNALS3, consistency={"ambiguous_quantile": 0.5})
    with pytest.raises(SchemaMismatch, match=f"missing column.*{columns.MARGIN}"):
        consistency_stage(quantile, [*uris, broken], str(tmp_path / "k.parquet"), str(tmp_path / "d.parquet"))


def test_length_report_sees_a_shorter_chosen_as_shorter() -> None:
    """len_chars is unsigned: chosen − rejected must go negative, not wrap to 4e9 (it did, and read 100% longer)."""
    from steps.pairing.consistency import length_report

    def side(text: str) -> list[dict[str, str]]:
        return [{"role": "assistant", "content": text}]

    frame = pl.DataFrame({
        columns.CHOSEN: [side("short"), side("a much longer answer"), side("tiny")],
        columns.REJECTED: [side("a longer rejected one"), side("x"), side("a bit longer")],
        columns.MARGIN: [1.0, 2.0, 3.0],
    })  # fmt: skip
    report = length_report(frame)
    assert report["chosen_longer_share"] == pytest.approx(1 / 3)
    assert report["corr_length_diff_margin"] == pytest.approx(0.5)  # ranks of -16, 19, -8 against 1, 2, 3
