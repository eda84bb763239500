"""Fitting a prompt into a model's context, the same way in every engine.

A prompt longer than the context is either dropped (reason ``prompt_too_long``)
or, with ``sampling.too_long: truncate_left``, shortened by leaving out its
oldest turns: the system message (if any) and the last user turn always stay,
and the prompt must leave room for ``max_tokens`` of answer. Whole messages go,
never part of one, so the kept conversation is one a person could have had and
``turns_dropped`` alone says which conversation the policy saw (see
``truncated``). The count is measured on the engine's own token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from schemas import reasons
from steps.engines.base import Conversation, Failed, Message


@dataclass(frozen=True)
class Fitted:
    """The conversation to run, its prompt token ids, and how many of its oldest turns were left out."""

    conversation: list[Message]
    prompt_ids: list[int]
    turns_dropped: int


def truncated(messages: Sequence[Message], turns_dropped: int) -> list[Message]:
    """The conversation the policy saw: the system message, then all but the ``turns_dropped`` oldest."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    return [*messages[:head], *messages[head + turns_dropped :]]


def fit_prompt(
    conversation: Conversation,
    tokenize: Callable[[Sequence[Message]], list[int]],
    n_ctx: int,
    max_tokens: int,
    too_long: str = "drop",
) -> Fitted | Failed:
    """The conversation as it will be run, or ``Failed(prompt_too_long)`` with what to do about it.

    ``drop`` keeps the old rule (the prompt plus one answer token must fit; the
    answer is then capped by the room left). ``truncate_left`` keeps the most
    recent turns that fit together with ``max_tokens``; it starts every kept
    part at a user turn, so the policy never sees an answer without its question.
    """
    messages = list(conversation)
    ids = tokenize(messages)
    if too_long == "drop":
        if len(ids) + 1 > n_ctx:
            return Failed(
                reasons.PROMPT_TOO_LONG,
                f"{len(ids)} prompt tokens >= context {n_ctx}; raise n_ctx, or set "
                "sampling.too_long: truncate_left to keep the most recent turns",
            )
        return Fitted(messages, ids, 0)
    if too_long != "truncate_left":
        raise ValueError(f"too_long must be 'drop' or 'truncate_left', got {too_long!r}")
    budget = n_ctx - max_tokens
    if len(ids) <= budget:
        return Fitted(messages, ids, 0)
    head = 1 if messages[0]["role"] == "system" else 0
    starts = [k for k in range(1, len(messages) - head) if messages[head + k]["role"] == "user"]
    for k in starts:  # fewest turns left out first
        candidate = truncated(messages, k)
        ids = tokenize(candidate)
        if len(ids) <= budget:
            return Fitted(candidate, ids, k)
    kept = "the system message and the last user turn" if head else "the last user turn"
    return Failed(
        reasons.PROMPT_TOO_LONG,
        f"{kept} alone need {len(ids)} tokens, more than context {n_ctx} minus max_tokens {max_tokens}; "
        "raise n_ctx or lower sampling.max_tokens",
    )
