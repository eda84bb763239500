"""Exactly-once work: every (stage, shard) result is addressed by what made it.

A shard's key hashes the stage, the stage's code version, the settings that
shape its output and the checksums of its input shards. Nothing else: not the
run, not the time, not the recipe as a whole. So a rerun of the same command
finds every finished shard and pays only for the rest. A change to a stage's
settings (or a bump of its code version below) changes that stage's keys, so it
is recomputed; later stages are keyed by its outputs' checksums, so they are
recomputed exactly when its output changed (a bump that reproduces the same
bytes costs that stage only). Earlier stages are found again untouched:
changing a filter never resamples.

A result counts only when its marker, written after the data, is present and the
data still hashes to the checksum in the marker. A shard killed mid-write, a
truncated file or one corrupted later is therefore computed again, never read.
Markers are single small objects, so this holds on object stores too, where a
write is all-or-nothing and there is no rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec

from schemas import stage_names
from schemas.recipe import NOT_SHAPING
from steps.base import ShardResult, StageStats
from steps.run.files import join_uri

log = logging.getLogger(__name__)

# Bump a stage's number when a code change alters what it writes for the same input; its shards
# (and all later stages') are then recomputed on the next run, earlier stages are reused.
CODE_VERSIONS: dict[str, int] = {
    stage_names.PROMPTS: 1,
    "decontamination": 1,  # an eval set's n-gram index (steps.prompts.decontaminate)
    stage_names.SAMPLING: 1,
    "label:bleu": 1,
    "label:density_ratio": 1,
    "label:follow_up": 1,
    "label:judge_pointwise": 2,  # 2: one quote marker per prompt (was per reply)
    "label:judge_pairwise": 2,  # 2: details.p_beats keyed by the opponent (was the reply's own index)
    "label:reward_model": 1,
    "labels": 1,
    stage_names.PAIRING: 1,
    stage_names.CONSISTENCY: 2,  # 2: ambiguous_below 0.0 is a floor under the quantile cut
    "publish": 1,
}

MARKER_SUFFIX = ".done.json"


def shaping_settings(value: Any) -> Any:
    """A config dump without the keys that only affect speed (or, for labels, the pairing weight)."""
    if isinstance(value, dict):
        return {k: shaping_settings(v) for k, v in value.items() if k not in NOT_SHAPING}
    if isinstance(value, list | tuple):
        return [shaping_settings(v) for v in value]
    return value


def sha256_of(uri: str) -> str | None:
    """Checksum of a stored file, or None when it cannot be read."""
    fs, path = fsspec.core.url_to_fs(uri)
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except (FileNotFoundError, OSError):
        return None
    return digest.hexdigest()


@dataclass(frozen=True)
class Done:
    """A finished (stage, shard): its files by role, their checksums, and what the stage reported."""

    key: str
    files: dict[str, str]
    checksums: dict[str, str]
    rows: dict[str, int]
    stats: StageStats
    extra: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False

    def result(self, role: str = "data") -> ShardResult:
        return ShardResult(
            self.files[role], self.rows[role], self.stats, self.checksums[role], resumed=self.resumed
        )


Compute = Callable[[dict[str, str]], tuple[StageStats, dict[str, int], dict[str, Any]]]


@dataclass(frozen=True)
class WorkArea:
    """Where finished shards live between runs (``<output>/.work`` unless the user names another URI).

    ``fresh`` ignores every marker, so everything is recomputed (and overwritten).
    """

    root: str
    fresh: bool = False

    def key(self, stage: str, settings: Any, inputs: Sequence[str]) -> str:
        """The address of a shard: stage, its code version, its settings and its inputs' checksums."""
        version = CODE_VERSIONS[stage]
        blob = json.dumps(
            {"stage": stage, "version": version, "settings": settings, "inputs": list(inputs)},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _dir(self, stage: str) -> str:
        return join_uri(self.root, stage.replace(":", "/"))

    def file_uri(self, stage: str, key: str, role: str = "data") -> str:
        return join_uri(self._dir(stage), f"{key}.{role}.parquet")

    def marker_uri(self, stage: str, key: str) -> str:
        return join_uri(self._dir(stage), f"{key}{MARKER_SUFFIX}")

    @staticmethod
    def entry(stage: str, key: str) -> str:
        """A finished shard's name in run records and GC: its files' path below the root, sans suffix."""
        return f"{stage.replace(':', '/')}/{key}"

    def entry_of(self, uri: str) -> str:
        """The entry a shard file of this work location belongs to (the inverse of ``file_uri``).

        Compared as the store sees both paths: a shard written under another spelling of the same
        location (``w/.work`` before, its absolute path now with a model pool) is still under it.
        """
        _, root = fsspec.core.url_to_fs(self.root)
        _, path = fsspec.core.url_to_fs(uri)
        prefix = f"{root.rstrip('/')}/"
        if not path.startswith(prefix):
            raise ValueError(f"{uri} is not a shard file under the work location {self.root}")
        return path.removeprefix(prefix).split(".", 1)[0]

    def lookup(self, stage: str, key: str) -> Done | None:
        """A finished shard whose files still match their checksums, else None (so it is recomputed)."""
        if self.fresh:
            return None
        fs, path = fsspec.core.url_to_fs(self.marker_uri(stage, key))
        try:
            with fs.open(path, "r", encoding="utf-8") as handle:
                marker = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a marker cut short by a kill is not a marker
            log.warning("ignoring unreadable marker %s (%s); recomputing", path, exc)
            return None
        for role, uri in marker["files"].items():
            if sha256_of(uri) != marker["checksums"][role]:
                log.warning("%s shard %s: %s does not match its checksum; recomputing", stage, key, uri)
                return None
        return Done(
            key=key,
            files=marker["files"],
            checksums=marker["checksums"],
            rows=marker["rows"],
            stats=StageStats.from_dict(marker["stats"]),
            extra=marker.get("extra", {}),
            resumed=True,
        )

    def run(self, stage: str, key: str, compute: Compute, roles: Sequence[str] = ("data",)) -> Done:
        """The finished shard for ``key``: found again if it exists intact, otherwise computed now.

        ``compute`` gets the URI to write for each role and returns the stage's stats, the rows
        written per role and any extra facts to keep with the marker.
        """
        found = self.lookup(stage, key)
        if found is not None:
            return found
        files = {role: self.file_uri(stage, key, role) for role in roles}
        stats, rows, extra = compute(files)
        checksums = {}
        for role, uri in files.items():
            digest = sha256_of(uri)
            if digest is None:
                raise RuntimeError(f"{stage}: the step did not write its {role} file {uri}")
            checksums[role] = digest
        marker = {
            "stage": stage,
            "key": key,
            "version": CODE_VERSIONS[stage],
            "files": files,
            "checksums": checksums,
            "rows": rows,
            "stats": stats.to_dict(),
            "extra": extra,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        from steps.run import faults

        faults.checkpoint(f"{stage}:before-marker")
        fs, path = fsspec.core.url_to_fs(self.marker_uri(stage, key))
        with fs.open(path, "w", encoding="utf-8") as handle:
            json.dump(marker, handle, indent=1, sort_keys=True, ensure_ascii=False)
        faults.checkpoint(f"{stage}:done")
        return Done(key, files, checksums, rows, stats, extra, resumed=False)
