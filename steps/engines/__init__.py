"""Model engines behind one protocol (``steps.engines.base``), loaded once per process.

``load_engine`` is the only way stages get a model (``load_reward_model`` for a
reward model's classifier): it resolves the spec (cheap, done at validation time
too) and keeps one loaded engine per (spec, engine, options) for the life of the
process, so a stage that handles many shards loads its model once.
"""

from __future__ import annotations

import atexit
import threading
from typing import TYPE_CHECKING, Any

from steps.engines.base import (
    Chooser,
    Completion,
    Engine,
    Failed,
    Generator,
    JointReader,
    OptionRequest,
    ReadRequest,
    ReadResult,
    SamplingParams,
    Scorer,
    ScoreRequest,
    TokenScores,
    derive_seed,
    read_requests,
    sample_seed,
)
from steps.engines.dtypes import resolve_dtype
from steps.engines.models import ModelSpecError, ResolvedModel, resolve_model
from steps.engines.reward import RewardRequest, RewardScorer

if TYPE_CHECKING:  # the vLLM worker imports this package, and has no pyarrow for schemas.recipe
    from schemas.recipe import ModelConfig

__all__ = [
    "Chooser",
    "Completion",
    "Engine",
    "Failed",
    "Generator",
    "JointReader",
    "ModelSpecError",
    "OptionRequest",
    "ReadRequest",
    "ReadResult",
    "ResolvedModel",
    "RewardRequest",
    "RewardScorer",
    "SamplingParams",
    "ScoreRequest",
    "Scorer",
    "TokenScores",
    "derive_seed",
    "load_engine",
    "load_reward_model",
    "read_requests",
    "resolve_model",
    "sample_seed",
]

_ENGINES: dict[tuple[Any, ...], Engine] = {}
_REWARD_MODELS: dict[tuple[Any, ...], RewardScorer] = {}
_LOCK = threading.Lock()


def load_key(config: ModelConfig, classifier: bool = False) -> tuple[Any, ...]:
    """Which load of this process ``config`` gets: equal keys share one model in memory.

    A classifier (``load_reward_model``) is cached apart from a causal LM of the same checkpoint,
    so the two are different loads even with equal settings.
    """
    return ("classifier" if classifier else "lm", *_settings(config))


def _settings(policy: ModelConfig) -> tuple[Any, ...]:
    """Everything a loaded model depends on: equal settings share one load."""
    return (
        policy.model,
        policy.engine,
        policy.n_ctx,
        policy.device,
        policy.dtype,
        policy.n_threads,
        policy.decode,
        policy.trust_remote_code,
        policy.batch_tokens,
        policy.tensor_parallel_size,
        policy.gpu_memory_utilization,
        policy.max_model_len,
        policy.enforce_eager,
        policy.kv_cache_gib,
    )


def _vllm_options(config: ModelConfig) -> dict[str, Any]:
    """The keyword arguments every vLLM-backed model takes from its config (generation and rewards)."""
    return {
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "dtype": config.dtype,
        "enforce_eager": config.enforce_eager,
        "trust_remote_code": config.trust_remote_code,
        "kv_cache_gib": config.kv_cache_gib,
        "device": config.device,
    }


def load_engine(policy: ModelConfig) -> Engine:
    """The engine for ``policy``, loaded on first use and reused afterwards."""
    key = _settings(policy)
    with _LOCK:
        if key not in _ENGINES:
            resolved = resolve_model(policy.model, policy.engine)
            if policy.engine == "llama_cpp":
                from steps.engines.llama_cpp import LlamaCppEngine

                _ENGINES[key] = LlamaCppEngine(
                    resolved, n_ctx=policy.n_ctx, n_threads=policy.n_threads, decode=policy.decode
                )
            elif policy.engine == "vllm":
                from steps.engines.vllm_process import RemoteVllmEngine

                _ENGINES[key] = RemoteVllmEngine(resolved, **_vllm_options(policy))
            else:
                from steps.engines.transformers_engine import TransformersEngine

                _ENGINES[key] = TransformersEngine(
                    resolved,
                    policy.device,
                    resolve_dtype(policy.engine, policy.device, policy.dtype)[0],  # runs resolve it earlier
                    policy.trust_remote_code,
                    policy.batch_tokens,
                    n_ctx=policy.n_ctx,
                )
        return _ENGINES[key]


def tokens_through_models() -> int:
    """Every token the loaded models have read so far in this process (what scoring cost, in tokens).

    Engines count what they feed through the network (``tokens_processed``): a shared prefix read
    once counts once. A labeler's share is the difference across its run, since labelers run one
    after another.
    """
    loaded = [*_ENGINES.values(), *_REWARD_MODELS.values()]
    return sum(int(getattr(model, "tokens_processed", 0)) for model in loaded)


def load_reward_model(config: ModelConfig) -> RewardScorer:
    """The reward model for ``config``, loaded on first use and reused (``steps.engines.reward``).

    Cached apart from ``load_engine``'s: the same checkpoint loads as a classifier here and as a
    causal LM there, which are different weights in memory.
    """
    key = _settings(config)
    with _LOCK:
        if key not in _REWARD_MODELS:
            resolved = resolve_model(config.model, config.engine)
            if config.engine == "vllm":
                from steps.engines.vllm_process import RemoteVllmRewardModel

                _REWARD_MODELS[key] = RemoteVllmRewardModel(resolved, **_vllm_options(config))
            elif config.engine == "transformers":
                from steps.engines.reward import TransformersRewardModel

                _REWARD_MODELS[key] = TransformersRewardModel(
                    resolved,
                    config.device,
                    resolve_dtype(config.engine, config.device, config.dtype)[0],
                    config.trust_remote_code,
                    config.batch_tokens,
                    n_ctx=config.n_ctx,
                )
            else:
                raise ModelSpecError(f"engine {config.engine} has no classifier heads for a reward model")
        return _REWARD_MODELS[key]


@atexit.register
def close_engines() -> None:
    with _LOCK:
        for loaded in [*_ENGINES.values(), *_REWARD_MODELS.values()]:
            close = getattr(loaded, "close", None)
            if close is not None:
                close()
        _ENGINES.clear()
        _REWARD_MODELS.clear()
