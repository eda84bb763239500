"""transformers backend: CPU or CUDA; the reference implementation for scoring.

Loading a GGUF through transformers dequantises it (15–20 s for the default
model on 2 cores), so the converted weights are saved once under the cache
directory and later loads read the safetensors copy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steps.engines.base import (
    Completion,
    Conversation,
    Failed,
    SamplingParams,
    TokenScores,
    continuation_span,
    sample_seed,
)
from steps.engines.models import ResolvedModel

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def cache_dir() -> Path:
    return Path(os.environ.get("PREFSMITH_CACHE", Path.home() / ".cache" / "prefsmith"))


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def materialise(model: ResolvedModel) -> str:
    """A directory or hub id ``from_pretrained`` can read; GGUFs are converted once and cached."""
    if model.kind != "gguf":
        return model.location
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "converted" / f"{Path(model.location).stem}-{_gguf_cache_key(model.path)}"
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return str(target)
    folder, name = str(model.path.parent), model.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
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
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return str(target)


class TransformersEngine:
    engine_name = "transformers"

    def __init__(
        self,
        model: ResolvedModel,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
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
            location, dtype=getattr(torch, _DTYPES[dtype]), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_id} has no chat template in its tokenizer")
        self._special = set(self.tokenizer.all_special_ids)
        self._eos = [
            t
            for t in {self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id}
            if t is not None
        ]
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos[0]
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def _ids(self, conversation: Conversation, add_generation_prompt: bool) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if not isinstance(ids, list):  # newer versions return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        import torch

        results: list[list[Completion] | Failed] = []
        for conversation, base_seed in zip(conversations, seeds, strict=True):
            prompt = self._ids(conversation, add_generation_prompt=True)
            if len(prompt) + 1 > self.n_ctx:
                results.append(Failed("prompt_too_long", f"{len(prompt)} tokens ≥ context {self.n_ctx}"))
                continue
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
            completions = []
            for i, row in enumerate(out[:, len(prompt) :].tolist()):
                ids, finish = [], "length"
                for token in row:
                    if token in self._eos:
                        finish = "stop"
                        break
                    ids.append(token)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(Completion(text, len(ids), finish, len(prompt), sample_seed(seed, i)))
            results.append(completions)
        return results

    def score(self, context: Conversation, continuation: str) -> TokenScores | Failed:
        import torch

        prefix = self._ids(context, add_generation_prompt=True)
        full = self._ids([*context, {"role": "assistant", "content": continuation}], False)
        span = continuation_span(prefix, full)
        if span is None:
            return Failed("template_boundary", "chat template changes earlier tokens when a reply is added")
        start, end = span
        for pos in range(start, end):
            if full[pos] in self._special:
                end = pos
                break
        if end > self.n_ctx:
            return Failed("too_long", f"{end} tokens exceed context {self.n_ctx}")
        ids = torch.tensor([full[:end]], device=self.device)
        with torch.inference_mode():
            logits = self.model(ids).logits[0, start - 1 : end - 1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = ids[0, start:end]
        picked = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
        return TokenScores(target.tolist(), picked.tolist())
