"""Output and work location on S3: a real S3-compatible server (moto) on loopback, the pipeline through fsspec.

Everything the flow writes goes through ``fsspec``/``s3fs`` to the server, so this
covers what a local path cannot: no rename on object stores, listings instead of
directories, markers as single objects. The fake engine samples in process (as
in ``test_resume``); the flow, the stages and publication are the real ones.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import fsspec
import pyarrow.parquet as pq
import pytest

from flows import build_prefs as bp
from flows import cli
from schemas import columns
from steps import sampling
from steps.publish import release as publish_mod
from steps.publish import writer
from steps.run import resume
from tests.conftest import FakeEngine
from tests.steps.run.test_resume import write_recipe

# Moto accepts any credentials; these keep boto from looking for real ones (or a metadata service).
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


pytestmark = pytest.mark.integration  # a moto S3 server on loopback


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; every fsspec/boto client finds it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*FAKE_AWS, "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_AWS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket per test, so tests never see each other's objects."""
    name = f"prefs-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return name


def s3_markers(work: str) -> dict[str, bytes]:
    """Every completion marker under an s3:// work location, by key: a rewritten one means redone work."""
    fs, root = fsspec.core.url_to_fs(work)
    fs.invalidate_cache()
    found = [p for p in fs.find(root) if p.endswith(resume.MARKER_SUFFIX)]
    return {p.removeprefix(root.rstrip("/") + "/"): fs.cat_file(p) for p in found}


def train_rows(out: str) -> list[dict[str, Any]]:
    manifest = writer.verify(out)
    fs, root = fsspec.core.url_to_fs(out)
    rows = []
    for entry in manifest["files"]:
        if "/train-" in entry["path"]:
            with fs.open(f"{root}/{entry['path']}", "rb") as handle:
                rows += pq.read_table(handle).to_pylist()
    return sorted(rows, key=lambda r: r[columns.PROMPT_ID])


def local_leftovers(tmp_path: Path) -> list[Path]:
    """Anything the run wrote under the test's directory besides the recipe and prompts it was given."""
    return [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(("recipe-", "prompts"))]


def test_pipeline_on_s3_publishes_a_loadable_dataset_and_resumes(
    tmp_path: Path, engine: FakeEngine, bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, out, work = write_recipe(tmp_path), f"s3://{bucket}/prefs", f"s3://{bucket}/work"
    assert cli.build_prefs_main(["--recipe", recipe, "--output", out, "--work", work]) == 0
    manifest = writer.verify(out)
    assert manifest["splits"]["train"] > 0
    assert not local_leftovers(tmp_path), "everything must go to the bucket"

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/prefs/README.md") and fs.exists(f"{bucket}/prefs/manifest.json")
    first = s3_markers(work)
    stages = {key.split("/")[0] for key in first}
    assert stages == {"prompts", "sampling", "label", "labels", "pairing", "consistency"}
    assert sum(1 for key in first if key.startswith("sampling/")) == 3

    # The published files load with `datasets` straight from the bucket. Its offline switch (set for
    # the whole test session) refuses any remote URL; this one is the loopback server, not the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    files = [f"{out}/{f['path']}" for f in manifest["files"] if "/train-" in f["path"]]
    loaded = datasets.load_dataset(
        "parquet",
        data_files={"train": files},
        split="train",
        storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}},
    )
    rows = train_rows(out)
    assert sorted(loaded.to_list(), key=lambda r: r[columns.PROMPT_ID]) == rows

    # Rerun: every shard is found finished on S3; nothing is sampled, no marker rewritten, nothing republished.
    calls = engine.calls
    manifest_bytes = fs.cat_file(f"{bucket}/prefs/manifest.json")
    assert cli.build_prefs_main(["--recipe", recipe, "--output", out, "--work", work]) == 0
    assert engine.calls == calls
    assert s3_markers(work) == first
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/prefs/manifest.json") == manifest_bytes

    # A corrupted shard object is detected by its checksum and recomputed: exactly that shard.
    shard = sorted(p for p in fs.find(f"{bucket}/work/sampling") if p.endswith(".data.parquet"))[1]
    fs.pipe_file(shard, fs.cat_file(shard)[:50])
    assert cli.build_prefs_main(["--recipe", recipe, "--output", out, "--work", work]) == 0
    assert engine.calls == calls + 1, "exactly the damaged shard is sampled again"
    after = s3_markers(work)
    rewritten = {key for key in first if after[key] != first[key]}
    assert {key.split("/")[0] for key in rewritten} == {"sampling"} and len(rewritten) == 1
    assert train_rows(out) == rows


class _Crash(Exception):
    pass


def test_failure_between_data_and_card_leaves_the_previous_dataset_on_s3(
    tmp_path: Path, engine: FakeEngine, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, work = f"s3://{bucket}/prefs", f"s3://{bucket}/work"
    bp.build_prefs(recipe=write_recipe(tmp_path), output=out, work=work)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    old_manifest = writer.verify(out)
    old_card = fs.cat_file(f"{bucket}/prefs/README.md")
    old_rows = train_rows(out)

    def crash(point: str) -> None:
        if point == "publish:data":
            raise _Crash(point)

    monkeypatch.setattr(publish_mod.faults, "checkpoint", crash)
    changed = write_recipe(tmp_path, **{"sampling.seed": 4})
    with pytest.raises(_Crash):
        bp.build_prefs(recipe=changed, output=out, work=work)
    fs.invalidate_cache()
    runs = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/prefs/runs", detail=False)}
    assert len(runs) == 2 and old_manifest["run_id"] in runs, "the new data went to its own run prefix"
    assert fs.cat_file(f"{bucket}/prefs/README.md") == old_card
    assert writer.verify(out) == old_manifest
    assert train_rows(out) == old_rows

    monkeypatch.undo()
    monkeypatch.setattr(sampling, "load_engine", lambda policy: engine)
    bp.build_prefs(recipe=changed, output=out, work=work)
    new_manifest = writer.verify(out)
    assert new_manifest["run_id"] != old_manifest["run_id"]
    card = fs.cat_file(f"{bucket}/prefs/README.md").decode()
    assert card != old_card.decode() and f"runs/{new_manifest['run_id']}/" in card
    listed = json.loads(fs.cat_file(f"{bucket}/prefs/manifest.json"))
    assert all(f["path"].startswith(f"runs/{new_manifest['run_id']}/") for f in listed["files"])


def test_object_writes_are_all_or_nothing(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card/manifest replacement that fails mid-upload leaves the old object, never a partial one."""
    from steps.run.files import write_bytes_atomic

    uri = f"s3://{bucket}/prefs/manifest.json"
    write_bytes_atomic(uri, b"old")
    fs = fsspec.filesystem("s3")
    original = type(fs)._call_s3
    big = b"x" * (2 * 50 * 2**20 + 1)  # over s3fs's single-PUT size: a multipart upload

    async def fail_second_part(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part" and kwargs.get("PartNumber") == 2:
            raise OSError("connection reset during upload")
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(type(fs), "_call_s3", fail_second_part)
    with pytest.raises(OSError, match="connection reset"):
        write_bytes_atomic(uri, big)
    monkeypatch.undo()
    fs.invalidate_cache()
    assert fs.cat_file(uri) == b"old"
