"""One run at a time per location: a lease object naming its owner, renewed while the run lives.

Two runs publishing to one output could interleave (the card of one, the manifest of the other);
two runs on one work location duplicate work, a ``--fresh`` one overwrites shards the other is
reading, and garbage collection must not delete what a live run uses. So a run holds a lease on its
output and on its work location for its whole life: ``.prefsmith-lease.json``, a small object naming
the owner (a random id, host, pid, what it runs) and when the lease expires. A background thread
renews it; a killed run stops renewing, and once its lease expires the next run takes it over.

Every change of the lease is a compare-and-swap, so two runs never both believe they hold it:

* local disks: the read-compare-write happens under ``flock`` on a sibling guard file, and the
  lease is replaced by an atomic rename (NFS: only where the mount's locks work, NFSv4 usually);
* S3 and stores that implement S3's conditional writes (AWS since 2024, MinIO, moto): created with
  ``If-None-Match: *``, renewed, taken over and removed with ``If-Match: <ETag>`` (a conditional
  delete: AWS since 2025; a store that ignores it on deletes still gets a read-and-compare first);
* any other fsspec store: best effort. The lease is written, read back after ``SETTLE_S`` and kept
  only if the write survived; two runs that start within that window can both go on.

A lease is stale when its process is gone (checked only where the holder's pid means the same
process: same kernel boot and pid namespace, so a run killed on this machine is taken over at
once), when the wall clock is past its ``expires_at`` (this assumes the hosts' clocks agree to well
under the expiry), or when a waiter has seen it unchanged for longer than its time-to-live by its
own monotonic clock, which holds whatever the clocks say.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from schemas.errors import RunError
from schemas.locks import LockSettings
from steps.run.files import join_uri, write_bytes_atomic
from steps.run.liveness import alive, pid_space

log = logging.getLogger(__name__)

LEASE_FILE = ".prefsmith-lease.json"
SETTLE_S = 2.0  # best-effort stores: how long a write must survive before it counts
REPEAT_WAIT_MESSAGE_S = 60.0


class LeaseBusyError(RunError):
    """Another live run holds the lease, and the settings say not to wait (or waiting ran out)."""


class LeaseLostError(RunError):
    """This run's lease expired or was taken over: it must not publish or delete anything now."""


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Holder:
    """What a lease object says: who holds it, for what, and until when."""

    owner: str
    host: str
    pid: int
    purpose: str
    acquired_at: float
    expires_at: float
    ttl_s: float
    token: str  # new with every write, so no two versions of the object are ever equal
    space: str = ""  # the kernel boot and pid namespace its pid belongs to (``steps.base.pid_space``)

    @classmethod
    def new(cls, owner: str, purpose: str, ttl_s: float) -> Holder:
        now = time.time()
        return cls(
            owner,
            socket.gethostname(),
            os.getpid(),
            purpose,
            now,
            now + ttl_s,
            ttl_s,
            uuid.uuid4().hex,
            pid_space(),
        )

    def process_gone(self) -> bool:
        """True only when the holder's pid is in this process's pid space and no process has it.

        A run killed on this machine is then taken over at once instead of after its expiry. A pid
        reused by another process reads as alive: the lease then simply waits for its expiry.
        """
        return bool(self.space) and self.space == pid_space() and not alive(self.pid)

    def renewed(self) -> Holder:
        return replace(self, expires_at=time.time() + self.ttl_s, token=uuid.uuid4().hex)

    def to_bytes(self) -> bytes:
        return json.dumps({**asdict(self), "expires": _when(self.expires_at)}, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder an object names, or None when it is not a lease this code wrote."""
        try:
            raw = json.loads(data)
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return (
            f"owner {self.owner[:12]} (host {self.host}, pid {self.pid}, {self.purpose}), "
            f"held since {_when(self.acquired_at)}, expires {_when(self.expires_at)} unless renewed"
        )


class _Store(Protocol):
    """One lease object with compare-and-swap: ``expected`` None means "only if absent"."""

    def read(self) -> tuple[bytes | None, str | None]: ...

    def swap(self, data: bytes, expected: str | None) -> str | None: ...

    def delete(self, expected: str) -> None: ...


def _digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


class _LocalStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self.guard = f"{path}.guard"  # never replaced or removed, so every process locks the same inode

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
            yield
        finally:
            os.close(fd)

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None, None
        return data, _digest(data)

    def swap(self, data: bytes, expected: str | None) -> str | None:
        with self._locked():
            if self.read()[1] != expected:
                return None
            write_bytes_atomic(self.path, data)
            return _digest(data)

    def delete(self, expected: str) -> None:
        with self._locked():
            if self.read()[1] == expected:
                os.remove(self.path)


def _precondition_failed(exc: OSError) -> bool:
    """An S3 conditional write refused (412), raced (409) or aimed at an object now gone (404)."""
    if isinstance(exc, FileExistsError | FileNotFoundError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in {"PreconditionFailed", "ConditionalRequestConflict"}


class _S3Store:
    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[bytes | None, str | None]:
        # The ETag first, then the body: if the object changes in between, a swap against this ETag
        # fails, so a decision made on newer content than the ETag names never takes effect.
        try:
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return data, etag

    def swap(self, data: bytes, expected: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return str(out["ETag"])

    def delete(self, expected: str) -> None:
        # Conditional, like the writes: a lease taken over between a read and a plain delete would
        # be removed under its new holder, letting a third run in beside it. The read first still
        # protects on a store that ignores the condition on deletes.
        if self.read()[1] != expected:
            return
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
        finally:
            self.fs.invalidate_cache(self.path)


class _BestEffortStore:
    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path

    def read(self) -> tuple[bytes | None, str | None]:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return data, _digest(data)

    def swap(self, data: bytes, expected: str | None) -> str | None:
        if self.read()[1] != expected:
            return None
        self.fs.pipe_file(self.path, data)
        time.sleep(SETTLE_S)
        return _digest(data) if self.read()[0] == data else None

    def delete(self, expected: str) -> None:
        if self.read()[1] == expected:
            self.fs.rm_file(self.path)


def _store(root: str) -> _Store:
    fs, path = fsspec.core.url_to_fs(join_uri(root, LEASE_FILE))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(path)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a"}:
        return _S3Store(fs, path)
    return _BestEffortStore(fs, path)


class Lease:
    """A held lease, renewed by a daemon thread until ``release``; ``check`` before exclusive steps."""

    def __init__(self, root: str, what: str, store: _Store, holder: Holder, version: str, renew_s: float):
        self.root = root
        self.what = what
        self._store = store
        self.holder = holder
        self._version = version
        self._renew_s = renew_s
        self._lost: str | None = None
        self._swap = threading.Lock()  # the renewal thread and ``check`` take turns writing the lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{what}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._renew_s) and self._lost is None:
            try:
                self._renew_once()
            except (
                Exception
            ) as exc:  # a storage hiccup (any client's error): retry; expiry decides if it lasts
                log.warning("could not renew the lease on %s %s (%s); retrying", self.what, self.root, exc)

    def _renew_once(self) -> None:
        with self._swap:
            if self._lost is None:
                self._renew_locked()

    def _renew_locked(self) -> None:
        new = self.holder.renewed()
        version = self._store.swap(new.to_bytes(), self._version)
        if version is None:
            data, current_version = self._store.read()
            current = Holder.parse(data) if data is not None else None
            if current is not None and current.token == new.token and current_version is not None:
                version = current_version  # our write landed; only its answer was lost (a retried PUT)
            else:
                by = "nobody (it was removed)" if data is None else _who(current)
                self._lost = f"the lease on {self.what} {self.root} was taken over; it is now held by {by}"
                log.error(self._lost)
                return
        self.holder, self._version = new, version

    def check(self) -> None:
        """Raise unless this run still holds the lease (renewed in time and not taken over).

        Renews it now, against the store, rather than trusting the renewal thread's last word: a
        takeover since that renewal (up to ``renew_s`` ago) would otherwise go unnoticed, and the
        step this check guards would write over the new holder's work. If the store cannot be
        reached now, the lease still counts as held until its expiry.
        """
        try:
            self._renew_once()
        except Exception as exc:  # same as a renewal that failed: the expiry below decides
            log.warning("could not confirm the lease on %s %s (%s)", self.what, self.root, exc)
        if self._lost is not None:
            raise LeaseLostError(f"{self._lost}. Nothing more was published or deleted by this run.")
        if time.time() > self.holder.expires_at:
            raise LeaseLostError(
                f"the lease on {self.what} {self.root} expired at {_when(self.holder.expires_at)} without "
                "being renewed (storage unreachable or the process stalled); another run may hold it now. "
                "Nothing more was published or deleted by this run."
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._lost is None:
            try:
                self._store.delete(self._version)
            except Exception as exc:  # it expires on its own; the run's own outcome must not be masked
                log.warning("could not remove the lease on %s %s (%s)", self.what, self.root, exc)


def _who(holder: Holder | None) -> str:
    return holder.describe() if holder is not None else "an unreadable lease object"


def _busy_message(what: str, root: str, holder: Holder | None) -> str:
    return f"{what} {root} is in use by another run: {_who(holder)}"


def acquire(
    root: str,
    settings: LockSettings,
    purpose: str,
    what: str = "location",
    report: Callable[[str], None] = print,
) -> Lease:
    """Take the lease on ``root``: at once if free or stale, else wait or fail as ``settings`` say."""
    store = _store(root)
    owner = uuid.uuid4().hex
    started = time.monotonic()
    first_seen: dict[str, float] = {}  # lease version -> when this process first saw it
    told: tuple[str, float] | None = None  # (holder, when) of the last wait message
    poll = min(settings.renew_s, 2.0)
    while True:
        data, version = store.read()
        current = Holder.parse(data) if data is not None else None
        mine = Holder.new(owner, purpose, settings.expiry_s)
        if data is None:
            got = store.swap(mine.to_bytes(), None)
        elif _stale(current, version, first_seen, settings):
            report(f"taking over the stale lease on {what} {root}, left by {_who(current)}")
            got = store.swap(mine.to_bytes(), version)
        else:
            waited = time.monotonic() - started
            message = _busy_message(what, root, current)
            if settings.on_busy == "fail":
                raise LeaseBusyError(
                    f"{message}. Wait for it to finish, or rerun with --on-busy wait. A killed run's lease "
                    f"is taken over once it expires (leases last {settings.expiry_s:g} s unless renewed)."
                )
            if settings.max_wait_s is not None and waited >= settings.max_wait_s:
                raise LeaseBusyError(f"{message}; gave up after waiting {waited:.0f} s (--max-wait)")
            holder_id = current.owner if current is not None else ""
            if told is None or told[0] != holder_id or time.monotonic() - told[1] >= REPEAT_WAIT_MESSAGE_S:
                limit = "" if settings.max_wait_s is None else f" up to {settings.max_wait_s:g} s"
                report(f"{message}; waiting{limit} (--on-busy fail stops instead)")
                told = (holder_id, time.monotonic())
            time.sleep(poll)
            continue
        if got is not None:
            return Lease(root, what, store, mine, got, settings.renew_s)
        # Another run changed the lease between our read and our write: look again.


def _stale(
    current: Holder | None, version: str | None, first_seen: dict[str, float], settings: LockSettings
) -> bool:
    """Its process is gone, it is past its wall-clock expiry, or this process saw it unchanged too long."""
    if current is not None and (current.process_gone() or time.time() > current.expires_at):
        return True
    seen = first_seen.setdefault(str(version), time.monotonic())
    ttl = current.ttl_s if current is not None else settings.expiry_s
    return time.monotonic() - seen > ttl


@contextmanager
def held(
    root: str,
    settings: LockSettings,
    purpose: str,
    what: str = "location",
    report: Callable[[str], None] = print,
) -> Iterator[Lease]:
    """The lease on ``root`` for the duration of the block, released on any exit but a kill."""
    lease = acquire(root, settings, purpose, what, report)
    try:
        yield lease
    finally:
        lease.release()


@contextmanager
def held_each(
    roots: Sequence[tuple[str, str]],
    settings: LockSettings,
    purpose: str,
    report: Callable[[str], None] = print,
) -> Iterator[list[Lease]]:
    """Leases on several ``(what, root)`` locations, one per distinct location, taken in the order given.

    Every run takes them in the same order (output, then work location), so two runs never each
    hold one while waiting for the other's. A location named twice (``--work`` equal to the output)
    is leased once: a second lease would wait for this run's own.
    """
    with ExitStack() as stack:
        by_location: dict[str, Lease] = {}
        leases = []
        for what, root in roots:
            fs, path = fsspec.core.url_to_fs(root)
            where = fs.unstrip_protocol(path.rstrip("/"))
            if where not in by_location:
                by_location[where] = stack.enter_context(held(root, settings, purpose, what, report))
            leases.append(by_location[where])
        yield leases


def check_all(leases: Iterable[Lease]) -> None:
    """Raise ``LeaseLostError`` unless every one of ``leases`` is still held."""
    for lease in leases:
        lease.check()
