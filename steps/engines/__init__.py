"""Model engines behind one protocol (``steps.engines.base``), loaded once per process.

``load_engine`` is the only way stages get a model: it resolves the spec
(cheap, done at validation time too) and keeps one loaded engine per
(spec, engine, options) for the life of the process, so a stage that handles
many shards loads its model once.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

from schemas.recipe import ModelConfig
from steps.engines.base import (
    Chooser,
    Completion,
    Engine,
    Failed,
    Generator,
    OptionRequest,
    SamplingParams,
    Scorer,
    ScoreRequest,
    TokenScores,
    derive_seed,
    sample_seed,
)
from steps.engines.models import ModelSpecError, ResolvedModel, resolve_model

__all__ = [
    "Chooser",
    "Completion",
    "Engine",
    "Failed",
    "Generator",
    "ModelSpecError",
    "OptionRequest",
    "ResolvedModel",
    "SamplingParams",
    "ScoreRequest",
    "Scorer",
    "TokenScores",
    "derive_seed",
    "load_engine",
    "resolve_model",
    "sample_seed",
]

_ENGINES: dict[tuple[Any, ...], Engine] = {}
_LOCK = threading.Lock()


def load_engine(policy: ModelConfig) -> Engine:
    """The engine for ``policy``, loaded on first use and reused afterwards."""
    key = (
        policy.model,
        policy.engine,
        policy.n_ctx,
        policy.device,
        policy.dtype,
        policy.n_threads,
        policy.trust_remote_code,
        policy.batch_tokens,
        policy.tensor_parallel_size,
        policy.gpu_memory_utilization,
        policy.max_model_len,
        policy.enforce_eager,
    )
    with _LOCK:
        if key not in _ENGINES:
            resolved = resolve_model(policy.model, policy.engine)
            if policy.engine == "llama_cpp":
                from steps.engines.llama_cpp import LlamaCppEngine

                _ENGINES[key] = LlamaCppEngine(resolved, n_ctx=policy.n_ctx, n_threads=policy.n_threads)
            elif policy.engine == "vllm":
                from steps.engines.vllm_engine import VllmEngine

                _ENGINES[key] = VllmEngine(
                    resolved,
                    tensor_parallel_size=policy.tensor_parallel_size,
                    gpu_memory_utilization=policy.gpu_memory_utilization,
                    max_model_len=policy.max_model_len,
                    dtype=policy.dtype,
                    enforce_eager=policy.enforce_eager,
                    trust_remote_code=policy.trust_remote_code,
                )
            else:
                from steps.engines.transformers_engine import TransformersEngine

                _ENGINES[key] = TransformersEngine(
                    resolved,
                    policy.device,
                    policy.dtype,
                    policy.trust_remote_code,
                    policy.batch_tokens,
                    n_ctx=policy.n_ctx,
                )
        return _ENGINES[key]


@atexit.register
def close_engines() -> None:
    with _LOCK:
        for engine in _ENGINES.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()
        _ENGINES.clear()
