"""The recipe's ``eval`` block: pairs read from any source, the table on the card, the min_accuracy gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.recipe import EvalPairs, RecipeError, load_recipe
from steps.pairing.pairs import make_pairs
from steps.publish.card import render_card
from steps.publish.writer import WrittenFile
from steps.quality.evaluate import LabelQualityError, measure_recipe
from steps.quality.pairs_file import PairsFileError, check_eval_sets, read_pairs
from steps.run.resume import WorkArea
from tests.conftest import make_recipe
from tests.steps.labelers.test_labeling import responses
from tests.steps.pairing.test_pairing import labels_for
from tests.steps.test_sampling import prompts_table

REF = "the cat sat on the mat by the open door"


def pairs_file(path: Path, n: int = 6, agree: int = 4) -> Path:
    """``agree`` pairs where BLEU sides with the human choice, the rest where it sides against it."""
    lines = []
    for i in range(n):
        good, bad = (REF, "dogs run fast") if i < agree else ("dogs run fast", REF)
        record = {
            "id": f"q{i}",
            "prompt": f"question {i}",
            "chosen": good,
            "rejected": bad,
            "reference": [REF],
        }
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bleu_recipe(eval_block: dict[str, Any]) -> Any:
    return make_recipe(labelers=[{"kind": "bleu", "name": "bleu"}], eval=eval_block)


def test_eval_block_accepts_a_path_a_list_and_builtins_and_refuses_ambiguity() -> None:
    recipe = bleu_recipe({"pairs": "a.jsonl"})
    assert recipe.eval is not None and recipe.eval.pairs[0].uri == "a.jsonl"
    recipe = bleu_recipe({"pairs": ["a.jsonl", {"builtin": "hh_harmless_32", "domain": "harmlessness"}]})
    assert recipe.eval is not None and Path(recipe.eval.pairs[1].location).is_file()
    with pytest.raises((RecipeError, ValueError), match="no built-in eval set"):
        bleu_recipe({"pairs": [{"builtin": "nope"}]})
    with pytest.raises((RecipeError, ValueError), match="exactly one of"):
        bleu_recipe({"pairs": [{"uri": "a.jsonl", "hf": "org/name"}]})
    with pytest.raises((RecipeError, ValueError), match="min_accuracy"):
        bleu_recipe({"pairs": "a.jsonl", "min_accuracy": 1.5})


def test_parquet_with_a_column_map_reads_like_jsonl(tmp_path: Path) -> None:
    table = pa.table({
        "question": ["q one", "q two"], "good": ["yes", "sure"], "bad": ["no", "nope"], "uid": ["a", "b"],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet")
    spec = EvalPairs(
        uri=str(tmp_path / "p.parquet"),
        columns={"prompt": "question", "chosen": "good", "rejected": "bad", "id": "uid"},
    )
    pairs, skipped = read_pairs(spec)
    assert [(p.pid, p.chosen, p.rejected) for p in pairs] == [("a", "yes", "no"), ("b", "sure", "nope")]
    assert pairs[0].messages == [{"role": "user", "content": "q one"}] and not skipped


def test_measure_recipe_puts_every_signal_and_the_aggregate_on_each_set(tmp_path: Path) -> None:
    path = pairs_file(tmp_path / "pairs.jsonl")
    recipe = bleu_recipe({"pairs": [{"uri": str(path), "domain": "toy overlap", "name": "toy"}]})
    result = measure_recipe(recipe, WorkArea(str(tmp_path / "cache")))
    assert result is not None and result["min_accuracy"] is None
    (only,) = result["sets"]
    assert (only["name"], only["domain"], only["n"]) == ("toy", "toy overlap", 6)
    rows = {row["labeler"]: row for row in only["rows"]}
    assert rows["bleu"]["agree"] == 4 and rows["bleu"]["disagree"] == 2
    assert rows["aggregate"]["accuracy"] == pytest.approx(4 / 6)
    assert "length (longer wins)" in rows


def test_min_accuracy_gate_names_the_numbers(tmp_path: Path) -> None:
    path = pairs_file(tmp_path / "pairs.jsonl", agree=2)
    recipe = bleu_recipe({"pairs": str(path), "min_accuracy": 0.55})
    with pytest.raises(LabelQualityError) as info:
        measure_recipe(recipe, WorkArea(str(tmp_path / "cache")))
    message = str(info.value)
    assert "aggregate 0.333" in message and "< 0.55" in message and "Nothing was published" in message
    assert measure_recipe(
        bleu_recipe({"pairs": str(path), "min_accuracy": 0.3}), WorkArea(str(tmp_path / "c2"))
    )


def test_unreadable_or_empty_eval_sets_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(PairsFileError, match="cannot be opened|No such file"):
        check_eval_sets(bleu_recipe({"pairs": str(tmp_path / "missing.jsonl")}))
    (tmp_path / "empty.jsonl").write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(PairsFileError, match="no usable pairs"):
        check_eval_sets(bleu_recipe({"pairs": str(tmp_path / "empty.jsonl")}))


def test_default_recipe_measures_itself_on_the_shipped_set() -> None:
    recipe = load_recipe("default")
    assert recipe.eval is not None and recipe.eval.pairs[0].builtin == "hh_harmless_32"
    pairs, skipped = read_pairs(recipe.eval.pairs[0])
    assert len(pairs) == 32 and not skipped


def card_text(stats: dict[str, Any], **pairing: Any) -> str:
    labelers = [{"kind": "bleu", "name": "a"}, {"kind": "bleu", "name": "b", "weight": -0.5}]
    recipe = make_recipe(labelers=labelers, pairing=pairing)
    prompts = prompts_table(["p"])
    resp = responses(prompts, ["one", "two"])
    sample, _ = make_pairs(prompts, resp, labels_for(resp, {"a": [2.0, 1.0], "b": [1.0, 2.0]}), recipe)
    files = {"train": [WrittenFile("data/train-00000-of-00001.parquet", 1, "0" * 64, 10)]}
    stages = {
        name: {"rows_in": 1, "rows_out": 1, "drops": {}, "counts": {}, "examples": {}, "seconds": 0.0}
        for name in ("prompts", "sampling", "labeling", "pairing")
    }
    full = {"prompts": {"source": "x"}, "stages": stages, **stats}
    return render_card(recipe, files, full, {}, sample, {"model_id": "m", "engine": "e"}, {"a": {}, "b": {}})


def test_card_reports_label_quality_provenance_and_length() -> None:
    row = {"labeler": "aggregate", "n": 32, "agree": 20, "disagree": 10, "tie": 2, "accuracy": 0.625, "ci_low": 0.45,
           "ci_high": 0.78}  # fmt: skip
    stats = {
        "eval": {
            "sets": [
                {"name": "hh", "domain": "harmlessness", "n": 32, "source": "built-in hh", "rows": [row]}
            ],
            "min_accuracy": 0.55,
        },
        "aggregation": {"spread": {}, "slope": {}, "length_corr": {"before": 0.61, "after": 0.05}},
    }
    fit = {
        "pairs": "dev.jsonl", "sha256": "a" * 64, "domain": "HH harmless", "n": 400, "folds": 5,
        "cv_accuracy": 0.58, "ci_low": 0.53, "ci_high": 0.63, "best_single": "judge",
        "best_single_accuracy": 0.5, "equal_weights_accuracy": 0.45,
    }  # fmt: skip
    text = card_text(stats, scale="spread", length_control={"residual": True}, weights_fit=fit)
    assert "## Label quality" in text and "**hh** (32 pairs; harmlessness" in text
    assert "| aggregate | 20 / 10 / 2 | 0.625 [0.45, 0.78] |" in text
    assert "at least 0.55" in text
    assert "fitted on human preferences" in text and "HH harmless" in text and "0.58 [0.53, 0.63]" in text
    assert "spread over the whole run" in text and "less what response length predicts" in text
    assert "0.61 without length control and 0.05 with the residual control" in text
    unmeasured = card_text({})
    assert "Not measured" in unmeasured and "set by hand" in unmeasured


def test_prefect_summary_carries_the_label_quality_line() -> None:
    from flows.summary import summary_markdown

    row = {"labeler": "aggregate", "accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    stage = {"rows_in": 1, "rows_out": 1, "drops": {}, "seconds": 0.0}
    stats = {
        "stages": {name: stage for name in ("prompts", "sampling", "labeling", "pairing", "consistency")},
        "eval": {"sets": [{"name": "hh", "n": 32, "domain": "harmlessness", "rows": [row]}]},
    }
    manifest = {"stats": stats, "splits": {"train": 1}, "recipe": {"name": "r", "hash": "h"}}
    text = summary_markdown("out", manifest)
    assert "Label quality on hh (32 human pairs, harmlessness): aggregate agrees 0.500 [0.400, 0.600]" in text


def test_cost_summary_adds_up_and_divides_by_kept_pairs() -> None:
    from steps.base import StageStats
    from steps.publish.cost import cost_summary

    sampling = StageStats("sampling", seconds=10.0)
    sampling.counts["tokens"] = 400
    labeling = StageStats("labeling", seconds=6.0, timings={"judge": 4.0, "bleu": 2.0})
    labeling.counts["judge:tokens_scored"] = 1000
    pairing = StageStats("pairing", seconds=2.0)
    pairing.counts["tokens_scored"] = 200
    cost = cost_summary({"sampling": sampling, "labeling": labeling, "pairing": pairing}, 4, 2.0)
    assert cost["labelers"] == {
        "bleu": {"seconds": 2.0, "tokens_scored": 0},
        "judge": {"seconds": 4.0, "tokens_scored": 1000},
    }
    assert cost["seconds"]["label_quality"] == 2.0
    assert cost["total"] == {"seconds": 20.0, "tokens_generated": 400, "tokens_scored": 1200}
    assert cost["per_kept_pair"] == {"seconds": 5.0, "tokens_generated": 100.0, "tokens_scored": 300.0}
    assert cost_summary({"sampling": sampling}, 0, None)["per_kept_pair"] is None
    text = card_text({"cost": cost})
    assert "## What it cost" in text and "| signal `judge` | 4 | 1,000 read |" in text
    assert "| **per kept pair** (4) | 5 | 100 generated, 300 read |" in text
