"""The CLI's console: our progress lines, without library lines that repeat them."""

from __future__ import annotations

import logging


class QuietConsole(logging.Filter):
    """Prefect's console lines that repeat ours: a task's "Completed" state (failures still show) and
    the second line of the temporary-server notice. The API handler (the UI) keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message == "Finished in state Completed()":
            return False
        if message.startswith("Starting temporary server on ") and "\n" in message:
            record.msg, record.args = message.split("\n", 1)[0], None
        return True


def quiet_console() -> None:
    """Attach the filter to Prefect's console handlers (set up when prefect was imported)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, QuietConsole) for f in handler.filters
            ):
                handler.addFilter(QuietConsole())
