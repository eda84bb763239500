"""The CLI's temporary Prefect server, which dies with the CLI however the CLI dies.

Without a configured server (``PREFECT_API_URL``), Prefect starts one of its own in a child
process and stops it from an ``atexit`` hook. A process killed by a signal (SIGKILL, an OOM kill,
a native segfault) runs no ``atexit`` hook, so that server lived on, re-parented to init, holding
its memory and a port: one leak per crash. So the CLI starts the server itself, the same way
(uvicorn serving Prefect's ``create_app`` as an ephemeral server, UI off), with a lifeline: the
server's stdin is a pipe whose only writer is the CLI. The kernel closes it when the CLI exits for
any reason, and a thread in the server that reads it then shuts the server down. Unlike Linux's
``PR_SET_PDEATHSIG`` this works on macOS too and is not tied to the thread that started the child
(Dask's worker processes watch their nanny the same way). The listening socket is bound here and
handed over, so the port is known before the server starts and no two runs race for one.

Prefect is then pointed at the server through ``PREFECT_API_URL`` for the rest of the process, so
it never starts a server of its own. ``python -m flows.temp_server FD`` is the server side.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from schemas.errors import RunError

# After the lifeline breaks, uvicorn gets this long to shut down cleanly before the process exits anyway.
SHUTDOWN_GRACE_S = 5.0


class TemporaryServerError(RunError):
    """The temporary server exited or did not answer before the startup timeout."""


@dataclass
class TemporaryServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def stop(self) -> None:
        """Close the lifeline (the server shuts itself down) and wait for it; kill it if it lingers."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=SHUTDOWN_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_server: TemporaryServer | None = None


def ensure_server() -> TemporaryServer | None:
    """Start the temporary server unless Prefect has a server to talk to; point Prefect at it.

    Returns None when ``PREFECT_API_URL`` is set (a real server, or this process's temporary one)
    or when ephemeral mode is switched off (Prefect then says that a server is needed). The server
    is stopped at exit, after Prefect's own exit hooks have sent the last logs and events.
    """
    global _server
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    server = start_server()
    _server = server
    atexit.register(server.stop)
    os.environ[PREFECT_API_URL.name] = server.api_url
    refresh_global_settings_context()
    return server


def is_temporary(api_url: str | None) -> bool:
    """Whether ``api_url`` is this process's temporary server, which no other process can rely on."""
    return _server is not None and api_url == _server.api_url


def start_server(timeout: float | None = None) -> TemporaryServer:
    """A temporary server on a free loopback port, healthy when this returns; its lifeline held here."""
    import httpx
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    get_logger("temporary-server").info(
        f"Starting temporary server on http://127.0.0.1:{port} (ends with this run)"
    )
    with listener:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(listener.fileno())],
            stdin=subprocess.PIPE,
            pass_fds=(listener.fileno(),),
            env={**os.environ, "PREFECT_UI_ENABLED": "0"},
        )
    assert process.stdin is not None
    lifeline = process.stdin
    # A child forked without exec (multiprocessing's "fork") would hold the lifeline open after we die.
    os.register_at_fork(after_in_child=lifeline.close)
    server = TemporaryServer(process, port)
    wait = timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    deadline = time.monotonic() + wait
    while True:
        if process.poll() is not None:
            raise TemporaryServerError(
                f"Prefect's temporary server exited with code {process.returncode} before it answered "
                "(its messages are above)"
            )
        try:
            if httpx.get(f"{server.api_url}/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise TemporaryServerError(
                f"Prefect's temporary server did not answer within {wait:g} s; raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a slow machine, or start a server "
                "(prefect server start) and set PREFECT_API_URL"
            )
        time.sleep(0.2)


def _exit_with_parent() -> None:
    """Block on the lifeline until it breaks (EOF), then shut the server down, forcibly if need be."""
    while sys.stdin.buffer.read(4096):
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own clean shutdown
    time.sleep(SHUTDOWN_GRACE_S)
    os._exit(0)


def serve(fd: int) -> None:
    # Watching first: the imports take seconds, and a parent that dies meanwhile must not be outlived.
    threading.Thread(target=_exit_with_parent, name="lifeline", daemon=True).start()
    import uvicorn
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True, final=True)
    config = uvicorn.Config(app, log_level="error", lifespan="on")
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


if __name__ == "__main__":
    serve(int(sys.argv[1]))
