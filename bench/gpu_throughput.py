"""Parts 2 and 3 of the GPU check: scoring and generation throughput against raw transformers calls.

Scoring: ``engine.score`` on a preference-labeling workload against a raw batched
``model(input_ids)`` + log-softmax over the same full sequences, interleaved in the same process;
tokens/s counts the baseline's tokens for both sides. Generation: ``engine.generate`` (n samples
of one prompt per call, as sampling runs it) against one batched ``model.generate``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench.common import Row
from bench.gpu_kit import (
    NAME,
    Clock,
    Plan,
    Shape,
    as_lists,
    batched_forward,
    diff_stats,
    filler,
    preference_requests,
    random_text,
    sequences,
    sync,
)
from steps.engines.base import Failed, SamplingParams
from steps.engines.transformers_engine import TransformersEngine


def _rounds(
    fns: dict[str, Callable[[], Any]], rounds: int, device: str, clock: Clock, label: str
) -> dict[str, list[tuple[float, Any]]]:
    """Interleaved timing (A B C, C B A, …) with a device sync on both ends of every run.

    Rounds after the first are dropped once the run is past two thirds of its budget: the
    check must finish, and one round already gives every number.
    """
    names = list(fns)
    out: dict[str, list[tuple[float, Any]]] = {name: [] for name in names}
    for index in range(rounds):
        if index and clock.over(2 / 3):
            clock.log(f"{label}: time budget: stopping after {index} round(s)")
            break
        for name in names if index % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            value = fns[name]()
            sync(device)
            seconds = time.perf_counter() - start
            out[name].append((seconds, value))
            clock.log(f"{label}: round {index + 1}, {name}: {seconds:.2f} s")
    return out


def _median_speedup(
    ours: list[tuple[float, Any]], baseline: list[tuple[float, Any]], work: Callable[[Any], float]
) -> float:
    return statistics.median(
        (work(a) / ta) / (work(b) / tb) for (ta, a), (tb, b) in zip(ours, baseline, strict=True)
    )


def scoring(
    plan: Plan, shape: Shape, model: Any, tokenizer: Any, clock: Clock
) -> tuple[list[Row], dict[str, Any]]:
    """``engine.score`` at each row size against the raw batched forward, same model, same requests.

    The engine's time includes templating and tokenising the requests (it takes conversations);
    the baseline gets its token ids ready-made, so that cost, measured once, is in the details.
    """
    words = filler(tokenizer)
    requests = preference_requests(plan, words)
    engines = {
        f"engine, row_tokens {rows}": TransformersEngine.from_loaded(
            model, tokenizer, shape.name, batch_tokens=plan.batch_tokens, row_tokens=rows
        )
        for rows in plan.row_tokens
    }
    first = next(iter(engines.values()))
    started = time.perf_counter()
    seqs = sequences(first, requests)
    tokenise_seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids, _ in seqs)

    def counted(engine: TransformersEngine) -> Callable[[], tuple[list[list[float]], int]]:
        def run() -> tuple[list[list[float]], int]:
            before = engine.tokens_processed
            scores = engine.score(requests)
            if any(isinstance(s, Failed) for s in scores):
                raise RuntimeError(f"{shape.name}: the engine failed a scoring request")
            return as_lists(scores), engine.tokens_processed - before

        return run

    def raw() -> tuple[list[list[float]], int]:
        return batched_forward(model, seqs, plan.batch_tokens, first._pad), tokens

    fns: dict[str, Callable[[], Any]] = {name: counted(engine) for name, engine in engines.items()}
    fns["raw forward"] = raw
    clock.log(f"{shape.name}: scoring {len(requests)} requests, {tokens:,} tokens; warm-up")
    warm = {name: fn() for name, fn in fns.items()}  # first calls allocate; their answers are compared
    sync(plan.device)
    diffs = {name: diff_stats(warm[name][0], warm["raw forward"][0]) for name in engines}
    runs = _rounds(fns, plan.scoring_rounds, plan.device, clock, f"{shape.name} scoring")
    base = runs["raw forward"]
    base_tps = tokens * len(base) / sum(t for t, _ in base)
    rows = []
    per_engine: dict[str, Any] = {}
    for name in engines:
        ours = runs[name]
        tps = tokens * len(ours) / sum(t for t, _ in ours)
        through = ours[0][1][1]
        per_engine[name] = {
            "seconds": [t for t, _ in ours],
            "tokens_per_second": tps,
            "tokens_through_network": through,
            "max_abs_diff_logp": diffs[name][0],
            "mean_abs_diff_logp": diffs[name][1],
        }
        rows.append(
            Row(
                NAME,
                f"score tok/s: {name} vs raw batched forward",
                f"{shape.name}: {plan.prompts} prompts × {plan.responses} answers × 2 contexts, "
                f"{tokens:,} tokens",
                tps,
                base_tps,
                "tok/s",
                _median_speedup(ours, base, lambda _: 1.0),
                note=f"{through:,} tokens through the network; Δ log p max {diffs[name][0]:.2g}, "
                f"mean {diffs[name][1]:.1g}",
            )
        )
    details = {
        "requests": len(requests),
        "tokens": tokens,
        "batch_tokens": plan.batch_tokens,
        "tokenise_seconds": tokenise_seconds,
        "raw_seconds": [t for t, _ in base],
        "raw_tokens_per_second": base_tps,
        "engines": per_engine,
    }
    return rows, details


def generation(
    plan: Plan, shape: Shape, model: Any, tokenizer: Any, clock: Clock
) -> tuple[list[Row], dict[str, Any]]:
    """``engine.generate`` as sampling calls it (one prompt, n samples, per ``model.generate``)
    against one ``model.generate`` over every prompt at once: what batching prompts would gain.

    A random model almost never samples its end-of-turn token among 128k, so every sample runs
    to ``max_tokens`` on both sides and the token counts match.
    """
    import torch

    engine = TransformersEngine.from_loaded(model, tokenizer, shape.name, batch_tokens=plan.batch_tokens)
    words = filler(tokenizer)
    rng = random.Random(3)
    conversations = [
        [{"role": "user", "content": random_text(rng, words, plan.prompt_words)}]
        for _ in range(plan.gen_prompts)
    ]
    params = SamplingParams(n=plan.gen_n, temperature=0.8, top_p=0.95, max_tokens=plan.gen_max_tokens)
    seeds = list(range(len(conversations)))
    prompts = [engine.chat.ids(c, True) for c in conversations]
    eos = set(engine._eos)

    def ours() -> int:
        results = engine.generate(conversations, params, seeds)
        return sum(c.num_tokens for r in results if not isinstance(r, Failed) for c in r)

    def batched(max_new_tokens: int = params.max_tokens) -> int:
        # Every prompt has the same number of words, hence of tokens: no padding is needed.
        ids = torch.tensor(prompts, device=engine.device)
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=params.n,
                pad_token_id=engine._pad,
                eos_token_id=sorted(eos),
            )
        count = 0
        for row in out[:, ids.shape[1] :].tolist():
            count += next((k for k, t in enumerate(row) if t in eos), len(row))
        return count

    clock.log(f"{shape.name}: generation warm-up")
    engine.generate(conversations[:1], replace(params, max_tokens=4), seeds[:1])
    batched(4)
    runs = _rounds(
        {"engine.generate": ours, "batched model.generate": batched},
        plan.gen_rounds,
        plan.device,
        clock,
        f"{shape.name} generation",
    )
    mine, base = runs["engine.generate"], runs["batched model.generate"]
    tps = sum(n for _, n in mine) / sum(t for t, _ in mine)
    base_tps = sum(n for _, n in base) / sum(t for t, _ in base)
    row = Row(
        NAME,
        "generate tok/s: engine.generate (a call per prompt) vs one batched model.generate",
        f"{shape.name}: {plan.gen_prompts} prompts × n={plan.gen_n}, ≤{plan.gen_max_tokens} new tokens, "
        f"{len(prompts[0])}-token prompts",
        tps,
        base_tps,
        "tok/s",
        _median_speedup(mine, base, lambda n: float(n)),
    )
    details = {
        "tokens": {"engine": [n for _, n in mine], "batched": [n for _, n in base]},
        "seconds": {"engine": [t for t, _ in mine], "batched": [t for t, _ in base]},
        "tokens_per_second": {"engine": tps, "batched": base_tps},
    }
    return [row], details
