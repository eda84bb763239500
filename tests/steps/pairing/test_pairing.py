"""Pairing rules and signal aggregation: ties never pair, chosen ≠ rejected, every no-pair has a reason."""

from __future__ import annotations

import random

import polars as pl
import pyarrow as pa
import pytest

from schemas import columns
from schemas.records import LABELS, pairs_schema
from steps.pairing.aggregate import AGG, aggregate_scores
from steps.pairing.pairs import make_pairs
from tests.conftest import make_recipe
from tests.steps.labelers.test_labeling import responses
from tests.steps.test_sampling import prompts_table


def labels_for(resp: pa.Table, scores: dict[str, list[float | None]]) -> pa.Table:
    """Scores per signal, listed in response order."""
    rows = []
    ids = resp.select([columns.PROMPT_ID, columns.RESPONSE_ID]).to_pylist()
    for signal, values in scores.items():
        for ident, value in zip(ids, values, strict=True):
            rows.append(
                {
                    **ident,
                    columns.SIGNAL: signal,
                    columns.SCORE: value,
                    columns.REASON: None if value is not None else "no_references",
                    columns.DETAILS: None,
                }
            )
    return pa.Table.from_pylist(rows, schema=LABELS)


def run(texts: list[str], scores: list[float | None], **pairing: object) -> tuple[pa.Table, dict[str, int]]:
    prompts = prompts_table(["p"])
    resp = responses(prompts, texts)
    recipe = make_recipe(pairing=pairing or {})
    table, stats = make_pairs(prompts, resp, labels_for(resp, {"bleu": scores}), recipe)
    assert table.schema == pairs_schema(["bleu"])
    return table, dict(stats.drops)


def test_best_vs_worst_conversational_rows() -> None:
    table, drops = run(["a", "b", "c", "d"], [1.0, 5.0, 0.5, 3.0])
    assert drops == {}
    row = table.to_pylist()[0]
    assert row[columns.CHOSEN] == [{"role": "assistant", "content": "b"}]
    assert row[columns.REJECTED] == [{"role": "assistant", "content": "c"}]
    assert row[columns.PROMPT] == [{"role": "user", "content": "p"}]
    assert (row[columns.SCORE_CHOSEN], row[columns.SCORE_REJECTED], row[columns.MARGIN]) == (5.0, 0.5, 4.5)
    assert (
        row[columns.signal_column("bleu", columns.CHOSEN)],
        row[columns.signal_column("bleu", columns.REJECTED)],
    ) == (5.0, 0.5)
    assert row[columns.CHOSEN_ID].endswith("-1") and row[columns.REJECTED_ID].endswith("-2")


def test_ties_make_no_pair_and_tied_best_breaks_by_sample_order() -> None:
    table, drops = run(["a", "b", "c", "d"], [2.0, 2.0, 2.0, 2.0])
    assert table.num_rows == 0 and drops == {"all_tied": 1}
    table, _ = run(["a", "b", "c", "d"], [3.0, 3.0, 1.0, 1.0])
    row = table.to_pylist()[0]
    assert row[columns.CHOSEN][0]["content"] == "a" and row[columns.REJECTED][0]["content"] == "c"


def test_margin_is_strict() -> None:
    assert run(["a", "b"], [1.0, 1.5], min_margin=0.5)[1] == {"below_margin": 1}
    assert run(["a", "b"], [1.0, 1.6], min_margin=0.5)[0].num_rows == 1


def test_identical_text_never_pairs_even_with_different_scores() -> None:
    table, drops = run(["Same answer", "same   ANSWER "], [2.0, 1.0])
    assert table.num_rows == 0 and drops == {"identical_samples": 1}
    table, _ = run(["Same answer", "same answer", "other"], [2.0, 0.0, 1.0])
    assert table.to_pylist()[0][columns.REJECTED][0]["content"] == "other"


def test_unscored_and_single_scored_prompts_have_reasons() -> None:
    assert run(["a", "b"], [None, None])[1] == {"unscored:no_references": 1}
    assert run(["a", "b"], [1.0, None])[1] == {"fewer_than_two_scored": 1}


def test_best_vs_random_is_seeded_and_spreads() -> None:
    prompts = prompts_table([f"p{i}" for i in range(30)])
    resp = responses(prompts, ["a", "b", "c", "d"])
    labels = labels_for(resp, {"bleu": [4.0, 3.0, 2.0, 1.0] * 30})

    def rejected(seed: int) -> list[str]:
        recipe = make_recipe(pairing={"rule": "best_vs_random"}, sampling={"seed": seed})
        return make_pairs(prompts, resp, labels, recipe)[0].column(columns.REJECTED_ID).to_pylist()

    assert rejected(1) == rejected(1)
    assert rejected(1) != rejected(2)
    assert {r.rsplit("-", 1)[1] for r in rejected(1)} == {"1", "2", "3"}


@pytest.mark.parametrize("rule", ["best_vs_worst", "best_vs_random"])
def test_chosen_and_rejected_always_differ(rule: str) -> None:
    rng = random.Random(0)
    prompts = prompts_table([f"p{i}" for i in range(200)])
    texts = ["x", "x ", "y", "z"]
    resp = responses(prompts, texts)
    scores = [rng.choice([None, 0.0, 1.0, 1.0, 2.0]) for _ in range(resp.num_rows)]
    table, stats = make_pairs(
        prompts, resp, labels_for(resp, {"bleu": scores}), make_recipe(pairing={"rule": rule})
    )
    for row in table.to_pylist():
        assert row[columns.CHOSEN_ID] != row[columns.REJECTED_ID]
        assert row[columns.CHOSEN][0]["content"].strip() != row[columns.REJECTED][0]["content"].strip()
        assert row[columns.SCORE_CHOSEN] > row[columns.SCORE_REJECTED]
    assert table.num_rows + sum(stats.drops.values()) == 200  # every prompt accounted for


def test_aggregate_is_weighted_mean_of_within_prompt_zscores() -> None:
    prompts = prompts_table(["p"])
    resp = responses(prompts, ["a", "b", "c"])
    labels = labels_for(resp, {"s1": [1.0, 2.0, 3.0], "s2": [5.0, 5.0, 5.0], "s3": [3.0, None, 1.0]})
    frame = aggregate_scores(labels, {"s1": 2.0, "s2": 1.0, "s3": 1.0})
    z1 = [-1.224744871391589, 0.0, 1.224744871391589]  # population z of 1,2,3
    z3 = [1.0, None, -1.0]  # population z of 3,1 (the null response has no s3)
    expected = [
        (2 * z1[0] + 0 + z3[0]) / 4,
        (2 * z1[1] + 0) / 3,  # s3 missing: its weight leaves the denominator
        (2 * z1[2] + 0 + z3[2]) / 4,
    ]
    got = frame.sort(columns.RESPONSE_ID).get_column(AGG).to_list()
    assert got == pytest.approx(expected)
    assert frame.get_column("s2").to_list() == [5.0, 5.0, 5.0]  # raw scores stay


def test_single_signal_aggregate_is_raw_score() -> None:
    prompts = prompts_table(["p"])
    resp = responses(prompts, ["a", "b"])
    frame = aggregate_scores(labels_for(resp, {"bleu": [7.0, None]}), {"bleu": 1.0})
    assert frame.sort(columns.RESPONSE_ID).get_column(AGG).to_list() == [7.0, None]
    assert isinstance(frame, pl.DataFrame)


def cut(resp: pa.Table, indices: set[int]) -> pa.Table:
    """Mark the answers at ``indices`` as cut at max_tokens."""
    flags = [i in indices for i in resp.column(columns.SAMPLE_INDEX).to_pylist()]
    reasons = ["length" if f else "stop" for f in flags]
    resp = resp.set_column(resp.schema.get_field_index(columns.TRUNCATED), columns.TRUNCATED, pa.array(flags))
    return resp.set_column(
        resp.schema.get_field_index(columns.FINISH_REASON), columns.FINISH_REASON, pa.array(reasons)
    )


def run_cut(
    scores: list[float], indices: set[int], **pairing: object
) -> tuple[pa.Table, dict[str, int], dict]:
    prompts = prompts_table(["p"])
    resp = cut(responses(prompts, ["a", "b", "c", "d"]), indices)
    recipe = make_recipe(pairing=pairing)
    table, stats = make_pairs(prompts, resp, labels_for(resp, {"bleu": scores}), recipe)
    return table, dict(stats.drops), dict(stats.counts)


def test_finished_only_pairs_the_best_and_worst_finished_answers() -> None:
    # b (5.0) and c (0.5) are the extremes but cut; among the finished a (1.0) and d (3.0) pair.
    table, drops, counts = run_cut([1.0, 5.0, 0.5, 3.0], {1, 2}, finished_only=True)
    [row] = table.to_pylist()
    assert (row[columns.CHOSEN][0][columns.CONTENT], row[columns.REJECTED][0][columns.CONTENT]) == ("d", "a")
    assert (
        row[columns.side_column(columns.FINISH_REASON, columns.CHOSEN)]
        == row[columns.side_column(columns.FINISH_REASON, columns.REJECTED)]
        == "stop"
    )
    assert drops == {} and counts["cut_answers_not_paired"] == 2
    # Off (the default), the cut answers pair as before.
    table, _, counts = run_cut([1.0, 5.0, 0.5, 3.0], {1, 2})
    assert [table.to_pylist()[0][k][0][columns.CONTENT] for k in (columns.CHOSEN, columns.REJECTED)] == [
        "b",
        "c",
    ]
    assert "cut_answers_not_paired" not in counts


def test_finished_only_with_one_finished_answer_names_the_reason() -> None:
    table, drops, _ = run_cut([1.0, 5.0, 0.5, 3.0], {0, 1, 2}, finished_only=True)
    assert table.num_rows == 0 and drops == {"fewer_than_two_finished": 1}
    table, drops, _ = run_cut([1.0, 5.0, 0.5, 3.0], {0, 1, 2, 3}, finished_only=True)
    assert table.num_rows == 0 and drops == {"fewer_than_two_finished": 1}


def test_max_ratio_tries_the_next_best_pair_and_says_why_when_none_fits() -> None:
    texts = ["x" * 400, "y" * 100, "z" * 60, "w" * 10]
    # Unconstrained: best (400 chars) vs worst (10 chars).
    table, _ = run(texts, [4.0, 3.0, 2.0, 1.0])
    assert (table[columns.CHOSEN_ID][0].as_py()[-1], table[columns.REJECTED_ID][0].as_py()[-1]) == ("0", "3")
    # Ratio 2: the best has no partner within 2x, so the next best (100) pairs with 60.
    prompts = prompts_table(["p"])
    resp = responses(prompts, texts)
    recipe = make_recipe(pairing={"length_control": {"max_ratio": 2.0}})
    table, stats = make_pairs(prompts, resp, labels_for(resp, {"bleu": [4.0, 3.0, 2.0, 1.0]}), recipe)
    assert (table[columns.CHOSEN_ID][0].as_py()[-1], table[columns.REJECTED_ID][0].as_py()[-1]) == ("1", "2")
    assert stats.counts["length_ratio_next_best"] == 1
    # Ratio 1.1: no two answers are that close in length.
    recipe = make_recipe(pairing={"length_control": {"max_ratio": 1.1}})
    table, stats = make_pairs(prompts, resp, labels_for(resp, {"bleu": [4.0, 3.0, 2.0, 1.0]}), recipe)
    assert table.num_rows == 0 and dict(stats.drops) == {"length_ratio": 1}


def test_spread_scale_and_residual_control_run_through_pairing() -> None:
    prompts = prompts_table(["p", "q"])
    resp = responses(prompts, ["a" * 10, "b" * 300, "c" * 40, "d" * 50])
    labels = labels_for(resp, {"s1": [1.0, 2.0, 3.0, 4.0] * 2, "s2": [4.0, 3.0, 2.0, 1.0] * 2})
    labelers = [{"kind": "bleu", "name": "s1"}, {"kind": "bleu", "name": "s2", "weight": -1.0}]
    recipe = make_recipe(labelers=labelers, pairing={"scale": "spread", "length_control": {"residual": True}})
    table, _ = make_pairs(prompts, resp, labels, recipe)
    assert table.num_rows == 2
    assert table.column(columns.AGREEMENT).to_pylist() == [1.0, 1.0]  # s2 is inverted, so it agrees with s1
    assert all(m > 0 for m in table.column(columns.STRENGTH_MEAN).to_pylist())
