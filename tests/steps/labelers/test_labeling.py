"""Labelers: BLEU per response, null-with-reason where a score cannot exist."""

from __future__ import annotations

import json

import pyarrow as pa

from schemas import columns
from schemas.recipe import BleuConfig
from schemas.records import LABELS, RESPONSES
from steps.labelers.base import Labeler, PromptGroup, Score
from steps.labelers.bleu import BleuLabeler
from steps.labelers.bleu_score import bleuberi_bleu, sacrebleu_bleu
from tests.steps.test_sampling import prompts_table


def responses(prompts: pa.Table, texts: list[str]) -> pa.Table:
    rows = []
    for pid in prompts.column(columns.PROMPT_ID).to_pylist():
        for i, text in enumerate(texts):
            rows.append(
                {
                    columns.PROMPT_ID: pid,
                    columns.RESPONSE_ID: f"{pid}-{i}",
                    columns.SAMPLE_INDEX: i,
                    columns.TEXT: text,
                    columns.FINISH_REASON: "stop",
                    columns.TRUNCATED: False,
                    columns.IS_EMPTY: not text.strip(),
                    columns.NUM_TOKENS: 1,
                    columns.PROMPT_TOKENS: 1,
                    columns.PROMPT_TURNS_DROPPED: 0,
                    columns.POLICY_MODEL: "m",
                    columns.ENGINE: "e",
                    columns.TEMPERATURE: 1.0,
                    columns.TOP_P: 1.0,
                    columns.MAX_TOKENS: 8,
                    columns.SEED: i,
                }
            )
    return pa.Table.from_pylist(rows, schema=RESPONSES)


def with_refs(prompts: pa.Table, refs: list[list[str]]) -> pa.Table:
    return prompts.set_column(
        prompts.schema.get_field_index(columns.REFERENCES),
        columns.REFERENCES,
        pa.array(refs, pa.list_(pa.string())),
    )


def test_bleu_labels_match_the_bleu_functions_per_variant() -> None:
    prompts = with_refs(prompts_table(["p"]), [["the cat sat on the mat", "a cat was on the mat"]])
    texts = ["the cat sat on the mat", "a dog", ""]
    for variant, fn in (("bleuberi", bleuberi_bleu), ("sacrebleu", sacrebleu_bleu)):
        labels, stats = BleuLabeler(BleuConfig(variant=variant)).label(prompts, responses(prompts, texts))
        assert labels.schema == LABELS
        expected = [fn(t, ["the cat sat on the mat", "a cat was on the mat"]) for t in texts]
        assert labels.column(columns.SCORE).to_pylist() == expected
        assert labels.column(columns.SCORE).to_pylist()[2] == 0.0  # empty response scores 0, not null
        assert stats.drops == {}


def test_prompt_without_references_gets_null_with_reason() -> None:
    prompts = with_refs(prompts_table(["p", "q"]), [[], ["ref"]])
    labels, stats = BleuLabeler(BleuConfig()).label(prompts, responses(prompts, ["ref", "x"]))
    rows = labels.to_pylist()
    assert [r[columns.SCORE] is None for r in rows] == [True, True, False, False]
    assert [r[columns.REASON] for r in rows[:2]] == ["no_references", "no_references"]
    assert rows[2][columns.REASON] is None
    assert stats.drops == {"no_references": 2}


class Broken(Labeler):
    signal = "broken"

    def score_prompt(self, group: PromptGroup) -> list[Score]:
        return [
            Score(float("nan")),
            Score(float("inf")),
            Score(None, "judge_unparseable"),
            Score(2.0, details={"k": 1}),
        ][: len(group.responses)]


def test_non_finite_scores_become_null_with_reason_and_details_are_json() -> None:
    prompts = prompts_table(["p"])
    labels, stats = Broken().label(prompts, responses(prompts, ["a", "b", "c", "d"]))
    rows = labels.to_pylist()
    assert [r[columns.SCORE] for r in rows] == [None, None, None, 2.0]
    assert [r[columns.REASON] for r in rows] == [
        "non_finite_score",
        "non_finite_score",
        "judge_unparseable",
        None,
    ]
    assert json.loads(rows[3][columns.DETAILS]) == {"k": 1}
    assert stats.drops == {"non_finite_score": 2, "judge_unparseable": 1}
