"""Publishing a finished dataset to the Hugging Face Hub as one commit.

The network sits behind ``HubClient``, a one-method seam: ``HfHubClient`` is the
real one (``huggingface_hub.HfApi``), tests use a recorder. Only files listed in
the manifest (plus the manifest and the card) are uploaded, so work files and
leftovers never leave the machine; files of earlier dataset versions in the repo
are deleted in the same commit, so a re-run after any failure leaves exactly one
copy of the dataset. The token is never handled here: HfApi reads it from
``HF_TOKEN`` or the saved login itself, so it cannot end up in a log, a card or a
Prefect parameter.

Failures split in two. Transient ones (connection errors and timeouts, HTTP 408,
429, 500, 502, 503, 504) are retried with exponential backoff; the commit is
atomic on the Hub, so a retried commit cannot half-apply. Everything else, and
authentication or permission errors (401, 403) above all, fails at once with a
message that says what to do: retrying a bad token only delays the answer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import fsspec

from schemas.errors import RunError
from steps.publish.writer import CARD, MANIFEST, RUNS_DIR, verify

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})
# Paths a previous prefsmith upload may have left in the repo (older layouts included); other files
# (a LICENSE someone added by hand) are never deleted.
OWNED_PREFIXES = (f"{RUNS_DIR}/", "data/", "images/")
OWNED_FILES = frozenset({"stats.json", CARD, MANIFEST})


class HubError(RunError):
    """A push that did not happen; the message says why and what to do."""

    hint = (
        "The dataset itself is complete; rerun the same command to push again "
        "(finished work is reused, nothing is recomputed)."
    )


class HubAuthError(HubError):
    """Credentials missing, wrong or without write access: never retried."""


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    data: bytes


class HubClient(Protocol):
    def publish(self, repo_id: str, files: Sequence[UploadFile], *, private: bool, message: str) -> str: ...


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the Hub hiccuped, not our request."""
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    for module in ("httpx2", "httpx"):
        try:
            transport_error = __import__(module).TransportError
        except (ImportError, AttributeError):
            continue
        if isinstance(exc, transport_error):
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_delay: float = 2.0
    max_delay: float = 60.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter, so many workers do not retry in lockstep."""
        return min(self.max_delay, self.first_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class HfHubClient:
    """The real Hub: create the dataset repo if needed, then one commit that adds and deletes."""

    def __init__(
        self,
        api: object | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self._api: Any = api
        self._retry = retry or RetryPolicy()
        self._sleep = sleep

    def _call(self, what: str, repo_id: str, fn: Callable[[], T]) -> T:
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                status = http_status(exc)
                if status in AUTH_STATUS:
                    raise HubAuthError(
                        f"{what} on {repo_id} was refused (HTTP {status}): the token is missing, invalid or "
                        "has no write access. Set HF_TOKEN to a write token (or run `hf auth login`) and "
                        "check you may write to that namespace."
                    ) from exc
                if not is_transient(exc):
                    detail = f"HTTP {status}" if status else type(exc).__name__
                    raise HubError(f"{what} on {repo_id} failed ({detail}: {exc}); not retried") from exc
                if attempt == self._retry.attempts:
                    raise HubError(
                        f"{what} on {repo_id} still failing after {attempt} attempts "
                        f"({type(exc).__name__}: {exc}); nothing was committed, rerun the push later"
                    ) from exc
                delay = self._retry.delay(attempt)
                log.warning("%s on %s: transient %s; retry %d in %.1fs", what, repo_id, exc, attempt, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def publish(self, repo_id: str, files: Sequence[UploadFile], *, private: bool, message: str) -> str:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        api = self._api
        self._call(
            "create repo",
            repo_id,
            lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True),
        )
        existing = self._call(
            "list files", repo_id, lambda: api.list_repo_files(repo_id, repo_type="dataset")
        )
        keep = {f.path_in_repo for f in files}
        stale = [p for p in existing if p not in keep and (p.startswith(OWNED_PREFIXES) or p in OWNED_FILES)]
        operations: list[Any] = [CommitOperationDelete(path_in_repo=p) for p in stale]
        operations += [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.data) for f in files]
        info = self._call(
            "commit",
            repo_id,
            lambda: api.create_commit(repo_id, operations, commit_message=message, repo_type="dataset"),
        )
        return str(getattr(info, "commit_url", "") or f"https://huggingface.co/datasets/{repo_id}")


def collect_files(output: str) -> list[UploadFile]:
    """The complete dataset as the manifest describes it, checksums verified first."""
    manifest = verify(output)
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    listed = manifest["files"] + manifest.get("extras", [])
    paths = [entry["path"] for entry in listed] + [CARD, MANIFEST]
    files = []
    for path in paths:
        with fs.open(f"{root}/{path}", "rb") as handle:
            files.append(UploadFile(path, handle.read()))
    return files


def push_dataset(output: str, repo_id: str, *, private: bool, client: HubClient | None = None) -> str:
    files = collect_files(output)
    client = client or HfHubClient()
    manifest_rows = sum(1 for f in files if f.path_in_repo not in (CARD, MANIFEST))
    message = f"Upload preference dataset ({manifest_rows} data files) with prefsmith"
    return client.publish(repo_id, files, private=private, message=message)
