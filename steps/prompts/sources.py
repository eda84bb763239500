"""Prompt sources: rows out of the built-in set, a JSONL/Parquet file (fsspec) or a Hugging Face split.

A source yields raw rows (the prompt value, its references and where it came from); turning them
into conversations is ``steps.prompts.normalise``'s job, so every source is checked by one rule.
Column names in error messages are the user's recipe keys (``SourceKeys``), whoever reads the
source: decontamination reads eval sets through the same code under its own keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import columns
from schemas.errors import UsageError
from schemas.recipe import BuiltinPrompts, FilePrompts, HFPrompts, PromptsConfig

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "prompts"


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


def source_keys() -> SourceKeys:
    """The recipe keys that name the source being read now, for error messages."""
    return _KEYS.get()


@contextmanager
def naming(keys: SourceKeys) -> Iterator[None]:
    """Source errors raised in this block name ``keys`` (generators: wrap where they are iterated)."""
    token = _KEYS.set(keys)
    try:
        yield
    finally:
        _KEYS.reset(token)


class PromptSourceError(UsageError):
    """The prompt source cannot be read; the message says which row/column and what to do."""


@dataclass(frozen=True)
class RawRow:
    index: int
    prompt: Any
    references: Any
    has_references: bool = True  # the row had the references field at all (JSONL rows may lack it)


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
    return all(name in fields and _is_text(fields[name]) for name in (columns.ROLE, columns.CONTENT))


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
    names: list[str] | None,
    batch_rows: int,
    unreadable: Callable[[Exception], Exception],
) -> Iterator[pa.RecordBatch]:
    """Record batches one row group at a time; any Arrow failure becomes ``unreadable(exc)``.

    Row group by row group because pyarrow cannot return a nested column holding dictionary
    (categorical) values in a batch that spans two row groups ("Nested data conversions not
    implemented for chunked array outputs"), e.g. messages whose ``role`` is a pandas categorical.
    """
    for group in range(parquet.num_row_groups):
        reader = parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=names)
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
