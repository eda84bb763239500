"""Prompt sources → the prompts table: normalised conversations with stable ids.

Every source (the built-in set, JSONL/Parquet through fsspec, a Hugging Face
dataset) yields raw rows; one normaliser turns them into the PROMPTS contract.
A row that cannot become a prompt is dropped with a reason and counted; a
source that cannot be read at all (missing file, missing column, undecodable
bytes) is an error that names the row or column and what to do.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import columns as c
from schemas import reasons
from schemas.recipe import BuiltinPrompts, FilePrompts, HFPrompts, PromptsConfig
from schemas.records import PROMPTS
from steps.base import StageStats

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "prompts"
ROLES = ("system", "user", "assistant")
LOAD_CHUNK_ROWS = 65_536  # load_prompts gathers the stream in pieces of this size
PARQUET_BATCH_ROWS = 4096  # source rows held as Python objects at once while reading a columnar source


@dataclass(frozen=True)
class SourceKeys:
    """The recipe keys a source error tells the user to set: the prompt source's, unless a reader
    of another source (an eval set) names its own with ``naming``."""

    prompt_column: str = "prompts.prompt_column"
    references_column: str = "prompts.references_column"
    format: str = "prompts.format"
    file: str = "prompt file"


_KEYS: ContextVar[SourceKeys] = ContextVar("prompt_source_keys", default=SourceKeys())  # noqa: B039 (frozen)


@contextmanager
def naming(keys: SourceKeys) -> Iterator[None]:
    """Source errors raised in this block name ``keys`` (generators: wrap where they are iterated)."""
    token = _KEYS.set(keys)
    try:
        yield
    finally:
        _KEYS.reset(token)


class PromptSourceError(ValueError):
    """The prompt source cannot be read; the message says which row/column and what to do."""


@dataclass(frozen=True)
class RawRow:
    index: int
    prompt: Any
    references: Any
    has_references: bool = True  # the row had the references field at all (JSONL rows may lack it)


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
        prompt = [{c.ROLE: "user", c.CONTENT: prompt}]
    if not isinstance(prompt, list | tuple):
        raise InvalidRow(
            reasons.INVALID_PROMPT,
            f"prompt must be a string or a list of messages, got {type(prompt).__name__}",
        )
    if not prompt:
        raise InvalidRow(reasons.EMPTY_PROMPT, "prompt has no messages")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or c.ROLE not in message or c.CONTENT not in message:
            raise InvalidRow(
                reasons.INVALID_PROMPT, f"message {i} must be a mapping with 'role' and 'content'"
            )
        role = message[c.ROLE]
        if role not in ROLES:
            raise InvalidRow(reasons.UNKNOWN_ROLE, f"message {i} has role {role!r}; expected one of {ROLES}")
        if role == "system" and i != 0:
            raise InvalidRow(reasons.INVALID_PROMPT, f"message {i}: a system message may only come first")
        messages.append({c.ROLE: role, c.CONTENT: _text(message[c.CONTENT], f"message {i} content")})
    if messages[-1][c.ROLE] != "user":
        raise InvalidRow(reasons.INVALID_PROMPT, "the last message must be a user turn (the one to answer)")
    if not messages[-1][c.CONTENT]:
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
    canonical = json.dumps([[m[c.ROLE], m[c.CONTENT]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- sources


def json_value(line: str) -> Any:
    """``json.loads`` whose every failure is a ValueError saying why, for an error that names the line.

    Besides malformed JSON, CPython refuses an integer of over 4,300 digits (a plain ValueError)
    and nesting past its recursion limit (RecursionError, which is no ValueError at all).
    """
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    except ValueError:
        raise ValueError("an integer of more than 4,300 digits") from None


def _jsonl_rows(handle: Any, label: str, prompt_col: str, refs_col: str | None) -> Iterator[RawRow]:
    for line_no, raw in enumerate(handle, start=1):
        try:
            # A byte-order mark (files saved by some Windows editors) is not part of the JSON.
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise PromptSourceError(
                f"{label} line {line_no}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "re-encode the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            record = json_value(line)
        except ValueError as exc:
            raise PromptSourceError(f"{label} line {line_no}: invalid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise PromptSourceError(f"{label} line {line_no}: expected a JSON object per line")
        if prompt_col not in record:
            raise PromptSourceError(
                f"{label} line {line_no}: no {prompt_col!r} field (fields: {sorted(record)}); "
                f"set {_KEYS.get().prompt_column} in the recipe"
            )
        refs = record.get(refs_col) if refs_col else None
        yield RawRow(line_no, record[prompt_col], refs, has_references=bool(refs_col) and refs_col in record)


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):  # e.g. a pandas categorical column
        return _is_text(kind.value_type)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_list_of(kind: pa.DataType, item: Any) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and item(kind.value_type)


def _is_message(kind: pa.DataType) -> bool:
    if not pa.types.is_struct(kind):
        return False
    fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    return all(name in fields and _is_text(fields[name]) for name in (c.ROLE, c.CONTENT))


def _check_column_types(schema: pa.Schema, label: str, prompt_col: str, refs_col: str | None) -> None:
    """A wrongly typed column fails every row the same way, so it is one error naming it, not N drops."""
    kind = schema.field(prompt_col).type
    if not (_is_text(kind) or _is_list_of(kind, _is_message)):
        raise PromptSourceError(
            f"{label}: column {prompt_col!r} has type {kind}; expected text (string), or a list of "
            "{role, content} messages with string fields (bytes must be decoded to UTF-8 text first); "
            f"convert the column or point {_KEYS.get().prompt_column} at another one"
        )
    if refs_col:
        kind = schema.field(refs_col).type
        if not (_is_text(kind) or _is_list_of(kind, _is_text) or pa.types.is_null(kind)):
            raise PromptSourceError(
                f"{label}: column {refs_col!r} has type {kind}; expected text or a list of text; "
                f"convert it, or set {_KEYS.get().references_column} to another column (or null for none)"
            )


def _table_columns(
    schema: pa.Schema, label: str, prompt_col: str, refs_col: str | None, refs_required: bool = False
) -> str | None:
    """Check a columnar source's schema; returns the references column to read (None: there is none)."""
    if prompt_col not in schema.names:
        raise PromptSourceError(
            f"{label}: no column {prompt_col!r} (columns: {schema.names}); "
            f"set {_KEYS.get().prompt_column} in the recipe"
        )
    if refs_col and refs_col not in schema.names:
        if refs_required:
            raise PromptSourceError(
                f"{label}: no column {refs_col!r} (columns: {schema.names}) as named by "
                f"{_KEYS.get().references_column}; fix the name, or remove the key if there are no references"
            )
        refs_col = None
    _check_column_types(schema, label, prompt_col, refs_col)
    return refs_col


def _batch_rows(batches: Iterable[Any], prompt_col: str, refs_col: str | None) -> Iterator[RawRow]:
    """Rows of record batches, one batch as Python objects at a time (never a whole column)."""
    index = 0
    for batch in batches:
        prompts = batch.column(prompt_col).to_pylist()
        refs = batch.column(refs_col).to_pylist() if refs_col else [None] * len(prompts)
        for prompt, ref in zip(prompts, refs, strict=True):
            yield RawRow(index, prompt, ref)
            index += 1


def _parquet_rows(handle: Any, config: FilePrompts) -> Iterator[RawRow]:
    """A Parquet source read batch by batch, only the prompt and references columns."""

    def unreadable(exc: Exception) -> PromptSourceError:
        return PromptSourceError(
            f"{config.uri!r} is not a readable Parquet file ({exc}); check the file, "
            f"or set {_KEYS.get().format}: jsonl if it is JSON lines"
        )

    parquet = open_parquet(handle, unreadable)
    refs_col = _table_columns(
        parquet.schema_arrow,
        config.uri,
        config.prompt_column,
        config.references_column,
        refs_required=references_named(config),
    )
    wanted = [config.prompt_column] + ([refs_col] if refs_col else [])
    batches = parquet_batches(parquet, wanted, PARQUET_BATCH_ROWS, unreadable)
    yield from _batch_rows(batches, config.prompt_column, refs_col)


def open_parquet(handle: Any, unreadable: Callable[[Exception], Exception]) -> pq.ParquetFile:
    """The Parquet file behind ``handle``; a file that is not (all) Parquet becomes ``unreadable(exc)``."""
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(exc) from None


def parquet_batches(
    parquet: pq.ParquetFile,
    columns: list[str] | None,
    batch_rows: int,
    unreadable: Callable[[Exception], Exception],
) -> Iterator[pa.RecordBatch]:
    """Record batches one row group at a time; any Arrow failure becomes ``unreadable(exc)``.

    Row group by row group because pyarrow cannot return a nested column holding dictionary
    (categorical) values in a batch that spans two row groups ("Nested data conversions not
    implemented for chunked array outputs"), e.g. messages whose ``role`` is a pandas categorical.
    """
    for group in range(parquet.num_row_groups):
        reader = parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
        while True:
            try:
                batch = next(reader)  # the generator starts reading (and can fail) here
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:
                raise unreadable(exc) from None
            yield batch


def _infer_format(uri: str) -> str:
    lowered = uri.lower()
    if lowered.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    if lowered.endswith(".parquet"):
        return "parquet"
    raise PromptSourceError(
        f"cannot tell the format of {uri!r}; set {_KEYS.get().format} to jsonl or parquet"
    )


def _file_rows(config: FilePrompts) -> Iterator[RawRow]:
    fmt = config.format or _infer_format(config.uri)
    try:
        opened = fsspec.open(config.uri, "rb", compression="infer")
        with opened as handle:
            if fmt == "parquet":
                yield from _parquet_rows(handle, config)
            else:
                yield from _jsonl_rows(handle, config.uri, config.prompt_column, config.references_column)
    except FileNotFoundError:
        raise PromptSourceError(f"{_KEYS.get().file} {config.uri!r} does not exist") from None
    except ImportError as exc:
        raise PromptSourceError(
            f"cannot open {config.uri!r}: {exc}; install the fsspec backend for this protocol "
            "(for s3:// use `pip install 'prefsmith[s3]'`)"
        ) from None


def references_named(config: PromptsConfig) -> bool:
    """The recipe named a references column itself: then it must exist (the default may be absent)."""
    return (
        isinstance(config, FilePrompts)
        and "references_column" in config.model_fields_set
        and bool(config.references_column)
    )


def _builtin_rows(config: BuiltinPrompts) -> Iterator[RawRow]:
    path = BUILTIN_DIR / f"{config.name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))
        raise PromptSourceError(f"no built-in prompt set {config.name!r}; built-in sets: {known}")
    with path.open("rb") as handle:
        yield from _jsonl_rows(handle, f"built-in set {config.name!r}", "prompt", "references")


def load_hf_split(path: str, config: str | None, split: str) -> Any:
    """``datasets.load_dataset(path, config, split=split)``; a dataset that cannot load is named."""
    import datasets

    try:
        return datasets.load_dataset(path, config, split=split)
    except (FileNotFoundError, ValueError) as exc:
        raise PromptSourceError(f"cannot load dataset {path!r} split {split!r}: {exc}") from None


def _hf_rows(config: HFPrompts) -> Iterator[RawRow]:
    dataset = load_hf_split(config.path, config.config, config.split)
    wanted = [config.prompt_column] + ([config.references_column] if config.references_column else [])
    missing = [col for col in wanted if col not in dataset.column_names]
    if missing:
        keys = _KEYS.get()
        named = keys.prompt_column + (f" / {keys.references_column}" if config.references_column else "")
        raise PromptSourceError(
            f"dataset {config.path!r} has no column(s) {missing} "
            f"(columns: {dataset.column_names}); set {named}"
        )
    table = dataset.select_columns(wanted).data.table
    refs_col = _table_columns(table.schema, config.path, config.prompt_column, config.references_column)
    yield from _batch_rows(table.to_batches(PARQUET_BATCH_ROWS), config.prompt_column, refs_col)


def raw_rows(config: PromptsConfig) -> Iterator[RawRow]:
    if isinstance(config, BuiltinPrompts):
        return _builtin_rows(config)
    if isinstance(config, FilePrompts):
        return _file_rows(config)
    return _hf_rows(config)


def source_label(config: PromptsConfig) -> str:
    if isinstance(config, BuiltinPrompts):
        return f"builtin:{config.name}"
    if isinstance(config, FilePrompts):
        return config.uri
    return f"hf:{config.path}:{config.split}"


# ---------------------------------------------------------------- the step


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
        rows[c.PROMPT_ID].append(pid)
        rows[c.MESSAGES].append(messages)
        rows[c.REFERENCES].append(references)
        rows[c.SOURCE].append(label)
        rows[c.SOURCE_ROW].append(raw.index)
        stats.rows_out += 1
        stats.counts["with_references"] += bool(references)
        if len(rows[c.PROMPT_ID]) == shard_rows:
            yield pa.Table.from_pydict(rows, schema=PROMPTS)
            rows = _empty_rows()
    if isinstance(config, FilePrompts) and references_named(config) and stats.rows_in and not any_references:
        raise PromptSourceError(
            f"{label}: no row has the field {config.references_column!r} named by "
            f"{_KEYS.get().references_column}; fix the name, or remove the key if there are no references"
        )
    if not seen:
        raise _nothing_usable(label, stats)
    if rows[c.PROMPT_ID]:
        yield pa.Table.from_pydict(rows, schema=PROMPTS)


def _empty_rows() -> dict[str, list[Any]]:
    return {name: [] for name in PROMPTS.names}


def load_prompts(config: PromptsConfig, limit: int | None = None) -> tuple[pa.Table, StageStats]:
    """All unique prompts as one table, for callers that want them at once (eval harness, tests).

    The pipeline streams them instead (``stream_prompts``); this is the same stream gathered.
    """
    stats = StageStats("prompts")
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
    stats = StageStats("prompts")
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
