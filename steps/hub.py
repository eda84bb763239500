"""Publishing a finished dataset to the Hugging Face Hub as one commit.

The network sits behind ``HubClient``, a one-method seam: ``HfHubClient`` is the
real one (``huggingface_hub.HfApi``), tests use a recorder. Only files listed in
the manifest (plus the manifest and the card) are uploaded, so work files and
leftovers never leave the machine. The token is never handled here: HfApi reads
it from ``HF_TOKEN`` or the saved login itself, so it cannot end up in a log,
a card or a Prefect parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import fsspec

from steps.writer import CARD, MANIFEST, verify


@dataclass(frozen=True)
class UploadFile:
    path_in_repo: str
    data: bytes


class HubClient(Protocol):
    def publish(self, repo_id: str, files: Sequence[UploadFile], *, private: bool, message: str) -> str: ...


class HfHubClient:
    """The real Hub: create the dataset repo if needed, then one commit with every file."""

    def __init__(self, api: object | None = None) -> None:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        self._api = api

    def publish(self, repo_id: str, files: Sequence[UploadFile], *, private: bool, message: str) -> str:
        from huggingface_hub import CommitOperationAdd

        self._api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)  # type: ignore[attr-defined]
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=f.data) for f in files]
        info = self._api.create_commit(  # type: ignore[attr-defined]
            repo_id, operations, commit_message=message, repo_type="dataset"
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
