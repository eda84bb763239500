"""A stand-in run for the lease tests, in its own process: take the lease, publish, let go.

``python -m tests.lease_worker ROOT LOG NAME HOLD EXPIRY_S RENEW_S`` takes the lease on ROOT
(waiting for another holder), appends ``enter NAME`` to the local file LOG, then publishes the way
``steps.publish.release`` orders it (a card naming NAME, then the manifest naming NAME, each an atomic
write), and appends ``exit NAME``. Between card and manifest it waits HOLD: seconds, or until the
local file HOLD exists (so a test can keep it mid-publication until another worker is waiting). Two workers publishing to one ROOT at once would leave
the card of one beside the manifest of the other, or overlapping enter/exit lines in LOG.
"""

from __future__ import annotations

import os
import sys
import time

from schemas.locks import LockSettings
from steps.run import lease
from steps.run.files import join_uri, write_bytes_atomic


def note(log: str, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{time.time():.6f} {line}\n".encode())
    finally:
        os.close(fd)


def hold(until: str) -> None:
    try:
        time.sleep(float(until))
    except ValueError:
        deadline = time.monotonic() + 120
        while not os.path.exists(until) and time.monotonic() < deadline:
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    root, log, name, hold_s, expiry_s, renew_s = argv
    settings = LockSettings(expiry_s=float(expiry_s), renew_s=float(renew_s))
    with lease.held(root, settings, f"worker {name}", "output", lambda m: print(m, flush=True)) as held:
        note(log, f"enter {name}")
        print("HELD", flush=True)
        write_bytes_atomic(join_uri(root, "README.md"), name.encode())
        hold(hold_s)
        held.check()
        write_bytes_atomic(join_uri(root, "manifest.json"), name.encode())
        note(log, f"exit {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
