"""The ``prefsmith`` command and the error tree it turns into exit codes."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from flows import cli
from schemas.errors import EXIT_RUN_ERROR, EXIT_USAGE_ERROR, PrefsmithError, RunError, UsageError
from tests.conftest import ROOT
from tests.test_imports import modules

# Raised and caught inside one step to turn a row into a drop reason; never reaches a person.
INTERNAL = {"steps.prompts.normalise.InvalidRow"}


def test_every_error_we_raise_belongs_to_one_family() -> None:
    """A new error class must say which exit code it gets: usage (2) or run (1)."""
    loose, both = [], []
    for name in modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                cls.__module__ != name
                or not issubclass(cls, Exception)
                or f"{name}.{cls.__name__}" in INTERNAL
            ):
                continue
            if not issubclass(cls, PrefsmithError):
                loose.append(f"{name}.{cls.__name__}")
            elif issubclass(cls, UsageError) and issubclass(cls, RunError):
                both.append(f"{name}.{cls.__name__}")
    assert loose == [] and both == []


@pytest.mark.integration
def test_the_console_script_dispatches_and_maps_errors_to_exit_codes(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "prefsmith"
    assert script.is_file(), "pip install -e . installs the prefsmith console script"
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0 and all(name in shown.stdout for name in ("run", "eval", "gc"))
    wrong = subprocess.run(
        [str(script), "run", "--recipe", "no-such-recipe"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert wrong.returncode == EXIT_USAGE_ERROR, wrong.stderr
    assert (
        wrong.stderr.startswith("error: no recipe named 'no-such-recipe'") and "Traceback" not in wrong.stderr
    )
    assert not (tmp_path / "outputs").exists()  # nothing ran


def test_a_run_error_exits_1_with_its_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Refused(RunError):
        hint = "rerun the same command"

    def fails(args: object) -> int:
        raise Refused("the push was refused")

    monkeypatch.setitem(cli.COMMANDS, "gc", (*cli.COMMANDS["gc"][:2], fails))
    assert cli.main(["gc", "--work", str(ROOT / "never-created")]) == EXIT_RUN_ERROR
    err = capsys.readouterr().err
    assert err == "error: the push was refused\nrerun the same command\n"
