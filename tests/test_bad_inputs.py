"""The bad-input catalogue (issue 5): one test per kind of bad input, named after it.

Each bad input ends in a clear error that names the row, column or key and what
to do, or in a drop whose reason is counted in the stage's statistics. Nothing
is silently lost or defaulted, and nothing NaN reaches the output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from schemas import columns
from schemas.recipe import (
    BleuConfig,
    FilePrompts,
    PointwiseJudgeConfig,
    PolicyConfig,
    RecipeError,
    load_recipe,
)
from schemas.records import PROMPTS, RESPONSES, pairs_schema
from steps.engines import Failed, ModelSpecError, SamplingParams, load_engine
from steps.engines.base import Completion, Conversation, Message, OptionRequest
from steps.engines.context import fit_prompt, truncated
from steps.labelers import judge_pointwise
from steps.labelers import judging as judges
from steps.labelers.base import Labeler, PromptGroup, Score
from steps.labelers.bleu import BleuLabeler
from steps.labelers.checks import preflight
from steps.pairing.pairs import judge_candidates, make_pairs
from steps.prompts.normalise import check_prompts, load_prompts
from steps.prompts.sources import PromptSourceError
from steps.sampling import sample_table, sampling_params
from tests.conftest import ROOT, FakeEngine, make_recipe
from tests.steps.labelers.test_labeling import responses, with_refs
from tests.steps.pairing.test_pairing import labels_for
from tests.steps.test_sampling import prompts_table


def jsonl(path: Path, rows: list[object]) -> FilePrompts:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return FilePrompts(source="file", uri=str(path))


def parquet(path: Path, table: pa.Table, **config: Any) -> FilePrompts:
    pq.write_table(table, path)
    return FilePrompts(source="file", uri=str(path), **config)


def drops_of(rows: list[object], tmp_path: Path) -> tuple[pa.Table, dict[str, int], dict[str, str]]:
    """Load ``rows`` followed by one good prompt; return the table, the drops and their examples."""
    table, stats = load_prompts(jsonl(tmp_path / "p.jsonl", [*rows, {"prompt": "a good prompt"}]))
    return table, dict(stats.drops), stats.examples


def user(text: str) -> Message:
    return {columns.ROLE: "user", columns.CONTENT: text}


# ----------------------------------------------------------------- 1. empty prompt


def test_empty_or_whitespace_prompt(tmp_path: Path) -> None:
    rows: list[object] = [
        {"prompt": ""},
        {"prompt": " \t\n "},
        {"prompt": []},
        {"prompt": [user("earlier"), {"role": "assistant", "content": "ok"}, user("   ")]},
    ]
    table, drops, examples = drops_of(rows, tmp_path)
    assert table.num_rows == 1 and drops == {"empty_prompt": 4}
    assert examples["empty_prompt"].startswith("row 1:")  # the source row is named
    with pytest.raises(PromptSourceError, match="no usable prompts.*'empty_prompt': 2"):
        load_prompts(jsonl(tmp_path / "e.jsonl", [{"prompt": ""}, {"prompt": "  "}]))


# ----------------------------------------------------------------- 2. non-string content


def test_non_string_content(tmp_path: Path) -> None:
    rows: list[object] = [
        {"prompt": [{"role": "user", "content": 42}]},
        {"prompt": [{"role": "user", "content": ["a", "list"]}]},
        {"prompt": [{"role": "user", "content": None}]},
        {"prompt": "fine text", "references": [7]},
        {"prompt": "also fine", "references": 7},  # not a list at all: its own reason
        {"prompt": "still fine", "references": {"a": "b"}},
    ]
    table, drops, examples = drops_of(rows, tmp_path)
    assert table.num_rows == 1 and drops == {"non_string_content": 4, "invalid_references": 2}
    assert examples["non_string_content"] == "row 1: message 0 content must be a string, got int"
    assert (
        examples["invalid_references"] == "row 5: references must be a string or a list of strings, got int"
    )
    # In Parquet the type is the column's, so it is one error naming the column, not N drops.
    messages = pa.array(
        [[{"role": "user", "content": 1}]],
        pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())])),
    )
    config = parquet(tmp_path / "p.parquet", pa.table({"prompt": messages}))
    with pytest.raises(
        PromptSourceError, match=r"column 'prompt' has type list<.*content: int64.*expected text"
    ):
        load_prompts(config)


# ----------------------------------------------------------------- 3. missing / wrongly typed columns


def test_missing_or_wrongly_typed_columns_in_a_prompts_file(tmp_path: Path) -> None:
    # JSONL: a missing field is an error naming the line and the recipe key to set ...
    with pytest.raises(PromptSourceError, match=r"line 2: no 'prompt' field.*prompts.prompt_column"):
        load_prompts(jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, {"question": "y"}]))
    # ... a wrongly typed value is that row's drop, with the row named.
    _, drops, examples = drops_of([{"prompt": {"text": "x"}}], tmp_path)
    assert (
        drops == {"invalid_prompt": 1}
        and "row 1: prompt must be a string or a list" in examples["invalid_prompt"]
    )

    # Parquet: missing column, wrongly typed prompt or references column, each an error naming it.
    with pytest.raises(PromptSourceError, match=r"no column 'prompt' \(columns: \['question'\]\)"):
        load_prompts(parquet(tmp_path / "b.parquet", pa.table({"question": ["x"]})))
    with pytest.raises(PromptSourceError, match="column 'prompt' has type int64; expected text"):
        load_prompts(parquet(tmp_path / "c.parquet", pa.table({"prompt": [1, 2]})))
    bad_refs = pa.table({"prompt": ["x"], "references": [3.5]})
    with pytest.raises(PromptSourceError, match="column 'references' has type double; expected text"):
        load_prompts(parquet(tmp_path / "d.parquet", bad_refs))
    # A references column the recipe names must exist; the default one may be absent.
    named = parquet(tmp_path / "e.parquet", pa.table({"prompt": ["x"]}), references_column="gold")
    with pytest.raises(PromptSourceError, match="no column 'gold'.*prompts.references_column"):
        load_prompts(named)
    assert load_prompts(parquet(tmp_path / "f.parquet", pa.table({"prompt": ["x"]})))[0].num_rows == 1
    named_jsonl = FilePrompts(
        source="file", uri=jsonl(tmp_path / "g.jsonl", [{"prompt": "x"}]).uri, references_column="gold"
    )
    with pytest.raises(PromptSourceError, match="no row has the field 'gold'"):
        load_prompts(named_jsonl)
    # Typed columns that are fine: text, messages, list of text, categorical text.
    good = pa.table(
        {
            "prompt": pa.array(["a", "b"]).dictionary_encode(),
            "references": pa.array([["r"], []], pa.list_(pa.string())),
        }
    )
    assert load_prompts(parquet(tmp_path / "h.parquet", good))[0].num_rows == 2
    # Not Parquet at all.
    (tmp_path / "i.parquet").write_text('{"prompt": "x"}\n')
    with pytest.raises(PromptSourceError, match="not a readable Parquet file.*prompts.format"):
        load_prompts(FilePrompts(source="file", uri=str(tmp_path / "i.parquet")))


# ----------------------------------------------------------------- 4. unknown role


def test_unknown_role_in_messages(tmp_path: Path) -> None:
    rows: list[object] = [
        {"prompt": [{"role": "wizard", "content": "x"}]},
        {"prompt": [{"role": "tool", "content": "{}"}, user("y")]},
        {"prompt": [{"role": None, "content": "z"}]},
    ]
    table, drops, examples = drops_of(rows, tmp_path)
    assert table.num_rows == 1 and drops == {"unknown_role": 3}
    assert examples["unknown_role"] == (
        "row 1: message 0 has role 'wizard'; expected one of ('system', 'user', 'assistant')"
    )


# ----------------------------------------------------------------- 5. prompt longer than the context


def words(conversation: Sequence[Message]) -> list[int]:
    """A toy tokenizer: one token per word plus two per message for the template."""
    return [0] * sum(len(m[columns.CONTENT].split()) + 2 for m in conversation)


LONG_CHAT: list[Message] = [
    {"role": "system", "content": "Be brief."},  # 4 tokens
    user("one two three four five six"),  # 8
    {"role": "assistant", "content": "a b c d e f"},  # 8
    user("seven eight nine ten"),  # 6
    {"role": "assistant", "content": "g h"},  # 4
    user("last question"),  # 4
]  # 34 tokens in all


class TruncatingEngine(FakeEngine):
    """The fake policy with a real context rule: it fits prompts exactly as the engines do."""

    def __init__(self, n_ctx: int) -> None:
        super().__init__(answers=("alpha beta", "gamma"))
        self.n_ctx = n_ctx
        self.seen: list[list[Message]] = []

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        out: list[list[Completion] | Failed] = []
        for conversation, seed in zip(conversations, seeds, strict=True):
            fitted = fit_prompt(conversation, words, self.n_ctx, params.max_tokens, params.too_long)
            if isinstance(fitted, Failed):
                out.append(fitted)
                continue
            self.seen.append(fitted.conversation)
            prompt_tokens, dropped = len(fitted.prompt_ids), fitted.turns_dropped
            texts = [self.answers[i % len(self.answers)] for i in range(params.n)]
            out.append(
                [
                    Completion(t, len(t.split()), "stop", prompt_tokens, seed + i, dropped)
                    for i, t in enumerate(texts)
                ]
            )
        return out


def test_prompt_longer_than_the_model_context() -> None:
    """Default: dropped as prompt_too_long; truncate_left: oldest turns out, marked, used downstream."""
    # The rule itself: the system message and the last user turn stay, room is left for max_tokens,
    # and the kept part starts at a user turn.
    assert fit_prompt(LONG_CHAT, words, 34, 8, "drop").reason == "prompt_too_long"  # type: ignore[union-attr]
    fitted = fit_prompt(LONG_CHAT, words, 34, 8, "truncate_left")
    assert not isinstance(fitted, Failed)
    assert fitted.turns_dropped == 2 and fitted.conversation == [LONG_CHAT[0], *LONG_CHAT[3:]]
    assert len(fitted.prompt_ids) + 8 <= 34 and fitted.conversation == truncated(LONG_CHAT, 2)
    fitted = fit_prompt(LONG_CHAT, words, 20, 8, "truncate_left")
    assert not isinstance(fitted, Failed) and fitted.conversation == [LONG_CHAT[0], LONG_CHAT[-1]]
    assert fit_prompt(LONG_CHAT, words, 100, 8, "truncate_left").turns_dropped == 0  # type: ignore[union-attr]
    too_small = fit_prompt(LONG_CHAT, words, 15, 8, "truncate_left")
    assert isinstance(too_small, Failed) and too_small.reason == "prompt_too_long"
    assert "the system message and the last user turn alone need 8 tokens" in too_small.message

    # Through sampling, labeling and pairing.
    prompts = prompts_table(["short question"])
    prompts = pa.concat_tables(
        [
            prompts,
            pa.Table.from_pylist(
                [
                    {
                        columns.PROMPT_ID: "long",
                        columns.MESSAGES: LONG_CHAT,
                        columns.REFERENCES: ["alpha beta"],
                        columns.SOURCE: "t",
                        columns.SOURCE_ROW: 1,
                    }
                ],
                schema=PROMPTS,
            ),
        ]
    )
    dropping = make_recipe(sampling={"n": 2, "max_tokens": 8})
    table, stats = sample_table(prompts, TruncatingEngine(34), sampling_params(dropping), seed=0)
    assert stats.drops == {"prompt_too_long": 1} and "truncate_left" in stats.examples["prompt_too_long"]
    assert set(table.column(columns.PROMPT_ID).to_pylist()) == {prompts.column(columns.PROMPT_ID)[0].as_py()}

    recipe = make_recipe(sampling={"n": 2, "max_tokens": 8, "too_long": "truncate_left"})
    engine = TruncatingEngine(34)
    resp, stats = sample_table(prompts, engine, sampling_params(recipe), seed=0)
    assert resp.schema == RESPONSES and stats.drops == {} and stats.counts["prompts_truncated"] == 1
    dropped = {
        pid: k
        for pid, k in zip(
            *resp.select([columns.PROMPT_ID, columns.PROMPT_TURNS_DROPPED]).to_pydict().values(), strict=True
        )
    }
    assert dropped == {prompts.column(columns.PROMPT_ID)[0].as_py(): 0, "long": 2}

    class Recorder(Labeler):
        signal = "bleu"
        contexts: ClassVar[list[list[Message]]] = []

        def score_prompt(self, group: PromptGroup) -> list[Score]:
            self.contexts.append(group.prompt[columns.MESSAGES])
            return [Score(float(len(t))) for t in group.responses]

    labels, _ = Recorder().label(prompts, resp)
    assert Recorder.contexts[1] == truncated(LONG_CHAT, 2)  # labelers read what the policy answered
    pairs, _ = make_pairs(prompts, resp, labels, recipe)
    assert pairs.schema == pairs_schema(["bleu"])
    row = {r[columns.PROMPT_ID]: r for r in pairs.to_pylist()}["long"]
    assert row[columns.PROMPT] == truncated(LONG_CHAT, 2) and row[columns.PROMPT_TURNS_DROPPED] == 2


@pytest.mark.model
@pytest.mark.parametrize("engine_name", ["llama_cpp", "transformers"])
def test_prompt_longer_than_the_model_context_real_engines(
    engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both engines fit with their own tokenizer: drop by default, or keep the last turns that fit."""
    if engine_name == "llama_cpp":
        engine = load_engine(PolicyConfig(n_ctx=160, n_threads=2))
    else:
        engine = load_engine(PolicyConfig(engine="transformers", device="cpu"))
        monkeypatch.setattr(engine, "n_ctx", 160)  # its real context (8192) would take minutes to fill
    filler = "Tell me more about the long history of bread baking in old European towns. " * 3
    chat: list[Message] = [{"role": "system", "content": "You are brief."}]
    for i in range(4):
        chat += [user(f"{i}: {filler}"), {"role": "assistant", "content": f"Answer {i}: {filler}"}]
    chat.append(user("Name one yellow fruit."))
    params = SamplingParams(n=2, temperature=0.8, top_p=1.0, max_tokens=6)
    [dropped] = engine.generate([chat], params, [1])
    assert isinstance(dropped, Failed) and dropped.reason == "prompt_too_long"
    keep = SamplingParams(n=2, temperature=0.8, top_p=1.0, max_tokens=6, too_long="truncate_left")
    [samples] = engine.generate([chat], keep, [1])
    assert not isinstance(samples, Failed)
    turns = samples[0].prompt_turns_dropped
    assert turns >= 2 and turns % 2 == 0  # whole (user, assistant) exchanges, so it starts at a user turn
    assert all(s.prompt_turns_dropped == turns for s in samples)
    assert samples[0].prompt_tokens + 6 <= 160 and all(1 <= s.num_tokens <= 6 for s in samples)
    # Keeping one more exchange would not have fitted: nothing was left out that did not have to be.
    [again] = engine.generate([truncated(chat, turns - 2)], keep, [1])
    assert not isinstance(again, Failed) and again[0].prompt_turns_dropped == 2


# ----------------------------------------------------------------- 6. duplicate prompt ids


def test_duplicate_prompt_ids(tmp_path: Path) -> None:
    rows: list[object] = [
        {"prompt": "What is 2+2?"},
        {"prompt": "  What is 2+2?  "},  # same after normalisation: same id
        {"prompt": [user("What is 2+2?")]},  # the same conversation written as messages
        {"prompt": "Café?"},
        {"prompt": "Cafe\u0301?"},  # the same text in decomposed Unicode
    ]
    table, stats = load_prompts(jsonl(tmp_path / "p.jsonl", rows))
    assert table.num_rows == 2 and dict(stats.drops) == {"duplicate_prompt": 3}
    assert stats.examples["duplicate_prompt"] == "row 2: same conversation as row 1"
    ids = table.column(columns.PROMPT_ID).to_pylist()
    assert len(set(ids)) == len(ids)
    assert table.column(columns.SOURCE_ROW).to_pylist() == [1, 4]  # the first occurrence is the one kept


# ----------------------------------------------------------------- 7. non-UTF-8 bytes


def test_non_utf8_bytes_in_a_prompts_file(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptSourceError, match=r"line 2: not valid UTF-8 .*re-encode the file as UTF-8"):
        load_prompts(FilePrompts(source="file", uri=str(latin1)))
    # A byte-order mark is not an error, and not part of the first prompt.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "second"}\n')
    table, _ = load_prompts(FilePrompts(source="file", uri=str(bom)))
    assert table.column(columns.MESSAGES).to_pylist()[0] == [user("first")]
    # Valid UTF-8 JSON can still escape an unpaired surrogate: that row is dropped, not a crash later.
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "bad \\ud800 text"}\n{"prompt": "fine"}\n', encoding="utf-8")
    table, stats = load_prompts(FilePrompts(source="file", uri=str(surrogate)))
    assert table.num_rows == 1 and dict(stats.drops) == {"invalid_unicode": 1}
    assert "row 1: message 0 content is not valid Unicode" in stats.examples["invalid_unicode"]
    # Parquet: raw bytes are a binary column, named in the error.
    raw = pa.table({"prompt": pa.array([b"caf\xe9"], pa.binary())})
    with pytest.raises(PromptSourceError, match="column 'prompt' has type binary.*decoded to UTF-8"):
        load_prompts(parquet(tmp_path / "b.parquet", raw))


# ----------------------------------------------------------------- 8. zero prompts left


def test_zero_prompts_left_after_drops(tmp_path: Path) -> None:
    """An error before any model loads (check_prompts is the CLI's early check), never an empty dataset."""
    rows: list[object] = [{"prompt": " "}, {"prompt": [{"role": "bot", "content": "x"}]}, {"prompt": "a"}]
    config = jsonl(tmp_path / "p.jsonl", rows[:2])
    for check in (check_prompts, load_prompts):
        with pytest.raises(PromptSourceError) as info:
            check(config)  # type: ignore[operator]
        message = str(info.value)
        assert "no usable prompts" in message and "2 rows read" in message
        assert "empty_prompt: row 1" in message and "unknown_role: row 2" in message
        assert "fix the rows or point prompts at another source" in message
    check_prompts(jsonl(tmp_path / "ok.jsonl", rows))  # one usable row is enough
    with pytest.raises(PromptSourceError, match="does not exist"):
        check_prompts(FilePrompts(source="file", uri=str(tmp_path / "missing.jsonl")))


# ----------------------------------------------------------------- 9. n = 1


@pytest.mark.parametrize("n", [1, 0])
def test_n_equals_one_is_a_config_error(tmp_path: Path, n: int) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "sampling": {"n": n}}))
    with pytest.raises(RecipeError, match=rf"sampling.n: .*{n} response\(s\) per prompt cannot make a pair"):
        load_recipe(str(path))
    with pytest.raises(RecipeError, match="sampling.n"):
        load_recipe("default").with_overrides(**{"sampling.n": n})


# ----------------------------------------------------------------- 10. identical responses


def test_all_responses_of_a_prompt_identical() -> None:
    prompts = prompts_table(["p", "q"])
    resp = responses(prompts, ["Same answer.", " same   ANSWER. ", "same answer."])
    # Different scores (a noisy signal) must not turn identical texts into a pair.
    labels = labels_for(resp, {"bleu": [3.0, 2.0, 1.0, 3.0, 2.0, 1.0]})
    table, stats = make_pairs(prompts, resp, labels, make_recipe())
    assert table.num_rows == 0
    assert dict(stats.drops) == {"identical_samples": 2}
    assert stats.examples["identical_samples"].startswith("prompt ")


# ----------------------------------------------------------------- 11. NaN / inf from a labeler


class NonFinite(Labeler):
    signal = "bleu"

    def score_prompt(self, group: PromptGroup) -> list[Score]:
        return [Score(v) for v in (float("nan"), float("inf"), float("-inf"), 1.0, 2.0)][
            : len(group.responses)
        ]


def test_nan_or_inf_from_a_labeler(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = prompts_table(["p"])
    resp = responses(prompts, ["a", "b", "c", "d", "e"])
    labels, stats = NonFinite().label(prompts, resp)
    assert labels.column(columns.SCORE).to_pylist() == [None, None, None, 1.0, 2.0]
    assert labels.column(columns.REASON).to_pylist()[:3] == ["non_finite_score"] * 3
    assert dict(stats.drops) == {"non_finite_score": 3}
    pairs, _ = make_pairs(prompts, resp, labels, make_recipe())
    assert pairs.num_rows == 1
    for name in pairs.column_names:
        if pa.types.is_floating(pairs.schema.field(name).type):
            assert not any(v is not None and not math.isfinite(v) for v in pairs.column(name).to_pylist())

    # A judge reading NaN/-inf option log-probs gives no verdict rather than a NaN or a coin flip.
    class BrokenJudge:
        def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float]]:
            return [{" A": float("-inf"), " B": float("-inf")}, {" A": float("nan"), " B": -1.0}] * (
                len(requests) // 2
            )

    [verdict] = judges.judge_pairs(BrokenJudge(), [([user("p")], "a", "b")])
    assert isinstance(verdict, Failed) and verdict.reason == "non_finite_verdict"

    class NaNPairJudge:
        def __init__(self, model: object) -> None:
            pass

        def judge(self, jobs: Sequence[object]) -> list[judges.Verdict]:
            return [judges.Verdict(float("nan"), True, float("nan"), float("nan")) for _ in jobs]

    monkeypatch.setattr(judges, "PairJudge", NaNPairJudge)
    from steps.base import StageStats

    pair_stats = StageStats("pairing")
    judged = judge_candidates(pairs, PolicyConfig(), pair_stats)
    assert judged.column(columns.JUDGE_P_CHOSEN).to_pylist() == [None]
    assert pair_stats.counts["pair_judge_failed:non_finite_verdict"] == 1


# ----------------------------------------------------------------- 12. unparseable judge output


class CannedJudge:
    """A generator returning canned judgements, in order, n per conversation."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        it = iter(self.texts)
        return [[Completion(next(it), 3, "stop", 10, i) for i in range(params.n)] for _ in conversations]


def test_unparseable_judge_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        judge_pointwise,
        "load_engine",
        lambda config: CannedJudge(
            [
                "Good answer.\nScore: 4",
                "I would say it deserves a four",  # no score line: dropped, not read as 0
                "Score: 7",  # out of range: dropped
                "Score: five",
                "nothing here",
                "",
            ]
        ),
    )
    config = PointwiseJudgeConfig(kind="judge_pointwise", mode="sampled", n=3)
    prompts = prompts_table(["p"])
    labels, stats = judge_pointwise.PointwiseJudgeLabeler(config).label(
        prompts, responses(prompts, ["one", "two"])
    )
    first, second = labels.to_pylist()
    assert (
        first[columns.SCORE] == 4.0 and first[columns.REASON] is None
    )  # the mean of the parsed verdicts only
    assert json.loads(first[columns.DETAILS])["ratings"] == [4, None, None]
    assert second[columns.SCORE] is None and second[columns.REASON] == "judge_unparseable"
    assert dict(stats.drops) == {"judge_unparseable": 1}
    assert stats.counts["judgement_unparseable"] == 5  # every unreadable verdict is counted


# ----------------------------------------------------------------- 13. missing references for BLEU


def test_missing_references_for_bleu(tmp_path: Path) -> None:
    rows: list[object] = [
        {"prompt": "a"},
        {"prompt": "b", "references": ["  ", ""]},
        {"prompt": "c", "references": "ref"},
    ]
    loaded, _ = load_prompts(jsonl(tmp_path / "p.jsonl", rows))
    assert loaded.column(columns.REFERENCES).to_pylist() == [[], [], ["ref"]]
    prompts = with_refs(prompts_table(["a", "b", "c"]), loaded.column(columns.REFERENCES).to_pylist())
    labels, stats = BleuLabeler(BleuConfig()).label(prompts, responses(prompts, ["ref", "x"]))
    scores = labels.column(columns.SCORE).to_pylist()
    assert scores[:4] == [None] * 4 and scores[4] == 100.0
    assert labels.column(columns.REASON).to_pylist()[:4] == ["no_references"] * 4
    assert dict(stats.drops) == {"no_references": 4}


# ----------------------------------------------------------------- 14. unknown kind / engine / model path


def write_recipe(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "t", **data}))
    return str(path)


@pytest.mark.parametrize(
    ("data", "key", "error"),
    [
        ({"labelers": [{"kind": "bleurt"}]}, "labelers.0", RecipeError),
        ({"policy": {"engine": "vllm2"}}, "policy.engine", RecipeError),
        (
            {"labelers": [{"kind": "judge_pointwise", "model": {"engine": "onnx"}}]},
            "model.engine",
            RecipeError,
        ),
        ({"policy": {"model": "/nowhere/policy.gguf"}}, "policy.model: model file", ModelSpecError),
        (
            {
                "labelers": [
                    {"kind": "bleu"},
                    {"kind": "judge_pointwise", "model": {"model": "/nowhere/j.gguf"}},
                ]
            },
            "labelers.1.model.model (judge): model file '/nowhere/j.gguf' does not exist",
            ModelSpecError,
        ),
        (
            {"labelers": [{"kind": "density_ratio", "weak": {"model": {"model": "./no-such-dir"}}}]},
            "labelers.0.weak.model.model (density_ratio)",
            ModelSpecError,
        ),
        (
            {"pairing": {"judge": {"model": {"model": "/nowhere/x.gguf"}}}},
            "pairing.judge.model.model",
            ModelSpecError,
        ),
    ],
)
def test_unknown_labeler_kind_engine_or_model_path(
    tmp_path: Path, data: dict[str, Any], key: str, error: type
) -> None:
    """Fails in validation or preflight (file-system checks only), with the recipe key in the message."""
    with pytest.raises(error) as info:
        preflight(load_recipe(write_recipe(tmp_path, data)))
    assert key in str(info.value)


@pytest.mark.integration
def test_unknown_model_path_cli_exit_code_and_followup_yaml(tmp_path: Path) -> None:
    """The CLI exits 2 naming the key, before Prefect starts; an unsafe follow-up set is a recipe error."""
    missing = str(tmp_path / "missing-judge.gguf")
    path = write_recipe(tmp_path, {"labelers": [{"kind": "judge_pointwise", "model": {"model": missing}}]})
    proc = subprocess.run(
        [sys.executable, "-m", "flows.build_prefs", "--recipe", path, "--output", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"labelers.0.model.model (judge): model file {missing!r} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "temporary server" not in proc.stdout + proc.stderr
    evil = tmp_path / "evil.yaml"
    evil.write_text("clarity: !!python/object/apply:os.system ['echo pwned']\n")
    recipe = load_recipe(
        write_recipe(tmp_path, {"labelers": [{"kind": "follow_up", "followups": str(evil)}]})
    )
    with pytest.raises(RecipeError, match="labelers.0.followups: .*not valid YAML"):
        preflight(recipe)


def test_memory_filesystem_prompts_are_checked_the_same_way() -> None:
    """The checks do not depend on the file system (fsspec): a bad column in memory:// is the same error."""
    with fsspec.open("memory://bad-inputs/p.parquet", "wb") as handle:
        pq.write_table(pa.table({"prompt": [1]}), handle)
    with pytest.raises(PromptSourceError, match="column 'prompt' has type int64"):
        check_prompts(FilePrompts(source="file", uri="memory://bad-inputs/p.parquet"))
