"""GC of the work location: it keeps what the last runs used, frees the rest, and is safe to kill.

Runs are in process with the fake engine (as ``test_resume``); GC goes through the CLI
(``python -m flows.build_prefs --gc``), in process or, for the kill, in a child process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flows import build_prefs as bp
from flows import cli
from schemas.locks import LockSettings
from steps.base import StageStats
from steps.run import faults, lease, work_gc
from steps.run.resume import WorkArea
from tests.conftest import ROOT, FakeEngine
from tests.steps.run.test_resume import markers, run, write_recipe


def files(work: Path) -> dict[str, int]:
    """Every work entry file with its size (run records and the lease left out)."""
    return {
        str(p.relative_to(work)): p.stat().st_size
        for p in work.rglob("*")
        if p.is_file() and not p.name.startswith(".") and work_gc.RECORDS_DIR not in p.parts
    }


def two_settings(tmp_path: Path) -> tuple[Path, str]:
    """One output, runs with seeds 3 then 4 of the same recipe: two settings' entries in one work location."""
    out = tmp_path / "out"
    old, new = write_recipe(tmp_path), write_recipe(tmp_path, **{"sampling.seed": 4})
    run(old, out)
    run(new, out)
    return out, new


def gc(work: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.build_prefs_main(["--gc", "--work", str(work), "--keep-runs", "1", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def freed(report: str) -> int:
    return int(report.rsplit("(", 1)[1].split()[0])


def test_gc_keeps_the_latest_runs_entries_frees_the_rest_and_waits_for_live_runs(
    tmp_path: Path,
    engine: FakeEngine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, new = two_settings(tmp_path)
    work = out / ".work"
    before, latest = files(work), markers(work)
    records = list((work / work_gc.RECORDS_DIR / "resume-test").glob("*.json"))
    assert len(records) == 2 and all(json.loads(p.read_text())["status"] == "finished" for p in records)

    code, said = gc(work, capsys, "--dry-run")
    assert code == 0 and "would remove" in said, said
    assert files(work) == before, "a dry run removes nothing"
    assert sorted((work / work_gc.RECORDS_DIR / "resume-test").glob("*.json")) == sorted(records)
    would_free = freed(said)
    assert would_free > 0

    # A live run (here: anyone holding the work location's lease) blocks GC.
    other = lease.acquire(str(work), LockSettings(), "build-prefs live-run")
    try:
        code, said = gc(work, capsys, "--on-busy", "fail")
    finally:
        other.release()
    assert code == 1 and "build-prefs live-run" in said and f"pid {os.getpid()}" in said, said
    assert files(work) == before

    code, said = gc(work, capsys)
    assert code == 0 and freed(said) == would_free, said
    after = files(work)
    assert sum(before.values()) - sum(after.values()) == would_free
    gone = {path.split("/")[0] for path in set(before) - set(after)}
    assert {"sampling", "label", "labels", "pairing", "consistency"} <= gone  # the seed-3 setting's
    assert "prompts" not in gone, "prompt shards do not depend on the seed: both runs used them"
    assert len(list((work / work_gc.RECORDS_DIR / "resume-test").glob("*.json"))) == 1

    # The latest recipe resumes fully: nothing sampled, no marker rewritten.
    calls = engine.calls
    run(new, out)
    now = markers(work)
    assert engine.calls == calls and set(now) <= set(latest) and all(now[p] == latest[p] for p in now)


def test_gc_killed_midway_leaves_a_state_that_the_next_gc_and_the_next_run_complete(
    tmp_path: Path,
    engine: FakeEngine,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, new = two_settings(tmp_path)
    work = out / ".work"
    before, latest = files(work), markers(work)
    env = {**os.environ, faults.ENV: "gc:file-removed#2"}  # after the first entry's marker and one data file
    cmd = [sys.executable, "-m", "flows.build_prefs", "--gc", "--work", str(work), "--keep-runs", "1"]
    cmd += ["--lock-expiry", "3", "--lock-renew", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    halfway = files(work)
    assert len(before) - len(halfway) == 2 and (work / lease.LEASE_FILE).exists(), (
        "killed with its lease held"
    )
    torn = sorted(set(before) - set(halfway))
    assert any(p.endswith(".done.json") for p in torn), "the marker goes first"

    # The killed GC's lease expires and is taken over; this GC removes the rest.
    code, said = gc(work, capsys, "--lock-expiry", "3", "--lock-renew", "1")
    assert code == 0 and "taking over the stale lease" in said, said
    after = files(work)
    assert freed(said) == sum(halfway[p] for p in set(halfway) - set(after))
    assert not any(p.split(".")[0] == torn[0].split(".")[0] for p in after), "the torn entry is gone"

    calls = engine.calls
    run(new, out)
    now = markers(work)
    assert engine.calls == calls, "the latest setting's entries were all kept"
    assert set(now) <= set(latest) and all(now[p] == latest[p] for p in now), "and none was recomputed"


def test_an_unreadable_run_record_stops_gc_before_it_removes_anything(tmp_path: Path) -> None:
    work = tmp_path / "work"
    entry = work / "sampling" / f"{'a' * 32}.data.parquet"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"x")
    broken = work / work_gc.RECORDS_DIR / "r" / "1-x.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    with pytest.raises(work_gc.GcError, match="1-x.json"):
        work_gc.collect(str(work), keep_runs=1)
    assert entry.exists()
    broken.unlink()
    said: list[str] = []
    assert work_gc.collect(str(work), keep_runs=1, report=said.append).entries_removed == 0
    assert "no run records" in said[0] and entry.exists(), "without any record nothing is known to be unused"


def test_a_shard_written_under_another_spelling_of_the_work_location_is_still_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local run records ``w/.work``; the next, with a model pool, names the absolute path."""
    monkeypatch.chdir(tmp_path)

    def write(files: dict[str, str]) -> Any:
        Path(files["data"]).parent.mkdir(parents=True, exist_ok=True)
        Path(files["data"]).write_bytes(b"rows")
        return StageStats("sampling"), {"data": 1}, {}

    relative = WorkArea("w/.work")
    key = relative.key("sampling", {"n": 4}, [])
    relative.run("sampling", key, write)
    absolute = WorkArea(str(tmp_path / "w" / ".work"))
    done = absolute.lookup("sampling", key)
    assert done is not None
    assert absolute.entry_of(done.files["data"]) == WorkArea.entry("sampling", key)
    assert relative.entry_of(str(tmp_path / "w" / ".work" / "sampling" / f"{key}.data.parquet")) == (
        WorkArea.entry("sampling", key)
    )
    with pytest.raises(ValueError, match="not a shard file under the work location"):
        absolute.entry_of(str(tmp_path / "elsewhere" / f"{key}.data.parquet"))


def test_a_gc_that_cannot_go_on_after_publishing_warns_and_the_run_still_succeeds(
    tmp_path: Path,
    engine: FakeEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GC is housekeeping: an unreadable run record stops it, not the run that already published."""
    out = tmp_path / "out"
    junk = out / ".work" / work_gc.RECORDS_DIR / "resume-test" / "0-junk.json"
    junk.parent.mkdir(parents=True)
    junk.write_text("not a run record")
    with caplog.at_level("WARNING"):
        assert bp.build_prefs(recipe=write_recipe(tmp_path), output=str(out), gc_keep_runs=1) == str(out)
    assert (out / "manifest.json").exists() and junk.exists()
    assert any("gc of" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
