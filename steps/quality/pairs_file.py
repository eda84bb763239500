"""Human preference pairs from a file or a Hub split: ``{id, prompt, chosen, rejected}`` per row.

The prompt goes through the pipeline's own normalisation, so a pair is the conversation the
labelers would see in a run; a row that cannot be a pair is skipped with its reason counted,
and a file that cannot be read at all stops with its line number (a usage error).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from schemas import columns
from schemas.errors import UsageError
from schemas.reasons import INVALID_RESPONSE, INVALID_UNICODE, NOT_AN_OBJECT
from schemas.recipe import EvalPairs, Recipe
from steps.engines import derive_seed
from steps.prompts.normalise import InvalidRow, normalise_messages, normalise_references, prompt_id
from steps.prompts.sources import json_value, open_parquet, parquet_batches


class PairsFileError(UsageError):
    """The pairs file cannot be read; the message names the line."""


@dataclass(frozen=True)
class Pair:
    pid: str
    messages: list[dict[str, str]]
    references: list[str]
    chosen: str
    rejected: str
    line: int


def chosen_first(pid: str, seed: int) -> bool:
    """Seeded coin flip per pair: labelers that break ties by order must not see the human choice first.

    Keyed on the pair id (not its position) so ``--limit`` leaves every flip unchanged.
    """
    return derive_seed("eval-flip", seed, pid) % 2 == 0


def _parse_pair(record: Any, line: int, seen: set[str]) -> Pair:
    if not isinstance(record, dict):
        raise InvalidRow(NOT_AN_OBJECT, f"line {line}: expected a JSON object")
    for side in (columns.CHOSEN, columns.REJECTED):
        text = record.get(side)
        if not isinstance(text, str):
            raise InvalidRow(INVALID_RESPONSE, f"line {line}: {side!r} must be a string")
        try:  # a JSON escape such as "\ud800" decodes to a lone surrogate, which Arrow cannot hold
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRow(
                INVALID_UNICODE, f"line {line}: {side!r} has an unpaired surrogate at character {exc.start}"
            ) from None
    messages = normalise_messages(record.get(columns.PROMPT))
    # A pair id is unique by contract, but one prompt often has several pairs: hashing the prompt
    # alone would merge them into one group and let z-scores mix responses of different pairs.
    pid = str(record.get("id") or prompt_id(messages))
    base, k = pid, 1
    while pid in seen:  # "<id>@<line>" may itself be an id given earlier: count on until it is free
        pid = f"{base}@{line}" if k == 1 else f"{base}@{line}.{k}"
        k += 1
    references = normalise_references(record.get("reference"))
    return Pair(pid, messages, references, record[columns.CHOSEN], record[columns.REJECTED], line)


def _records(source: Path | EvalPairs) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) of a JSONL/Parquet file or a datasets dataset; bad JSON is fatal."""
    if isinstance(source, Path):
        source = EvalPairs(uri=str(source), format="jsonl")
    if source.hf is not None:
        import datasets

        try:
            rows = datasets.load_dataset(source.hf, source.config, split=source.split)
        except Exception as exc:  # datasets raises many types; all mean "cannot read this"
            raise PairsFileError(f"eval pairs {source.hf!r}: cannot load the dataset ({exc})") from None
        yield from enumerate(rows, start=1)
        return
    uri = source.location
    fmt = source.format or ("parquet" if uri.endswith(".parquet") else "jsonl")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        handle = fs.open(path, "rb")
    except (OSError, ValueError) as exc:
        raise PairsFileError(f"pairs file {uri!r} cannot be opened ({exc})") from None
    with handle:
        if fmt == "parquet":
            yield from _parquet_records(handle, uri)
            return
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                # A byte-order mark (some Windows editors write one) is not part of the JSON.
                record = json_value(raw.decode("utf-8-sig" if line == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                raise PairsFileError(f"{uri} line {line}: not valid UTF-8 ({exc.reason})") from None
            except ValueError as exc:
                raise PairsFileError(f"{uri} line {line}: invalid JSON ({exc})") from None
            yield line, record


def _parquet_records(handle: Any, uri: str) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet pairs file, numbered from 1; a file that is not (all) Parquet is named."""

    def unreadable(exc: Exception) -> PairsFileError:
        return PairsFileError(
            f"pairs file {uri!r} is not a readable Parquet file ({exc}); check the file, "
            "or set format: jsonl if it is JSON lines"
        )

    line = 0
    for batch in parquet_batches(open_parquet(handle, unreadable), None, 1024, unreadable):
        for record in batch.to_pylist():
            line += 1
            yield line, record


def read_pairs(source: Path | EvalPairs, limit: int | None = None) -> tuple[list[Pair], Counter[str]]:
    """The first ``limit`` usable pairs, plus skip counts by reason; only unreadable input is fatal.

    ``source`` is a JSONL path or an ``eval`` set of a recipe (whose ``columns`` rename fields).
    """
    renames = source.columns if isinstance(source, EvalPairs) else {}
    pairs: list[Pair] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for line, record in _records(source):
        if limit is not None and len(pairs) >= limit:
            break
        if renames and isinstance(record, dict):
            record = {**record, **{ours: record.get(theirs) for ours, theirs in renames.items()}}
        try:
            pair = _parse_pair(record, line, seen)
        except InvalidRow as exc:
            skipped[exc.reason] += 1
            continue
        seen.add(pair.pid)
        pairs.append(pair)
    return pairs, skipped


def check_eval_sets(recipe: Recipe) -> None:
    """Every ``eval`` set reads and has usable pairs: a config error, before any model loads."""
    for spec in recipe.eval.pairs if recipe.eval is not None else []:
        pairs, skipped = read_pairs(spec, spec.limit)
        if not pairs:
            raise PairsFileError(f"eval pairs {spec.label}: no usable pairs (skipped: {dict(skipped)})")
