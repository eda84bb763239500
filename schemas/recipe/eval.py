"""``eval:`` human pairs the labels are measured against before a run samples anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from schemas.recipe.base import EVAL_DIR, Strict


class EvalPairs(Strict):
    """One set of human-labelled pairs: a JSONL/Parquet file (any fsspec URI) or a ``datasets`` dataset.

    Rows need a prompt (a string or a list of messages), ``chosen`` and ``rejected`` (the human
    preferred chosen); ``columns`` maps these names (and optional ``reference``, ``id``) to the
    file's own column names.
    """

    builtin: str | None = Field(None, description="a set shipped in pipelines/eval/ (e.g. hh_harmless_32)")
    uri: str | None = Field(None, description="JSONL or Parquet, local path or fsspec URI")
    hf: str | None = Field(None, description="a datasets.load_dataset path (hub name or local directory)")
    config: str | None = None
    split: str = "train"
    format: Literal["jsonl", "parquet"] | None = Field(None, description="default: from the file suffix")
    columns: dict[Literal["prompt", "chosen", "rejected", "reference", "id"], str] = {}  # noqa: RUF012 (pydantic copies field defaults)
    name: str | None = Field(None, description="shown on the card (default: the file or dataset name)")
    domain: str = Field("domain not stated", description="what kind of preference the pairs express")
    limit: int | None = Field(None, ge=1, description="only the first N usable pairs")

    @model_validator(mode="after")
    def _one_source(self) -> EvalPairs:
        if sum(x is not None for x in (self.builtin, self.uri, self.hf)) != 1:
            raise ValueError(
                "give exactly one of builtin, uri (a JSONL/Parquet file) or hf (a datasets path)"
            )
        if self.builtin is not None and not (EVAL_DIR / f"{self.builtin}.jsonl").is_file():
            shipped = sorted(p.stem for p in EVAL_DIR.glob("*.jsonl"))
            raise ValueError(f"no built-in eval set {self.builtin!r}; shipped: {shipped}")
        return self

    @property
    def location(self) -> str:
        """Where the pairs are read from: a path or URI, or a datasets path."""
        if self.builtin is not None:
            return str(EVAL_DIR / f"{self.builtin}.jsonl")
        return str(self.uri or self.hf)

    @property
    def label(self) -> str:
        return self.name or self.builtin or Path(self.location).name


class EvalConfig(Strict):
    """Measure the labels against human pairs in every run; the card and ``stats.json`` carry the table."""

    pairs: list[EvalPairs] = Field(min_length=1)
    min_accuracy: float | None = Field(
        None, gt=0.0, le=1.0, description="publish nothing unless the aggregate reaches this on every set"
    )

    @field_validator("pairs", mode="before")
    @classmethod
    def _uris(cls, value: Any) -> Any:
        """``pairs: FILE`` and ``pairs: [FILE, {uri: ..., domain: ...}]`` both read naturally in YAML."""
        items = value if isinstance(value, list) else [value]
        return [{"uri": item} if isinstance(item, str) else item for item in items]
