"""Hub push through the seam: one commit with exactly the dataset; the token never leaks."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from steps.hub import HfHubClient, UploadFile, push_dataset
from steps.publish import publish
from tests.conftest import make_recipe
from tests.test_writer import STATS, pair_shards


class RecordingClient:
    def __init__(self) -> None:
        self.commits: list[dict[str, Any]] = []

    def publish(self, repo_id: str, files: Sequence[UploadFile], *, private: bool, message: str) -> str:
        self.commits.append({"repo": repo_id, "files": list(files), "private": private, "message": message})
        return f"https://hub.test/{repo_id}"


class SignatureCheckedApi:
    """Stands in for HfApi: every call must bind to the real method's signature."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, inspect.BoundArguments]] = []

    def __getattr__(self, name: str) -> Any:
        real = getattr(HfApi, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(real).bind(self, *args, **kwargs)
            self.calls.append((name, bound))
            return type("CommitInfo", (), {"commit_url": "https://hub.test/commit/1"})()

        return call


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    recipe = make_recipe(output={"rows_per_shard": 1})
    out = tmp_path / "out"
    publish(recipe, str(out), pair_shards(tmp_path, recipe, [["a", "b"]]), STATS)
    (out / ".work").mkdir()
    (out / ".work" / "scratch.parquet").write_bytes(b"not part of the dataset")
    (out / "data" / "stray.parquet").write_bytes(b"not in the manifest")
    return out


def test_push_is_one_commit_of_exactly_the_manifest_files(dataset_dir: Path) -> None:
    client = RecordingClient()
    url = push_dataset(str(dataset_dir), "org/prefs", private=True, client=client)
    assert url == "https://hub.test/org/prefs"
    assert len(client.commits) == 1
    commit = client.commits[0]
    assert commit["private"] is True
    paths = sorted(f.path_in_repo for f in commit["files"])
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    extras = sorted(e["path"] for e in manifest["extras"])
    assert "stats.json" in extras and "images/funnel.png" in extras
    assert paths == sorted(
        [
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "manifest.json",
            *extras,
        ]
    )
    assert "data/stray.parquet" not in paths and not any(p.startswith(".work") for p in paths)
    readme = next(f for f in commit["files"] if f.path_in_repo == "README.md")
    assert readme.data == (dataset_dir / "README.md").read_bytes()


def test_push_refuses_incomplete_dataset(dataset_dir: Path) -> None:
    (dataset_dir / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        push_dataset(str(dataset_dir), "org/prefs", private=False, client=RecordingClient())


def test_real_client_calls_bind_to_huggingface_hub_signatures(dataset_dir: Path) -> None:
    api = SignatureCheckedApi()
    url = push_dataset(str(dataset_dir), "org/prefs", private=False, client=HfHubClient(api))
    assert url == "https://hub.test/commit/1"
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_commit"]
    create_repo, create_commit = (bound.arguments for _, bound in api.calls)
    assert create_repo["repo_type"] == "dataset" and create_repo["exist_ok"] is True
    assert create_commit["repo_type"] == "dataset"
    operations = list(create_commit["operations"])
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert len(operations) == len(manifest["files"]) + len(manifest["extras"]) + 2
    assert "token" not in create_repo and "token" not in create_commit


def test_token_never_written_anywhere(
    dataset_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "hf_FAKEtoken1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    client = RecordingClient()
    push_dataset(str(dataset_dir), "org/prefs", private=False, client=client)
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    for path in dataset_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    for f in client.commits[0]["files"]:
        assert secret.encode() not in f.data
