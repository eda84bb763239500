"""Throughput the GPU recipes' cost estimates are built from (``python -m bench.gpu_rates``).

README's per-10k-prompt costs for ``pipelines/gpu-onpolicy.yaml`` and
``pipelines/ultrafeedback-like.yaml`` need two rates per model size on the card they target:
**decode** tokens/s (the policy sampling answers, a generative judge writing its verdict) and
**prefill** tokens/s (a reward model or a judge reading prompt + answer once). vLLM, which those
recipes run, cannot be installed on the lent GPU machines, so this measures the plain Hugging Face
path at batch sizes a serving engine would use, with randomly initialised bf16 Llamas of the real
shapes (nothing to download). These are floors: vLLM's paged attention and CUDA graphs decode
faster than ``model.generate``, so costs derived from them are upper bounds, and README says so.

Shapes: Llama-3.1-8B (the policy and the reward model) and Qwen2.5-32B (the judge: 64 layers,
hidden 5,120, 152,064-token vocabulary). A random model never samples its end-of-turn token, so
``min_new_tokens`` equals ``max_new_tokens`` and every sequence decodes exactly that many tokens.
A part that runs out of memory halves its batch and tries again; what it settled on is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import gpu
from bench.common import DEFAULT_OUT, Row, format_table, write_json
from bench.gpu import environment, one_thread_if, record_failure
from bench.gpu_kit import (
    Clock,
    Shape,
    batched_forward,
    build_model,
    build_tokenizer,
    filler,
    free_memory,
    sync,
)

NAME = "gpu_rates"
EXIT_OK, EXIT_NO_CUDA, EXIT_ERROR = 0, 3, 4

SHAPES = {
    "8b": gpu.SHAPES["8b"],  # the CUDA check's 8B: one definition of the shape
    "32b": Shape("Qwen2.5-32B shape", 5120, 64, 40, 8, 27648, 152064, False),
}
SMOKE_SHAPES = {
    "8b": Shape("8B stand-in (smoke)", 64, 2, 4, 2, 128, 1024, False),
    "32b": Shape("32B stand-in (smoke)", 96, 3, 4, 2, 192, 1024, False),
}


@dataclass(frozen=True)
class Plan:
    device: str
    filler_words: int
    prompt_tokens: int  # every prompt; one word is one token with the built-in tokenizer
    decode_batch: dict[str, int]  # sequences decoded together, per shape
    decode_tokens: int
    prefill_sequences: int
    prefill_tokens: int  # per sequence: a prompt and an answer, as a reward model reads them
    prefill_batch_tokens: int
    rounds: int


FULL = Plan(
    device="cuda",
    filler_words=4000,
    prompt_tokens=200,
    decode_batch={"8b": 256, "32b": 128},
    decode_tokens=256,
    prefill_sequences=96,
    prefill_tokens=600,
    prefill_batch_tokens=16384,
    rounds=2,
)
SMOKE = replace(
    FULL,
    device="cpu",
    filler_words=300,
    prompt_tokens=8,
    decode_batch={"8b": 4, "32b": 4},
    decode_tokens=4,
    prefill_sequences=4,
    prefill_tokens=16,
    prefill_batch_tokens=64,
    rounds=1,
)


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def _measure(
    size: int, run: Callable[[int], float], plan: Plan, clock: Clock, label: str
) -> tuple[int, list[float]]:
    """Seconds of each timed round at the largest size (from ``size`` down) that fits in memory.

    The first run at a size is never a sample: it pays for kernel selection and the allocator's
    growth (1.8-2.5x slower than the next in the first H200/H100 runs). So each size gets one
    untimed run, which is also where running out of memory shows and halves the size, then at
    least one timed round, more while the budget lasts.
    """
    while True:
        try:
            run(size)
            break
        except RuntimeError as exc:
            if not _is_oom(exc) or size == 1:
                raise
            free_memory(plan.device)
            clock.log(f"{label}: out of memory at {size}; halving")
            size //= 2
    seconds = [run(size)]
    while len(seconds) < plan.rounds and not clock.over(2 / 3):
        seconds.append(run(size))
    return size, seconds


def decode_rate(plan: Plan, key: str, model: Any, tokenizer: Any, clock: Clock) -> dict[str, Any]:
    import random

    import torch

    words = filler(tokenizer)
    rng = random.Random(0)
    device = plan.device

    def run(batch: int) -> float:
        rows = [[rng.choice(words) for _ in range(plan.prompt_tokens)] for _ in range(batch)]
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(row) for row in rows], device=device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=0.8,
                top_p=0.95,
                top_k=0,
                max_new_tokens=plan.decode_tokens,
                min_new_tokens=plan.decode_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        sync(device)
        return time.perf_counter() - start

    label = f"{key} decode"
    batch, seconds = _measure(plan.decode_batch[key], run, plan, clock, label)
    best = min(seconds)
    rate = batch * plan.decode_tokens / best
    clock.log(f"{label}: batch {batch}, {plan.decode_tokens} new tokens: {best:.2f} s, {rate:,.0f} tok/s")
    return {"batch": batch, "new_tokens": plan.decode_tokens, "seconds": seconds, "tokens_per_second": rate}


def prefill_rate(plan: Plan, key: str, model: Any, tokenizer: Any, clock: Clock) -> dict[str, Any]:
    import random

    words = filler(tokenizer)
    rng = random.Random(1)
    start_at = plan.prompt_tokens
    seqs = [
        ([tokenizer.convert_tokens_to_ids(rng.choice(words)) for _ in range(plan.prefill_tokens)], start_at)
        for _ in range(plan.prefill_sequences)
    ]
    tokens = plan.prefill_sequences * plan.prefill_tokens

    def run(batch_tokens: int) -> float:
        sync(plan.device)
        start = time.perf_counter()
        batched_forward(model, seqs, batch_tokens, tokenizer.pad_token_id)
        sync(plan.device)
        return time.perf_counter() - start

    label = f"{key} prefill"
    batch_tokens, seconds = _measure(plan.prefill_batch_tokens, run, plan, clock, label)
    best = min(seconds)
    rate = tokens / best
    clock.log(f"{label}: {tokens:,} tokens in batches of ≤{batch_tokens}: {best:.2f} s, {rate:,.0f} tok/s")
    return {"batch_tokens": batch_tokens, "tokens": tokens, "seconds": seconds, "tokens_per_second": rate}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_rates", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every part at tiny sizes on CPU (seconds)")
    p.add_argument("--shapes", default="8b,32b", help="which shapes, in order (default 8b,32b)")
    p.add_argument(
        "--budget", type=float, default=300.0, help="seconds; later rounds and shapes skip past it"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON (default $OUT, else outputs/bench)"
    )
    args = p.parse_args(argv)
    with one_thread_if(args.cpu_smoke):
        return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    plan = SMOKE if args.cpu_smoke else FULL
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench.gpu_rates needs a CUDA GPU; --cpu-smoke runs it tiny on CPU.", file=sys.stderr)
        return EXIT_NO_CUDA
    shapes = SMOKE_SHAPES if args.cpu_smoke else SHAPES
    wanted = [k.strip() for k in args.shapes.split(",") if k.strip()]
    if unknown := [k for k in wanted if k not in shapes]:
        print(f"unknown shape(s) {unknown}; choose from {sorted(shapes)}", file=sys.stderr)
        return 2
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    clock = Clock(args.budget)
    env = environment(plan.device)
    payload: dict[str, Any] = {
        "name": NAME,
        "cpu_smoke": args.cpu_smoke,
        "environment": env,
        "plan": asdict(plan),
        "shapes": {},
        "errors": [],
        "skipped": [],
    }
    clock.log(f"{env['card']}; torch {env['torch']}, transformers {env['transformers']}")
    tokenizer = build_tokenizer(plan.filler_words)
    rows: list[Row] = []
    for key in wanted:
        shape = shapes[key]
        if clock.over():
            payload["skipped"].append(f"{shape.name}: time budget spent")
            continue
        detail: dict[str, Any] = {"shape": asdict(shape)}
        payload["shapes"][key] = detail
        model = None
        try:
            torch.manual_seed(0)
            built = time.perf_counter()
            model = build_model(shape, tokenizer, plan.device, torch.bfloat16)
            sync(plan.device)
            detail["parameters"] = sum(p.numel() for p in model.parameters())
            detail["init_seconds"] = round(time.perf_counter() - built, 1)
            clock.log(f"{shape.name}: {detail['parameters'] / 1e9:.2f} B parameters")
            for part, fn in (("prefill", prefill_rate), ("decode", decode_rate)):
                if clock.over():
                    payload["skipped"].append(f"{shape.name} {part}: time budget spent")
                    continue
                detail[part] = fn(plan, key, model, tokenizer, clock)
                unit = "tok/s"
                what = (
                    f"batch {detail[part]['batch']} × {plan.decode_tokens} new tokens"
                    if part == "decode"
                    else f"{plan.prefill_sequences} × {plan.prefill_tokens}-token sequences"
                )
                rows.append(
                    Row(
                        NAME,
                        f"{part} tok/s (transformers, bf16)",
                        f"{shape.name}: {what}",
                        detail[part]["tokens_per_second"],
                        None,
                        unit,
                        None,
                    )
                )
            if plan.device.startswith("cuda"):
                detail["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 1)
        except Exception as exc:  # one shape failing (memory) must not lose the other's numbers
            record_failure(payload, shape.name, exc, clock)
        del model
        free_memory(plan.device)
        if plan.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        write_json(out_dir, NAME, payload | {"rows": [r.to_dict() for r in rows]})
    payload["seconds"] = round(clock.elapsed(), 1)
    path = write_json(out_dir, NAME, payload | {"rows": [r.to_dict() for r in rows]})
    print(f"\n**GPU rates** on {env['card']}: torch {env['torch']}, transformers {env['transformers']}\n")
    print(format_table(rows))
    for error in payload["errors"]:
        print(f"\nERROR in {error['part']}: {error['error']}")
    print(f"\nwrote {path}", file=sys.stderr)
    return EXIT_ERROR if payload["errors"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
