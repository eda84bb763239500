"""Reward models: a sequence-classification head's outputs for (conversation, response).

A reward model reads the whole exchange rendered by its own chat template and
returns one number per head; nothing is generated and no continuation boundary is
needed, so this is a protocol of its own (``RewardScorer``) beside the engine's.
The transformers implementation lives here; the vLLM one is
``steps.engines.vllm_engine.VllmRewardModel``. Both fail a request whose tokens
exceed the window as ``too_long`` rather than truncating it: a truncated exchange
is scored as a different answer.

Which checkpoints qualify is decided from ``config.json`` alone
(``classifier_labels``, ``head_index``), so a recipe that names a causal LM or a head
the model lacks fails before any weights are read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from schemas import reasons
from steps.engines.base import Conversation, Failed
from steps.engines.chat import ChatTokens, ChatWindow, hf_chat_tokens
from steps.engines.models import ModelSpecError, ResolvedModel

CLASSIFIER_SUFFIX = "ForSequenceClassification"


@dataclass(frozen=True)
class RewardRequest:
    """Score ``response`` as the assistant's reply to ``context``."""

    context: Conversation
    response: str


@runtime_checkable
class RewardScorer(Protocol):
    """A loaded reward model: every head's output per request, or why there is none.

    All heads come back so that several labelers (one per head of a multi-objective
    model) share one loaded model; each picks its column.
    """

    model_id: str
    labels: tuple[str, ...]

    def reward(self, requests: Sequence[RewardRequest]) -> list[tuple[float, ...] | Failed]: ...


def classifier_labels(config: Any, model_id: str) -> tuple[str, ...]:
    """The head's output names in column order; ModelSpecError when the checkpoint is no classifier.

    A ``*ForSequenceClassification`` architecture qualifies, and so does remote code
    registered for ``AutoModelForSequenceClassification`` (multi-objective reward models
    often ship that way). A causal LM has no head to read, only a vocabulary.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    if not any(a.endswith(CLASSIFIER_SUFFIX) for a in architectures) and (
        "AutoModelForSequenceClassification" not in auto_map
    ):
        raise ModelSpecError(
            f"{model_id} is not a sequence-classification reward model (architectures: {architectures}); "
            f"kind: reward_model needs a *{CLASSIFIER_SUFFIX} checkpoint with a scalar or "
            "multi-objective head"
        )
    count = int(config.num_labels)
    names = getattr(config, "id2label", None) or {}
    return tuple(str(names.get(i, f"LABEL_{i}")) for i in range(count))


def head_index(labels: Sequence[str], head: int | None, model_id: str) -> int:
    """The column a labeler reads; a multi-output model needs ``head: i``, and i must exist."""
    listed = ", ".join(f"{i}: {name}" for i, name in enumerate(labels))
    if head is None:
        if len(labels) != 1:
            raise ModelSpecError(f"{model_id} has {len(labels)} outputs ({listed}); pick one with head: i")
        return 0
    if head >= len(labels):
        raise ModelSpecError(
            f"head: {head} is out of range; {model_id} has {len(labels)} output(s) ({listed})"
        )
    return head


def refuse_gguf(model: ResolvedModel) -> None:
    """A GGUF holds a causal LM: transformers reads no classifier head from one."""
    if model.kind == "gguf":
        raise ModelSpecError(
            f"{model.location} is a GGUF file, which holds a causal LM and no classifier head; "
            "kind: reward_model needs a Hugging Face directory or hub id"
        )


def _labels_at(location: str, model_id: str, trust_remote_code: bool) -> tuple[str, ...]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"cannot read the config of {model_id}: {exc}") from None
    return classifier_labels(config, model_id)


def local_labels(model: ResolvedModel, trust_remote_code: bool = False) -> tuple[str, ...] | None:
    """The head's output names read from ``config.json`` alone, or None for a hub id not downloaded yet.

    Never touches the network, as model resolution checks only the file system: a hub
    id is looked up in the local Hugging Face cache, and an uncached one is checked
    when it loads (``checkpoint_labels``).
    """
    refuse_gguf(model)
    location = model.location
    if model.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model.location, "config.json")
        if not isinstance(cached, str):
            return None
        location = str(Path(cached).parent)
    return _labels_at(location, model.model_id, trust_remote_code)


def checkpoint_labels(model: ResolvedModel, trust_remote_code: bool = False) -> tuple[str, ...]:
    """The head's output names of a model about to load (a hub id's config is downloaded if needed)."""
    refuse_gguf(model)
    return _labels_at(model.location, model.model_id, trust_remote_code)


def length_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped so that rows x longest row stays within ``budget`` tokens, longest first.

    Sorting by length keeps padding small; the longest batch comes first, so a batch
    too big for the device fails at once, not after an hour. A sequence longer than
    the budget runs alone (so does every one with a budget of 0).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def conversation_ids(chat: ChatTokens, request: RewardRequest) -> list[int] | Failed:
    """Token ids of the exchange as the model's template renders it, or ``too_long`` past the window."""
    ids = chat.ids([*request.context, {"role": "assistant", "content": request.response}], False)
    if len(ids) > chat.n_ctx:
        return Failed(reasons.TOO_LONG, f"{len(ids)} tokens exceed context {chat.n_ctx}")
    return ids


class TransformersRewardModel(ChatWindow):
    """An ``AutoModelForSequenceClassification`` checkpoint on CPU or CUDA, batched by length.

    Sequences are right-padded with the model's own ``pad_token_id`` and the model's
    forward picks the position it pools (decoder models: the rightmost token that is not
    the pad id), so a batched score equals the model's own forward pass on the sequence
    alone. Setting a pad id the checkpoint lacks (the tokenizer's, or EOS) would move
    that position whenever the template ends on that token, so such a model runs one
    sequence per pass instead.
    """

    engine_name = "transformers"

    def __init__(
        self,
        model: ResolvedModel,
        device: str = "auto",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        batch_tokens: int = 4096,
        n_ctx: int = 2048,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.model_id = model.model_id
        self.labels = checkpoint_labels(model, trust_remote_code)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model.location, trust_remote_code=trust_remote_code)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_id} has no chat template in its tokenizer")
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model.location, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        text_config = self.model.config.get_text_config()
        self._pad: int | None = text_config.pad_token_id
        trained = getattr(text_config, "max_position_embeddings", None)
        self.chat = hf_chat_tokens(self.tokenizer, min(n_ctx, int(trained)) if trained else n_ctx)
        self.batch_tokens = batch_tokens
        self.forward_passes = 0  # tests read it: batching is visible
        self.tokens_processed = 0  # real (unpadded) tokens read: what the dataset's card reports

    def reward(self, requests: Sequence[RewardRequest]) -> list[tuple[float, ...] | Failed]:
        results: list[tuple[float, ...] | Failed | None] = [None] * len(requests)
        ready: list[tuple[int, list[int]]] = []
        for i, request in enumerate(requests):
            ids = conversation_ids(self.chat, request)
            if isinstance(ids, Failed):
                results[i] = ids
            else:
                ready.append((i, ids))
        lengths = [len(ids) for _, ids in ready]
        # Without a padding token transformers will not run a batch of more than one sequence.
        budget = self.batch_tokens if self._pad is not None else 0
        for batch in length_batches(lengths, budget):
            rows = [ready[k] for k in batch]
            for (i, _), outputs in zip(rows, self._forward([ids for _, ids in rows]), strict=True):
                results[i] = outputs
        return [x if x is not None else Failed(reasons.INTERNAL, "request not scored") for x in results]

    def _forward(self, rows: list[list[int]]) -> list[tuple[float, ...]]:
        import torch

        width = max(len(ids) for ids in rows)
        pad = self._pad if self._pad is not None else 0  # no pad id: one row, nothing padded
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
        self.forward_passes += 1
        self.tokens_processed += sum(len(row) for row in rows)
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return [tuple(float(v) for v in row) for row in logits.float().cpu().tolist()]
