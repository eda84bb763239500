"""One scoring pass for every labeler reading a model: same scores as apart, fewer tokens, resume per labeler.

A tiny random Llama over the default model's tokenizer (fp32) runs the real trie and chat
template; the labelers' ``load_engine`` is pointed at it, so every labeler shares one engine
object, as ``load_engine``'s cache makes them do in a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from schemas import columns
from schemas.recipe import BleuConfig, DensityRatioConfig, FollowUpConfig, PointwiseJudgeConfig
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats
from steps.engines.base import (
    Failed,
    JointReader,
    OptionRequest,
    ScoreRequest,
    TokenScores,
    read_requests,
)
from steps.labelers import density_ratio, follow_up, judge_pointwise
from steps.labelers.base import Plan, read_plans
from steps.labelers.joint import label_jointly, passes
from steps.labelers.judging import SCORE_OPTIONS, SCORE_PREFILL, pointwise_prompt
from steps.run import stages
from steps.run.files import read_table, write_table
from steps.run.resume import WorkArea, sha256_of
from tests.conftest import smollm2_tokenizer, tiny_llama
from tests.steps.labelers.test_labeling import responses as responses_table
from tests.steps.test_sampling import prompts_table

TOLERANCE = 1e-4  # fp32: another packing of the same trie changes sums by rounding only


@pytest.fixture(scope="module")
def tiny() -> Any:
    from steps.engines.transformers_engine import TransformersEngine

    tokenizer = smollm2_tokenizer()
    # Short rows split the joint trie into cached paths and several batches, as long shards do.
    return TransformersEngine.from_loaded(tiny_llama(tokenizer), tokenizer, "tiny", row_tokens=128)


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch, tiny: Any) -> Any:
    for module in (density_ratio, follow_up, judge_pointwise):
        monkeypatch.setattr(module, "load_engine", lambda config: tiny)
    return tiny


def configs(per_dimension: int = 1) -> list[Any]:
    return [
        DensityRatioConfig(kind="density_ratio", strong={"system_prompt": "Be accurate and kind."}),
        FollowUpConfig(
            kind="follow_up", dimensions=["understanding", "relevance"], per_dimension=per_dimension
        ),
        PointwiseJudgeConfig(kind="judge_pointwise"),
    ]


PROMPTS_TABLE = prompts_table(["How do I keep basil alive?", "Name a prime number."])
RESPONSES_TABLE = responses_table(PROMPTS_TABLE, ["Water it often and give it sun.", "Seven.", " "])


def scores(table: pa.Table) -> dict[str, float | None]:
    return dict(zip(table[columns.RESPONSE_ID].to_pylist(), table[columns.SCORE].to_pylist(), strict=True))


def close(a: dict[str, float | None], b: dict[str, float | None]) -> bool:
    assert a.keys() == b.keys()
    return all(
        (x is None and y is None)
        or (x is not None and y is not None and math.isclose(x, y, abs_tol=TOLERANCE))
        for x, y in ((a[k], b[k]) for k in a)
    )


def test_the_engine_reads_a_mix_of_kinds_in_one_pass_as_it_reads_each_kind(tiny: Any) -> None:
    conversation = [{"role": "user", "content": "Is the sky blue?"}]
    answer = "Yes, on a clear day."
    mixed = [
        ScoreRequest(conversation, answer),
        OptionRequest(pointwise_prompt(conversation, answer), SCORE_PREFILL, SCORE_OPTIONS),
        ScoreRequest([*conversation, {"role": "assistant", "content": answer}], "Thanks!", "user"),
        ScoreRequest(conversation, ""),  # fails, as a value, in place
    ]
    assert isinstance(tiny, JointReader)
    together = tiny.read_mixed(mixed)
    apart = tiny.score([mixed[0], mixed[2], mixed[3]])
    [options] = tiny.option_logprobs([mixed[1]])
    assert isinstance(together[3], Failed) and isinstance(apart[2], Failed)
    for joint, alone in ((together[0], apart[0]), (together[2], apart[1])):
        assert isinstance(joint, TokenScores) and isinstance(alone, TokenScores)
        assert joint.token_ids == alone.token_ids
        assert max(abs(x - y) for x, y in zip(joint.logprobs, alone.logprobs, strict=True)) < TOLERANCE
    assert isinstance(together[1], dict) and isinstance(options, dict)
    assert max(abs(together[1][k] - options[k]) for k in SCORE_OPTIONS) < TOLERANCE


class KindByKind:
    """An engine with no joint pass (like llama.cpp, vLLM or a test's fake): one call per kind."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenScores | Failed]:
        self.calls.append("score")
        return [TokenScores([1], [-float(len(r.continuation))]) for r in requests]

    def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float] | Failed]:
        self.calls.append("options")
        return [{o: -1.0 for o in r.options} for r in requests]


def test_engines_without_a_joint_pass_get_one_call_per_kind_in_request_order() -> None:
    engine = KindByKind()
    assert not isinstance(engine, JointReader)
    asked = [ScoreRequest([], "ab"), OptionRequest([], "", ("x",)), ScoreRequest([], "abc")]
    out = read_requests(engine, asked)
    assert engine.calls == ["score", "options"]
    assert [o.total if isinstance(o, TokenScores) else o for o in out] == [-2.0, {"x": -1.0}, -3.0]
    only_scores = KindByKind()
    read_requests(only_scores, [ScoreRequest([], "a")])
    assert only_scores.calls == ["score"]  # a fake that can only score is never asked for options


def test_plans_are_pooled_per_engine_object() -> None:
    a, b = KindByKind(), KindByKind()

    def plan(*reads: tuple[Any, list[Any]]) -> Plan:
        return Plan(list(reads), lambda results: [])

    first = plan((a, [ScoreRequest([], "a")]), (b, [ScoreRequest([], "bb")]))
    second = plan((a, [ScoreRequest([], "ccc")]))
    third = plan((KindByKind(), [ScoreRequest([], "d")]))
    assert passes({0: first, 1: second, 2: third}) == [[0, 1], [2]]
    answers = read_plans([first, second])
    assert a.calls == ["score"] and b.calls == ["score"]  # a's requests of both plans: one call
    assert [[[s.total for s in part] for part in plan] for plan in answers] == [[[-1.0], [-2.0]], [[-3.0]]]


def test_joint_scores_equal_separate_scores_with_fewer_tokens(shared: Any) -> None:
    labelers = [stages.build_labeler(config) for config in configs()]
    apart, apart_tokens = [], 0
    for labeler in labelers:
        before = shared.tokens_processed
        apart.append(labeler.label(PROMPTS_TABLE, RESPONSES_TABLE)[0])
        apart_tokens += shared.tokens_processed - before
    before = shared.tokens_processed
    together = label_jointly(labelers, PROMPTS_TABLE, RESPONSES_TABLE)
    joint_tokens = shared.tokens_processed - before
    for alone, joint in zip(apart, together, strict=True):
        assert alone[columns.RESPONSE_ID].to_pylist() == joint.table[columns.RESPONSE_ID].to_pylist()
        assert alone[columns.REASON].to_pylist() == joint.table[columns.REASON].to_pylist()
        assert close(scores(alone), scores(joint.table))
    # The plain side of the density ratio is the prefix of every follow-up: it runs once now.
    assert joint_tokens < apart_tokens
    assert all(j.shared_by == 3 and j.pass_tokens == joint_tokens for j in together)
    assert sum(j.tokens for j in together) == joint_tokens  # equal shares that add up to the pass


def stored(table: pa.Table, schema: pa.Schema, path: Path) -> ShardResult:
    uri = write_table(table, str(path), schema)
    return ShardResult(uri, table.num_rows, StageStats("t"), sha256_of(uri) or "")


def test_a_changed_labeler_recomputes_alone_and_equals_a_run_from_scratch(
    shared: Any, tmp_path: Path
) -> None:
    shard = (
        stored(PROMPTS_TABLE, PROMPTS, tmp_path / "p.parquet"),
        stored(RESPONSES_TABLE, RESPONSES, tmp_path / "r.parquet"),
    )
    area = WorkArea(str(tmp_path / "work"))
    bleu = BleuConfig()
    first = stages.label_parts([*configs(1), bleu], area, *shard)
    assert [p.resumed for p in first] == [False] * 4
    assert [p.stats.counts["scored_jointly"] for p in first] == [1, 1, 1, 0]  # BLEU reads no model
    before = shared.tokens_processed
    second = stages.label_parts([*configs(2), bleu], area, *shard)
    assert [p.resumed for p in second] == [True, False, True, True]
    changed = second[1].stats.counts
    assert "scored_jointly" not in changed and changed["tokens_scored"] == shared.tokens_processed - before
    scratch = stages.label_parts([*configs(2), bleu], WorkArea(str(tmp_path / "scratch")), *shard)
    for part, fresh in zip(second, scratch, strict=True):
        got, want = read_table(part.files["data"], LABELS), read_table(fresh.files["data"], LABELS)
        assert close(scores(got), scores(want))
    assert second[0].files == first[0].files and second[2].files == first[2].files


def test_label_keeps_one_part_per_labeler_and_the_cost_says_what_was_shared(
    shared: Any, tmp_path: Path
) -> None:
    from steps.publish.cost import cost_summary
    from tests.conftest import make_recipe

    recipe = make_recipe(labelers=[config.model_dump() for config in configs()])
    shard = (
        stored(PROMPTS_TABLE, PROMPTS, tmp_path / "p.parquet"),
        stored(RESPONSES_TABLE, RESPONSES, tmp_path / "r.parquet"),
    )
    labels = stages.label(recipe, WorkArea(str(tmp_path / "work")), *shard)
    assert set(read_table(labels.uri, LABELS)[columns.SIGNAL].to_pylist()) == {
        "density_ratio",
        "follow_up",
        "judge",
    }
    cost = cost_summary({"labeling": labels.stats}, kept=1, eval_seconds=None)
    shares = {name: entry["shared_pass"] for name, entry in cost["labelers"].items()}
    assert {s["shards"] for s in shares.values()} == {1}
    [pass_tokens] = {s["pass_tokens"] for s in shares.values()}
    assert sum(entry["tokens_scored"] for entry in cost["labelers"].values()) == pass_tokens


def test_a_run_killed_in_a_later_pass_keeps_the_parts_earlier_passes_finished(
    shared: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines, two passes: the first pass's part is stored before the second pass starts."""
    from steps.engines.transformers_engine import TransformersEngine
    from steps.labelers import joint

    tokenizer = smollm2_tokenizer()
    other = TransformersEngine.from_loaded(tiny_llama(tokenizer), tokenizer, "other", row_tokens=128)
    monkeypatch.setattr(judge_pointwise, "load_engine", lambda config: other)
    shard = (
        stored(PROMPTS_TABLE, PROMPTS, tmp_path / "p.parquet"),
        stored(RESPONSES_TABLE, RESPONSES, tmp_path / "r.parquet"),
    )
    area = WorkArea(str(tmp_path / "work"))
    chosen = [BleuConfig(), configs()[0], PointwiseJudgeConfig(kind="judge_pointwise")]
    real, calls = joint.read_plans, []

    def dies_in_the_second_pass(plans: Any) -> Any:
        calls.append(len(plans))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during the second pass")
        return real(plans)

    monkeypatch.setattr(joint, "read_plans", dies_in_the_second_pass)
    with pytest.raises(KeyboardInterrupt):
        stages.label_parts(chosen, area, *shard)
    keys = [stages._label_key(config, area, *shard) for config in chosen]
    assert [area.lookup(*key) is not None for key in keys] == [True, True, False]

    monkeypatch.setattr(joint, "read_plans", real)
    before = (shared.tokens_processed, other.tokens_processed)
    rerun = stages.label_parts(chosen, area, *shard)
    assert [part.resumed for part in rerun] == [True, True, False]
    assert shared.tokens_processed == before[0] and other.tokens_processed > before[1]
