"""``output:`` and ``card:`` where the dataset goes and what its card says."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
)

from schemas.recipe.base import Strict


class OutputConfig(Strict):
    uri: str | None = Field(None, description="default: ./outputs/<recipe name>")
    format: Literal["parquet", "arrow"] = "parquet"
    rows_per_shard: int = Field(10_000, ge=1)
    prompts_per_shard: int = Field(16, ge=1, description="work unit of every stage")


class CardConfig(Strict):
    license: str = "apache-2.0"
    pretty_name: str | None = None
    language: list[str] = ["en"]  # noqa: RUF012 (pydantic copies field defaults)
    tags: list[str] = []  # noqa: RUF012 (pydantic copies field defaults)
