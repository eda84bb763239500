"""What every recipe section shares: strict models, setting tags, signed weights, where recipes live."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    ValidationError,
)

from schemas.errors import UsageError

PIPELINES_DIR = Path(__file__).resolve().parents[2] / "pipelines"


EVAL_DIR = PIPELINES_DIR / "eval"


class RecipeError(UsageError):
    """The recipe cannot be used; the message names the offending key and what to do."""


class Strict(BaseModel):
    # No NaN or ±inf anywhere: `temperature: .inf` would pass every bound (inf >= 0), reach the
    # engine and be written to the manifest as `Infinity`, which strict JSON readers reject.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# What a setting does, carried by the field itself (``json_schema_extra``) so that every list of
# "speed-only", "vllm-only" or "not on the card" settings is derived here, never kept by hand:
#   shapes_output=False  changes speed (or only the aggregation), never what a stage writes: a change
#                        must not invalidate finished shards, and the card does not list it;
#   engine="vllm"        does nothing unless the model runs on vLLM (rejected for other engines);
#   on_card=False        shapes nothing a dataset user needs to know (where or how safely it ran);
#   shapes_labels=False  a labeler setting the labels do not depend on (only the aggregate does).
SPEED_ONLY: dict[str, Any] = {"shapes_output": False}


AGGREGATE_ONLY: dict[str, Any] = {"shapes_labels": False}


VLLM: dict[str, Any] = {"engine": "vllm"}


OFF_CARD: dict[str, Any] = {"on_card": False}


def tagged(model: type[BaseModel], **tags: Any) -> frozenset[str]:
    """The fields of ``model`` whose metadata carries every one of ``tags``."""
    out = set()
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if all(extra.get(key) == value for key, value in tags.items()):
            out.add(name)
    return frozenset(out)


def _signed_weight(value: float) -> float:
    """A weight may be negative (an inverted signal is evidence too) or 0 (kept as a column, not counted).

    Weight 0 is what a fit gives a signal that scored none of its pairs: nothing says which way it
    points, so it stays out of the aggregate, ``agreement`` and ``min_agree``.
    """
    if not math.isfinite(value):
        raise ValueError(
            f"weight {value} must be a finite number (negative inverts the signal, 0 ignores it)"
        )
    return value


# A labeler's weight in the aggregate; the sign says which way the signal points (docs/design.md).
Weight = Annotated[float, AfterValidator(_signed_weight)]


def key_text(part: str | int) -> str:
    """A key as the message shows it: quoted when it is empty, padded or holds invisible characters
    (a key holding a newline, printed plain, would break the message's one-line-per-key layout)."""
    text = str(part)
    return text if text and text.isprintable() and text == text.strip() else repr(text)


def format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(key_text(part) for part in err["loc"]) or "<root>"
        # pydantic quotes the offending value raw: a newline or U+2028 in it would split the line.
        msg = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see pipelines/default.yaml for valid keys)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
