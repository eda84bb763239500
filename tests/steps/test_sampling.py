"""Sampling step over the engine protocol, with a fake engine (the real one is in test_engines)."""

from __future__ import annotations

import pyarrow as pa

from schemas import columns
from schemas.records import PROMPTS, RESPONSES
from steps.engines import Failed, Generator, SamplingParams
from steps.prompts.normalise import normalise_messages, prompt_id
from steps.sampling import sample_table
from tests.conftest import FakeEngine


def prompts_table(texts: list[str]) -> pa.Table:
    rows = []
    for i, text in enumerate(texts):
        messages = normalise_messages(text)
        rows.append(
            {
                columns.PROMPT_ID: prompt_id(messages),
                columns.MESSAGES: messages,
                columns.REFERENCES: ["ref"],
                columns.SOURCE: "t",
                columns.SOURCE_ROW: i,
            }
        )
    return pa.Table.from_pylist(rows, schema=PROMPTS)


PARAMS = SamplingParams(n=4, temperature=0.8, top_p=0.9, max_tokens=3)


def test_fake_engine_satisfies_protocol() -> None:
    assert isinstance(FakeEngine(), Generator)


def test_responses_follow_contract_and_mark_empty_and_truncated(fake_engine: FakeEngine) -> None:
    table, stats = sample_table(prompts_table(["one", "two", "three"]), fake_engine, PARAMS, seed=3)
    assert table.schema == RESPONSES
    assert table.num_rows == 12 and stats.rows_out == 12
    rows = table.to_pylist()
    assert {r[columns.SAMPLE_INDEX] for r in rows} == {0, 1, 2, 3}
    assert len({r[columns.RESPONSE_ID] for r in rows}) == 12
    for r in rows:
        assert r[columns.IS_EMPTY] == (r[columns.TEXT].strip() == "")
        assert r[columns.TRUNCATED] == (r[columns.FINISH_REASON] == "length")
        assert (r[columns.POLICY_MODEL], r[columns.ENGINE], r[columns.MAX_TOKENS]) == (
            "fake/model",
            "fake",
            3,
        )
    assert stats.counts["empty"] == sum(r[columns.IS_EMPTY] for r in rows)
    assert stats.counts["truncated"] == sum(r[columns.TRUNCATED] for r in rows)


def test_failed_prompt_is_dropped_with_reason_not_silently(fake_engine: FakeEngine) -> None:
    table, stats = sample_table(prompts_table(["ok", "TOO_LONG prompt"]), fake_engine, PARAMS, seed=0)
    assert table.num_rows == 4
    assert stats.drops == {"prompt_too_long": 1}
    assert "fake context limit" in stats.examples["prompt_too_long"]


def test_seeds_depend_on_prompt_not_position(fake_engine: FakeEngine) -> None:
    forward, _ = sample_table(prompts_table(["x", "y"]), fake_engine, PARAMS, seed=5)
    backward, _ = sample_table(prompts_table(["y", "x"]), fake_engine, PARAMS, seed=5)
    key = [columns.RESPONSE_ID, columns.TEXT, columns.SEED]
    assert sorted(forward.select(key).to_pylist(), key=str) == sorted(
        backward.select(key).to_pylist(), key=str
    )
    other, _ = sample_table(prompts_table(["x", "y"]), fake_engine, PARAMS, seed=6)
    assert other.column(columns.SEED).to_pylist() != forward.column(columns.SEED).to_pylist()


def test_several_temperatures_split_n_and_record_each(fake_engine: FakeEngine) -> None:
    """UltraFeedback-style diversity from one policy: n/len samples at each temperature, own seeds."""
    prompts = prompts_table(["one", "two"])
    table, stats = sample_table(prompts, fake_engine, PARAMS, seed=3, temperatures=[0.6, 1.0])
    assert fake_engine.calls == 2 and table.num_rows == 8 and stats.rows_out == 8
    for pid in prompts.column(columns.PROMPT_ID).to_pylist():
        rows = [r for r in table.to_pylist() if r[columns.PROMPT_ID] == pid]
        assert [r[columns.SAMPLE_INDEX] for r in rows] == [0, 1, 2, 3]
        assert [r[columns.TEMPERATURE] for r in rows] == [0.6, 0.6, 1.0, 1.0]
        assert len({r[columns.SEED] for r in rows}) == 4  # the groups do not repeat each other's seeds
    # One temperature given as a list samples exactly what the plain setting samples.
    single, _ = sample_table(prompts, FakeEngine(), PARAMS, seed=3, temperatures=[0.8])
    plain, _ = sample_table(prompts, FakeEngine(), PARAMS, seed=3)
    assert single.equals(plain)


def test_a_prompt_failing_at_one_temperature_is_dropped_whole() -> None:
    class FailsHot(FakeEngine):
        def generate(self, conversations, params, seeds):  # type: ignore[no-untyped-def]
            out = super().generate(conversations, params, seeds)
            if params.temperature > 0.9:
                out[0] = Failed("prompt_too_long", "hot group failed")
            return out

    table, stats = sample_table(
        prompts_table(["one", "two"]), FailsHot(), PARAMS, seed=0, temperatures=[0.5, 1.0]
    )
    assert table.num_rows == 4 and stats.drops == {"prompt_too_long": 1}
    assert "hot group failed" in stats.examples["prompt_too_long"]


def test_only_failures_that_would_repeat_are_kept_for_a_later_shard_of_the_slot() -> None:
    """A prompt too long for the context fails the same way next time; an engine hiccup may not."""
    from steps.sampling import sample_rows

    class FailsTwo(FakeEngine):
        def generate(self, conversations, params, seeds):  # type: ignore[no-untyped-def]
            out = super().generate(conversations, params, seeds)
            out[0] = Failed("prompt_too_long", "does not fit")
            out[1] = Failed("engine_error", "the server dropped the request")
            return out

    _, stats, failed = sample_rows(prompts_table(["one", "two", "three"]), FailsTwo(), PARAMS, seed=0)
    assert stats.drops == {"prompt_too_long": 1, "engine_error": 1}  # both reported in this run
    assert [reason for reason, _ in failed.values()] == ["prompt_too_long"]  # only one replayed
