"""The demo's console: our progress lines stay, Prefect's echo of them and library noise go."""

from __future__ import annotations

import logging

from flows.console import QuietConsole, quiet_console


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, message, None, None)


def test_completed_echo_is_dropped_and_failures_are_kept() -> None:
    quiet = QuietConsole()
    assert not quiet.filter(record("Finished in state Completed()"))
    assert quiet.filter(record("Finished in state Failed('Task run encountered an exception')"))
    assert quiet.filter(record("sampling shard 1/2: 8 in → 32 out (drops: none) in 59.7s"))


def test_temporary_server_notice_keeps_its_first_line() -> None:
    line = record(
        "Starting temporary server on http://127.0.0.1:8481\nSee https://docs.prefect.io/ for more."
    )
    assert QuietConsole().filter(line)
    assert line.getMessage() == "Starting temporary server on http://127.0.0.1:8481"


def test_filter_sits_on_prefects_console_handlers_once() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet_console()
    quiet_console()
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles
    assert all(sum(isinstance(f, QuietConsole) for f in h.filters) == 1 for h in consoles)
