"""Chat turns as token ids, the same way for every engine: where a continuation starts is found
from token ids (the header two different one-word turns share), never by splitting strings.

Each engine supplies how it renders and tokenises (``ChatTokens``' three callables); the rules —
which tokens are the continuation, when it is empty, when it does not fit — live here once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from schemas import reasons
from steps.engines.base import (
    Conversation,
    Failed,
    OptionRequest,
    SamplingParams,
    ScoreRequest,
    common_prefix,
)
from steps.engines.context import Fitted, fit_prompt


class ChatTokens:
    """Token ids of conversations, continuation boundaries and judge options for one tokenizer."""

    def __init__(
        self,
        encode_chat: Callable[[Conversation, bool], list[int]],
        encode_text: Callable[[str], list[int]],
        is_special: Callable[[int], bool],
        n_ctx: int,
    ) -> None:
        self.encode_chat = encode_chat
        self.encode_text = encode_text
        self.is_special = is_special
        self.n_ctx = n_ctx
        self._headers: dict[tuple[Any, ...], tuple[int, ...]] = {}

    def ids(self, conversation: Conversation, add_generation_prompt: bool) -> list[int]:
        return self.encode_chat(conversation, add_generation_prompt)

    def fit(self, conversation: Conversation, params: SamplingParams) -> Fitted | Failed:
        """The prompt ids to sample from, its oldest turns left out if the recipe allows (or a failure)."""
        encode = functools.partial(self.ids, add_generation_prompt=True)
        return fit_prompt(conversation, encode, self.n_ctx, params.max_tokens, params.too_long)

    def header(self, context: Conversation, role: str) -> tuple[int, ...]:
        """Tokens of the context plus the next turn's role header: what two one-word turns share."""
        key = (tuple((m["role"], m["content"]) for m in context), role)
        if key not in self._headers:
            a = self.ids([*context, {"role": role, "content": "x"}], False)
            b = self.ids([*context, {"role": role, "content": "y"}], False)
            self._headers[key] = tuple(a[: common_prefix(a, b)])
        return self._headers[key]

    def split(self, request: ScoreRequest, reserve: int = 0) -> tuple[tuple[int, ...], list[int]] | Failed:
        """The header and the continuation's content tokens (up to the end-of-turn marker).

        ``reserve``: tokens the engine needs beyond the sequence (vLLM generates one).
        """
        header = self.header(request.context, request.role)
        turn = {"role": request.role, "content": request.continuation}
        full = self.ids([*request.context, turn], False)
        if tuple(full[: len(header)]) != header:
            return Failed(
                reasons.TEMPLATE_BOUNDARY, "chat template changes earlier tokens when a turn is added"
            )
        content = []
        for token in full[len(header) :]:
            if self.is_special(token):  # the end-of-turn marker the template appends
                break
            content.append(token)
        if not content:
            return Failed(reasons.EMPTY_CONTINUATION, "nothing to score")
        size = len(header) + len(content)
        if size + reserve > self.n_ctx:
            extra = f" (+{reserve})" if reserve else ""
            return Failed(reasons.TOO_LONG, f"{size} tokens{extra} exceed context {self.n_ctx}")
        return header, content

    def options(self, request: OptionRequest, reserve: int = 0) -> tuple[list[int], dict[str, int]] | Failed:
        """The sequence up to the judge's prefill, and each option's single token after it."""
        header = self.header(request.context, "assistant")
        base = self.encode_text(request.prefill)
        option_ids = {}
        for option in request.options:
            ids = self.encode_text(request.prefill + option)
            if ids[: len(base)] != base or len(ids) != len(base) + 1:
                return Failed(reasons.OPTION_NOT_SINGLE_TOKEN, f"option {option!r} after {request.prefill!r}")
            option_ids[option] = int(ids[-1])
        seq = [*header, *base]
        if len(seq) + reserve > self.n_ctx:
            extra = f" (+{reserve})" if reserve else ""
            return Failed(reasons.TOO_LONG, f"{len(seq)} tokens{extra} exceed context {self.n_ctx}")
        return seq, option_ids


def hf_chat_tokens(tokenizer: Any, n_ctx: int) -> ChatTokens:
    """``ChatTokens`` over a Hugging Face tokenizer and its own chat template."""
    special = set(tokenizer.all_special_ids)

    def encode_chat(conversation: Conversation, add_generation_prompt: bool) -> list[int]:
        ids: Any = tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def encode_text(text: str) -> list[int]:
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]

    return ChatTokens(encode_chat, encode_text, special.__contains__, n_ctx)


class ChatWindow:
    """An engine whose context window is its chat tokens' limit: one number, set in one place."""

    chat: ChatTokens

    @property
    def n_ctx(self) -> int:
        return self.chat.n_ctx

    @n_ctx.setter
    def n_ctx(self, value: int) -> None:
        self.chat.n_ctx = value
