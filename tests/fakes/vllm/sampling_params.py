"""``vllm.SamplingParams`` with the fields prefsmith sets, their real defaults and checks.

The real class is a msgspec Struct with many more fields. Note the default
``max_tokens=16``: a caller that forgets to set it gets 16-token answers. The
fake's ``LLM`` refuses non-neutral values of fields it does not implement, so a
test cannot pass by the fake silently ignoring a setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Not a vLLM field: which fields the caller set, for tests that check nothing is left to defaults.
    _explicit: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __init__(self, **kwargs: object) -> None:
        known = {f.name: f for f in fields(self) if not f.name.startswith("_")}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword argument(s) {unknown}")
        for name, spec in known.items():
            setattr(self, name, kwargs.get(name, spec.default))
        self._explicit = frozenset(kwargs)
        self._verify()

    def _verify(self) -> None:
        """The real class's checks on these fields (``SamplingParams._verify_args``)."""
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value != -1 and value < 0:
                raise ValueError(f"{name} must be non-negative or -1, got {value}.")
