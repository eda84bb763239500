"""The process that holds a vLLM model, run by the interpreter of vLLM's own environment.

vLLM pins fastapi, transformers and torch to versions our Prefect cannot share one environment
with (docs/vllm.md), so the model runs here and the pipeline talks to it across a process
boundary (``steps.engines.vllm_process``). This module is what runs on the other side: it loads
``VllmEngine`` or ``VllmRewardModel`` (``steps.engines.vllm_engine``, the same code a
one-environment install would run in-process) and answers method calls sent as pickles over a
socket the parent opened, one at a time.

Only the standard library, ``steps.engines`` and ``schemas.reasons`` are imported before vLLM, so
the vLLM environment needs nothing of ours installed: the parent puts our two packages on
``PYTHONPATH``.

Nothing is left behind: the worker leads its own process group (vLLM's EngineCore and its
workers are started inside it), and a watchdog thread kills the whole group the moment the
parent is gone, even while a long ``generate`` call holds the main thread. A SIGKILLed pipeline
therefore takes its model processes with it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

# How often the watchdog looks at the parent; a killed run leaves vLLM alive at most this long.
PARENT_POLL_S = 0.25


def _kill_group() -> None:
    """This process and every process it started (vLLM's engine core, its workers)."""
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(137)


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:  # re-parented: the pipeline died without closing us
            _kill_group()
        time.sleep(PARENT_POLL_S)


def _platform() -> dict[str, Any]:
    """Which vLLM build this is: its version, and whether it computes on CPU or on a GPU."""
    import vllm

    try:
        from vllm.platforms import current_platform

        device = "cpu" if current_platform.is_cpu() else str(current_platform.device_type or "cuda")
    except Exception:  # an old or stripped-down build: report what we know
        device = "unknown"
    return {"vllm_version": str(getattr(vllm, "__version__", "?")), "device": device}


def _load(kind: str, model: Any, options: dict[str, Any]) -> Any:
    """The model, after checking that this vLLM build computes where the recipe's ``device`` says."""
    from steps.engines.models import ModelSpecError
    from steps.engines.vllm_engine import VllmEngine, VllmRewardModel

    options = dict(options)
    device, built = options.pop("device", "auto"), _platform()["device"]
    if device != "auto" and built != "unknown" and (device == "cpu") != (built == "cpu"):
        raise ModelSpecError(
            f"device: {device}, but this vLLM (in {sys.prefix}) is a {built} build; set device: auto, "
            "or point PREFSMITH_VLLM_PYTHON at an environment with the other build"
        )
    cls = VllmRewardModel if kind == "reward" else VllmEngine
    return cls(model, **options)


def _describe(loaded: Any) -> dict[str, Any]:
    return {
        **_platform(),
        "model_id": loaded.model_id,
        "n_ctx": int(loaded.n_ctx),
        "labels": tuple(getattr(loaded, "labels", ()) or ()),
        "pid": os.getpid(),
    }


_CALLS = frozenset({"generate", "score", "option_logprobs", "reward"})


def _error(exc: BaseException) -> tuple[str, str, str, str]:
    return ("error", type(exc).__name__, str(exc), traceback.format_exc(limit=20))


def serve(conn: Connection) -> None:
    """Load what the first message asks for, then answer calls until told to close (or the parent goes)."""
    loaded: Any = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the parent closed its end without saying so
        verb = message[0]
        if verb == "close":
            conn.send(("closed",))
            break
        try:
            if verb == "load":
                _, kind, model, options = message
                loaded = _load(kind, model, options)
                conn.send(("ready", _describe(loaded)))
            elif verb == "call" and loaded is not None and message[1] in _CALLS:
                _, method, args = message
                result = getattr(loaded, method)(*args)
                conn.send(("ok", result, int(getattr(loaded, "tokens_processed", 0))))
            else:
                conn.send(("error", "ValueError", f"the vLLM worker cannot {message[:2]!r}", ""))
        except Exception as exc:
            conn.send(_error(exc))
    if loaded is not None:
        # vLLM shuts its engine core down when the LLM is collected; the parent kills the process
        # group afterwards in case anything was left.
        del loaded
        import gc

        gc.collect()


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    if os.getppid() != parent:
        return 3  # the parent died before we started
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watchdog").start()
    conn = Connection(socket.socket(fileno=fd).detach())
    serve(conn)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
