"""Every error a user can meet belongs to one of two families, and the family sets the exit code.

    PrefsmithError
    ├── UsageError (exit 2)   the request is wrong: a recipe key, a model that does not resolve,
    │                         an unreadable prompt source or pairs file, an output that cannot
    │                         be written, a placement that cannot work. Found before any model
    │                         loads wherever it can be; the message names the key, file or row
    │                         and what to change. Nothing ran, so there is nothing to resume.
    └── RunError (exit 1)     a run that was right to start could not finish: an engine crashed,
                              a lease was lost or is held by another live run, no pool worker
                              started the model stage, the labels missed eval.min_accuracy, the
                              Hub refused the push. Finished shards are kept: rerunning the same
                              command resumes from them.

The command line (``flows.cli``) catches these two bases and nothing of ours by name; the one
foreign family it also turns into a message is ``OSError`` from storage (a full disk, a revoked
bucket), which is a run error too. A class that knows what the user should do next says it in
``hint``, printed after the message.

The concrete classes live beside the code that raises them; the families stay here, below every
package, so ``schemas`` can raise a usage error without importing ``steps``. Each family also
derives from the builtin its members always were (``ValueError`` / ``RuntimeError``), so code
that caught those keeps working.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_ERROR = 1
EXIT_USAGE_ERROR = 2


class PrefsmithError(Exception):
    """The root: anything we raise on purpose for a person to read."""

    exit_code = EXIT_RUN_ERROR
    hint = ""  # what to do next, when the class knows it better than the raising site


class UsageError(PrefsmithError, ValueError):
    """The request cannot work as written; fix it and rerun (exit 2)."""

    exit_code = EXIT_USAGE_ERROR


class RunError(PrefsmithError, RuntimeError):
    """The run started and failed; finished work is kept and a rerun resumes (exit 1)."""

    exit_code = EXIT_RUN_ERROR
