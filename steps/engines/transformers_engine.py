"""transformers backend: CPU or CUDA; the reference implementation for scoring.

Scoring is the hot path of every model-reading labeler. All requests of one
call are merged into a token trie, so each distinct prefix (a judge's rubric,
a prompt shared by its responses, a response shared by its follow-ups) runs
through the network exactly once; branches are packed into rows with tree
attention, so there is almost no padding either. Only the positions whose
log-probs are needed go through the LM head, so memory does not scale with the
vocabulary times the batch.

The token trie and its row planner are ``steps.engines.token_trie``; reading a GGUF through
transformers (dequantised once, cached) is ``steps.engines.gguf_cache``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from schemas import reasons
from steps.engines.base import (
    Completion,
    Conversation,
    Failed,
    OptionRequest,
    ReadRequest,
    ReadResult,
    SamplingParams,
    ScoreRequest,
    TokenScores,
    sample_seed,
)
from steps.engines.chat import ChatWindow, hf_chat_tokens
from steps.engines.gguf_cache import materialise
from steps.engines.models import ResolvedModel
from steps.engines.token_trie import Item, TokenTrie, plan_rows

# Rows of the LM head + softmax at once: 256 x 49k vocabulary is 50 MB of float32 logits.
_HEAD_ROWS = 256
# Largest trie subtree packed into one row; larger ones are split at their branching points.
# Attention is dense inside a row (masked keys still cost), so rows stay short: on 2 CPU
# cores 512 scored the default labelers 0-25% faster than 1024 (eval_labelers, 16 pairs).
ROW_TOKENS = 512
# A subtree's short root stretch (up to this many tokens) may be repeated in several rows
# rather than run as a cached path of its own (see TransformersEngine._frontier).
_INLINE_TOKENS = 8
# Turns the log-probs read at each trie node into one request's result, once the trie has run.
_Finish = Callable[[dict[int, dict[int, float]]], ReadResult]


class _Tokenized:
    """A request split at token level: the shared prefix and the content tokens to score."""

    __slots__ = ("content", "prefix")

    def __init__(self, prefix: tuple[int, ...], content: list[int]) -> None:
        self.prefix = prefix
        self.content = content


def _eos_ids(*sources: int | list[int] | None) -> list[int]:
    """Every id that ends a turn: Llama 3 and Qwen2.5 list several in generation_config."""
    ids: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(t for t in source if isinstance(t, int))
    return sorted(ids)


@functools.cache
def _cache_keyword(decoder_type: type) -> str:
    """``cache`` on transformers >= 5.x, ``past_key_values`` before: the old name warns on every call now."""
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"


class TransformersEngine(ChatWindow):
    engine_name = "transformers"

    def __init__(
        self,
        model: ResolvedModel,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        batch_tokens: int = 4096,
        row_tokens: int = ROW_TOKENS,
        n_ctx: int = 2048,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # A "Loading weights" bar per model load reads as noise between our per-shard progress lines.
        hf_logging.disable_progress_bar()
        location = materialise(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        loaded = AutoModelForCausalLM.from_pretrained(
            location, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(torch.device(device))
        self._setup(loaded, tokenizer, model.model_id, batch_tokens, row_tokens, n_ctx)

    @classmethod
    def from_loaded(
        cls,
        model: Any,
        tokenizer: Any,
        model_id: str,
        batch_tokens: int = 4096,
        row_tokens: int = ROW_TOKENS,
        n_ctx: int = 2048,
    ) -> TransformersEngine:
        """An engine over a model already in memory, on whatever device and dtype it is in.

        ``bench.gpu`` builds randomly initialised 8B-parameter models directly on the GPU;
        writing them to disk only for ``__init__`` to read them back would cost 16 GB of I/O
        per shape and most of the check's time budget.
        """
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, model_id, batch_tokens, row_tokens, n_ctx)
        return engine

    def _setup(
        self, model: Any, tokenizer: Any, model_id: str, batch_tokens: int, row_tokens: int, n_ctx: int
    ) -> None:
        """Everything after the weights are in place: one path for loaded and handed-in models."""
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.model = model
        self.device = next(model.parameters()).device
        self.model.eval()
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_id} has no chat template in its tokenizer")
        self._special = set(self.tokenizer.all_special_ids)
        self._eos = _eos_ids(self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id)
        if not self._eos:
            raise ValueError(f"{self.model_id} names no end-of-sequence token; generation could not stop")
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else self._eos[0]
        # The recipe's n_ctx caps the window, as it does for llama.cpp; a model with a shorter
        # trained window caps it further (positions past it are untrained).
        trained = getattr(self.model.config, "max_position_embeddings", None)
        self.chat = hf_chat_tokens(self.tokenizer, min(n_ctx, int(trained)) if trained else n_ctx)
        self.batch_tokens = batch_tokens
        self.row_tokens = min(row_tokens, batch_tokens)
        self.tokens_processed = 0  # every token fed through the network; tests read it

    # ------------------------------------------------------------ tokenisation

    def _split(self, request: ScoreRequest) -> _Tokenized | Failed:
        split = self.chat.split(request)
        return split if isinstance(split, Failed) else _Tokenized(*split)

    # ------------------------------------------------------------ scoring
    #
    # All requests of a call go into one token trie, so every shared prefix (a
    # judge's rubric, a prompt shared by its responses, a response shared by its
    # follow-ups) runs once. The trie is run top-down: a subtree of at most
    # ``row_tokens`` nodes is one row, packed without padding between its
    # branches (tree attention: each token sees its ancestors only, at its own
    # depth as position); rows of similar size run as one batch on a copy of
    # the cached path above them. A larger subtree extends that cached path
    # down to its next branching point instead, and its children go the same way.

    def _forward(
        self, ids: Any, positions: Any, allowed: Any, cache: Any, keep: bool, real: int
    ) -> tuple[Any, Any]:
        """Hidden states of ``ids`` after ``cache``; ``allowed[b, i, j]``: token i of row b sees new token j.

        Every token sees the whole cache. The mask is additive (0 or the dtype's
        minimum), which every attention implementation reads the same way.
        """
        import torch

        cached = 0 if cache is None else cache.get_seq_length()
        rows, width = ids.shape
        mask = torch.zeros((rows, 1, width, cached + width), dtype=self.model.dtype)
        mask[:, 0, :, cached:].masked_fill_(~allowed, torch.finfo(self.model.dtype).min)
        self.tokens_processed += real
        decoder = self.model.get_decoder()
        name = _cache_keyword(type(decoder))
        out = decoder(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=keep,
            **{name: cache},
        )
        return out.last_hidden_state, getattr(out, name) if keep else None

    def _read(
        self, trie: TokenTrie, hidden: Any, where: list[tuple[int, int, int]], out: dict[int, Any]
    ) -> None:
        """Log-probs of each node's read tokens, the LM head and softmax run on those rows only."""
        import torch

        for start in range(0, len(where), _HEAD_ROWS):
            chunk = where[start : start + _HEAD_ROWS]
            states = hidden[[b for b, _, _ in chunk], [j for _, j, _ in chunk]]
            logprobs = torch.log_softmax(self.model.get_output_embeddings()(states).float(), dim=-1)
            rows, cols, owners = [], [], []
            for row, (_, _, node) in enumerate(chunk):
                for token in trie.reads[node]:
                    rows.append(row)
                    cols.append(token)
                    owners.append((node, token))
            for (node, token), value in zip(owners, logprobs[rows, cols].tolist(), strict=True):
                out.setdefault(node, {})[token] = value

    def _run_rows(self, trie: TokenTrie, packed: list[list[Item]], cache: Any, out: dict[int, Any]) -> None:
        """One forward pass over rows of packed subtrees, each token seeing its own ancestors only."""
        import numpy as np
        import torch

        rows = []
        for items in packed:
            nodes: list[int] = []
            seen: set[int] = set()
            for above, root in items:
                nodes += [n for n in above if n not in seen]  # branches of one stretch share it
                seen.update(above)
                nodes += trie.subtree(root)
            rows.append(nodes)
        width = max(len(nodes) for nodes in rows)
        ids = np.full((len(rows), width), self._pad, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        allowed = np.zeros((len(rows), width, width), dtype=bool)
        where = []
        for b, nodes in enumerate(rows):
            local = {node: j for j, node in enumerate(nodes)}
            ids[b, : len(nodes)] = [trie.token[n] for n in nodes]
            positions[b, : len(nodes)] = [trie.depth[n] for n in nodes]
            for j, node in enumerate(nodes):
                parent = local.get(trie.parent[node])
                if parent is not None:  # a subtree's root has its whole past in the cache
                    allowed[b, j] = allowed[b, parent]
                allowed[b, j, j] = True
                if node in trie.reads:
                    where.append((b, j, node))
            for j in range(len(nodes), width):
                allowed[b, j, j] = True  # padding sees itself only and is seen by nothing
        batch_cache = None
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            if len(rows) > 1:
                batch_cache.batch_repeat_interleave(len(rows))
        real = sum(len(nodes) for nodes in rows)
        tensors = (torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(allowed))
        hidden, _ = self._forward(*tensors, batch_cache, False, real)
        self._read(trie, hidden, where, out)

    def _run_path(self, trie: TokenTrie, path: list[int], cache: Any, out: dict[int, Any]) -> Any:
        """Run one unbranched stretch of the trie on top of ``cache``; returns the cache grown by it."""
        import torch

        ids = torch.tensor([[trie.token[n] for n in path]])
        positions = torch.tensor([[trie.depth[n] for n in path]])
        allowed = torch.ones((len(path), len(path)), dtype=torch.bool).tril()[None]
        hidden, grown = self._forward(ids, positions, allowed, cache, True, len(path))
        self._read(trie, hidden, [(0, j, n) for j, n in enumerate(path) if n in trie.reads], out)
        return grown

    def _frontier(self, trie: TokenTrie, node: int) -> tuple[list[Item], list[Item]]:
        """What to run below ``node`` (whose path is cached): subtrees for rows, and larger ones.

        A subtree too large for a row whose root stretch branches within
        ``_INLINE_TOKENS`` tokens is not run as a cached path of its own (a pass
        for a token or two, and its few branches batched alone): its branches
        join the rows here, each carrying a copy of that short stretch. Judge
        prompts branch like this on the first characters of their nonce.
        """
        items: list[Item] = []
        big: list[Item] = []
        pending: list[Item] = [((), kid) for kid in trie.children[node].values()]
        while pending:
            above, root = pending.pop()
            if len(above) + trie.size[root] <= self.row_tokens:
                items.append((above, root))
                continue
            stretch = [*above, root]
            while len(stretch) <= _INLINE_TOKENS and (child := trie.only_child(stretch[-1])) is not None:
                stretch.append(child)
            if len(stretch) <= _INLINE_TOKENS and trie.children[stretch[-1]]:
                pending += [(tuple(stretch), kid) for kid in trie.children[stretch[-1]].values()]
            else:
                big.append((above, root))
        return items, big

    def _run(self, trie: TokenTrie) -> dict[int, dict[int, float]]:
        """Every node once; returns the log-probs read at each node that has reads."""
        import torch

        trie.seal()
        out: dict[int, dict[int, float]] = {}
        cache: Any = None
        todo: list[tuple[str, Any]] = [("expand", 0)]
        with torch.inference_mode():
            while todo:
                step, arg = todo.pop()
                if step == "drop":  # back up to the cached path of the parent subtree
                    if cache.get_seq_length() == arg:
                        cache = None
                    else:
                        cache.crop(-arg)
                    continue
                if step == "path":
                    above, root = arg
                    path = [*above, root]
                    while len(path) < self.row_tokens and (child := trie.only_child(path[-1])) is not None:
                        path.append(child)
                    cache = self._run_path(trie, path, cache, out)
                    todo += [("drop", len(path)), ("expand", path[-1])]
                    continue
                items, big = self._frontier(trie, arg)
                if items:
                    cached = 0 if cache is None else cache.get_seq_length()
                    sizes = {i: len(above) + trie.size[root] for i, (above, root) in enumerate(items)}
                    for batch in plan_rows(sizes, cached, self.row_tokens, self.batch_tokens):
                        self._run_rows(trie, [[items[i] for i in row] for row in batch], cache, out)
                todo += [("path", item) for item in reversed(big)]
        return out

    def read_mixed(self, requests: Sequence[ReadRequest]) -> list[ReadResult]:
        """Scores and option log-probs for a mix of requests, all in one trie: shared prefixes run once.

        A continuation's tokens are read from the node before each of them; an option request's
        options from the node ending its prefill. Each option must add exactly one token to the
        prefill; otherwise the request fails (a multi-token option has no single probability to read).
        """
        trie = TokenTrie()
        planned: list[tuple[int, _Finish]] = []
        results: list[ReadResult] = [Failed(reasons.INTERNAL, "request not read")] * len(requests)
        for i, request in enumerate(requests):
            if isinstance(request, ScoreRequest):
                plan = self._plan_score(trie, request)
            else:
                plan = self._plan_options(trie, request)
            if isinstance(plan, Failed):
                results[i] = plan
            else:
                planned.append((i, plan))
        read = self._run(trie) if planned else {}
        for i, finish in planned:
            results[i] = finish(read)
        return results

    def _plan_score(self, trie: TokenTrie, request: ScoreRequest) -> _Finish | Failed:
        split = self._split(request)
        if isinstance(split, Failed):
            return split
        if not split.prefix:  # the first token has no state to be predicted from
            return Failed(reasons.NO_CONTEXT, "the chat template puts nothing before the continuation")
        nodes = trie.add(split.content, trie.end_of(split.prefix))
        for node in nodes:
            trie.read(trie.parent[node], trie.token[node])
        content = list(split.content)
        return lambda read: TokenScores(content, [read[trie.parent[n]][trie.token[n]] for n in nodes])

    def _plan_options(self, trie: TokenTrie, request: OptionRequest) -> _Finish | Failed:
        prepared = self.chat.options(request)
        if isinstance(prepared, Failed):
            return prepared
        seq, options = prepared
        last = trie.end_of(tuple(seq))
        for token in options.values():
            trie.read(last, token)
        return lambda read: {option: read[last][token] for option, token in options.items()}

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenScores | Failed]:
        return self.read_mixed(requests)  # type: ignore[return-value]  # score requests read as TokenScores

    def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float] | Failed]:
        """Next-token log-probs of each option after the assistant's ``prefill``, shared prefixes run once."""
        return self.read_mixed(requests)  # type: ignore[return-value]  # option requests read as dicts

    # ------------------------------------------------------------ sampling

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        import torch

        results: list[list[Completion] | Failed] = []
        for conversation, base_seed in zip(conversations, seeds, strict=True):
            fitted = self.chat.fit(conversation, params)
            if isinstance(fitted, Failed):
                results.append(fitted)
                continue
            prompt = fitted.prompt_ids
            seed = sample_seed(base_seed, 0)
            torch.manual_seed(seed)
            input_ids = torch.tensor([prompt], device=self.device)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=0,
                    max_new_tokens=min(params.max_tokens, self.n_ctx - len(prompt)),
                    num_return_sequences=params.n,
                    pad_token_id=self._pad,
                    eos_token_id=self._eos,
                )
            self.tokens_processed += len(prompt) * params.n + int(out.shape[1] - len(prompt)) * params.n
            completions: list[Completion] = []
            for row in out[:, len(prompt) :].tolist():
                ids, finish = [], "length"
                for token in row:
                    if token in self._eos:
                        finish = "stop"
                        break
                    ids.append(token)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                # All n share one torch generator seeded once: record the seed actually used.
                dropped = fitted.turns_dropped
                completions.append(Completion(text, len(ids), finish, len(prompt), seed, dropped))
            results.append(completions)
        return results
