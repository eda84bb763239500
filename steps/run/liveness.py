"""Whether the process that wrote a file or holds a lease still lives, and where a pid means that.

Leases and temporaries name their owner by pid; a pid only identifies a process within one
kernel boot and pid namespace, so each owner is tagged with that space too.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket


@functools.cache  # a process's boot and pid namespace never change; read once, not per directory entry
def pid_space() -> str:
    """This kernel boot and pid namespace: where a pid means the same process (Linux; else unknown).

    A hostname is not enough: containers sharing one (host networking) have their own pids.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


@functools.cache
def space_tag() -> str:
    """``pid_space`` as a short name part; where it is unknown, the host (the best left)."""
    space = pid_space()
    if not space:
        return socket.gethostname().replace("-", "_")
    return hashlib.sha256(space.encode()).hexdigest()[:12]


def alive(pid: int) -> bool:
    """Whether a process has ``pid`` (in this pid space); someone else's process counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
