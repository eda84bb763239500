"""Shard files through fsspec: read and write against a contract, and replace a file atomically.

Every stage reads and writes through these, so a shard can live on local disk or an object
store and a reader never sees half a file.
"""

from __future__ import annotations

import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.records import conform
from steps.run.liveness import alive, space_tag


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def write_table(table: pa.Table, uri: str, schema: pa.Schema | None = None, what: str = "") -> str:
    """Write a Parquet shard, checking it against its contract first."""
    if schema is not None:
        table = conform(table, schema, what or uri)
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        pq.write_table(table, handle)
    return uri


# A local atomic write's temporary sibling: <name>.tmp-<host>-<pid>-<random>.
TEMP_INFIX = ".tmp-"


def write_bytes_atomic(uri: str, data: bytes) -> str:
    """Replace a file so that a reader sees the old bytes or the new ones, never a partial write.

    Local files go through a temporary sibling and an atomic rename; on object stores a single
    PUT already is all-or-nothing (and there is no rename), so the object is written directly, as
    one ``pipe_file`` call: s3fs sends a PUT, or a multipart upload that it aborts on failure. (A
    file opened with ``fs.open(..., "wb")`` would not do: closing it on an error commits what was
    written so far.)
    """
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return uri
    remove_stale_temporaries(path)
    temporary = f"{path}{TEMP_INFIX}{space_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return uri


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete the temporaries of ``path`` whose writer, in this pid space, no longer runs.

    A writer killed between writing its temporary and renaming it (SIGKILL runs no ``finally``)
    leaves ``<name>.tmp-<space>-<pid>-<random>`` beside the file, forever: a file no manifest
    lists. The next atomic write of the same file removes those of dead processes. A live
    writer's temporary, or one written from another machine or container sharing the folder
    (another boot or pid namespace, where its pid means nothing here), is left alone.
    """
    folder, name = os.path.split(path)
    prefix = f"{name}{TEMP_INFIX}"
    try:
        entries = [e for e in os.listdir(folder or ".") if e.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        owner = entry[len(prefix) :].rpartition("-")[0]  # <space>-<pid>, before the random part
        space, _, pid = owner.rpartition("-")
        if space != space_tag() or not pid.isdigit() or alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(folder, entry))
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


def read_table(uri: str, schema: pa.Schema | None = None) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    if schema is not None:
        table = conform(table, schema, uri)
    return table


def parquet_rows(uri: str) -> int:
    """Row count from the Parquet footer, without reading the data."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)


def shard_uri(work: str, stage: str, index: int) -> str:
    return join_uri(work, stage, f"shard-{index:05d}.parquet")
