"""vLLM models in a process of their own, run by vLLM's own Python environment.

Why a process: every vLLM release pins fastapi, transformers and torch exactly, and the current
ones cannot share an environment with the Prefect we need (docs/vllm.md has the resolver runs).
So ``engine: vllm`` starts ``steps.engines.vllm_worker`` with the interpreter of an environment
that has vLLM, and sends it the same engine calls the other engines answer in-process. Requests
and results are our own dataclasses, pickled over a socket pair only the two processes hold; the
per-call cost is a few milliseconds against seconds of model time (``bench.vllm``).

Which interpreter: ``steps.engines.models.vllm_python`` (``PREFSMITH_VLLM_PYTHON``, else this one if
it imports vllm, else ``.venv-vllm`` beside the project, what ``make vllm-env`` builds). Validation
only looks the interpreter up and asks it whether vllm is importable, so a missing vLLM fails
before any model loads.

A worker leads its own process group. ``close`` (and the exit hook of ``steps.engines``) ends it
gracefully and then kills what is left of the group; if this process dies instead, the worker's
watchdog kills the group itself (``steps.engines.vllm_worker``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from schemas.errors import RunError
from steps.engines.base import (
    Completion,
    Conversation,
    Failed,
    OptionRequest,
    SamplingParams,
    ScoreRequest,
    TokenScores,
)
from steps.engines.llama_build import cache_root
from steps.engines.models import (
    PROJECT_ROOT,
    ModelSpecError,
    ResolvedModel,
    VllmMissingError,
    check_vllm_installed,
)
from steps.engines.reward import RewardRequest

log = logging.getLogger(__name__)

# How long a model may take to load before the run gives up on it (a 70B from a cold disk is slow).
LOAD_TIMEOUT_S = float(os.environ.get("PREFSMITH_VLLM_LOAD_TIMEOUT_S", "1800"))
CLOSE_TIMEOUT_S = 30.0
_LOG_TAIL = 40
_COUNTER = itertools.count()


class VllmWorkerError(RunError):
    """The vLLM worker could not load its model, or died while answering; the message carries its log."""


def _import_root() -> Path:
    """A folder holding only our ``steps`` and ``schemas`` packages, for the worker's PYTHONPATH.

    Not the folder they live in: installed, that is this environment's site-packages, whose
    packages would shadow the vLLM environment's own.
    """
    key = hashlib.sha256(str(PROJECT_ROOT).encode()).hexdigest()[:12]
    root = cache_root() / "vllm-path" / key
    root.mkdir(parents=True, exist_ok=True)
    for package in ("steps", "schemas"):
        link = root / package
        if not link.is_symlink():
            tmp = root / f".{package}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(PROJECT_ROOT / package, target_is_directory=True)
            os.replace(tmp, link)  # atomic: two runs starting together both end with a good link
    return root


_KNOWN_ERRORS: dict[str, type[Exception]] = {
    "VllmMissingError": VllmMissingError,
    "ModelSpecError": ModelSpecError,
    "ValueError": ValueError,
}


class VllmWorker:
    """One worker process holding one vLLM model; calls are answered one at a time, in order."""

    def __init__(self, kind: str, model: ResolvedModel, options: dict[str, Any]) -> None:
        python = check_vllm_installed()
        logs = cache_root() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"vllm-{os.getpid()}-{next(_COUNTER)}.log"
        ours, theirs = socket.socketpair()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_import_root()), os.environ.get("PYTHONPATH")])),
        }
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        started = time.monotonic()
        with open(self.log_path, "wb") as sink:
            self.process = subprocess.Popen(
                [str(python), "-m", "steps.engines.vllm_worker", str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # its own process group: what close() kills
            )
        theirs.close()
        self._conn = Connection(ours.detach())
        self._closed = False
        self._lock = threading.Lock()  # one call at a time on the connection (Prefect runs tasks in threads)
        log.info(
            "vLLM: loading %s in a worker (pid %d, %s; log %s)",
            model.model_id,
            self.process.pid,
            python,
            self.log_path,
        )
        try:
            self.info: dict[str, Any] = self._ask(("load", kind, model, options), LOAD_TIMEOUT_S, "loading")
        except BaseException:
            self.close()
            raise
        log.info(
            "vLLM %s on %s: %s ready in %.0f s",
            self.info["vllm_version"],
            self.info["device"],
            model.model_id,
            time.monotonic() - started,
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL:])

    def _ask(self, message: tuple[Any, ...], timeout: float | None, doing: str) -> Any:
        if self._closed:
            raise VllmWorkerError("the vLLM worker was closed")
        self._conn.send(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._conn.poll(0.5):
            code = self.process.poll()
            if code is not None and not self._conn.poll(0):
                self.close()
                raise VllmWorkerError(
                    f"the vLLM worker exited with code {code} while {doing}; the last lines of its log "
                    f"({self.log_path}):\n{self._log_tail()}"
                )
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise VllmWorkerError(
                    f"the vLLM worker took over {timeout:.0f} s {doing}; log: {self.log_path}"
                )
        try:
            reply = self._conn.recv()
        except (EOFError, OSError) as exc:
            self.close()
            raise VllmWorkerError(
                f"the vLLM worker hung up while {doing} ({exc}); log: {self.log_path}"
            ) from None
        if reply[0] == "error":
            _, name, text, trace = reply
            if doing == "loading":
                if name in _KNOWN_ERRORS:
                    raise _KNOWN_ERRORS[name](text)
                raise VllmWorkerError(
                    f"vLLM could not load the model: {name}: {text}\nthe last lines of its log "
                    f"({self.log_path}):\n{self._log_tail()}"
                )
            raise VllmWorkerError(f"vLLM failed while {doing}: {name}: {text}\n{trace}")
        return reply[1] if reply[0] == "ready" else reply[1:]

    def call(self, method: str, *args: Any) -> Any:
        with self._lock:
            result, self.tokens_processed = self._ask(("call", method, args), None, f"answering {method}")
        return result

    tokens_processed = 0

    def close(self) -> None:
        """Ask the worker to finish, wait for it, then kill whatever is left of its process group."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.process.poll() is None:
                self._conn.send(("close",))
                self.process.wait(CLOSE_TIMEOUT_S)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            pass
        finally:
            self._conn.close()
            with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already empty
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class _Remote:
    """What every model held by a worker shares: its id, its window, its token count, ``close``."""

    engine_name = "vllm"
    kind = "lm"

    def __init__(self, model: ResolvedModel, **options: Any) -> None:
        self.worker = VllmWorker(self.kind, model, options)
        self.model_id = str(self.worker.info["model_id"])
        self.n_ctx = int(self.worker.info["n_ctx"])
        self.device = str(self.worker.info["device"])
        self.vllm_version = str(self.worker.info["vllm_version"])

    @property
    def tokens_processed(self) -> int:
        return self.worker.tokens_processed

    def close(self) -> None:
        self.worker.close()


class RemoteVllmEngine(_Remote):
    """The engine protocol (generate, score, option_logprobs) answered by ``VllmEngine`` in a worker."""

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        return self.worker.call("generate", [list(c) for c in conversations], params, list(seeds))

    def score(self, requests: Sequence[ScoreRequest]) -> list[TokenScores | Failed]:
        return self.worker.call("score", list(requests))

    def option_logprobs(self, requests: Sequence[OptionRequest]) -> list[dict[str, float] | Failed]:
        return self.worker.call("option_logprobs", list(requests))


class RemoteVllmRewardModel(_Remote):
    """A reward model's classifier heads (``VllmRewardModel``) in a worker."""

    kind = "reward"

    def __init__(self, model: ResolvedModel, **options: Any) -> None:
        super().__init__(model, **options)
        self.labels = tuple(self.worker.info["labels"])

    def reward(self, requests: Sequence[RewardRequest]) -> list[tuple[float, ...] | Failed]:
        return self.worker.call("reward", list(requests))
