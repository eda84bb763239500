"""Sampling: the pipeline's sampling stage against a plain llama.cpp chat-completion loop, and
the llama.cpp engine's two decode modes against each other.

Ours is ``steps.sampling.sample_table`` with the llama.cpp engine the default recipe loads. The
first row compares it, in ``decode: single`` (one ``create_completion`` per sample), with what a
user writes with llama-cpp-python alone: ``create_chat_completion`` n times per prompt, with the
same model file, context, threads, sampling parameters and per-sample seeds. Both decode one
sequence at a time, so the row measures the pipeline's overhead and can compare texts.

The stretch row measures the engine's default, ``decode: batched`` (the n samples of a prompt
decoded together as llama.cpp sequences sharing the prompt's KV cache,
``steps.engines.llama_batch``), against ``decode: single``: same run, same prompts and seeds,
both through ``sample_table``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from bench.common import Row, finish, interleave, log, median_ratio, parser, total_seconds
from schemas import columns
from schemas.recipe import DecodeMode, ModelConfig, Recipe, SamplingConfig
from steps.engines import Engine, derive_seed, load_engine, resolve_model, sample_seed
from steps.prompts.normalise import load_prompts
from steps.sampling import sample_table, sampling_params

NAME = "sampling"
STRETCH_TARGET = 1.4  # batched over single-stream tokens/s at n=4 on 2 cores (issue 15)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from llama_cpp import Llama
    from llama_cpp import __version__ as llama_cpp_version

    started = time.perf_counter()
    threads = args.threads or os.cpu_count() or 1
    n_prompts = args.prompts or (1 if args.quick else 4)
    n = 2 if args.quick else 4
    max_tokens = 8 if args.quick else 128
    rounds = args.rounds or (1 if args.quick else 3)
    recipe = Recipe(
        name="bench-sampling",
        limit=n_prompts,
        policy=ModelConfig(n_ctx=2048, n_threads=threads),
        sampling=SamplingConfig(n=n, max_tokens=max_tokens),
    )
    params = sampling_params(recipe)
    prompts, _ = load_prompts(recipe.prompts, recipe.limit)
    conversations = prompts.column(columns.MESSAGES).to_pylist()
    seeds = [derive_seed(recipe.sampling.seed, pid) for pid in prompts.column(columns.PROMPT_ID).to_pylist()]
    model = resolve_model(recipe.policy.model, recipe.policy.engine)
    log(f"sampling: {n_prompts} prompts × {n}, ≤{max_tokens} tokens, {threads} threads, {model.location}")

    def policy(decode: DecodeMode) -> ModelConfig:
        return recipe.policy.model_copy(update={"decode": decode})

    engines: dict[DecodeMode, Engine] = {mode: load_engine(policy(mode)) for mode in ("single", "batched")}
    plain = Llama(model.location, n_ctx=recipe.policy.n_ctx, n_threads=threads, seed=0, verbose=False)

    def through_pipeline(decode: DecodeMode) -> tuple[list[str], int]:
        table, stats = sample_table(prompts, engines[decode], params, recipe.sampling.seed)
        return table.column(columns.TEXT).to_pylist(), int(stats.counts["tokens"])

    def plain_loop(limit: int | None = None) -> tuple[list[str], int]:
        texts, tokens = [], 0
        for conversation, base in zip(conversations[:limit], seeds[:limit], strict=True):
            for i in range(n if limit is None else 1):
                out = plain.create_chat_completion(
                    messages=conversation,
                    max_tokens=max_tokens if limit is None else 4,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=0,
                    min_p=0.0,
                    typical_p=1.0,
                    repeat_penalty=1.0,
                    seed=sample_seed(base, i),
                )
                texts.append(out["choices"][0]["message"]["content"] or "")
                tokens += int(out["usage"]["completion_tokens"])
        return texts, tokens

    # Warm-up outside the clock: first calls allocate buffers and page the weights in.
    from dataclasses import replace

    for engine in engines.values():
        sample_table(prompts.slice(0, 1), engine, replace(params, max_tokens=4), 1)
    plain_loop(limit=1)

    runs = interleave(
        {
            "single": lambda: through_pipeline("single"),
            "plain": plain_loop,
            "batched": lambda: through_pipeline("batched"),
        },
        rounds,
    )

    def tokens_of(value: tuple[list[str], int]) -> float:
        return float(value[1])

    tok = {name: sum(r.value[1] for r in rs) for name, rs in runs.items()}
    sec = {name: total_seconds(rs) for name, rs in runs.items()}
    rate = {name: tok[name] / sec[name] for name in runs}
    ours_texts, plain_texts = runs["single"][0].value[0], runs["plain"][0].value[0]
    same_text = sum(a.strip() == b.strip() for a, b in zip(ours_texts, plain_texts, strict=True))
    batched_texts = runs["batched"][0].value[0]
    # Reproducible per mode: the batched texts of every round must equal its first round's.
    batched_stable = all(r.value[0] == batched_texts for r in runs["batched"])
    workload = f"{n_prompts} prompts × {n}, ≤{max_tokens} tokens, {threads} threads"
    rows = [
        Row(
            NAME,
            "tokens/s, sample_table (decode: single) vs plain create_chat_completion loop",
            workload,
            rate["single"],
            rate["plain"],
            "tok/s",
            median_ratio(runs["single"], runs["plain"], tokens_of),
            target=0.95,
            note=f"pipeline overhead, both one sequence at a time; same seeds; {same_text}/{len(ours_texts)} "
            f"texts identical; median of {rounds} rounds",
        ),
        Row(
            NAME,
            f"stretch: decode batched ({n} sequences sharing the prompt's KV cache, the default) vs single",
            workload,
            rate["batched"],
            rate["single"],
            "tok/s",
            median_ratio(runs["batched"], runs["single"], tokens_of),
            target=STRETCH_TARGET,
            note=f"both sample_table on the engine; batched texts {'equal' if batched_stable else 'DIFFER'} "
            "across rounds",
        ),
    ]
    details = {
        "model_path": model.location,
        "model_id": model.model_id,
        "prompts": n_prompts,
        "n": n,
        "max_tokens": max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "n_ctx": recipe.policy.n_ctx,
        "threads": threads,
        "rounds": rounds,
        "tokens": tok,
        "seconds": {name: [r.seconds for r in rs] for name, rs in runs.items()},
        "tokens_per_second": rate,
        "identical_texts_ours_vs_plain": same_text,
        "batched_texts_stable_across_rounds": batched_stable,
        "texts": len(ours_texts),
        "llama_cpp_python": llama_cpp_version,
    }
    return finish(NAME, args, rows, details, started)


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--prompts", type=int, help="built-in prompts to sample (default 8; --quick 1)")
    p.add_argument("--threads", type=int, help="threads for every contender (default: all cores)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per contender (default 3; --quick 1)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
