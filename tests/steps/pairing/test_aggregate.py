"""Signed weights, the two scales, length control and the weight fit, on numbers worked by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from schemas import columns
from schemas.recipe import RecipeError
from steps.pairing.aggregate import (
    AGG,
    LOG_CHARS,
    Aggregation,
    RunStats,
    aggregate,
    feature,
    features,
    run_stats,
)
from steps.pairing.consistency import evidence
from steps.quality.fit_weights import fit_logistic, fit_weights, folds_by_group
from tests.conftest import make_recipe


def frame(
    values: dict[str, list[float | None]], prompts: list[str], chars: list[int] | None = None
) -> pl.DataFrame:
    data: dict[str, list[object]] = {
        columns.PROMPT_ID: list(prompts), columns.RESPONSE_ID: [f"{p}-{i}" for i, p in enumerate(prompts)], **values,
    }  # fmt: skip
    out = pl.DataFrame(data, schema_overrides={k: pl.Float64 for k in values})
    if chars is not None:
        out = out.with_columns(pl.Series(LOG_CHARS, [math.log(1 + n) for n in chars]))
    return out


def agg_of(wide: pl.DataFrame, aggregation: Aggregation, stats: RunStats | None = None) -> list[float | None]:
    return aggregate(features(wide, aggregation, stats), aggregation, stats).get_column(AGG).to_list()


def test_negative_weight_turns_an_inverted_signal_into_evidence() -> None:
    wide = frame({"good": [2.0, 1.0], "inverted": [0.0, 5.0]}, ["p", "p"])
    assert agg_of(wide, Aggregation({"good": 1.0, "inverted": 1.0})) == [0.0, 0.0]  # they cancel
    assert agg_of(wide, Aggregation({"good": 1.0, "inverted": -1.0})) == [1.0, -1.0]
    # One signal keeps its units, with the weight's sign.
    assert agg_of(frame({"s": [3.0, 1.0]}, ["p", "p"]), Aggregation({"s": -2.0})) == [-3.0, -1.0]


def test_zscore_is_a_vote_with_two_responses_and_spread_keeps_magnitude() -> None:
    # Two prompts of two responses: signal a differs by 4 then 1, signal b by 1 then 4, in opposite directions.
    wide = frame({"a": [4.0, 0.0, 1.0, 0.0], "b": [0.0, 1.0, 0.0, 4.0]}, ["p", "p", "q", "q"])
    equal = {"a": 1.0, "b": 1.0}
    assert agg_of(wide, Aggregation(equal)) == [0.0, 0.0, 0.0, 0.0]  # ±1 each way: ties everywhere
    stats = run_stats(wide, Aggregation(equal, "spread"))
    spread = math.sqrt((2.0**2 + 0.5**2) / 2)  # rms of the centred values ±2 and ±0.5
    assert stats.spread == pytest.approx({"a": spread, "b": spread})
    got = agg_of(wide, Aggregation(equal, "spread"), stats)
    assert got[0] > got[1] and got[2] < got[3]  # the larger difference wins each prompt
    assert got[0] == pytest.approx((2.0 - 0.5) / spread / 2)


def test_residual_control_takes_out_what_length_predicts() -> None:
    # s is 2·log-length plus a length-free part e; t is e alone. The residual of s ranks as e does.
    rng = np.random.default_rng(0)
    n = 40
    chars = [int(v) for v in rng.integers(10, 2000, size=n)]
    extra = [float(v) for v in rng.normal(scale=0.1, size=n)]
    scores = [2 * math.log(1 + k) + e for k, e in zip(chars, extra, strict=True)]
    prompts = [f"p{i // 2}" for i in range(n)]
    wide = frame({"s": scores, "t": extra}, prompts, chars)
    aggregation = Aggregation({"s": 1.0, "t": 1.0}, "spread", residual=True)
    stats = run_stats(wide, aggregation)
    assert stats.slope["s"] == pytest.approx(2.0, abs=0.1) and abs(stats.slope["t"]) < 0.1
    featured = features(wide, aggregation, stats)
    f, e = featured.get_column(feature("s")).to_list(), featured.get_column("t").to_list()
    agree = [(f[i] > f[i + 1]) == (e[i] > e[i + 1]) for i in range(0, n, 2)]
    assert sum(agree) >= 0.75 * len(agree)  # the slope is estimated, so a little length remains
    before, after = stats.length_corr["before"], stats.length_corr["after"]
    assert before is not None and after is not None and abs(after) < 0.5 < abs(before)


def test_run_wide_numbers_are_required_not_guessed() -> None:
    with pytest.raises(ValueError, match="run_stats"):
        features(frame({"s": [1.0, 2.0]}, ["p", "p"]), Aggregation({"s": 1.0}, "spread"))


def test_signed_evidence_counts_an_inverted_signal_as_agreeing() -> None:
    scores = frame({"good": [2.0, 1.0], "inverted": [0.0, 5.0], "none": [None, None]}, ["p", "p"])
    picked = pl.DataFrame(
        {columns.PROMPT_ID: ["p"], f"{columns.RESPONSE_ID}_c": ["p-0"], columns.RESPONSE_ID: ["p-1"]}
    )
    weights = Aggregation({"good": 1.0, "inverted": -3.0, "none": 1.0})
    ev = evidence(scores, picked, weights, ("good", "inverted")).row(0, named=True)
    assert ev[columns.AGREEMENT] == 1.0  # both scored signals back chosen; the unscored one is left out
    assert ev[columns.STRENGTH_MEAN] == pytest.approx(2.0)  # (1·2 + 3·2) / 4
    assert ev[columns.STRENGTH_STD] == pytest.approx(0.0)
    assert ev[columns.CONSISTENCY] == pytest.approx(1.0)  # ranks agree once the inverted one is flipped
    plain = evidence(scores, picked, ["good", "inverted"], None).row(0, named=True)
    assert plain[columns.AGREEMENT] == 0.5 and plain[columns.STRENGTH_MEAN] == pytest.approx(0.0)


@pytest.mark.parametrize("weight", [math.inf, math.nan])
def test_non_finite_weight_is_a_recipe_error(weight: float) -> None:
    with pytest.raises((RecipeError, ValueError), match="finite"):
        make_recipe(labelers=[{"kind": "bleu", "weight": weight}])
    assert make_recipe(labelers=[{"kind": "bleu", "weight": -0.5}]).labelers[0].weight == -0.5


def test_zero_weight_keeps_a_column_out_of_the_vote() -> None:
    labelers = [{"kind": "bleu", "name": "a"}, {"kind": "bleu", "name": "b", "weight": 0}]
    recipe = make_recipe(labelers=labelers)
    assert recipe.signals == ["a", "b"] and recipe.voting_signals == ["a"]
    with pytest.raises((RecipeError, ValueError), match="every weight is 0"):
        make_recipe(labelers=[{"kind": "bleu", "weight": 0}])
    with pytest.raises((RecipeError, ValueError), match="min_agree: 2 > the 1 signal"):
        make_recipe(labelers=labelers, consistency={"min_agree": 2})
    scores = frame({"a": [2.0, 1.0], "b": [0.0, 5.0]}, ["p", "p"])
    aggregation = Aggregation({"a": 1.0, "b": 0.0})
    assert agg_of(scores, aggregation) == [2.0, 1.0]  # one voting signal: its own units
    picked = pl.DataFrame(
        {columns.PROMPT_ID: ["p"], f"{columns.RESPONSE_ID}_c": ["p-0"], columns.RESPONSE_ID: ["p-1"]}
    )
    ev = evidence(scores, picked, aggregation, None).row(0, named=True)
    assert ev[columns.AGREEMENT] == 1.0 and ev[columns.STRENGTH_MEAN] == pytest.approx(2.0)


def test_logistic_fit_matches_the_optimality_condition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    w = fit_logistic(x, lam=1.0)
    p = 1 / (1 + np.exp(-(x @ w)))
    assert np.allclose(-x.T @ (1 - p) + 1.0 * w, 0.0, atol=1e-8)  # the gradient vanishes


def test_fit_recovers_signs_and_cross_validates_by_prompt() -> None:
    rng = np.random.default_rng(1)
    n = 300
    truth = rng.normal(size=n)  # how much people prefer chosen, per pair
    good = truth + rng.normal(scale=0.5, size=n)
    inverted = -truth + rng.normal(scale=0.5, size=n)
    noise = rng.normal(size=n)
    sign = np.where(truth > 0, 1.0, -1.0)  # chosen is the side people preferred
    x = np.column_stack([good, inverted, noise]) * sign[:, None]
    groups = [f"g{i // 2}" for i in range(n)]  # two pairs per conversation
    fit = fit_weights({"spread": x, "zscore": np.sign(x)}, ["good", "inverted", "noise"], groups, folds=5)
    assert fit.weights["good"] > 0 > fit.weights["inverted"]
    assert abs(fit.weights["noise"]) < fit.weights["good"] / 3
    assert fit.choice.scale == "spread"  # magnitude carries information here
    accuracy = float(np.mean(fit.oof_margin > 0))
    assert accuracy > max(np.mean(good * sign > 0), np.mean(-inverted * sign > 0))
    folds = folds_by_group(groups, 5, 0)
    assert all(len(set(folds[[i for i, g in enumerate(groups) if g == h]])) == 1 for h in set(groups))
    with pytest.raises(ValueError, match="too few"):
        fit_weights({"spread": x[:6]}, ["good", "inverted", "noise"], groups[:6], folds=5)
