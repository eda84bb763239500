"""What every stage shares: shard I/O through fsspec and statistics with drop reasons.

A stage works on one shard at a time and hands the next stage a URI, never a
table, so a shard can be computed anywhere (thread, process, another machine)
and read back by whoever needs it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.records import conform


@dataclass
class StageStats:
    """Counts a stage reports for one shard; merged across shards into run statistics.

    ``drops`` maps a reason code to how many items were dropped for it, so that
    every row that does not reach the output is accounted for by name.
    """

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # Seconds of named parts of the stage (each labeler of the labeling stage), summed over shards.
    timings: dict[str, float] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1, example: str | None = None) -> None:
        """Count a drop; the first example per reason is kept so a person can see why."""
        self.drops[reason] += count
        if example is not None:
            self.examples.setdefault(reason, example)

    def merge(self, other: StageStats) -> StageStats:
        merged = StageStats(self.stage)
        for part in (self, other):
            merged.rows_in += part.rows_in
            merged.rows_out += part.rows_out
            merged.drops.update(part.drops)
            merged.counts.update(part.counts)
            for reason, example in part.examples.items():
                merged.examples.setdefault(reason, example)
            merged.seconds += part.seconds
            for name, seconds in part.timings.items():
                merged.timings[name] = merged.timings.get(name, 0.0) + seconds
        return merged

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "drops": dict(sorted(self.drops.items())),
            "counts": dict(sorted(self.counts.items())),
            "examples": dict(sorted(self.examples.items())),
            "seconds": round(self.seconds, 3),
            "timings": {name: round(value, 3) for name, value in sorted(self.timings.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageStats:
        return cls(
            stage=data["stage"],
            rows_in=data["rows_in"],
            rows_out=data["rows_out"],
            drops=Counter(data.get("drops", {})),
            counts=Counter(data.get("counts", {})),
            examples=dict(data.get("examples", {})),
            seconds=data.get("seconds", 0.0),
            timings=dict(data.get("timings", {})),
        )


def merge_stats(stage: str, parts: list[StageStats]) -> StageStats:
    total = StageStats(stage)
    for part in parts:
        total = total.merge(part)
    return total


@dataclass(frozen=True)
class ShardResult:
    """What a shard task returns: where its table lives and what happened to its rows.

    ``sha256`` is the file's checksum (the next stage's keys are built from it);
    ``resumed`` says the shard was found finished from an earlier run, not computed now.
    ``slot`` (prompt shards) names the prompts the shard was cut from before the prompt filters
    dropped any: shards of one slot hold subsets of the same prompts, so when only a filter setting
    changed, sampling finds each surviving prompt's samples in the slot's earlier shard.
    """

    uri: str
    rows: int
    stats: StageStats
    sha256: str = ""
    resumed: bool = False
    slot: str = ""


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
    temporary = f"{path}{TEMP_INFIX}{_space_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
        if space != _space_tag() or not pid.isdigit() or alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(folder, entry))
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


@functools.cache  # a process's boot and pid namespace never change; read once, not per directory entry
def pid_space() -> str:
    """This kernel boot and pid namespace: where a pid means the same process (Linux; else unknown).

    A hostname is not enough: containers sharing one (host networking) have their own pids.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@functools.cache
def _space_tag() -> str:
    """``pid_space`` as a short name part; where it is unknown, the host (the best left)."""
    space = pid_space()
    if not space:
        return socket.gethostname().replace("-", "_")
    return hashlib.sha256(space.encode()).hexdigest()[:12]


def alive(pid: int) -> bool:
    """Whether a process has ``pid`` (in this pid space); someone else's process counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
