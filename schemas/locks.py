"""How runs share an output and a work location: lock options from the CLI or the flow.

Not part of the recipe: they say how runs coexist, not what they make, so they never change a
dataset's fingerprint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    model_validator,
)

from schemas.recipe.base import RecipeError, Strict, format_errors


class LockSettings(Strict):
    """How a run shares its output and work location with other runs (``steps.run.lease``).

    Not part of the recipe: it says how runs coexist, not what they make, so it comes from the CLI
    or the flow's ``lock`` parameter and never changes a dataset's fingerprint.
    """

    on_busy: Literal["wait", "fail"] = Field(
        "wait", description="when another live run holds the lease: wait for it, or stop at once"
    )
    expiry_s: float = Field(
        60.0, ge=1.0, description="a lease not renewed for this long is stale and may be taken over"
    )
    renew_s: float = Field(10.0, gt=0.0, description="how often the holder renews its lease")
    max_wait_s: float | None = Field(None, gt=0.0, description="give up waiting after this (default: never)")

    @model_validator(mode="after")
    def _renew_well_within_expiry(self) -> LockSettings:
        if self.renew_s * 3 > self.expiry_s:
            raise ValueError(
                f"renew_s ({self.renew_s:g}) must be at most a third of expiry_s ({self.expiry_s:g}), "
                "so that two late renewals do not cost a live run its lease"
            )
        return self


def lock_settings(**values: Any) -> LockSettings:
    """CLI or flow lock options, validated with the recipe's error format; ``None`` means the default."""
    try:
        return LockSettings.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise RecipeError(f"lock options are invalid:\n{format_errors(exc)}") from None
