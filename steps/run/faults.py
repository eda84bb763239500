"""Named points where a test can kill the run, to prove that a rerun after any crash is exact.

Preemption and OOM kills arrive at arbitrary moments; the fault tests need to
land them at the moments that matter (between a shard's data and its marker,
between publishing the data and the card, ...) reproducibly. Setting
``PREFSMITH_FAULT_AT=<point>#<n>`` makes the n-th arrival at ``<point>`` in this
process SIGKILL the run — its whole process group when it leads one, so helper
processes such as Prefect's temporary server die with it, as they would on a
lost machine. Unset (always, outside tests) a checkpoint is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "PREFSMITH_FAULT_AT"
_seen: Counter[str] = Counter()


def checkpoint(point: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    name, _, nth = target.partition("#")
    if name != point:
        return
    _seen[point] += 1
    if _seen[point] < int(nth or 1):
        return
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
