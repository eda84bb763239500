"""SIGKILL the CLI process alone, at random moments: no process it started survives it, and reruns
finish the uninterrupted run's dataset.

``tests/steps/run/test_faults.py`` kills whole process groups at named checkpoints; here only the CLI's own pid
gets the signal, as the OOM killer or a segfault would do, so whatever it started must notice by
itself. The kill loop draws its moments from a seeded RNG: a stage, and a random delay within that
stage's duration as measured on an uninterrupted run, counted from when the attempt's log shows the
stage beginning. Each kill's landing stage is read back from the attempt's log and printed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from steps.publish import writer
from steps.run import lease, resume, work_gc
from tests.conftest import ROOT
from tests.steps.run.test_faults import dataset, env, recipe, tiny_model  # noqa: F401  (fixtures, used by name)

pytestmark = pytest.mark.model

KILLS = 10
SEED = 17
# Stage → the log line after which it runs (None: from launch). Progress lines come after each shard.
STAGES: dict[str, str | None] = {
    "startup": None,  # imports, checks, the temporary server, the prompts
    "sampling": r"prompts: \d+ kept of \d+ read",
    "labeling": r"sampling shard (\d+)/\1:",
    "pairing": r"labeling shard (\d+)/\1:",
    "consistency": r"pairing shard (\d+)/\1:",
    "publish": r"consistency: \d+ candidate pairs",
    "exit": r"published run ",  # the flow's end, Prefect's exit hooks, the server's stop
}
SERVER_LINE = re.compile(r"Starting temporary server on http://127\.0\.0\.1:(\d+)")


@dataclass
class Attempt:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def launch(recipe: Path, out: Path, env: dict[str, str], log: Path) -> Attempt:  # noqa: F811
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.build_prefs", "--recipe", str(recipe), "--output", str(out)],
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the CLI leads a process group holding everything it starts
        )
    return Attempt(proc, log, time.monotonic())


def wait_for_line(attempt: Attempt, pattern: str | None, timeout: float = 300) -> bool:
    """True once ``pattern`` is in the attempt's log; False if the run ended first."""
    if pattern is None:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, attempt.text()):
            return True
        if attempt.proc.poll() is not None:
            return bool(re.search(pattern, attempt.text()))
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} did not appear in {timeout} s:\n{attempt.text()[-3000:]}")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def left_alive(pgid: int, started: list[psutil.Process]) -> list[str]:
    """Processes that ``pgid``'s leader started and that still run (zombies awaiting init are dead)."""
    found = {}
    for proc in started:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = " ".join(proc.cmdline())[:160]
        except psutil.Error:
            pass
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found[proc.pid] = " ".join(proc.info["cmdline"] or [])[:160]
        except (OSError, psutil.Error):
            pass
    return [f"{pid}: {cmd}" for pid, cmd in sorted(found.items())]


def assert_nothing_left(pgid: int, started: list[psutil.Process], within: float = 15) -> float:
    """Wait until every process the CLI started has ended; returns how long that took."""
    begun = time.monotonic()
    while (alive := left_alive(pgid, started)) and time.monotonic() - begun < within:
        time.sleep(0.05)
    try:
        assert not alive, f"still alive {within:.0f} s after the CLI died:\n" + "\n".join(alive)
    finally:
        for line in alive:  # never leave them to the rest of the suite
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    return time.monotonic() - begun


def sigkill_cli(attempt: Attempt) -> tuple[list[psutil.Process], float]:
    """SIGKILL the CLI's pid only (not its group); returns what it had started and how long they lasted."""
    started = descendants(attempt.proc.pid)
    attempt.proc.send_signal(signal.SIGKILL)
    attempt.proc.wait()
    return started, assert_nothing_left(attempt.proc.pid, started)


def finish(attempt: Attempt) -> None:
    """Wait for a run to end normally; it must succeed and leave nothing running."""
    started: list[psutil.Process] = []
    while attempt.proc.poll() is None:
        started += [p for p in descendants(attempt.proc.pid) if p not in started]
        time.sleep(0.1)
    assert attempt.proc.returncode == 0, attempt.text()[-4000:]
    assert_nothing_left(attempt.proc.pid, started)


def stage_at_end(log: str) -> str:
    """The stage a run was in when its log stops: the one after the last stage boundary it shows."""
    last, where = "startup", -1
    for stage, pattern in STAGES.items():
        if pattern is None:
            continue
        for match in re.finditer(pattern, log):
            if match.start() > where:
                last, where = stage, match.start()
    return last


def files_outside_manifest(out: Path) -> list[str]:
    """Files in the output that no manifest lists and no marker of the work area accounts for."""
    manifest = writer.verify(str(out))
    listed = {e["path"] for e in manifest["files"] + manifest.get("extras", [])} | {
        "manifest.json",
        "README.md",
    }
    work = out / ".work"
    owned = set()
    for marker in work.rglob(f"*{resume.MARKER_SUFFIX}"):
        owned.add(str(marker))
        owned.update(str(Path(uri)) for uri in json.loads(marker.read_text())["files"].values())
    # Files that belong to a run but to no shard: the lock's guard beside each lease (kept so every
    # process locks one inode), the runs' records for GC, and the slot lists sampling reuses.
    lock_guard = f"{lease.LEASE_FILE}.guard"
    records, slots = work / work_gc.RECORDS_DIR, work / "sampling" / "slots"
    stray = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        relative = str(path.relative_to(out))
        if path.name == lock_guard and path.parent in (out, work):
            continue
        if path.is_relative_to(work):
            # Only finished writes: a ``*.json.tmp-*`` left by a killed rewrite is a stray.
            kept = path.suffix == ".json" and (path.is_relative_to(records) or path.parent == slots)
            if str(path) not in owned and not kept:
                stray.append(relative)
        elif relative not in listed:
            stray.append(relative)
    return stray


def test_a_cli_killed_by_sigkill_leaves_no_process_behind_and_the_rerun_is_unaffected(
    recipe: Path,  # noqa: F811
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    attempt = launch(recipe, out, env, tmp_path / "killed.log")
    wait_for_line(attempt, r"Beginning flow run")  # the temporary server is up and the flow runs
    port = int(SERVER_LINE.search(attempt.text()).group(1))  # type: ignore[union-attr]
    started = descendants(attempt.proc.pid)
    commands = [" ".join(p.cmdline()) for p in started]
    # The CLI's own server, bound to its lifetime; Prefect did not start one of its own (uvicorn).
    assert any("flows.temp_server" in cmd for cmd in commands), commands
    assert not any("uvicorn" in cmd for cmd in commands), commands
    attempt.proc.send_signal(signal.SIGKILL)
    attempt.proc.wait()
    seconds = assert_nothing_left(attempt.proc.pid, started)
    print(f"the temporary server ended {seconds:.2f} s after the CLI was killed")
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # its port is free again

    finish(launch(recipe, out, env, tmp_path / "rerun.log"))
    writer.verify(str(out))


@pytest.mark.slow
def test_kill_loop_at_random_moments_of_every_stage_ends_in_the_uninterrupted_dataset(
    recipe: Path,  # noqa: F811
    env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    # The uninterrupted run, timed stage by stage from its own log as it grows.
    reference = launch(recipe, tmp_path / "reference", env, tmp_path / "reference.log")
    begins = {}
    for stage, pattern in STAGES.items():
        wait_for_line(reference, pattern)
        begins[stage] = time.monotonic()
    finish(reference)
    ends = [*list(begins.values())[1:], time.monotonic()]
    durations = {stage: end - begins[stage] for stage, end in zip(STAGES, ends, strict=True)}
    expected = dataset(tmp_path / "reference")
    assert expected["train"], "the reference run must produce pairs for the comparison to mean anything"

    # Every stage at least once, the rest drawn; each with a random moment within the stage. In
    # pipeline order: a rerun reuses the stages an earlier kill let finish and rushes through them,
    # so a kill aimed at an earlier stage than the last one would land later than aimed.
    rng = random.Random(SEED)
    draws = [(stage, rng.random() * durations[stage]) for stage in STAGES]
    draws += [
        (stage, rng.random() * durations[stage]) for stage in rng.choices(list(STAGES), k=KILLS - len(STAGES))
    ]
    order = list(STAGES)
    plan = sorted(draws, key=lambda draw: (order.index(draw[0]), draw[1]))

    outputs, report, landed_in = [tmp_path / "out-1"], [], set()
    kills = 0
    while kills < KILLS:
        stage, delay = plan[kills]
        n = len(report) + 1
        attempt = launch(recipe, outputs[-1], env, tmp_path / f"attempt-{n}.log")
        if wait_for_line(attempt, STAGES[stage]):
            time.sleep(delay)
        # A stage's log line that never appears (a reworded message) would retry for ever.
        assert len(report) < 4 * KILLS, "kills keep missing their stage:\n" + "\n".join(report)
        if attempt.proc.poll() is not None:  # finished first (this output had little left to do)
            finish(attempt)
            assert dataset(outputs[-1]) == expected
            report.append(
                f"{n:2d} {stage:>11} +{delay:5.2f}s: the run finished first; next kills in a new output"
            )
            outputs.append(tmp_path / f"out-{len(outputs) + 1}")
            # Aimed again at half the delay: a machine faster now than for the reference still converges.
            plan[kills] = (stage, delay / 2)
            continue
        _, lasted = sigkill_cli(attempt)
        if attempt.proc.returncode != -signal.SIGKILL:  # it ended between the poll and the kill
            assert attempt.proc.returncode == 0, attempt.text()[-4000:]
            report.append(f"{n:2d} {stage:>11} +{delay:5.2f}s: the run ended just before the kill")
            outputs.append(tmp_path / f"out-{len(outputs) + 1}")
            continue
        kills += 1
        landed = stage_at_end(attempt.text())
        landed_in.add(landed)
        report.append(f"{n:2d} {stage:>11} +{delay:5.2f}s: killed in {landed} ({lasted:.2f} s to no orphans)")
    print("\nkill loop (target stage, delay into it: where the kill landed):\n" + "\n".join(report))
    # The kills spread over the run, a model stage among them (a loop that only ever killed the
    # startup would prove little). Timing decides the exact landing (the last run here: six stages),
    # so this asks for a spread only, loose enough for a loaded CI machine.
    assert landed_in & {"sampling", "labeling"} and len(landed_in) >= 3, "\n".join(report)

    finish(launch(recipe, outputs[-1], env, tmp_path / "final.log"))
    for out in outputs:  # the earlier ones were finished by the attempt the loop could not kill
        assert dataset(out) == expected, f"{out.name}: the dataset differs from the uninterrupted run's"
        stray = files_outside_manifest(out)
        assert not stray, f"{out.name}: {stray}"
