"""Final shards in the Hugging Face layout, published so that readers never see a mix.

Every file of a dataset version goes under its own run prefix
(``runs/<run id>/data/…``, ``runs/<run id>/images/…``); nothing at the root is
touched until all of them are written. Then the card (``README.md``, whose
``configs`` point at that prefix, so ``datasets`` reads exactly those files) and
finally ``manifest.json`` replace the previous ones, each in one atomic write.
A reader therefore sees the previous complete dataset or the new complete one:
a crash before the card leaves the old card and files in place, untouched. The
manifest is the statement of what the dataset is: only the files it lists belong
to it (on object stores there is no rename, so leftovers of a crashed attempt may
exist under an unlisted prefix; they are ignored and removed by the next publish).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import columns
from schemas.recipe import Recipe
from schemas.records import conform, pairs_schema
from schemas.statistics import RunStatistics
from steps.run.files import join_uri, parquet_rows, write_bytes_atomic

MANIFEST = "manifest.json"
CARD = "README.md"
DATA_DIR = "data"
FORMAT_VERSION = 2
RUNS_DIR = "runs"
WRITE_THREADS = 4  # files encoded at once when publishing a split


def package_version() -> str:
    try:
        return metadata.version("prefsmith")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class WrittenFile:
    path: str  # relative to the output root
    rows: int
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "sha256": self.sha256, "bytes": self.bytes}


def _encode(table: pa.Table, fmt: Literal["parquet", "arrow"]) -> bytes:
    sink = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, sink, compression="zstd")
    else:
        # The IPC *stream* format is what `datasets`' arrow loader reads.
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return sink.getvalue()


def _rechunk(tables: Iterator[pa.Table], rows_per_shard: int) -> Iterator[pa.Table]:
    """Regroup a stream of tables into shards of exactly ``rows_per_shard`` (the last may be short)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        while table.num_rows:
            take = min(rows_per_shard - held, table.num_rows)
            pending.append(table.slice(0, take))
            held += take
            table = table.slice(take)
            if held == rows_per_shard:
                yield pa.concat_tables(pending)
                pending, held = [], 0
    if held:
        yield pa.concat_tables(pending)


def _row_groups(uri: str, schema: pa.Schema) -> Iterator[pa.Table]:
    """One input file a row group at a time: the consistency stage writes one file of many groups."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        for index in range(parquet.num_row_groups):
            yield conform(parquet.read_row_group(index), schema, uri)


def write_split(
    output: str,
    split: str,
    shard_uris: list[str],
    recipe: Recipe,
    schema: pa.Schema | None = None,
    prefix: str = "",
) -> tuple[list[WrittenFile], pa.Table]:
    """Write one split's shards under ``prefix``; returns the files and a one-row sample for the card.

    The recipe hash is stamped here, at publication, so that no earlier stage's output
    depends on settings that come after it.
    """
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    schema = schema or pairs_schema(recipe.signals)
    fmt = recipe.output.format
    ext = "parquet" if fmt == "parquet" else "arrow"
    data_dir = "/".join(p for p in (prefix.strip("/"), DATA_DIR) if p)
    fs.makedirs(f"{root}/{data_dir}", exist_ok=True)

    total = sum(parquet_rows(uri) for uri in shard_uris)
    count = max(1, math.ceil(total / recipe.output.rows_per_shard))
    tables = (part for uri in shard_uris for part in _row_groups(uri, schema))
    if not total:
        # `datasets` cannot read a 0-row Parquet/Arrow file, so an empty split has no file and no config.
        return [], schema.empty_table()
    stamp = recipe.fingerprint()

    def write_one(name: str, chunk: pa.Table) -> WrittenFile:
        column = chunk.schema.get_field_index(columns.RECIPE_HASH)
        if column >= 0:
            chunk = chunk.set_column(
                column, columns.RECIPE_HASH, pa.array([stamp] * chunk.num_rows, pa.string())
            )
        blob = _encode(conform(chunk, schema, name), fmt)
        with fs.open(f"{root}/{name}", "wb") as handle:
            handle.write(blob)
        return WrittenFile(name, chunk.num_rows, hashlib.sha256(blob).hexdigest(), len(blob))

    # Encoding, compressing and hashing release the GIL: files are written on a few
    # threads while the next chunk is read. At most `workers` chunks wait in memory.
    workers = max(1, min(WRITE_THREADS, os.cpu_count() or 1))
    written: list[WrittenFile] = []
    first = None
    with ThreadPoolExecutor(workers, thread_name_prefix="write-split") as pool:
        pending: deque[Future[WrittenFile]] = deque()
        for index, chunk in enumerate(_rechunk(tables, recipe.output.rows_per_shard)):
            name = f"{data_dir}/{split}-{index:05d}-of-{count:05d}.{ext}"
            pending.append(pool.submit(write_one, name, chunk))
            first = first if first is not None else chunk.slice(0, 1)
            while len(pending) > workers:
                written.append(pending.popleft().result())
        written.extend(future.result() for future in pending)
    if sum(f.rows for f in written) != total:
        raise RuntimeError(f"wrote {sum(f.rows for f in written)} rows of {total}: refusing to publish")
    assert first is not None
    return written, first


def write_extra(output: str, relative: str, data: bytes) -> WrittenFile:
    """A file that belongs to the dataset but is not data (plots, stats.json), checksummed too."""
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root.rstrip('/')}/{relative}"
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(data)
    return WrittenFile(relative, 0, hashlib.sha256(data).hexdigest(), len(data))


def write_manifest(
    output: str,
    files: dict[str, list[WrittenFile]],
    recipe: Recipe,
    stats: RunStatistics,
    extras: list[WrittenFile] | None = None,
    run_id: str = "",
) -> dict[str, Any]:
    """The last write of a publication (atomic): lists every file of the dataset with its checksum."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "package": {"name": "prefsmith", "version": package_version()},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
        "recipe": {
            "name": recipe.name,
            "hash": recipe.fingerprint(),
            "config": recipe.model_dump(mode="json"),
        },
        "splits": {split: sum(f.rows for f in entries) for split, entries in files.items()},  # 0: no files
        "files": [f.to_dict() for entries in files.values() for f in entries],
        "extras": [f.to_dict() for f in extras or []],
        "card": CARD,
        "stats": stats,
    }
    blob = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    write_bytes_atomic(join_uri(output, MANIFEST), blob)
    return manifest


def write_card_atomic(output: str, text: str) -> None:
    """Replace the card in one step: it names the files ``datasets`` reads, so it must never be partial."""
    write_bytes_atomic(join_uri(output, CARD), text.encode("utf-8"))


def remove_old_runs(output: str, keep: set[str]) -> list[str]:
    """Delete run prefixes no manifest points at any more (the previous one is kept for readers mid-read)."""
    fs, root = fsspec.core.url_to_fs(output)
    runs = f"{root.rstrip('/')}/{RUNS_DIR}"
    if not fs.exists(runs):
        return []
    removed = []
    for entry in fs.ls(runs, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if name not in keep:
            fs.rm(str(entry), recursive=True)
            removed.append(name)
    return removed


def read_manifest(output: str) -> dict[str, Any] | None:
    """The manifest of a complete dataset, or None when the directory is incomplete."""
    uri = join_uri(output, MANIFEST)
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)


def verify(output: str) -> dict[str, Any]:
    """Re-read every manifest-listed file and check its checksum; raise on any mismatch."""
    manifest = read_manifest(output)
    if manifest is None:
        raise FileNotFoundError(f"{output} has no {MANIFEST}: the dataset is incomplete")
    fs, root = fsspec.core.url_to_fs(output)
    for entry in manifest["files"] + manifest.get("extras", []):
        with fs.open(f"{root.rstrip('/')}/{entry['path']}", "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"{entry['path']}: checksum mismatch (file changed after publication)")
    return manifest


def score_summary(pair_uris: list[str], recipe: Recipe) -> dict[str, dict[str, float | int]]:
    """Distribution of the pair scores (aggregate, margin and each signal) for the card."""
    import polars as pl

    wanted = [columns.SCORE_CHOSEN, columns.SCORE_REJECTED, columns.MARGIN]
    for signal in recipe.signals:
        wanted += [
            columns.signal_column(signal, columns.CHOSEN),
            columns.signal_column(signal, columns.REJECTED),
        ]

    def numbers(uri: str) -> pa.Table:  # only these columns, never the texts
        fs, path = fsspec.core.url_to_fs(uri)
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=wanted)

    tables = [numbers(uri) for uri in pair_uris]
    if not tables or not sum(t.num_rows for t in tables):
        return {}
    # One contiguous column each: a sum over row-group chunks could differ in the last bit.
    frame = pl.from_arrow(pa.concat_tables(tables).combine_chunks())
    assert isinstance(frame, pl.DataFrame)
    summary: dict[str, dict[str, float | int]] = {}
    for name in wanted:
        col = frame.get_column(name).drop_nulls()
        if col.len() == 0:
            continue
        summary[name] = {
            "count": int(col.len()),
            "mean": float(col.mean()),  # type: ignore[arg-type]
            "std": float(col.std() or 0.0),
            "min": float(col.min()),  # type: ignore[arg-type]
            "median": float(col.median()),  # type: ignore[arg-type]
            "max": float(col.max()),  # type: ignore[arg-type]
        }
    return summary
