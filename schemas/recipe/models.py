"""A model as every section names one (``policy:``, a labeler's ``model:``, the pair judge's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from schemas.recipe.base import OFF_CARD, SPEED_ONLY, VLLM, Strict, tagged

# How llama.cpp decodes a prompt's n samples: together as sequences of one batch after one
# prefill (faster on CPU), or one create_completion after another (llama-cpp-python's own loop).
# The two give different texts for the same seeds, so the mode is part of the sampling key.
DecodeMode = Literal["batched", "single"]


class ModelConfig(Strict):
    """A model and the engine that runs it (the policy, or a model a labeler reads)."""

    model: str = "smollm2-135m-instruct"
    engine: Literal["llama_cpp", "transformers", "vllm"] = "llama_cpp"
    n_ctx: int = Field(2048, ge=128)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=OFF_CARD)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="auto: vllm reads the checkpoint's dtype; transformers picks bf16 where this machine "
        "has bf16 kernels, else fp32 (steps/engines/dtypes.py); llama_cpp runs the GGUF as it is",
    )
    n_threads: int | None = Field(None, ge=1, json_schema_extra=SPEED_ONLY)
    decode: DecodeMode = Field(
        "batched",
        description="llama_cpp: decode a prompt's n samples together (batched) or one after another "
        "(single); the texts differ, so a change resamples. Other engines always batch",
    )
    trust_remote_code: bool = Field(False, json_schema_extra=OFF_CARD)
    batch_tokens: int = Field(
        4096, ge=64, description="token budget of one scoring batch", json_schema_extra=SPEED_ONLY
    )
    # vllm only (engine: vllm); one engine per process, see steps/engines/gpu_pool.py for several GPUs
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm: GPUs one model is split across", json_schema_extra=VLLM
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vllm: share of GPU memory", json_schema_extra=VLLM
    )
    max_model_len: int | None = Field(
        None, ge=128, description="vllm: context length (default: the model's)", json_schema_extra=VLLM
    )
    enforce_eager: bool = Field(
        False, description="vllm: no CUDA graphs (faster start, slower decoding)", json_schema_extra=VLLM
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vllm: KV cache size in GiB, instead of what gpu_memory_utilization leaves; on a CPU "
        "build of vLLM (where gpu_memory_utilization is a share of RAM) the way to size it",
        json_schema_extra=VLLM,
    )

    @model_validator(mode="before")
    @classmethod
    def _vllm_dtype_default(cls, data: Any) -> Any:
        """vLLM runs the checkpoint's own dtype unless told otherwise; float32 would halve its speed."""
        if isinstance(data, dict) and data.get("engine") == "vllm" and "dtype" not in data:
            return {**data, "dtype": "auto"}
        return data

    @model_validator(mode="after")
    def _engine_options_match(self) -> ModelConfig:
        if self.decode == "single" and self.engine != "llama_cpp":
            raise ValueError(f"decode: single is a llama_cpp option; engine {self.engine} always batches")
        if self.engine != "vllm":
            # Compared with the defaults, not model_fields_set: overrides revalidate a full dump.
            fields = type(self).model_fields
            given = [k for k in sorted(VLLM_ONLY) if getattr(self, k) != fields[k].default]
            if given:
                raise ValueError(f"{', '.join(given)}: vllm options, but engine is {self.engine}")
        return self


VLLM_ONLY = tagged(ModelConfig, **VLLM)


# The policy is the model whose on-policy samples become the responses.
PolicyConfig = ModelConfig


class ScorerModelConfig(ModelConfig):
    """A model a labeler reads: transformers unless the recipe says otherwise.

    On CPU transformers' prefill is 2-4x llama.cpp's (docs/design.md, Engines). A labeler
    given only part of a model (``model: {model: ...}``) keeps that default.
    """

    engine: Literal["llama_cpp", "transformers", "vllm"] = "transformers"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto",
        description="auto: bf16 where this machine has bf16 kernels, else fp32 (made concrete per run)",
    )
