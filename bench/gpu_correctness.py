"""Part 1 of the GPU check: the scoring core must equal a plain forward pass, and CUDA must equal CPU.

Two controls prove the comparison can fail: a tree mask that lets sibling branches see each other,
and 30% noise in one weight matrix, must both be caught.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench.gpu_kit import (
    TINY,
    TINY_INIT,
    Clock,
    Plan,
    as_lists,
    build_model,
    build_tokenizer,
    filler,
    max_abs_diff,
    mixed_requests,
    option_requests,
    options_diff,
    plain_forward,
    sequences,
)
from steps.engines.transformers_engine import TransformersEngine

# Per-token log-prob agreement. fp32 sums the same products in another order (tree rows and
# cached paths against one causal pass; cuBLAS against the CPU's kernels): rounding only.
TOL_FP32 = 1e-3


# bf16 keeps 8 bits of mantissa: on the tiny model (log-probs spread with a standard deviation
# of about 0.85 nats) bf16 differed from fp32 by at most 0.045 nats on CPU over four seeds and
# two transformers versions (5.17, 5.24). A sibling-visible mask moves scores by nats, 30% noise in one
# matrix by about one nat: both far outside this.
TOL_BF16 = 0.2


class LeakyMaskEngine(TransformersEngine):
    """The control bug: tokens of one row also see earlier tokens of sibling branches.

    A plain causal mask over each packed row is the mistake a tree-attention core is most
    likely to make; the correctness check must catch it or it checks nothing.
    """

    def _forward(
        self, ids: Any, positions: Any, allowed: Any, cache: Any, keep: bool, real: int
    ) -> tuple[Any, Any]:
        import torch

        causal = torch.ones(allowed.shape[-2:], dtype=torch.bool).tril()
        return super()._forward(ids, positions, allowed | causal, cache, keep, real)


@dataclass
class Check:
    name: str
    max_abs_diff: float
    tolerance: float
    # A control passes when the comparison *fails* it: the difference must exceed the tolerance.
    control: bool = False

    @property
    def passed(self) -> bool:
        within = self.max_abs_diff <= self.tolerance
        return not within if self.control else within

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def correctness(plan: Plan, device: str, clock: Clock) -> tuple[list[Check], dict[str, Any]]:
    """The tiny-model checks; ``device`` is where the engine under test runs (CPU in a smoke run)."""
    import torch

    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 on CUDA too (no TF32)
    tokenizer = build_tokenizer(200)
    words = filler(tokenizer)
    torch.manual_seed(0)
    reference = build_model(
        replace(TINY, vocab=len(tokenizer)), tokenizer, "cpu", torch.float32, init_range=TINY_INIT
    )
    requests = mixed_requests(words)
    options = option_requests(words)

    def engine(
        model: Any, layout: tuple[int, int], kind: type[TransformersEngine] = TransformersEngine
    ) -> Any:
        return kind.from_loaded(model, tokenizer, "tiny", batch_tokens=layout[0], row_tokens=layout[1])

    base = engine(reference, plan.layouts[0])
    seqs = sequences(base, requests)
    expected = base.score(requests)
    raw_cpu = plain_forward(reference, seqs)
    spread = statistics.pstdev(v for scores in as_lists(expected) for v in scores)
    details: dict[str, Any] = {
        "requests": len(requests),
        "tokens": sum(len(ids) for ids, _ in seqs),
        "logprob_std": spread,
        "layouts": [list(layout) for layout in plan.layouts],
    }
    checks = [
        Check(
            "reference, CPU fp32: engine.score vs plain forward",
            max(max_abs_diff(engine(reference, lay).score(requests), raw_cpu) for lay in plan.layouts),
            TOL_FP32,
        )
    ]
    on_device = {
        "fp32": copy.deepcopy(reference).to(device=device, dtype=torch.float32),
        "bf16": copy.deepcopy(reference).to(device=device, dtype=torch.bfloat16),
    }
    for label, model in on_device.items():
        tol = TOL_FP32 if label == "fp32" else TOL_BF16
        raw = plain_forward(model, seqs)
        runs = [engine(model, lay).score(requests) for lay in plan.layouts]
        checks.append(
            Check(
                f"{device} {label}: engine.score vs plain forward",
                max(max_abs_diff(s, raw) for s in runs),
                tol,
            )
        )
        checks.append(
            Check(
                f"{device} {label}: engine.score vs CPU fp32 engine",
                max(max_abs_diff(s, as_lists(expected)) for s in runs),
                tol,
            )
        )
    fp32 = engine(on_device["fp32"], plan.layouts[0])
    checks.append(
        Check(
            f"{device} fp32: option_logprobs vs CPU fp32 engine",
            options_diff(fp32.option_logprobs(options), base.option_logprobs(options)),
            TOL_FP32,
        )
    )
    # Controls: the same comparisons must fail on a broken mask and on perturbed weights.
    leaky = engine(on_device["fp32"], plan.layouts[0], LeakyMaskEngine)
    checks.append(
        Check(
            f"control: {device} fp32 with sibling branches visible is caught",
            max_abs_diff(leaky.score(requests), raw_cpu),
            TOL_FP32,
            control=True,
        )
    )
    perturbed = copy.deepcopy(on_device["bf16"])
    with torch.no_grad():
        weight = perturbed.model.layers[0].self_attn.o_proj.weight
        # Drawn on CPU from its own generator: the same perturbation on every device.
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(weight)
        weight.add_(noise * 0.3 * float(weight.float().std()))
    checks.append(
        Check(
            f"control: {device} bf16 with 30% noise in one layer's o_proj is caught",
            max_abs_diff(engine(perturbed, plan.layouts[0]).score(requests), raw_cpu),
            TOL_BF16,
            control=True,
        )
    )
    for check in checks:
        verdict = "ok" if check.passed else "FAILED"
        clock.log(f"correctness: {check.name}: max |Δ log p| {check.max_abs_diff:.2e} ({verdict})")
    return checks, details


def correctness_table(checks: Sequence[Check]) -> str:
    lines = ["| correctness check (tiny Llama) | max abs Δ log p | tolerance | result |", "|---|---|---|---|"]
    for check in checks:
        rule = f"> {check.tolerance:g} (must be caught)" if check.control else f"≤ {check.tolerance:g}"
        result = "pass" if check.passed else "FAIL"
        lines.append(f"| {check.name} | {check.max_abs_diff:.2e} | {rule} | {result} |")
    return "\n".join(lines)
