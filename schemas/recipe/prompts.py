"""``prompts:`` where prompts come from (built-in, file, Hub) and the filters before sampling."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from schemas.recipe.base import Strict

EVAL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class EvalPromptSet(Strict):
    """An evaluation set whose prompts must stay out of training: JSONL/Parquet via fsspec, or ``datasets``.

    ``columns: {prompt: <column>}`` names the column that holds the prompt (a string or a list
    of {role, content} messages; default ``prompt``).
    """

    name: str = Field(description="names the drop reason contaminated:<name>; letters, digits, _ . -")
    uri: str | None = Field(None, description="JSONL or Parquet, local path or fsspec URI")
    hf: str | None = Field(None, description="a datasets.load_dataset path (hub name or local directory)")
    config: str | None = None
    split: str = "test"
    format: Literal["jsonl", "parquet"] | None = Field(None, description="default: from the file suffix")
    columns: dict[Literal["prompt"], str] = {}  # noqa: RUF012 (pydantic copies field defaults)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # The name becomes part of a reason code, a stats key and a card cell: keep it plain.
        if not EVAL_SET_NAME.fullmatch(value):
            raise ValueError(
                f"name {value!r} must start with a letter or digit and use only letters, digits, _ . - "
                "(at most 64 characters); it becomes the drop reason contaminated:<name>"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EvalPromptSet:
        if (self.uri is None) == (self.hf is None):
            raise ValueError("give exactly one of uri (a JSONL/Parquet file) or hf (a datasets path)")
        return self

    @property
    def prompt_column(self) -> str:
        return self.columns.get("prompt", "prompt")


class DecontaminationConfig(Strict):
    """Drop prompts that overlap evaluation sets by word n-grams (docs/design.md, Decontamination).

    A prompt is contaminated by an eval item when the item's words covered by n-grams that also
    occur in the prompt's user turns are at least ``threshold`` of the item's words, after the
    prompt-id normalisation (NFC, trimmed) plus lower-casing and splitting into words (punctuation
    dropped). The defaults are Tülu 3's (open-instruct's ``decontamination/``): 8-grams, and a
    match when at least half of the eval instance is covered by one training prompt. Eight words
    are long enough that a shared n-gram is rarely chance and short enough to catch a benchmark
    question pasted inside a longer prompt; measuring the share of the *eval item* (not of the
    prompt) is what catches that case. An eval item shorter than ``ngram`` words only matches a
    prompt with the same words.
    """

    sets: list[EvalPromptSet] = Field(min_length=1)
    ngram: int = Field(8, ge=1, le=64, description="words per n-gram (Tülu 3: 8)")
    threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="share of an eval item's words a prompt must cover (Tülu 3: 0.5)"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> DecontaminationConfig:
        names = [s.name for s in self.sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sets: names must be unique (each is a drop reason), repeated: {dupes}")
        return self


class NearDuplicatesConfig(Strict):
    """Drop a prompt whose MinHash-estimated Jaccard similarity to an earlier kept one reaches ``threshold``.

    Shingles are character n-grams of the normalised text (lower-cased words joined by one space),
    which keeps short prompts comparable. 0.8 merges rewordings that keep most of the text (a
    word added, punctuation, a typo) and keeps apart prompts that differ in the word that matters
    in a short question ("the capital of France" vs "of Spain" is ~0.6). Templated prompts that
    differ in one slot of a long text can still reach it: raise the threshold for such pools.
    """

    threshold: float = Field(0.8, gt=0.0, le=1.0, description="estimated Jaccard similarity to drop at")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: a finer estimate)")
    shingle: int = Field(5, ge=1, le=32, description="characters per shingle")
    seed: int = Field(1, ge=0, description="MinHash permutation seed: a fixed seed gives the same drops")


class _PromptSource(Strict):
    """What every prompt source shares: the filters applied after exact de-duplication."""

    decontaminate: DecontaminationConfig | None = Field(
        None, description="drop prompts that overlap evaluation sets (off: no sets to check)"
    )
    near_duplicates: NearDuplicatesConfig | None = Field(
        None, description="drop MinHash near-duplicates of earlier prompts (off unless given)"
    )


class BuiltinPrompts(_PromptSource):
    """Prompts shipped in ``pipelines/prompts/<name>.jsonl``."""

    source: Literal["builtin"] = "builtin"
    name: str = "default"


class FilePrompts(_PromptSource):
    """JSONL or Parquet read through fsspec (local path, ``memory://``, ``s3://`` …)."""

    source: Literal["file"]
    uri: str
    format: Literal["jsonl", "parquet"] | None = None
    prompt_column: str = "prompt"
    references_column: str | None = "references"


class HFPrompts(_PromptSource):
    """A dataset read with ``datasets.load_dataset`` (hub name or local path)."""

    source: Literal["hf"]
    path: str
    config: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    references_column: str | None = None


PromptsConfig = Annotated[BuiltinPrompts | FilePrompts | HFPrompts, Field(discriminator="source")]
