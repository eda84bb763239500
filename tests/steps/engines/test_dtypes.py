"""dtype: auto — bf16 where the CPU has bf16 matrix kernels, fp32 elsewhere, made concrete once per run."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.recipe import ModelConfig, ScorerModelConfig
from steps.engines import dtypes
from tests.conftest import make_recipe


def capability(monkeypatch: pytest.MonkeyPatch, **flags: bool) -> None:
    import torch

    report: dict[str, Any] = {"avx512_bf16": False, "amx_bf16": False, "avx2": True, **flags}
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: report, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({}, "float32"), ({"avx512_bf16": True}, "bfloat16"), ({"amx_bf16": True}, "bfloat16")],
)
def test_auto_follows_the_cpu_and_says_why(
    monkeypatch: pytest.MonkeyPatch, flags: dict[str, bool], expected: str
) -> None:
    capability(monkeypatch, **flags)
    chosen, why = dtypes.resolve_dtype("transformers", "auto", "auto")
    assert chosen == expected and why is not None and ("bf16" in why)
    assert dtypes.resolve_dtype("transformers", "cpu", "float32") == ("float32", None)  # explicit wins
    assert dtypes.resolve_dtype("vllm", "auto", "auto") == ("auto", None)  # vLLM's own meaning
    assert dtypes.resolve_dtype("llama_cpp", "auto", "auto") == ("auto", None)  # the GGUF decides


def test_labelers_default_to_auto_and_runs_make_it_concrete(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ScorerModelConfig().dtype == "auto" and ModelConfig().dtype == "float32"
    recipe = make_recipe(
        labelers=[{"kind": "judge_pointwise"}, {"kind": "follow_up", "model": {"dtype": "float32"}}],
        pairing={"judge": {}},
    )
    capability(monkeypatch, avx512_bf16=True)
    resolved, notes = dtypes.resolve_recipe_dtypes(recipe)
    judge, follow = resolved.labelers
    assert judge.model.dtype == "bfloat16" and follow.model.dtype == "float32"  # type: ignore[union-attr]
    assert resolved.pairing.judge is not None and resolved.pairing.judge.model.dtype == "bfloat16"
    assert resolved.policy.dtype == "float32"  # the llama.cpp policy is left alone
    assert notes == [
        "labelers.0.model: dtype auto -> bfloat16 (CPU with bf16 matrix kernels (avx512_bf16))",
        "pairing.judge.model: dtype auto -> bfloat16 (CPU with bf16 matrix kernels (avx512_bf16))",
    ]
    assert resolved.fingerprint() != recipe.fingerprint()  # the card's recipe hash names the real dtype
    capability(monkeypatch)
    other, _ = dtypes.resolve_recipe_dtypes(recipe)
    assert other.labelers[0].model.dtype == "float32"  # type: ignore[union-attr]
    # Resolving twice changes nothing: a pool that receives the resolved recipe runs the same dtype.
    assert dtypes.resolve_recipe_dtypes(resolved) == (resolved, [])


def test_this_machine_reports_its_bf16_flags() -> None:
    """No assertion on the value (machines differ), only that torch answers and we read it."""
    assert set(dtypes.cpu_bf16_flags()) <= set(dtypes.BF16_CPU_FLAGS)
