"""Garbage collection of the work location: keep what recent runs used, remove the rest.

Every finished shard stays under the work location for every setting it was ever computed with,
so a nightly deployment grows it without bound. Each run therefore leaves a record,
``_runs/<recipe>/<start>-<id>.json``, listing the entries (``<stage dir>/<key>``, see
``steps.run.resume``) it used; the record is rewritten (atomically) after every stage, so a killed run's
record lists what it finished up to its last complete stage. GC keeps every entry that the last N
runs of each recipe used and removes the others.

It runs only under the work location's lease (``steps.run.lease``), so no live run's entries are ever
touched, and it is safe to kill anywhere: an entry's marker is removed before its data, so a killed
GC leaves data without a marker, which a resume never trusts (``WorkArea.lookup`` needs the marker
and its checksums) and the next GC removes; the records of dropped runs go last, so a rerun of GC
finds the same entries to remove.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec

from schemas.errors import RunError
from schemas.recipe import RecipeError
from steps.run import faults
from steps.run.files import join_uri, write_bytes_atomic
from steps.run.resume import MARKER_SUFFIX

log = logging.getLogger(__name__)

RECORDS_DIR = "_runs"
# Three: the latest run's entries are what the next run resumes from; the one before lets a
# reverted recipe change (or an A/B of two settings) cost nothing; the third covers a killed run
# that took a slot with a partial record. Each kept run costs at most one copy of the work.
DEFAULT_KEEP_RUNS = 3
CHECK_EVERY_S = 1.0  # how often a GC confirms it still holds the work location's lease
RECORD_EVERY_S = 30.0  # within a stage, a run's record is rewritten at most this often
# A work entry's files: <stage dir>/<32 hex key>.<role>.parquet and <stage dir>/<key>.done.json.
_ENTRY_FILE = re.compile(r"^(?P<entry>(?:[A-Za-z0-9_]+/)+[0-9a-f]{32})\.[^/]+$")


class GcError(RunError):
    """GC cannot tell what is in use (an unreadable run record); nothing was removed."""


@dataclass
class RunRecord:
    """What one run used of the work location; GC keeps the entries of the last N runs per recipe."""

    root: str
    recipe: str
    output: str
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="microseconds"))
    status: str = "running"
    entries: set[str] = field(default_factory=set)
    _written: float = field(default=-math.inf, repr=False)

    @property
    def uri(self) -> str:
        stamp = re.sub(r"[^0-9]", "", self.started_at)
        return join_uri(self.root, RECORDS_DIR, self.recipe, f"{stamp}-{self.run}.json")

    def add(self, entries: Iterable[str], at_most_every_s: float = 0.0) -> None:
        """Record more entries as used by this run, rewriting the record in one atomic write.

        With ``at_most_every_s`` the write is skipped when the last one is more recent (the entries
        are kept for the next), so recording each shard of a long stage costs a few writes an hour.
        """
        self.entries.update(entries)
        if time.monotonic() - self._written >= at_most_every_s:
            self._write()

    def flush(self) -> None:
        """Write what ``add`` held back (the end of a stage: nothing it made may go unrecorded)."""
        self._write()

    def finish(self) -> None:
        self.status = "finished"
        self._write()

    def _write(self) -> None:
        self._written = time.monotonic()
        body = {
            "recipe": self.recipe,
            "output": self.output,
            "run": self.run,
            "started_at": self.started_at,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "status": self.status,
            "entries": sorted(self.entries),
        }
        write_bytes_atomic(self.uri, json.dumps(body, indent=1).encode() + b"\n")


@dataclass(frozen=True)
class GcReport:
    """What a GC kept and removed (or, in a dry run, would remove), in entries and bytes."""

    root: str
    dry_run: bool
    runs_kept: int
    runs_dropped: int
    entries_kept: int
    bytes_kept: int
    entries_removed: int
    files_removed: int
    bytes_freed: int

    def describe(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        freed = "would free" if self.dry_run else "freed"
        return (
            f"gc of {self.root}: kept {self.entries_kept} entries ({_size(self.bytes_kept)}) used by the "
            f"last {self.runs_kept} run record(s); {verb} {self.entries_removed} entries "
            f"({self.files_removed} files) and {self.runs_dropped} older run record(s); "
            f"{freed} {_size(self.bytes_freed)} ({self.bytes_freed} bytes)"
        )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    scaled = float(n)
    for unit in ("KiB", "MiB"):
        scaled /= 1024
        if scaled < 1024:
            return f"{scaled:.1f} {unit}"
    return f"{scaled / 1024:.1f} GiB"


def _records(fs: Any, base: str) -> list[tuple[str, dict[str, Any]]]:
    """Every run record under ``base``, as (path, content); an unreadable one stops GC."""
    found = [p for p in fs.find(f"{base}/{RECORDS_DIR}") if p.endswith(".json")]
    out = []
    for path in found:
        try:
            record = json.loads(fs.cat_file(path))
        except ValueError:
            record = None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("entries"), list)
            and isinstance(record.get("recipe"), str)
            and isinstance(record.get("started_at"), str)
        ):
            raise GcError(
                f"run record {path} is unreadable or lacks entries/recipe/started_at; GC cannot tell "
                "what that run used, so it removed nothing. Inspect it (delete it if it is not a run "
                "record) and rerun."
            )
        out.append((path, record))
    return out


def check_keep_runs(keep_runs: int, name: str = "keep_runs") -> None:
    """Reject a count that would remove what the latest run used (what its resume needs)."""
    if keep_runs < 1:
        raise RecipeError(
            f"{name} must be at least 1 (got {keep_runs}): the latest run's entries are what a resume needs"
        )


def collect(
    root: str,
    keep_runs: int = DEFAULT_KEEP_RUNS,
    dry_run: bool = False,
    report: Callable[[str], None] = print,
    check: Callable[[], None] | None = None,
) -> GcReport:
    """Remove the work entries that none of the last ``keep_runs`` runs of any recipe used.

    The caller holds the work location's lease (``steps.run.lease``) for the duration; ``check`` (its
    ``Lease.check``) is called before each entry is removed, so a GC that lost the lease stops.
    """
    check_keep_runs(keep_runs)
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    fs.invalidate_cache()
    records = _records(fs, base)
    by_recipe: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path, record in records:
        by_recipe.setdefault(record["recipe"], []).append((path, record))
    kept_records, dropped_records = [], []
    for runs in by_recipe.values():
        runs.sort(key=lambda item: item[1]["started_at"], reverse=True)
        kept_records += runs[:keep_runs]
        dropped_records += [path for path, _ in runs[keep_runs:]]
    keep = {entry for _, record in kept_records for entry in record["entries"]}

    entries: dict[str, list[tuple[str, int]]] = {}
    for path, info in fs.find(base, detail=True).items():
        relative = path.removeprefix(f"{base}/")
        match = _ENTRY_FILE.match(relative)
        if match is not None and not relative.startswith(f"{RECORDS_DIR}/"):
            entries.setdefault(match["entry"], []).append((path, int(info.get("size") or 0)))
    if not records:
        report(
            f"gc of {root}: no run records under {RECORDS_DIR}/, so nothing is known to be unused; "
            "removed nothing (every run of this version leaves a record)"
        )
        doomed: dict[str, list[tuple[str, int]]] = {}
    else:
        doomed = {entry: files for entry, files in entries.items() if entry not in keep}
    kept_bytes = sum(size for entry, files in entries.items() if entry not in doomed for _, size in files)
    result = GcReport(
        root=root,
        dry_run=dry_run,
        runs_kept=len(kept_records),
        runs_dropped=len(dropped_records),
        entries_kept=len(entries) - len(doomed),
        bytes_kept=kept_bytes,
        entries_removed=len(doomed),
        files_removed=sum(len(files) for files in doomed.values()),
        bytes_freed=sum(size for files in doomed.values() for _, size in files),
    )
    if not dry_run:
        checked = -math.inf
        for entry in sorted(doomed):
            # Confirming the lease is a write to the store: once a second, not once per entry.
            if check is not None and time.monotonic() - checked >= CHECK_EVERY_S:
                check()
                checked = time.monotonic()
            # The marker first: from then on no resume trusts the entry, whatever is left of it.
            files = sorted(doomed[entry], key=lambda item: not item[0].endswith(MARKER_SUFFIX))
            for path, _ in files:
                fs.rm_file(path)
                faults.checkpoint("gc:file-removed")
        if check is not None:
            check()
        for path in dropped_records:
            fs.rm_file(path)
    report(result.describe())
    return result
