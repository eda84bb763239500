"""Which dtype a transformers model runs in when the recipe says ``auto``: what this machine is fast at.

bf16 is several times faster than fp32 on a CPU with bf16 matrix kernels (AVX512-BF16 or AMX:
2.4x in the engine on our AMD EPYC, 3-4x on an AMX Xeon) and several times slower on one
without them, so the choice is made per machine, from what torch reports about the CPU. It is
made once per run, on the machine that prepares it, and written into the recipe the stages
see: resume keys and the card then name the dtype actually used, and a rerun on a machine that
chooses differently recomputes rather than mixing shards of both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the vLLM worker imports steps.engines without pyarrow
    from schemas.recipe import Recipe

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> list[str]:
    """The bf16 matrix-kernel flags torch reports for this CPU (empty when it reports none)."""
    import torch

    report = getattr(torch._C._cpu, "_get_cpu_capability", None)
    flags: dict[str, Any] = report() if callable(report) else {}
    return [flag for flag in BF16_CPU_FLAGS if flags.get(flag)]


def resolve_dtype(engine: str, device: str, dtype: str) -> tuple[str, str | None]:
    """The concrete dtype for a model config, and why (None when nothing was chosen).

    Only transformers resolves ``auto``: vLLM reads it as the checkpoint's dtype, and
    llama.cpp runs the GGUF's own quantisation whatever the recipe says.
    """
    if dtype != "auto" or engine != "transformers":
        return dtype, None
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "CUDA GPU with bf16"
        return "float32", "CUDA GPU without bf16"
    flags = cpu_bf16_flags()
    if flags:
        return "bfloat16", f"CPU with bf16 matrix kernels ({', '.join(flags)})"
    return "float32", "CPU without bf16 matrix kernels (no avx512_bf16 or amx_bf16)"


def resolve_recipe_dtypes(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe with each transformers ``dtype: auto`` made concrete, and one line per choice."""
    notes: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if {"engine", "dtype", "device"} <= node.keys():
                chosen, why = resolve_dtype(node["engine"], node["device"], node["dtype"])
                if why is not None:
                    notes.append(f"{path.rstrip('.')}: dtype auto -> {chosen} ({why})")
                    node = {**node, "dtype": chosen}
            return {key: walk(value, f"{path}{key}.") for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, f"{path}{i}.") for i, value in enumerate(node)]
        return node

    resolved = walk(recipe.model_dump(mode="json"), "")
    from schemas.recipe import Recipe

    return (Recipe.model_validate(resolved) if notes else recipe), notes
