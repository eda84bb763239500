"""Raw rows → the prompts table: normalised conversations with stable ids, duplicates dropped.

Every source goes through the same rules (roles, text, references), and a row that breaks one
is dropped with its reason and row number, never silently. A prompt's id hashes its normalised
conversation, so the same prompt has the same id in every source and every run.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from schemas import columns, reasons, stage_names
from schemas.recipe import FilePrompts, PromptsConfig
from schemas.records import PROMPTS
from steps.base import StageStats
from steps.prompts.sources import PromptSourceError, raw_rows, references_named, source_keys, source_label

ROLES = ("system", "user", "assistant")


LOAD_CHUNK_ROWS = 65_536  # load_prompts gathers the stream in pieces of this size


class InvalidRow(ValueError):
    """One row cannot be a prompt; ``reason`` is its drop code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRow(reasons.NON_STRING_CONTENT, f"{where} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON escape such as "\ud800" decodes to a lone surrogate
        raise InvalidRow(
            reasons.INVALID_UNICODE,
            f"{where} is not valid Unicode (unpaired surrogate at character {exc.start}); fix the text",
        ) from None
    return unicodedata.normalize("NFC", value).strip()


def normalise_messages(prompt: Any) -> list[dict[str, str]]:
    """A string or a list of {role, content} → a checked conversation ending in a user turn."""
    if isinstance(prompt, str):
        prompt = [{columns.ROLE: "user", columns.CONTENT: prompt}]
    if not isinstance(prompt, list | tuple):
        raise InvalidRow(
            reasons.INVALID_PROMPT,
            f"prompt must be a string or a list of messages, got {type(prompt).__name__}",
        )
    if not prompt:
        raise InvalidRow(reasons.EMPTY_PROMPT, "prompt has no messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or columns.ROLE not in message or columns.CONTENT not in message:
            raise InvalidRow(
                reasons.INVALID_PROMPT, f"message {i} must be a mapping with 'role' and 'content'"
            )
        role = message[columns.ROLE]
        if role not in ROLES:
            raise InvalidRow(reasons.UNKNOWN_ROLE, f"message {i} has role {role!r}; expected one of {ROLES}")
        if role == "system" and i != 0:
            raise InvalidRow(reasons.INVALID_PROMPT, f"message {i}: a system message may only come first")
        messages.append(
            {columns.ROLE: role, columns.CONTENT: _text(message[columns.CONTENT], f"message {i} content")}
        )
    if messages[-1][columns.ROLE] != "user":
        raise InvalidRow(reasons.INVALID_PROMPT, "the last message must be a user turn (the one to answer)")
    if not messages[-1][columns.CONTENT]:
        raise InvalidRow(reasons.EMPTY_PROMPT, "the last user message is empty or whitespace")
    return messages


def normalise_references(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise InvalidRow(
            reasons.INVALID_REFERENCES,
            f"references must be a string or a list of strings, got {type(value).__name__}",
        )
    refs = [_text(ref, f"reference {i}") for i, ref in enumerate(value)]
    return [ref for ref in refs if ref]


def prompt_id(messages: list[dict[str, str]]) -> str:
    """Stable id: hash of the normalised conversation, independent of source and order."""
    canonical = json.dumps([[m[columns.ROLE], m[columns.CONTENT]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def stream_prompts(
    config: PromptsConfig, stats: StageStats, shard_rows: int, limit: int | None = None
) -> Iterator[pa.Table]:
    """Read, normalise and de-duplicate prompts, yielding tables of ``shard_rows`` unique prompts.

    Only the set of prompt ids seen so far is held across shards, so memory does not
    grow with the source. ``stats`` fills in as rows are read and is complete once the
    stream is exhausted; ``limit`` counts unique prompts. Raises PromptSourceError if the
    source is unreadable or no prompt survives (an empty run is never what the user
    meant); checks that need the whole source raise after its last shard.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
    label = source_label(config)
    seen: dict[str, int] = {}  # prompt id -> the source row that first had it
    any_references = False
    rows = _empty_rows()
    for raw in raw_rows(config):
        if limit is not None and len(seen) >= limit:
            break
        stats.rows_in += 1
        any_references = any_references or raw.has_references
        try:
            messages = normalise_messages(raw.prompt)
            references = normalise_references(raw.references)
        except InvalidRow as exc:
            stats.drop(exc.reason, example=f"row {raw.index}: {exc}")
            continue
        pid = prompt_id(messages)
        if pid in seen:
            stats.drop(
                reasons.DUPLICATE_PROMPT, example=f"row {raw.index}: same conversation as row {seen[pid]}"
            )
            continue
        seen[pid] = raw.index
        rows[columns.PROMPT_ID].append(pid)
        rows[columns.MESSAGES].append(messages)
        rows[columns.REFERENCES].append(references)
        rows[columns.SOURCE].append(label)
        rows[columns.SOURCE_ROW].append(raw.index)
        stats.rows_out += 1
        stats.counts["with_references"] += bool(references)
        if len(rows[columns.PROMPT_ID]) == shard_rows:
            yield pa.Table.from_pydict(rows, schema=PROMPTS)
            rows = _empty_rows()
    if isinstance(config, FilePrompts) and references_named(config) and stats.rows_in and not any_references:
        raise PromptSourceError(
            f"{label}: no row has the field {config.references_column!r} named by "
            f"{source_keys().references_column}; fix the name, or remove the key if there are no references"
        )
    if not seen:
        raise _nothing_usable(label, stats)
    if rows[columns.PROMPT_ID]:
        yield pa.Table.from_pydict(rows, schema=PROMPTS)


def _empty_rows() -> dict[str, list[Any]]:
    return {name: [] for name in PROMPTS.names}


def load_prompts(config: PromptsConfig, limit: int | None = None) -> tuple[pa.Table, StageStats]:
    """All unique prompts as one table, for callers that want them at once (eval harness, tests).

    The pipeline streams them instead (``stream_prompts``); this is the same stream gathered.
    """
    stats = StageStats(stage_names.PROMPTS)
    tables = list(stream_prompts(config, stats, LOAD_CHUNK_ROWS, limit))
    return pa.concat_tables(tables).combine_chunks(), stats


def _nothing_usable(label: str, stats: StageStats) -> PromptSourceError:
    detail = "; ".join(f"{k}: {v}" for k, v in sorted(stats.examples.items()))
    return PromptSourceError(
        f"no usable prompts in {label} ({stats.rows_in} rows read, drops {dict(stats.drops)})"
        + (f"; first problems: {detail}" if detail else "")
        + "; fix the rows or point prompts at another source"
    )


def check_prompts(config: PromptsConfig) -> None:
    """Raise PromptSourceError now if the source is unreadable or has no usable prompt at all.

    For the CLI's checks before anything heavy starts: it reads only up to the
    first row that makes a prompt, so a good source costs one row, and a source
    whose every row is dropped fails with the same message as ``load_prompts``
    instead of after Prefect has started.
    """
    stats = StageStats(stage_names.PROMPTS)
    rows = raw_rows(config)
    try:
        for raw in rows:
            stats.rows_in += 1
            try:
                normalise_messages(raw.prompt)
                normalise_references(raw.references)
            except InvalidRow as exc:
                stats.drop(exc.reason, example=f"row {raw.index}: {exc}")
                continue
            return
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
    raise _nothing_usable(source_label(config), stats)
