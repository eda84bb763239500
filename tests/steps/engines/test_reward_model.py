"""Reward-model labeler: tiny random sequence classifiers saved to disk, scored on transformers and vLLM.

The models are one-layer random Llamas with SmolLM2's tokenizer and chat template: every code path
a real reward model takes (template, batching, padding, the head, the window) in milliseconds. The
reference is always the model's own forward pass on one unpadded sequence.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.recipe import RecipeError, RewardModelConfig, load_recipe
from steps.engines import Failed, ModelSpecError, RewardRequest, load_reward_model
from steps.engines.models import ResolvedModel, VllmMissingError
from steps.engines.reward import TransformersRewardModel, length_batches
from steps.labelers.base import PromptGroup
from steps.labelers.checks import preflight
from steps.labelers.reward_model import RewardModelLabeler
from steps.labelers.settings import labeler_settings
from tests.conftest import ROOT, make_recipe, smollm2_tokenizer, tiny_llama
from tests.steps.engines.test_vllm_engine import API, _check_fields, _check_params, _latest

FAKES = ROOT / "tests" / "fakes"
CONV = [{"role": "user", "content": "Name a yellow fruit."}]
LONG_CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue, on a clear day."},
    {"role": "user", "content": "And at night?"},
]
REQUESTS = [
    RewardRequest(CONV, "A banana."),
    RewardRequest(CONV, "A banana is yellow when it is ripe, and so is a lemon."),
    RewardRequest(LONG_CONV, "Dark."),
    RewardRequest(LONG_CONV, "Dark blue to black, with stars and sometimes the moon."),
    RewardRequest(CONV, "Lemons."),
]
HEADS = {0: "helpful", 1: "honest", 2: "harmless"}
_tokenizer = functools.cache(smollm2_tokenizer)  # read once per session, not once per model
# Padding changes nothing the model reads (right padding, masked), but batched matmuls sum in another
# order: fp32 differences of ~1e-7 on outputs of order 1. A misread position differs by ~0.1.
TOLERANCE = 1e-5


def _save_classifier(path: Path, num_labels: int, pad_token_id: int | None) -> Path:
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = _tokenizer()
    labels = {"id2label": HEADS, "label2id": {v: k for k, v in HEADS.items()}} if num_labels == 3 else {}
    config = tiny_llama(
        tokenizer, max_positions=512, num_labels=num_labels, pad_token_id=pad_token_id, **labels
    ).config
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # a head of order 1, so positions and columns are told apart by the numbers
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scalar_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output, pad id set (SmolLM2's <|im_end|>, which also ends every turn of its template)."""
    return _save_classifier(tmp_path_factory.mktemp("rm-scalar"), 1, _tokenizer().pad_token_id)


@pytest.fixture(scope="module")
def multi_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three named outputs and no pad id (transformers then refuses batches of more than one)."""
    return _save_classifier(tmp_path_factory.mktemp("rm-multi"), 3, None)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = _tokenizer()
    path = tmp_path_factory.mktemp("causal")
    tiny_llama(tokenizer, max_positions=512).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _scorer(path: Path, **options: Any) -> TransformersRewardModel:
    return TransformersRewardModel(ResolvedModel("hf_dir", str(path), path.name), device="cpu", **options)


def _plain_forward(path: Path, requests: list[RewardRequest]) -> list[list[float]]:
    """The reference: the checkpoint's own forward pass on each exchange alone, no padding."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for request in requests:
        chat = [*request.context, {"role": "assistant", "content": request.response}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        with torch.inference_mode():
            out.append(model(input_ids=torch.tensor([ids])).logits[0].tolist())
    return out


def _close(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(abs(x - y) < TOLERANCE for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ transformers


def test_scores_equal_a_plain_forward_pass_batched_or_not(scalar_rm: Path) -> None:
    expected = _plain_forward(scalar_rm, REQUESTS)
    batched = _scorer(scalar_rm, batch_tokens=4096)
    one_by_one = _scorer(scalar_rm, batch_tokens=64)  # every sequence is longer: one per pass
    for scorer in (batched, one_by_one):
        got = scorer.reward(REQUESTS)
        assert all(_close(g, e) for g, e in zip(got, expected, strict=True)), (got, expected)
    assert batched.forward_passes == 1 and one_by_one.forward_passes == len(REQUESTS)
    assert len({round(e[0], 4) for e in expected}) == len(REQUESTS)  # real numbers, not a constant


def test_batches_are_sorted_by_length_under_the_token_budget() -> None:
    lengths = [10, 40, 12, 39, 100, 11]
    batches = length_batches(lengths, budget=80)
    assert batches == [[4], [1, 3], [2, 5, 0]]  # longest first; 3 x 12 <= 80; 100 alone, over budget
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches(lengths, budget=0) == [[4], [1], [3], [2], [5], [0]]


def test_head_picks_its_column_and_a_model_without_pad_runs_unbatched(multi_rm: Path) -> None:
    expected = _plain_forward(multi_rm, REQUESTS)
    scorer = _scorer(multi_rm)
    assert scorer.labels == ("helpful", "honest", "harmless")
    got = scorer.reward(REQUESTS)
    assert all(_close(g, e) for g, e in zip(got, expected, strict=True))
    assert scorer.forward_passes == len(REQUESTS)
    config = RewardModelConfig(
        kind="reward_model", model={"model": str(multi_rm), "device": "cpu", "dtype": "float32"}, head=2
    )
    labeler = RewardModelLabeler(config)
    group = PromptGroup({"messages": CONV}, [r.response for r in REQUESTS if r.context == CONV])
    [scores] = labeler.score_prompts([group])
    wanted = [e for r, e in zip(REQUESTS, expected, strict=True) if r.context == CONV]
    for score, want in zip(scores, wanted, strict=True):
        assert abs(score.value - want[2]) < TOLERANCE  # type: ignore[operator]
        assert list(score.details["heads"]) == ["helpful", "honest", "harmless"]


def test_too_long_is_null_with_a_reason_and_the_rest_still_score(scalar_rm: Path) -> None:
    scorer = _scorer(scalar_rm, n_ctx=128)
    assert _scorer(scalar_rm, n_ctx=4096).n_ctx == 512  # never past the model's trained positions
    long_reply = " the cat" * 80
    short, too_long = scorer.reward([RewardRequest(CONV, "Lemons."), RewardRequest(CONV, long_reply)])
    assert isinstance(too_long, Failed) and too_long.reason == "too_long"
    assert _close(short, _plain_forward(scalar_rm, [RewardRequest(CONV, "Lemons.")])[0])
    config = RewardModelConfig(
        kind="reward_model", model={"model": str(scalar_rm), "n_ctx": 128, "dtype": "float32"}
    )
    [[fine, cut, blank]] = RewardModelLabeler(config).score_prompts(
        [PromptGroup({"messages": CONV}, ["Lemons.", long_reply, "  "])]
    )
    assert fine.value is not None and (cut.value, cut.reason) == (None, "too_long")
    assert (blank.value, blank.reason) == (None, "empty_response")


def test_reward_models_load_once_apart_from_causal_engines(scalar_rm: Path) -> None:
    config = RewardModelConfig(
        kind="reward_model", model={"model": str(scalar_rm), "device": "cpu", "dtype": "float32"}
    )
    assert load_reward_model(config.model) is load_reward_model(config.model.model_copy())
    assert labeler_settings(config)["model.model"] == str(scalar_rm)
    assert isinstance(load_reward_model(config.model), TransformersRewardModel)


# ------------------------------------------------------------------ the recipe, checked before anything runs


def _recipe(labeler: dict[str, Any]) -> Any:
    return make_recipe(labelers=[{"kind": "reward_model", **labeler}])


def test_recipe_errors_name_the_key(tmp_path: Path) -> None:
    for labeler, message in [
        ("{kind: reward_model}", r"labelers.0.reward_model.*model.model: name the reward model"),
        ("{kind: reward_model, model: {engine: transformers}}", "model.model: name the reward model"),
        ("{kind: reward_model, model: {model: org/rm, engine: llama_cpp}}", "llama_cpp has no classifier"),
        ("{kind: reward_model, model: {model: org/rm}, head: -1}", r"labelers.0.reward_model.head"),
    ]:
        path = tmp_path / "r.yaml"
        path.write_text(f"name: rm\nlabelers:\n  - {labeler}\n")
        with pytest.raises(RecipeError, match=message):
            load_recipe(str(path))


def test_not_a_classifier_fails_preflight_before_any_model_loads(
    causal_lm: Path, multi_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("preflight loaded weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", no_weights)
    monkeypatch.setattr(_BaseAutoModelClass, "from_pretrained", no_weights)
    for labeler, message in [
        ({"model": {"model": str(causal_lm)}}, r"labelers.0.model.model \(reward\): .*LlamaForCausalLM"),
        ({"model": {"model": "smollm2-135m-instruct"}}, "GGUF file, which holds a causal LM"),
        ({"model": {"model": str(multi_rm)}}, r"3 outputs \(0: helpful, 1: honest, 2: harmless\); pick"),
        ({"model": {"model": str(multi_rm)}, "head": 3}, "head: 3 is out of range"),
    ]:
        with pytest.raises(ModelSpecError, match=message):
            preflight(_recipe(labeler))
    preflight(_recipe({"model": {"model": str(multi_rm)}, "head": 1}))
    preflight(_recipe({"model": {"model": "some-org/not-downloaded-rm"}}))  # checked when it loads


def test_eval_labelers_cli_stops_before_running_on_a_causal_lm(
    causal_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import eval_labelers_main as main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: rm\nlabelers:\n  - {{kind: reward_model, model: {{model: {causal_lm}}}}}\n")
    assert main(["--pairs", str(pairs), "--recipe", str(recipe), "--cache", str(tmp_path / "c")]) == 2
    assert "not a sequence-classification reward model" in capsys.readouterr().err


def test_eval_labelers_end_to_end_scores_every_pair(scalar_rm: Path, tmp_path: Path) -> None:
    from flows.cli import eval_labelers_main as main

    records = [
        {"id": f"p{i}", "prompt": CONV if i % 2 else LONG_CONV, "chosen": chosen, "rejected": rejected}
        for i, (chosen, rejected) in enumerate(
            [("A banana.", "Lemons."), ("Dark, with stars.", "Dark."), ("Bananas are yellow.", "No.")]
        )
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: rm\nlabelers:\n  - {{kind: reward_model, name: rm, model: {{model: {scalar_rm}, device: cpu, dtype: float32}}}}\n"
    )
    out = tmp_path / "report.json"
    args = [
        "--pairs",
        str(pairs),
        "--recipe",
        str(recipe),
        "--json",
        str(out),
        "--cache",
        str(tmp_path / "c"),
    ]
    assert main(args) == 0
    report = json.loads(out.read_text())
    [row] = [row for row in report["rows"] if row["labeler"] == "rm"]
    assert row["n"] == 3 and row["agree"] + row["disagree"] == 3  # every pair scored, no tie
    expected = _plain_forward(scalar_rm, [RewardRequest(r["prompt"], r["chosen"]) for r in records])
    for entry, want in zip(report["pairs"], expected, strict=True):
        assert abs(entry["scores"]["rm"][0] - want[0]) < TOLERANCE
    assert main(args) == 0  # the second run finds the labels under the pipeline's resume key
    assert json.loads(out.read_text())["rows"][0]["reused"] is True


# ------------------------------------------------------------------ vLLM (the fake, checked against the wheels)


def _unload_vllm() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fake as ``vllm`` here and in the workers (real vLLM's classify: tests/steps/engines/test_vllm_real.py)."""
    from tests.steps.engines.test_vllm_engine import use_fake_vllm

    yield from use_fake_vllm(monkeypatch)


def _released(version: str) -> list[int]:
    return [int(p) for p in version.split(".") if p.isdigit()]


def test_the_fake_pooling_api_mirrors_the_real_one(fake_vllm: Any) -> None:
    from vllm.entrypoints.llm import LLM
    from vllm.outputs import ClassificationOutput, PoolingRequestOutput
    from vllm.pooling_params import PoolingParams

    real = _latest()
    _check_params(LLM.classify, real["LLM.classify"], "LLM.classify")
    _check_params(LLM.__init__, real["LLM.__init__"], "LLM.__init__")
    _check_params(
        PoolingRequestOutput.__init__, real["PoolingRequestOutput.__init__"], "PoolingRequestOutput"
    )
    _check_fields({"use_activation": None}, real["PoolingParams"]["fields"], "PoolingParams")
    assert set(vars(PoolingParams())) == {"use_activation"}
    _check_fields(
        {"probs": dataclasses.MISSING}, real["ClassificationOutput"]["fields"], "ClassificationOutput"
    )
    assert set(ClassificationOutput.__dataclass_fields__) == {"probs"}
    # What the reward scorer relies on exists from 0.11.1 on, and not in the oldest release we support.
    for version, api in API["versions"].items():
        usable = _released(version) >= [0, 11, 1]
        pooling = api["PoolingParams"] or {"fields": {}}
        assert ("use_activation" in pooling["fields"]) == usable, version
        if usable:
            assert {"pooling_params", "use_tqdm"} <= set(api["LLM.classify"]["params"]), version
            assert api["LLM.__init__"]["params"]["runner"]["value"] == "auto", version
            assert "probs" in api["ClassificationOutput"]["fields"], version
            assert "PoolingParams" in api["exports"]["vllm"], version


def test_vllm_rewards_equal_the_transformers_scorer(fake_vllm: Any, scalar_rm: Path, multi_rm: Path) -> None:
    from steps.engines.vllm_engine import VllmRewardModel

    for path in (scalar_rm, multi_rm):
        engine = VllmRewardModel(ResolvedModel("hf_dir", str(path), path.name))
        reference = _scorer(path)
        ours, theirs = engine.reward(REQUESTS), reference.reward(REQUESTS)
        assert all(_close(a, b) for a, b in zip(ours, theirs, strict=True)), (ours, theirs)
        assert engine.labels == reference.labels
        [(prompts, params)] = engine.llm.calls  # one batched call, raw outputs asked for
        assert len(prompts) == len(REQUESTS) and {p.use_activation for p in params} == {False}
        assert engine.llm.init_args["runner"] == "pooling"
        # Without use_activation=False vLLM squashes the head: a sigmoid for one output, a softmax for several.
        [squashed] = engine.llm.classify(prompts[:1])
        assert all(0.0 < p < 1.0 for p in squashed.outputs.probs)
        assert not _close(squashed.outputs.probs, ours[0])


def test_vllm_reward_model_through_the_recipe(fake_vllm: Any, scalar_rm: Path) -> None:
    from steps.engines.vllm_process import RemoteVllmRewardModel

    config = RewardModelConfig(
        kind="reward_model", model={"model": str(scalar_rm), "engine": "vllm", "max_model_len": 128}
    )
    preflight(_recipe(config.model_dump(exclude={"kind"})))
    labeler = RewardModelLabeler(config)
    assert isinstance(labeler.scorer, RemoteVllmRewardModel) and labeler.scorer.n_ctx == 128
    [[fine, cut]] = labeler.score_prompts([PromptGroup({"messages": CONV}, ["Lemons.", " the cat" * 80])])
    assert fine.value is not None and (cut.value, cut.reason) == (None, "too_long")  # the call survived


def test_vllm_too_old_for_raw_rewards_names_the_version(
    fake_vllm: Any, scalar_rm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steps.engines.vllm_engine import VllmRewardModel

    class OldPoolingParams:  # vLLM before 0.11.1: no use_activation
        def __init__(self, additional_data: Any = None) -> None:
            self.additional_data = additional_data

    monkeypatch.setattr(fake_vllm, "PoolingParams", OldPoolingParams)
    with pytest.raises(VllmMissingError, match=r"vllm >= 0.11.1"):
        VllmRewardModel(ResolvedModel("hf_dir", str(scalar_rm), "rm"))
