"""Sampling overhead: the pipeline's sampling stage against a plain llama.cpp chat-completion loop.

Ours is ``steps.sampling.sample_table`` with the llama.cpp engine the default recipe loads;
the baseline is what a user writes with llama-cpp-python alone: ``create_chat_completion``
n times per prompt, with the same model file, context, threads, sampling parameters and
per-sample seeds (so the texts can be compared too). Both decode one sequence at a time.

The stretch row measures what the hardware would give if the n samples of a prompt were
decoded together as llama.cpp sequences sharing the prompt's KV cache (one batch of n
tokens per step instead of n single-token steps). That decoder lives here, in the bench,
written against llama.cpp's C API; it is a measurement of headroom, not pipeline code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import Row, finish, interleave, log, median_ratio, parser, total_seconds
from schemas import columns as c
from schemas.recipe import ModelConfig, Recipe, SamplingConfig
from steps.engines import derive_seed, load_engine, resolve_model, sample_seed
from steps.engines.base import render_chat
from steps.prompts import load_prompts
from steps.sampling import sample_table, sampling_params

NAME = "sampling"


class MultiSequenceSampler:
    """n samples per prompt decoded together: the prompt is evaluated once into a KV cache shared
    by n sequences, then every step decodes one token for each unfinished sequence in one batch.

    The sampler chain per sequence is the one llama-cpp-python builds for the engine's settings
    (top-k off, typical off, top-p, min-p off, temperature, then a seeded draw), so only the
    batching differs from the single-stream engine.
    """

    def __init__(self, model_path: str, n_ctx: int, n_threads: int, n_seq: int) -> None:
        import llama_cpp as L
        from llama_cpp import Llama

        self.L = L
        # Tokenising and detokenising through the high-level object keeps the prompt tokens
        # identical to what the engine feeds llama.cpp.
        self.text = Llama(model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=False, vocab_only=True)
        # (Creating it with verbose=False also quiets llama.cpp's log for the raw context below.)
        self.model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = 512
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = True  # one cache the sequences share, so the prompt is stored once
        self.ctx = L.llama_init_from_model(self.model, params)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.batch = L.llama_batch_init(512, 0, n_seq)
        meta = self.text.metadata
        self.template = meta["tokenizer.chat_template"]
        self.bos = self.text.detokenize([self.text.token_bos()], special=True).decode(errors="replace")
        self.eos = self.text.detokenize([self.text.token_eos()], special=True).decode(errors="replace")

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
        self.text.close()

    def _add(self, token: int, pos: int, seqs: Sequence[int], logits: bool) -> None:
        b = self.batch
        i = b.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, len(seqs)
        for j, seq in enumerate(seqs):
            b.seq_id[i][j] = seq
        b.logits[i] = logits
        b.n_tokens += 1

    def _decode(self) -> None:
        if self.L.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _chain(self, temperature: float, top_p: float, seed: int) -> Any:
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        for sampler in (
            L.llama_sampler_init_top_k(0),
            L.llama_sampler_init_typical(1.0, 1),
            L.llama_sampler_init_top_p(top_p, 1),
            L.llama_sampler_init_min_p(0.0, 1),
            L.llama_sampler_init_temp(temperature),
            L.llama_sampler_init_dist(seed),
        ):
            L.llama_sampler_chain_add(chain, sampler)
        return chain

    def generate(
        self, conversation: Sequence[dict[str, str]], n: int, temperature: float, top_p: float,
        max_tokens: int, base_seed: int,
    ) -> list[list[int]]:  # fmt: skip
        L = self.L
        text = render_chat(self.template, conversation, True, bos_token=self.bos, eos_token=self.eos)
        prompt = self.text.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        everyone = list(range(n))
        for start in range(0, len(prompt), 512):
            self.batch.n_tokens = 0
            chunk = prompt[start : start + 512]
            for offset, token in enumerate(chunk):
                pos = start + offset
                self._add(token, pos, everyone, pos == len(prompt) - 1)
            self._decode()
        chains = [self._chain(temperature, top_p, sample_seed(base_seed, i)) for i in range(n)]
        index = dict.fromkeys(everyone, self.batch.n_tokens - 1)
        out: list[list[int]] = [[] for _ in range(n)]
        active, pos = everyone, len(prompt)
        limit = min(max_tokens, self.n_ctx - len(prompt))
        try:
            for _ in range(limit):
                chosen = {}
                for seq in active:
                    token = L.llama_sampler_sample(chains[seq], self.ctx, index[seq])
                    if not L.llama_vocab_is_eog(self.vocab, token):
                        out[seq].append(token)
                        chosen[seq] = token
                active = [seq for seq in active if seq in chosen and len(out[seq]) < limit]
                if not active:
                    break
                self.batch.n_tokens = 0
                for row, seq in enumerate(active):
                    self._add(chosen[seq], pos, [seq], True)
                    index[seq] = row
                pos += 1
                self._decode()
        finally:
            for chain in chains:
                L.llama_sampler_free(chain)
        return out

    def detokenize(self, tokens: list[int]) -> str:
        return self.text.detokenize(tokens).decode("utf-8", errors="replace")


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
    conversations = prompts.column(c.MESSAGES).to_pylist()
    seeds = [derive_seed(recipe.sampling.seed, pid) for pid in prompts.column(c.PROMPT_ID).to_pylist()]
    model = resolve_model(recipe.policy.model, recipe.policy.engine)
    log(f"sampling: {n_prompts} prompts × {n}, ≤{max_tokens} tokens, {threads} threads, {model.location}")

    engine = load_engine(recipe.policy)
    plain = Llama(model.location, n_ctx=recipe.policy.n_ctx, n_threads=threads, seed=0, verbose=False)
    multi = MultiSequenceSampler(model.location, recipe.policy.n_ctx, threads, n)

    def ours() -> tuple[list[str], int]:
        table, stats = sample_table(prompts, engine, params, recipe.sampling.seed)
        return table.column(c.TEXT).to_pylist(), int(stats.counts["tokens"])

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

    def batched(limit: int | None = None) -> tuple[list[str], int]:
        texts, tokens = [], 0
        for conversation, base in zip(conversations[:limit], seeds[:limit], strict=True):
            samples = multi.generate(
                conversation, n, params.temperature, params.top_p, max_tokens if limit is None else 4, base
            )
            texts += [multi.detokenize(s) for s in samples]
            tokens += sum(len(s) for s in samples)
        return texts, tokens

    # Warm-up outside the clock: first calls allocate buffers and page the weights in.
    from dataclasses import replace

    sample_table(prompts.slice(0, 1), engine, replace(params, n=1, max_tokens=4), 1)
    plain_loop(limit=1)
    batched(limit=1)

    runs = interleave({"ours": ours, "plain": plain_loop, "multi": batched}, rounds)
    multi.close()

    def tokens_of(value: tuple[list[str], int]) -> float:
        return float(value[1])

    tok = {name: sum(r.value[1] for r in rs) for name, rs in runs.items()}
    sec = {name: total_seconds(rs) for name, rs in runs.items()}
    rate = {name: tok[name] / sec[name] for name in runs}
    ours_texts, plain_texts = runs["ours"][0].value[0], runs["plain"][0].value[0]
    same_text = sum(a.strip() == b.strip() for a, b in zip(ours_texts, plain_texts, strict=True))
    workload = f"{n_prompts} prompts × {n}, ≤{max_tokens} tokens, {threads} threads"
    rows = [
        Row(
            NAME,
            "tokens/s, sample_table vs plain create_chat_completion loop",
            workload,
            rate["ours"],
            rate["plain"],
            "tok/s",
            median_ratio(runs["ours"], runs["plain"], tokens_of),
            target=0.95,
            note=f"same seeds; {same_text}/{len(ours_texts)} texts identical; median of {rounds} rounds",
        ),
        Row(
            NAME,
            "stretch: n sequences sharing the prompt KV vs our single stream",
            workload,
            rate["multi"],
            rate["ours"],
            "tok/s",
            median_ratio(runs["multi"], runs["ours"], tokens_of),
            target=1.5,
            note="bench-side llama.cpp batch decoder; ours = baseline column",
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
