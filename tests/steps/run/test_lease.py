"""Leases: one run at a time per output and work location, between real processes, locally and on S3.

The S3 cases run against moto's server on loopback (as ``test_s3``), whose conditional writes
(``If-None-Match``, ``If-Match``) are what the lease's compare-and-swap uses there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import pytest

from flows import build_prefs as bp
from flows import cli
from schemas.locks import LockSettings, lock_settings
from schemas.recipe import RecipeError
from steps.run import lease
from tests.conftest import ROOT
from tests.flows.test_s3 import bucket, s3_endpoint  # noqa: F401  (fixtures, used by name)
from tests.steps.run.test_resume import write_recipe

pytestmark = pytest.mark.integration  # real processes and moto's S3 server

FAST = LockSettings(expiry_s=3.0, renew_s=0.5)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One location, on a local disk or in a bucket of the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    name = request.getfixturevalue("bucket")
    return f"s3://{name}/out"


def worker(root: str, log: Path, name: str, hold: str, expiry_s: float = 3.0) -> subprocess.Popen[str]:
    """``tests.lease_worker`` in its own process (and process group), output captured."""
    cmd = [
        sys.executable,
        "-m",
        "tests.lease_worker",
        root,
        str(log),
        name,
        hold,
        str(expiry_s),
        "0.5",
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 60) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"worker never printed {text!r}:\n{''.join(lines)}")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_processes_take_turns_and_publication_never_interleaves(
    root: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    log, go = tmp_path / "events.log", tmp_path / "go"
    first = worker(root, log, "A", hold=str(go))
    procs.append(first)
    wait_for_line(first, "HELD")  # A is mid-publication (card written, manifest not) until `go` exists
    second = worker(root, log, "B", hold="0.2")
    procs.append(second)
    told = wait_for_line(second, "waiting")
    go.touch()
    out_a, _ = first.communicate(timeout=60)
    out_b, _ = second.communicate(timeout=60)
    out_b = "".join(told) + out_b
    assert first.returncode == 0 and second.returncode == 0, out_a + out_b

    events = [line.split() for line in log.read_text().splitlines()]
    assert [(what, who) for _, what, who in events] == [
        ("enter", "A"),
        ("exit", "A"),
        ("enter", "B"),
        ("exit", "B"),
    ]
    # B waited, and said for whom: A's owner id, host and pid, and when A's lease expires.
    holder = f"pid {first.pid}"
    waiting = [line for line in out_b.splitlines() if "waiting" in line]
    assert waiting and holder in waiting[0] and "worker A" in waiting[0] and "expires" in waiting[0], out_b
    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache()
    assert fs.cat_file(f"{path}/README.md") == fs.cat_file(f"{path}/manifest.json") == b"B"
    assert not fs.exists(f"{path}/{lease.LEASE_FILE}"), "a released lease is removed"


def test_a_sigkilled_holders_lease_is_taken_over_at_once_on_its_machine(
    root: str, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Same kernel and pid namespace: the dead pid is proof enough, no need to wait for the expiry."""
    holder = worker(root, tmp_path / "events.log", "A", hold="600", expiry_s=600.0)
    procs.append(holder)
    wait_for_line(holder, "HELD")
    with pytest.raises(lease.LeaseBusyError, match=f"pid {holder.pid}") as busy:  # alive: busy
        lease.acquire(root, LockSettings(on_busy="fail"), "test")
    assert "worker A" in str(busy.value) and "--on-busy wait" in str(busy.value)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()

    said: list[str] = []
    taken = lease.acquire(root, LockSettings(on_busy="fail"), "test", report=said.append)
    try:
        assert any("taking over the stale lease" in line and f"pid {holder.pid}" in line for line in said)
        taken.check()
    finally:
        taken.release()


def test_a_lease_left_on_another_machine_blocks_until_it_expires_then_is_taken_over(root: str) -> None:
    """Its pid means nothing here, so only the expiry frees it."""
    store = lease._store(root)
    # Valid for 60 s while the busy cases run (a slow machine cannot let it expire under them)...
    other = replace(lease.Holder.new("elsewhere-run", "build-prefs nightly", 60.0), host="gpu-7", space="x")
    version = store.swap(other.to_bytes(), None)
    assert version is not None

    with pytest.raises(lease.LeaseBusyError, match="host gpu-7") as busy:
        lease.acquire(root, LockSettings(on_busy="fail"), "test")
    assert "elsewhere-ru" in str(busy.value) and "expires" in str(busy.value)
    with pytest.raises(lease.LeaseBusyError, match="gave up after waiting"):
        lease.acquire(root, FAST.model_copy(update={"max_wait_s": 0.5}), "test")

    # ... then renewed by its holder to expire in 3 s, and never again: the waiter takes it over then.
    assert store.swap(replace(other, expires_at=time.time() + 3.0, token="last").to_bytes(), version)
    said: list[str] = []
    taken = lease.acquire(root, FAST, "test", report=said.append)
    try:
        assert any("waiting" in line and "host gpu-7" in line for line in said), said
        assert any("taking over the stale lease" in line for line in said), said
        taken.check()
    finally:
        taken.release()


def test_the_lease_is_renewed_while_held_and_a_takeover_is_noticed(tmp_path: Path) -> None:
    root = str(tmp_path / "out")
    held = lease.acquire(root, LockSettings(expiry_s=1.5, renew_s=0.3), "test")
    try:
        first_expiry = held.holder.expires_at
        time.sleep(2.0)  # past the first expiry: only renewal keeps it
        assert held.holder.expires_at > first_expiry + 1.0  # the background thread renewed it
        held.check()
        # Another run takes it over (as if this one had stalled past its expiry).
        path = tmp_path / "out" / lease.LEASE_FILE
        other = lease.Holder.new("someone-else", "other run", 60.0)
        store = lease._store(root)
        # The renewal thread may write between our read and our swap: retry on a stale version.
        while store.swap(other.to_bytes(), store.read()[1]) is None:
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                held.check()
            except lease.LeaseLostError as exc:
                assert "someone-els" in str(exc) and "other run" in str(exc)
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the takeover was never noticed")
    finally:
        held.release()
    assert json.loads(path.read_bytes())["owner"] == "someone-else", "a lost lease is not removed on release"


def test_lock_options_are_validated_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="renew_s .* at most a third of expiry_s"):
        lock_settings(expiry_s=10, renew_s=5)
    with pytest.raises(RecipeError, match="on_busy"):
        lock_settings(on_busy="sometimes")
    assert lock_settings(on_busy=None, expiry_s=None) == LockSettings()
    code = cli.build_prefs_main(["--output", str(tmp_path / "o"), "--lock-expiry", "2", "--lock-renew", "1"])
    assert code == 2 and not (tmp_path / "o").exists()


def test_a_run_on_a_busy_output_with_on_busy_fail_stops_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bp.stages, "sample_shard", lambda *a: pytest.fail("sampled under another's lease"))
    out = tmp_path / "out"
    other = lease.acquire(str(out), LockSettings(), "build-prefs another-run")
    try:
        code = cli.build_prefs_main(
            ["--recipe", write_recipe(tmp_path), "--output", str(out), "--on-busy", "fail"]
        )
    finally:
        other.release()
    err = capsys.readouterr().err
    assert code == 1 and f"pid {os.getpid()}" in err and "build-prefs another-run" in err, err
    assert not (out / "manifest.json").exists() and not (out / ".work" / "sampling").exists()


def test_release_never_removes_a_lease_another_run_took_over_in_between(bucket: str) -> None:  # noqa: F811
    """On S3 the delete compares and deletes in one request (``If-Match``): a takeover landing after
    the run last read its lease, as if between that read and the delete, keeps the new holder's
    lease. (On a local disk both happen under one ``flock``, so no takeover can land between.)"""
    store = lease._store(f"s3://{bucket}/out")
    ours = store.swap(lease.Holder.new("us", "this run", 60.0).to_bytes(), None)
    assert ours is not None
    theirs = lease.Holder.new("them", "the run that took over", 60.0).to_bytes()
    assert store.swap(theirs, ours) is not None
    stale_read = (b"", ours)  # what the releasing run saw just before the takeover
    store.read = lambda: stale_read  # type: ignore[method-assign]
    store.delete(ours)
    del store.read
    assert store.read()[0] == theirs


def test_a_run_whose_output_lease_was_taken_over_does_not_publish(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine: Any,
) -> None:
    """The real flow, its lease stolen after every stage ran and before publishing (a run stalled past
    its expiry while another took over): it stops, publishing nothing, and leaves the new holder's lease."""
    out = tmp_path / "out"
    other = lease.Holder.new("the-new-holder", "another run", 600.0)
    real = bp.cost_summary

    def taken_over_now(*args: Any, **kwargs: Any) -> Any:
        store = lease._store(str(out))
        while store.swap(other.to_bytes(), store.read()[1]) is None:  # the renewal may write in between
            time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(bp, "cost_summary", taken_over_now)
    with pytest.raises(lease.LeaseLostError, match="the-new-h"):
        bp.build_prefs(recipe=write_recipe(tmp_path), output=str(out))
    assert not (out / "manifest.json").exists() and not (out / "README.md").exists()
    assert json.loads((out / lease.LEASE_FILE).read_bytes())["owner"] == "the-new-holder"
