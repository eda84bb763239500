"""``sampling:`` how many responses per prompt, and how they are drawn."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from schemas.recipe.base import Strict


class SamplingConfig(Strict):
    n: int = Field(4, ge=2, description="responses per prompt; a pair needs two")
    temperature: float | list[float] = Field(
        0.8,
        description="one temperature, or several (UltraFeedback-style diversity from one policy): "
        "n is split evenly over them, each with its own seeds; every response records its temperature",
    )
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    seed: int = Field(0, ge=0)
    too_long: Literal["drop", "truncate_left"] = Field(
        "drop",
        description="a prompt longer than the policy's context: drop it (reason prompt_too_long), or leave "
        "out its oldest turns until the last user turn and max_tokens fit (counted, and marked per row)",
    )

    @field_validator("n", mode="before")
    @classmethod
    def _two_or_more(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            raise ValueError(f"{value} response(s) per prompt cannot make a pair; use n >= 2 (default 4)")
        return value

    @field_validator("temperature")
    @classmethod
    def _not_greedy(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("an empty list samples nothing; give one temperature or several")
        for t in values:
            if t < 0.0:  # inf and NaN never get here: the models refuse them (allow_inf_nan=False)
                raise ValueError(f"temperature {t} is not a sampling temperature; use a value > 0")
            if t == 0.0:
                raise ValueError("temperature 0 makes every sample identical, so no pair can form; use > 0")
        if len(set(values)) != len(values):
            raise ValueError(f"temperatures {values} repeat a value; list each once")
        return value

    @model_validator(mode="after")
    def _n_splits_over_temperatures(self) -> SamplingConfig:
        if isinstance(self.temperature, list) and self.n % len(self.temperature):
            raise ValueError(
                f"n={self.n} does not split evenly over {len(self.temperature)} temperatures "
                f"{self.temperature}; use a multiple of {len(self.temperature)}"
            )
        return self

    @property
    def temperatures(self) -> list[float]:
        return self.temperature if isinstance(self.temperature, list) else [self.temperature]
