"""Hub push through the seam: one commit with exactly the dataset; the token never leaks."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError

from steps.publish.hub import HfHubClient, HubAuthError, HubError, RetryPolicy, UploadFile, push_dataset
from steps.publish.release import publish
from tests.conftest import make_recipe
from tests.steps.publish.test_writer import STATS, pair_shards


class RecordingClient:
    def __init__(self) -> None:
        self.commits: list[dict[str, Any]] = []

    def publish(self, repo_id: str, files: Sequence[UploadFile], *, private: bool, message: str) -> str:
        self.commits.append({"repo": repo_id, "files": list(files), "private": private, "message": message})
        return f"https://hub.test/{repo_id}"


class SignatureCheckedApi:
    """Stands in for HfApi: every call must bind to the real method's signature.

    It keeps the repo's files between commits (applying adds and deletes like the Hub does) and can be
    told to fail the next calls with given HTTP statuses or exceptions.
    """

    def __init__(self, failures: Sequence[int | BaseException | None] = ()) -> None:
        self.calls: list[tuple[str, inspect.BoundArguments]] = []
        self.files: dict[str, bytes] = {".gitattributes": b"*.parquet filter=lfs", "LICENSE": b"mine"}
        self.failures = list(failures)

    def __getattr__(self, name: str) -> Any:
        real = getattr(HfApi, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(real).bind(self, *args, **kwargs)
            self.calls.append((name, bound))
            failure = self.failures.pop(0) if self.failures else None  # None: this call succeeds
            if failure is not None:
                raise http_error(failure) if isinstance(failure, int) else failure
            if name == "list_repo_files":
                return sorted(self.files)
            if name == "create_commit":
                for op in bound.arguments["operations"]:
                    if isinstance(op, CommitOperationDelete):
                        del self.files[op.path_in_repo]
                    else:
                        self.files[op.path_in_repo] = op.path_or_fileobj
            return type("CommitInfo", (), {"commit_url": "https://hub.test/commit/1"})()

        return call


def http_error(status: int) -> HfHubHTTPError:
    """The exception huggingface_hub raises for an HTTP error status, built the way it builds it."""
    request = httpx2.Request("POST", "https://huggingface.co/api/datasets/org/prefs/commit/main")
    response = httpx2.Response(status, request=request, text="nope")
    return HfHubHTTPError(f"{status} error", response=response)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    recipe = make_recipe(output={"rows_per_shard": 1})
    out = tmp_path / "out"
    manifest = publish(recipe, str(out), pair_shards(tmp_path, recipe, [["a", "b"]]), STATS)
    (out / ".work").mkdir()
    (out / ".work" / "scratch.parquet").write_bytes(b"not part of the dataset")
    (out / "runs" / manifest["run_id"] / "data" / "stray.parquet").write_bytes(b"not in the manifest")
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
    run = f"runs/{manifest['run_id']}"
    assert f"{run}/stats.json" in extras and f"{run}/images/funnel.png" in extras
    data = [f["path"] for f in manifest["files"]]
    assert [p.rsplit("/", 1)[-1] for p in data] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert paths == sorted(["README.md", "manifest.json", *data, *extras])
    assert not any(p.endswith("stray.parquet") or p.startswith(".work") for p in paths)
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
    assert names == ["create_repo", "list_repo_files", "create_commit"]
    create_repo, _, create_commit = (bound.arguments for _, bound in api.calls)
    assert create_repo["repo_type"] == "dataset" and create_repo["exist_ok"] is True
    assert create_commit["repo_type"] == "dataset"
    operations = list(create_commit["operations"])
    assert all(isinstance(op, CommitOperationAdd) for op in operations)  # nothing stale in a new repo
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


def fast_client(api: SignatureCheckedApi, sleeps: list[float] | None = None) -> HfHubClient:
    record = sleeps if sleeps is not None else []
    return HfHubClient(api, RetryPolicy(attempts=4, first_delay=1.0), sleep=record.append)


def test_transient_failures_are_retried_with_backoff(dataset_dir: Path) -> None:
    api, sleeps = SignatureCheckedApi(failures=[503, httpx2.ConnectError("reset"), 429]), []
    url = push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api, sleeps))
    assert url == "https://hub.test/commit/1"
    assert len(sleeps) == 3 and sleeps[0] <= 1.0 < sleeps[2] <= 4.0  # exponential, with jitter
    assert sum(1 for name, _ in api.calls if name == "create_commit") == 1


def test_transient_failures_give_up_with_a_clear_message(dataset_dir: Path) -> None:
    api = SignatureCheckedApi(failures=[502] * 10)
    with pytest.raises(HubError, match="still failing after 4 attempts.*nothing was committed"):
        push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api))


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_not_retried(dataset_dir: Path, status: int) -> None:
    api, sleeps = SignatureCheckedApi(failures=[status]), []
    with pytest.raises(HubAuthError, match=f"HTTP {status}.*HF_TOKEN"):
        push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api, sleeps))
    assert sleeps == [] and len(api.calls) == 1


def test_other_client_errors_are_not_retried(dataset_dir: Path) -> None:
    api, sleeps = SignatureCheckedApi(failures=[400]), []
    with pytest.raises(HubError, match="HTTP 400.*not retried"):
        push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api, sleeps))
    assert sleeps == []


def test_rerun_after_failed_push_and_new_version_leave_one_copy(dataset_dir: Path, tmp_path: Path) -> None:
    api = SignatureCheckedApi(failures=[None, None, 500, 500, 500, 500])  # the commit keeps failing
    with pytest.raises(HubError, match="commit on org/prefs still failing"):
        push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api))
    assert set(api.files) == {".gitattributes", "LICENSE"}, "a failed commit changes nothing"
    push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api))
    push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api))
    first = json.loads((dataset_dir / "manifest.json").read_text())
    listed = {f["path"] for f in first["files"] + first["extras"]} | {"README.md", "manifest.json"}
    assert set(api.files) == listed | {".gitattributes", "LICENSE"}
    # A new version of the dataset replaces the old files in the same commit; hand-added files stay.
    recipe = make_recipe(output={"rows_per_shard": 2})
    second = publish(recipe, str(dataset_dir), pair_shards(tmp_path / "v2", recipe, [["c", "d", "e"]]), STATS)
    push_dataset(str(dataset_dir), "org/prefs", private=False, client=fast_client(api))
    listed = {f["path"] for f in second["files"] + second["extras"]} | {"README.md", "manifest.json"}
    assert set(api.files) == listed | {".gitattributes", "LICENSE"}
    assert not any(p.startswith(f"runs/{first['run_id']}") for p in api.files)
