"""transformers backend: CPU or CUDA; the reference implementation for scoring.

Scoring is the hot path of every model-reading labeler, so it is batched:
requests that share a context (a response and its follow-ups, one judge prompt
and its options) run the shared prefix once and reuse its KV cache; the rest are
packed by length with right padding and an attention mask. Only the positions
whose log-probs are needed go through the LM head, so memory does not scale
with the vocabulary times the batch.

Loading a GGUF through transformers dequantises it (15–20 s for the default
model on 2 cores), so the converted weights are saved once under the cache
directory and later loads read the safetensors copy.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steps.engines.base import (
    Completion,
    Conversation,
    Failed,
    OptionRequest,
    SamplingParams,
    ScoreRequest,
    TokenScores,
    common_prefix,
    sample_seed,
)
from steps.engines.context import fit_prompt
from steps.engines.models import ResolvedModel


def cache_dir() -> Path:
    return Path(os.environ.get("PREFSMITH_CACHE", Path.home() / ".cache" / "prefsmith"))


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def materialise(model: ResolvedModel) -> str:
    """A directory or hub id ``from_pretrained`` can read; GGUFs are converted once and cached."""
    if model.kind != "gguf":
        return model.location
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"{Path(model.location).stem}-{_gguf_cache_key(model.path)}"
    target = cache_dir() / "converted" / name
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return str(target)
    folder, filename = str(model.path.parent), model.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype="float32")
    # The loaded weights are already dequantised, but transformers still flags the
    # model as GGUF-quantised and refuses to save it: copy them into a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    weights = AutoModelForCausalLM.from_config(config, dtype="float32")
    weights.load_state_dict(loaded.state_dict())
    weights.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    weights.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if target.exists():  # another process won the race; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return str(target)


class _Tokenized:
    """A request split at token level: the shared prefix and the content tokens to score."""

    __slots__ = ("content", "prefix")

    def __init__(self, prefix: tuple[int, ...], content: list[int]) -> None:
        self.prefix = prefix
        self.content = content


class TransformersEngine:
    engine_name = "transformers"

    def __init__(
        self,
        model: ResolvedModel,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        batch_tokens: int = 4096,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model.model_id
        location = materialise(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            location, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_id} has no chat template in its tokenizer")
        self._special = set(self.tokenizer.all_special_ids)
        eos = {self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id}
        self._eos = sorted(t for t in eos if isinstance(t, int))
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else self._eos[0]
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.batch_tokens = batch_tokens
        self.tokens_processed = 0  # every token fed through the network; tests read it
        self._headers: dict[tuple[Any, ...], tuple[int, ...]] = {}

    # ------------------------------------------------------------ tokenisation

    def _ids(self, conversation: Conversation, add_generation_prompt: bool) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if not isinstance(ids, list):  # newer versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _header(self, context: Conversation, role: str) -> tuple[int, ...]:
        """Tokens of the context plus the next turn's role header, found from token ids.

        Two different one-word turns share exactly the header, so their common
        token prefix is it; no string is ever split.
        """
        key = (tuple((m["role"], m["content"]) for m in context), role)
        if key not in self._headers:
            a = self._ids([*context, {"role": role, "content": "x"}], False)
            b = self._ids([*context, {"role": role, "content": "y"}], False)
            self._headers[key] = tuple(a[: common_prefix(a, b)])
        return self._headers[key]

    def _split(self, request: ScoreRequest) -> _Tokenized | Failed:
        header = self._header(request.context, request.role)
        full = self._ids([*request.context, {"role": request.role, "content": request.continuation}], False)
        if tuple(full[: len(header)]) != header:
            return Failed("template_boundary", "chat template changes earlier tokens when a turn is added")
        content = []
        for token in full[len(header) :]:
            if token in self._special:  # the end-of-turn marker the template appends
                break
            content.append(token)
        if len(header) + len(content) > self.n_ctx:
            return Failed("too_long", f"{len(header) + len(content)} tokens exceed context {self.n_ctx}")
        if not content:
            return Failed("empty_continuation", "nothing to score")
        return _Tokenized(header, content)

    # ------------------------------------------------------------ scoring

    def _hidden(self, input_ids: Any, attention_mask: Any, **kwargs: Any) -> Any:
        self.tokens_processed += int(attention_mask[:, -input_ids.shape[1] :].sum())
        return self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _logprobs_at(self, hidden: Any, targets: Any) -> Any:
        """Log-probs of ``targets`` from the hidden states that predict them (LM head on those rows only)."""
        import torch

        logits = self.model.get_output_embeddings()(hidden).float()
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenScores | Failed]:
        results: list[TokenScores | Failed | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, _Tokenized]]] = {}
        for i, request in enumerate(requests):
            split = self._split(request)
            if isinstance(split, Failed):
                results[i] = split
            else:
                groups.setdefault(split.prefix, []).append((i, split))
        singles = [item for group in groups.values() if len(group) == 1 for item in group]
        for prefix, group in groups.items():
            if len(group) > 1:
                for i, scores in zip((i for i, _ in group), self._score_shared(prefix, group), strict=True):
                    results[i] = scores
        for i, scores in self._score_packed(singles):
            results[i] = scores
        return [r if r is not None else Failed("internal", "request not scored") for r in results]

    def _batches(
        self, items: list[tuple[int, _Tokenized]], length: Any
    ) -> list[list[tuple[int, _Tokenized]]]:
        """Length-sorted batches whose padded size stays within the token budget."""
        ordered = sorted(items, key=lambda item: length(item[1]))
        batches: list[list[tuple[int, _Tokenized]]] = []
        for item in ordered:
            if batches:
                current = batches[-1]
                if length(item[1]) * (len(current) + 1) <= self.batch_tokens:
                    current.append(item)
                    continue
            batches.append([item])
        return batches

    def _score_packed(self, items: list[tuple[int, _Tokenized]]) -> list[tuple[int, TokenScores]]:
        import torch

        out = []
        for batch in self._batches(items, lambda t: len(t.prefix) + len(t.content)):
            seqs = [list(t.prefix) + t.content for _, t in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            with torch.inference_mode():
                hidden = self._hidden(ids.to(self.device), mask.to(self.device)).last_hidden_state
                rows, cols, targets = [], [], []
                for row, (_, t) in enumerate(batch):
                    start = len(t.prefix)
                    rows += [row] * len(t.content)
                    cols += list(range(start - 1, start + len(t.content) - 1))
                    targets += t.content
                picked = self._logprobs_at(hidden[rows, cols], torch.tensor(targets, device=self.device))
            offset = 0
            for i, t in batch:
                values = picked[offset : offset + len(t.content)].tolist()
                offset += len(t.content)
                out.append((i, TokenScores(list(t.content), values)))
        return out

    def _score_shared(
        self, prefix: tuple[int, ...], group: list[tuple[int, _Tokenized]]
    ) -> list[TokenScores]:
        """Run the shared prefix once, then every continuation on a copy of its KV cache."""
        import torch

        scores: dict[int, TokenScores] = {}
        with torch.inference_mode():
            prefix_ids = torch.tensor([list(prefix)], device=self.device)
            first = self._hidden(prefix_ids, torch.ones_like(prefix_ids), use_cache=True)
            cache, last = first.past_key_values, first.last_hidden_state[:, -1]
            for batch in self._batches(group, lambda t: len(t.content)):
                width = max(len(t.content) for _, t in batch)
                ids = torch.full((len(batch), width), self._pad, dtype=torch.long, device=self.device)
                mask = torch.zeros((len(batch), len(prefix) + width), dtype=torch.long, device=self.device)
                mask[:, : len(prefix)] = 1
                for row, (_, t) in enumerate(batch):
                    ids[row, : len(t.content)] = torch.tensor(t.content)
                    mask[row, len(prefix) : len(prefix) + len(t.content)] = 1
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(len(batch))
                positions = torch.arange(len(prefix), len(prefix) + width, device=self.device)
                hidden = self._hidden(
                    ids, mask, past_key_values=batch_cache, position_ids=positions.expand(len(batch), -1)
                ).last_hidden_state
                for row, (i, t) in enumerate(batch):
                    # token k is predicted by the prefix's last state (k=0) or the state of token k-1
                    states = torch.cat([last, hidden[row, : len(t.content) - 1]], dim=0)
                    targets = torch.tensor(t.content, device=self.device)
                    scores[i] = TokenScores(list(t.content), self._logprobs_at(states, targets).tolist())
        return [scores[i] for i, _ in group]

    def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float] | Failed]:
        """Next-token log-probs of each option after the assistant's ``prefill``, batched by length.

        Each option must add exactly one token to the prefill; otherwise the
        request fails (a multi-token option has no single probability to read).
        """
        import torch

        results: list[dict[str, float] | Failed | None] = [None] * len(requests)
        ready: list[tuple[int, _Tokenized]] = []
        options: dict[int, dict[str, int]] = {}
        for i, request in enumerate(requests):
            prepared = self._option_ids(request)
            if isinstance(prepared, Failed):
                results[i] = prepared
                continue
            seq, options[i] = prepared
            ready.append((i, _Tokenized(tuple(seq), [])))
        for batch in self._batches(ready, lambda t: len(t.prefix)):
            width = max(len(t.prefix) for _, t in batch)
            ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, t) in enumerate(batch):
                ids[row, : len(t.prefix)] = torch.tensor(t.prefix)
                mask[row, : len(t.prefix)] = 1
            with torch.inference_mode():
                hidden = self._hidden(ids.to(self.device), mask.to(self.device)).last_hidden_state
                last = hidden[list(range(len(batch))), [len(t.prefix) - 1 for _, t in batch]]
                logits = self.model.get_output_embeddings()(last).float()
                logprobs = torch.log_softmax(logits, dim=-1)
            for row, (i, _) in enumerate(batch):
                results[i] = {option: float(logprobs[row, tid]) for option, tid in options[i].items()}
        return [r if r is not None else Failed("internal", "request not scored") for r in results]

    def _option_ids(self, request: OptionRequest) -> tuple[list[int], dict[str, int]] | Failed:
        header = self._header(request.context, "assistant")
        base = self.tokenizer(request.prefill, add_special_tokens=False)["input_ids"]
        option_ids = {}
        for option in request.options:
            ids = self.tokenizer(request.prefill + option, add_special_tokens=False)["input_ids"]
            if ids[: len(base)] != base or len(ids) != len(base) + 1:
                return Failed("option_not_single_token", f"option {option!r} after {request.prefill!r}")
            option_ids[option] = ids[-1]
        seq = list(header) + list(base)
        if len(seq) > self.n_ctx:
            return Failed("too_long", f"{len(seq)} tokens exceed context {self.n_ctx}")
        return seq, option_ids

    # ------------------------------------------------------------ sampling

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        import torch

        results: list[list[Completion] | Failed] = []
        for conversation, base_seed in zip(conversations, seeds, strict=True):
            fitted = fit_prompt(
                conversation,
                lambda conv: self._ids(conv, add_generation_prompt=True),
                self.n_ctx,
                params.max_tokens,
                params.too_long,
            )
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
