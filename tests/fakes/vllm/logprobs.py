"""``vllm.logprobs.Logprob``: one candidate token's log-prob, its rank and its text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None
