"""llama.cpp backend: the CPU default for sampling (≈100 tok/s on 2 cores, docs/design.md, Engines)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from schemas.recipe import DecodeMode
from steps.engines.base import (
    Completion,
    Conversation,
    Failed,
    FinishReason,
    OptionRequest,
    SamplingParams,
    ScoreRequest,
    TokenScores,
    common_prefix,
    render_chat,
    sample_seed,
)
from steps.engines.chat import ChatTokens
from steps.engines.llama_batch import Decoded, SharedPromptDecoder
from steps.engines.models import ResolvedModel


class LlamaCppEngine:
    """Samples with pure temperature + top-p: llama.cpp's extra samplers are switched off.

    llama.cpp defaults to top_k=40 and min_p=0.05, which would make the
    "on-policy" samples come from a different distribution than the recipe says.
    """

    engine_name = "llama_cpp"

    def __init__(
        self,
        model: ResolvedModel,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        decode: DecodeMode = "batched",
    ) -> None:
        from llama_cpp import Llama

        self.model_id = model.model_id
        self._resolved = model
        self._n_ctx = n_ctx
        self._n_threads = n_threads or usable_cpus()
        if model.kind == "hub":
            repo, _, filename = model.location.partition(":")
            self._llm = Llama.from_pretrained(repo, filename, n_ctx=n_ctx, verbose=False)
        else:
            self._llm = Llama(model.location, n_ctx=n_ctx, n_threads=self._n_threads, seed=0, verbose=False)
        self._scorer: Any = None
        self.decode = decode
        self._batcher: SharedPromptDecoder | None = None
        self.tokens_processed = 0  # tokens evaluated for scoring (a cached prefix is not evaluated again)
        meta = self._llm.metadata
        self._template = meta.get("tokenizer.chat_template")
        if not self._template:
            raise ValueError(f"{self.model_id} has no chat template in its GGUF metadata")
        self._bos = self._token_text(self._llm.token_bos())
        self._eos = self._token_text(self._llm.token_eos())
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") == "true"
        self.chat = ChatTokens(self._tokenize, self._encode_text, self._is_special, n_ctx)

    def close(self) -> None:
        """Free native memory now; llama.cpp's own finaliser fails at interpreter exit."""
        if self._batcher is not None:  # its context is made from self._llm's model: free it first
            self._batcher.close()
            self._batcher = None
        for llm in (self._llm, self._scorer):
            if llm is not None:
                llm.close()
        self._scorer = None

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _tokenize(self, conversation: Conversation, add_generation_prompt: bool) -> list[int]:
        text = render_chat(
            self._template, conversation, add_generation_prompt, bos_token=self._bos, eos_token=self._eos
        )
        # The template already writes BOS where the model wants it.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _encode_text(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        results: list[list[Completion] | Failed] = []
        for conversation, base_seed in zip(conversations, seeds, strict=True):
            fitted = self.chat.fit(conversation, params)
            if isinstance(fitted, Failed):
                results.append(fitted)
                continue
            prompt = fitted.prompt_ids
            sample_seeds = [sample_seed(base_seed, i) for i in range(params.n)]
            limit = min(params.max_tokens, self._n_ctx - len(prompt))
            if self.decode == "batched":
                samples = self._decode_batched(prompt, sample_seeds, params, limit)
            else:
                samples = self._decode_single(prompt, sample_seeds, params, limit)
            results.append(
                [
                    Completion(
                        text=text,
                        num_tokens=num_tokens,
                        finish_reason=finish_reason,
                        prompt_tokens=len(prompt),
                        seed=seed,
                        prompt_turns_dropped=fitted.turns_dropped,
                    )
                    for (text, num_tokens, finish_reason), seed in zip(samples, sample_seeds, strict=True)
                ]
            )
        return results

    def _decode_batched(
        self, prompt: list[int], seeds: list[int], params: SamplingParams, limit: int
    ) -> list[tuple[str, int, FinishReason]]:
        """All samples of the prompt as sequences of one batch (``steps.engines.llama_batch``)."""
        if self._batcher is None:
            # The raw pointers of the loaded model: a second context on them shares the weights.
            model = self._llm._model
            self._batcher = SharedPromptDecoder(
                model.model, model.vocab, self._llm.context_params, self._n_ctx, self._n_threads
            )
        group = self._batcher.max_sequences()
        decoded: list[Decoded] = []
        for start in range(0, len(seeds), group):  # beyond llama.cpp's sequence limit: one prefill per group
            chunk = seeds[start : start + group]
            decoded += self._batcher.decode(prompt, chunk, params.temperature, params.top_p, limit)
        return [(self.text_of(d.tokens), len(d.tokens), d.finish_reason) for d in decoded]

    def text_of(self, tokens: list[int]) -> str:
        """A sample's text, decoded only once it is complete: one character may span several tokens.

        Bytes that never form a character (a sample cut inside one) are dropped, as
        ``create_completion`` drops them; special tokens are not written, as there.
        """
        return self._llm.detokenize(tokens).decode("utf-8", errors="ignore")

    def _decode_single(
        self, prompt: list[int], seeds: list[int], params: SamplingParams, limit: int
    ) -> list[tuple[str, int, FinishReason]]:
        """One ``create_completion`` per sample: llama-cpp-python's own loop, the reference path."""
        # A fresh cache per conversation makes each prompt's samples independent of
        # which prompt ran before it, so reruns and resumed shards are identical.
        self._llm.reset()
        out: list[tuple[str, int, FinishReason]] = []
        for seed in seeds:
            completion = self._llm.create_completion(
                prompt,
                max_tokens=limit,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                min_p=0.0,
                typical_p=1.0,
                repeat_penalty=1.0,
                seed=seed,
            )
            choice = completion["choices"][0]
            finish: FinishReason = "length" if choice["finish_reason"] == "length" else "stop"
            out.append((choice["text"], int(completion["usage"]["completion_tokens"]), finish))
        return out

    def _scoring_model(self) -> Any:
        """A second instance that keeps logits for every position; sampling does not need them."""
        if self._scorer is None:
            from llama_cpp import Llama

            self._scorer = Llama(
                self._resolved.location,
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                logits_all=True,
                verbose=False,
            )
        return self._scorer

    def _is_special(self, token: int) -> bool:
        return self._llm.detokenize([token], special=False) == b"" and bool(self._token_text(token))

    def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float] | Failed]:
        """Log-probs of each single-token option after the assistant's ``prefill``, at one position.

        Only the last position's logits are read, so this runs on the sampling instance, which
        computes the LM head for the last token of a batch alone; the all-positions instance of
        ``score`` would run the head over every prompt token and hold an n_ctx × vocabulary array.
        """
        import llama_cpp
        import numpy as np

        llm = self._llm
        llm.reset()
        results: list[dict[str, float] | Failed] = []
        for request in requests:
            prepared = self.chat.options(request)
            if isinstance(prepared, Failed):
                results.append(prepared)
                continue
            seq, options = prepared
            self.tokens_processed += _run_after_cache(llm, seq, len(seq) - 1)  # the last token is run
            last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            logits = np.ctypeslib.as_array(last, shape=(1, llm.n_vocab())).astype(np.float64)
            logprobs = _log_softmax(logits)[0]
            results.append({option: float(logprobs[token]) for option, token in options.items()})
        return results

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenScores | Failed]:
        """One request at a time; consecutive requests with the same context reuse its KV cache."""
        import numpy as np

        llm = self._scoring_model()
        llm.reset()
        results: list[TokenScores | Failed] = []
        for request in requests:
            split = self.chat.split(request)
            if isinstance(split, Failed):
                results.append(split)
                continue
            header, content = split
            full = [*header, *content]
            self.tokens_processed += _run_after_cache(llm, full, len(header))  # logits from the header's end
            logits = np.asarray(llm.scores[len(header) - 1 : len(full) - 1], dtype=np.float64)
            logprobs = _log_softmax(logits)[np.arange(len(content)), content]
            results.append(TokenScores(list(content), [float(x) for x in logprobs]))
        return results


def _run_after_cache(llm: Any, tokens: list[int], limit: int) -> int:
    """Evaluate ``tokens``, reusing the still-valid prefix of the KV cache up to ``limit`` tokens.

    llama.cpp truncates the cache past ``n_tokens``; tokens after ``limit`` are always run so
    that their logits are fresh. Returns how many tokens were evaluated.
    """
    keep = min(common_prefix(list(llm.input_ids[: llm.n_tokens]), tokens), limit)
    llm.n_tokens = keep
    llm.eval(tokens[keep:])
    return len(tokens) - keep


def _log_softmax(logits: Any) -> Any:
    """Row-wise log-softmax of a (positions, vocabulary) float64 array."""
    import numpy as np

    top = logits.max(axis=1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a container's
    cpuset, ``taskset``), not every CPU of the machine, whose extra threads would only contend."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
