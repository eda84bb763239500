"""``vllm.inputs.TokensPrompt``: a prompt given as token ids, used as is (no BOS added)."""

from __future__ import annotations

from typing import NotRequired, TypedDict


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]
