"""The engine protocol: the only two things the pipeline asks of a model.

``generate`` samples n completions per conversation; ``score`` returns the
log-probabilities of a given continuation. Backends (llama.cpp, transformers,
later vLLM) implement these; everything else in the pipeline is engine-agnostic.
Failure is a value: a conversation the engine cannot handle comes back as
``Failed`` with a reason code, never as a sentinel or a silently missing row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from jinja2.sandbox import ImmutableSandboxedEnvironment

from schemas import reasons

Message = dict[str, str]
Conversation = Sequence[Message]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    # A prompt longer than the context: "drop" it, or "truncate_left" (steps.engines.context)
    too_long: Literal["drop", "truncate_left"] = "drop"


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: FinishReason
    prompt_tokens: int
    seed: int
    # Oldest non-system messages of the conversation the engine left out to fit its context
    prompt_turns_dropped: int = 0


@dataclass(frozen=True)
class Failed:
    """A conversation the engine could not handle, with a drop reason code."""

    reason: str
    message: str


@dataclass(frozen=True)
class TokenScores:
    """Log-probs of a continuation's content tokens (template and special tokens excluded)."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


@runtime_checkable
class Generator(Protocol):
    model_id: str
    engine_name: str

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]: ...


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``continuation`` as the next ``role`` turn after ``context``."""

    context: Conversation
    continuation: str
    role: Literal["assistant", "user"] = "assistant"


@dataclass(frozen=True)
class OptionRequest:
    """Which of ``options`` comes next after the assistant has started with ``prefill``."""

    context: Conversation
    prefill: str
    options: tuple[str, ...]


@runtime_checkable
class Scorer(Protocol):
    """Log-probs of given continuations; requests sharing a context share its computation."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenScores | Failed]: ...


@runtime_checkable
class Chooser(Protocol):
    """Log-probs of single-token options at one position: verdicts and ratings without parsing."""

    def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float] | Failed]: ...


@runtime_checkable
class Engine(Generator, Scorer, Chooser, Protocol):
    """What ``load_engine`` returns: every engine samples, scores continuations and reads options."""


ReadRequest = ScoreRequest | OptionRequest
ReadResult = TokenScores | dict[str, float] | Failed


@runtime_checkable
class JointReader(Protocol):
    """Scores continuations and reads options in one pass, so prefixes shared across kinds run once.

    Several labelers reading one model ask it about the same texts (a response under a plain
    prompt is the prefix of every follow-up after it); only one pass over all their requests
    can notice.
    """

    def read_mixed(self, requests: Sequence[ReadRequest]) -> list[ReadResult]: ...


def read_requests(engine: Any, requests: Sequence[ReadRequest]) -> list[ReadResult]:
    """``requests`` answered in order: in one pass where the engine can mix kinds, else one call per kind."""
    if isinstance(engine, JointReader):
        return engine.read_mixed(requests)
    results: list[ReadResult | None] = [None] * len(requests)
    for kind, call in ((ScoreRequest, "score"), (OptionRequest, "option_logprobs")):
        where = [i for i, request in enumerate(requests) if isinstance(request, kind)]
        if where:  # an engine (or a test's fake) may implement only the kind it is asked for
            for i, result in zip(where, getattr(engine, call)([requests[i] for i in where]), strict=True):
                results[i] = result
    return [
        result if result is not None else Failed(reasons.INTERNAL, "request not read") for result in results
    ]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from anything hashable-by-text: same inputs, same seed, on every machine."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def sample_seed(base: int, index: int) -> int:
    """Per-sample seed kept within 31 bits: llama.cpp and torch both accept it."""
    return derive_seed(base, index) & 0x7FFF_FFFF


_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _raise(message: str) -> None:
    raise ValueError(f"chat template refused the conversation: {message}")


_JINJA.globals["raise_exception"] = _raise


def render_chat(
    template: str,
    messages: Conversation,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render a model's own chat template (from its GGUF or tokenizer) in a sandbox.

    The sandbox matters: templates come with model files, and a model file is
    not trusted code.
    """
    compiled = _JINJA.from_string(template)
    return compiled.render(
        messages=list(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **extra,
    )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def continuation_span(prefix_ids: Sequence[int], full_ids: Sequence[int]) -> tuple[int, int] | None:
    """Where the continuation starts in ``full_ids``, taken from token ids, not strings.

    Returns None when the prefix is not a token prefix of the full sequence
    (a template that rewrites earlier turns), which callers report as a failure.
    """
    n = len(prefix_ids)
    if list(full_ids[:n]) != list(prefix_ids):
        return None
    return n, len(full_ids)
