"""The n samples of one prompt decoded together: one prefill, then one batch per step.

On a CPU a llama.cpp step that decodes n tokens costs well under n one-token steps (the
weights are read once per step, not once per token), and the prompt is evaluated once
instead of being looked up again for every sample. Each sample is its own llama.cpp
sequence with its own seeded sampler chain, so sample i draws from the same random
stream whatever the other samples do; the prompt's KV cells are shared by all of them
(``kv_unified``) and cleared before the next prompt, so no prompt sees another's cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steps.engines.base import FinishReason


@dataclass(frozen=True)
class Decoded:
    """One sample's generated token ids (end-of-generation token excluded) and why it ended."""

    tokens: list[int]
    finish_reason: FinishReason


def sampler_chain(temperature: float, top_p: float, seed: int) -> Any:
    """The chain llama-cpp-python builds for the engine's settings, so both decode modes sample alike.

    Its order (top-k, typical, top-p, min-p, then temperature, then the seeded draw) is
    llama-cpp-python's: top-p is cut before the temperature is applied. The repetition
    penalty stage it also adds is left out: the engine runs it at 1.0, where it changes nothing.
    """
    import llama_cpp as lc

    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if temperature < 0.0:
        stages = [lc.llama_sampler_init_dist(seed)]
    elif temperature == 0.0:
        stages = [lc.llama_sampler_init_greedy()]
    else:
        stages = [
            lc.llama_sampler_init_top_k(0),
            lc.llama_sampler_init_typical(1.0, 1),
            lc.llama_sampler_init_top_p(top_p, 1),
            lc.llama_sampler_init_min_p(0.0, 1),
            lc.llama_sampler_init_temp(temperature),
            lc.llama_sampler_init_dist(seed),
        ]
    for stage in stages:
        lc.llama_sampler_chain_add(chain, stage)  # the chain owns and frees its stages
    return chain


class SharedPromptDecoder:
    """A llama.cpp context of its own on an already loaded model (the weights are not loaded again).

    The context is sized for the worst case of the sampling settings it is asked for (the prompt
    stored once plus n full-length answers) and rebuilt only when a call needs more.
    """

    def __init__(self, model: Any, vocab: Any, base_params: Any, n_ctx: int, n_threads: int) -> None:
        import llama_cpp as lc

        self._lc = lc
        self._model = model
        self._vocab = vocab
        self._base_params = base_params
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_batch = min(512, n_ctx)
        self._ctx: Any = None
        self._batch: Any = None
        self._n_seq = 0
        self._cells = 0

    def close(self) -> None:
        """Free the context and batch now, before the model they were made from goes."""
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._lc.llama_free(self._ctx)
            self._ctx = None
        self._n_seq = self._cells = 0

    def _ensure(self, n_seq: int, limit: int) -> None:
        """A context with room for ``n_seq`` sequences of up to ``n_ctx`` positions each."""
        cells = self._n_ctx + (n_seq - 1) * limit
        if self._ctx is not None and n_seq <= self._n_seq and cells <= self._cells:
            return
        self.close()
        lc = self._lc
        params = type(self._base_params).from_buffer_copy(self._base_params)
        params.n_ctx = cells
        params.n_batch = params.n_ubatch = self._n_batch
        params.n_seq_max = n_seq
        params.kv_unified = True  # one cache: the prompt is stored once for every sequence
        # Chosen by measurement, not theory: on 2 cores, bench.sampling gave 1.33x the single
        # stream without flash attention and 1.45-1.47x with it (n=4, 128 tokens).
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = self._n_threads  # n-token steps use the batch count
        ctx = lc.llama_init_from_model(self._model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {cells} cells for {n_seq} sequences")
        self._ctx = ctx
        self._batch = lc.llama_batch_init(max(self._n_batch, n_seq), 0, n_seq)
        self._n_seq, self._cells = n_seq, cells

    def max_sequences(self) -> int:
        """How many sequences one context may hold (llama.cpp's compile-time limit)."""
        return int(self._lc.llama_max_parallel_sequences())

    def decode(
        self, prompt: Sequence[int], seeds: Sequence[int], temperature: float, top_p: float, limit: int
    ) -> list[Decoded]:
        """``len(seeds)`` samples of at most ``limit`` tokens each after ``prompt``, in seed order."""
        n = len(seeds)
        self._ensure(n, limit)
        lc = self._lc
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        last_row = self._prefill(prompt, n)
        chains = [sampler_chain(temperature, top_p, seed) for seed in seeds]
        try:
            return self._steps(chains, len(prompt), last_row, limit)
        finally:
            for chain in chains:
                lc.llama_sampler_free(chain)

    def _prefill(self, prompt: Sequence[int], n: int) -> int:
        """Evaluate the prompt once for all ``n`` sequences; returns the batch row of its last logits."""
        batch = self._batch
        for start in range(0, len(prompt), self._n_batch):
            chunk = prompt[start : start + self._n_batch]
            for row, token in enumerate(chunk):
                batch.token[row] = token
                batch.pos[row] = start + row
                batch.n_seq_id[row] = n
                seq_ids = batch.seq_id[row]
                for seq in range(n):
                    seq_ids[seq] = seq
                batch.logits[row] = 0
            batch.logits[len(chunk) - 1] = start + len(chunk) == len(prompt)
            batch.n_tokens = len(chunk)
            self._run()
        return batch.n_tokens - 1

    def _steps(self, chains: list[Any], n_prompt: int, last_row: int, limit: int) -> list[Decoded]:
        """Sample every live sequence, then decode all their new tokens in one batch, until all end."""
        lc = self._lc
        sample, is_eog = lc.llama_sampler_sample, lc.llama_vocab_is_eog
        ctx, vocab, batch = self._ctx, self._vocab, self._batch
        tokens: list[list[int]] = [[] for _ in chains]
        finish: list[FinishReason] = ["length"] * len(chains)
        rows = dict.fromkeys(range(len(chains)), last_row)  # live sequence -> its logits' batch row
        pos = n_prompt
        while rows:
            live: list[tuple[int, int]] = []
            for seq, row in rows.items():
                token = sample(chains[seq], ctx, row)
                if is_eog(vocab, token):
                    finish[seq] = "stop"
                    continue
                tokens[seq].append(token)
                if len(tokens[seq]) < limit:
                    live.append((seq, token))
            if not live:
                break
            rows = {}
            for row, (seq, token) in enumerate(live):
                batch.token[row] = token
                batch.pos[row] = pos
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = seq
                batch.logits[row] = 1
                rows[seq] = row
            batch.n_tokens = len(live)
            pos += 1
            self._run()
        return [Decoded(t, f) for t, f in zip(tokens, finish, strict=True)]

    def _run(self) -> None:
        status = self._lc.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} (1: no room in the KV cache, <0: error)")
