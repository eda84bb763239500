"""Writer, manifest and card: HF layout, nothing lost in resharding, manifest last, card safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
from huggingface_hub import DatasetCard

from schemas import columns
from schemas.recipe import Recipe
from steps.pairing.pairs import make_pairs
from steps.publish import writer
from steps.publish.card import fence, md
from steps.publish.release import publish
from steps.run import liveness
from steps.run.files import write_bytes_atomic, write_table
from tests.conftest import ROOT, make_recipe
from tests.steps.labelers.test_labeling import responses
from tests.steps.pairing.test_pairing import labels_for
from tests.steps.test_sampling import prompts_table

STATS = {
    "prompts": {"source": "test"},
    "stages": {
        name: {
            "stage": name,
            "rows_in": 1,
            "rows_out": 1,
            "drops": {},
            "counts": {},
            "examples": {},
            "seconds": 0.0,
        }
        for name in ("prompts", "sampling", "labeling", "pairing")
    },
}


def pair_shards(tmp_path: Path, recipe: Recipe, prompt_texts: list[list[str]]) -> list[str]:
    """One pair shard per list of prompt texts; every prompt yields exactly one pair."""
    uris = []
    for i, texts in enumerate(prompt_texts):
        prompts = prompts_table(texts)
        resp = responses(prompts, ["good answer", "bad"])
        labels = labels_for(resp, {"bleu": [2.0, 1.0] * len(texts)})
        table, _ = make_pairs(prompts, resp, labels, recipe)
        uris.append(write_table(table, str(tmp_path / "work" / f"pairs-{i}.parquet")))
    return uris


def test_reshards_without_losing_rows_and_loads_with_datasets(tmp_path: Path) -> None:
    recipe = make_recipe(output={"rows_per_shard": 3})
    uris = pair_shards(tmp_path, recipe, [["a", "b"], ["c", "d", "e"], [], ["f", "g"]])
    out = tmp_path / "out"
    manifest = publish(recipe, str(out), uris, STATS)
    data = out / "runs" / manifest["run_id"] / "data"
    names = sorted(p.name for p in data.iterdir())
    assert names == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [f["rows"] for f in manifest["files"]] == [3, 3, 1]
    assert manifest["splits"] == {"train": 7}
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == 7
    assert [p[0]["content"] for p in ds["prompt"]] == list("abcdefg")
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "good answer"}]
    assert writer.verify(str(out))["recipe"]["hash"] == recipe.fingerprint()
    card = DatasetCard.load(out / "README.md")
    assert card.data.configs[0]["data_files"][0]["path"] == [f["path"] for f in manifest["files"]]
    assert card.data.license == "apache-2.0" and card.data.size_categories == ["n<1K"]


def test_arrow_format_loads(tmp_path: Path) -> None:
    recipe = make_recipe(output={"format": "arrow"})
    out = tmp_path / "out"
    manifest = publish(recipe, str(out), pair_shards(tmp_path, recipe, [["a", "b"]]), STATS)
    assert (out / "runs" / manifest["run_id"] / "data" / "train-00000-of-00001.arrow").is_file()
    assert datasets.load_dataset(str(out), split="train").num_rows == 2


def test_zero_pairs_publish_card_and_manifest_without_unreadable_files(tmp_path: Path) -> None:
    recipe = make_recipe()
    out = tmp_path / "out"
    manifest = publish(recipe, str(out), pair_shards(tmp_path, recipe, [[]]), STATS)
    assert manifest["splits"] == {"train": 0} and manifest["files"] == []
    assert not list(out.rglob("train-*"))  # no unreadable 0-row file
    assert "No pairs were produced" in (out / "README.md").read_text()


def test_crash_mid_write_keeps_the_previous_dataset_and_old_runs_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = make_recipe(output={"rows_per_shard": 1})
    out = tmp_path / "out"
    uris = pair_shards(tmp_path, recipe, [["a", "b", "c"]])
    first = publish(recipe, str(out), uris, STATS)
    card = (out / "README.md").read_bytes()

    calls = {"n": 0}
    real = writer._encode

    def explode(table: pa.Table, fmt: str) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(table, fmt)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_encode", explode)
    smaller = make_recipe(output={"rows_per_shard": 2})
    with pytest.raises(OSError, match="disk full"):
        publish(smaller, str(out), uris, STATS)
    assert writer.verify(str(out)) == first and (out / "README.md").read_bytes() == card
    assert datasets.load_dataset(str(out), split="train", download_mode="force_redownload").num_rows == 3

    monkeypatch.setattr(writer, "_encode", real)
    second = publish(smaller, str(out), uris, STATS)
    assert [f["path"].rsplit("/", 1)[-1] for f in second["files"]] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    third = publish(make_recipe(output={"rows_per_shard": 3}), str(out), uris, STATS)
    assert {p.name for p in (out / "runs").iterdir()} == {second["run_id"], third["run_id"]}
    assert (out / "runs" / first["run_id"]).exists() is False


def test_publishing_the_same_content_twice_writes_nothing(tmp_path: Path) -> None:
    recipe = make_recipe()
    out = tmp_path / "out"
    uris = pair_shards(tmp_path, recipe, [["a", "b"]])
    first = publish(recipe, str(out), uris, STATS)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert publish(recipe, str(out), uris, STATS) == first
    assert (out / "manifest.json").stat().st_mtime_ns == stamp


def test_verify_detects_changed_shard(tmp_path: Path) -> None:
    recipe = make_recipe()
    out = tmp_path / "out"
    manifest = publish(recipe, str(out), pair_shards(tmp_path, recipe, [["a"]]), STATS)
    (out / manifest["files"][0]["path"]).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum mismatch"):
        writer.verify(str(out))


def test_manifest_records_provenance(tmp_path: Path) -> None:
    recipe = make_recipe()
    out = tmp_path / "out"
    publish(recipe, str(out), pair_shards(tmp_path, recipe, [["a"]]), STATS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["package"]["name"] == "prefsmith" and manifest["package"]["version"]
    assert manifest["recipe"]["config"]["name"] == "test"
    assert set(manifest["files"][0]) == {"path", "rows", "sha256", "bytes"}
    assert manifest["stats"]["scores"][columns.SCORE_CHOSEN]["count"] == 1


def test_card_escapes_user_strings_and_template_syntax(tmp_path: Path) -> None:
    hostile = "{{ 7*7 }} {% raw %} <script>alert(1)</script> [x](http://evil) | ``` ---"
    recipe = make_recipe(description=hostile, card={"pretty_name": "Name ---\nlicense: mit"})
    out = tmp_path / "out"
    uris = pair_shards(tmp_path, recipe, [[hostile + " ```\n# heading"]])
    publish(recipe, str(out), uris, STATS)
    text = (out / "README.md").read_text()
    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.pretty_name == "Name ---\nlicense: mit"
    assert "49" not in text.split("## Load it")[0]  # the template expression was not evaluated
    assert "<script>" not in text.split("## Example row")[0]
    assert "\\<script\\>" in text
    example = text.split("## Example row")[1].split("## Files")[0]
    assert example.strip().startswith("````json")  # fence longer than the ``` inside the prompt


def test_md_and_fence_helpers() -> None:
    assert md("a|b <i>") == "a\\|b \\<i\\>"
    assert md("line\nbreak") == "line break"
    assert fence("x ```` y").startswith("`````")


def test_rebuilt_dataset_in_the_same_folder_is_not_served_from_the_datasets_cache(tmp_path: Path) -> None:
    """`datasets` caches a local folder by name; new run prefixes give a rebuilt dataset new file paths."""
    recipe = make_recipe()
    out = tmp_path / "same-name"
    publish(recipe, str(out), pair_shards(tmp_path / "v1", recipe, [["a", "b", "c"]]), STATS)
    assert datasets.load_dataset(str(out), split="train").num_rows == 3
    publish(recipe, str(out), pair_shards(tmp_path / "v2", recipe, [["d", "e"]]), STATS)
    again = datasets.load_dataset(str(out), split="train")
    assert [p[0]["content"] for p in again["prompt"]] == ["d", "e"]


KILLED_BEFORE_RENAME = """
import os, signal, sys
from steps.run import files
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # the kill lands between write and rename
files.write_bytes_atomic(sys.argv[1], b"never published")
"""


def killed_pid(tmp_path: Path) -> int:
    """A pid that no process has any more."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_a_writer_killed_before_its_rename_leaves_no_temporary_after_the_next_write(tmp_path: Path) -> None:
    """A kill in the few milliseconds before the rename broke tests/steps/run/test_kill_loop.py's "no file outside
    the manifest": SIGKILL runs no ``finally``, and the temporary stayed for good."""
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, str(target)], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].startswith("manifest.json.tmp-"), left
    assert target.read_bytes() == b"old"
    # A live writer's temporary (this process's pid) is not touched.
    live = tmp_path / f"manifest.json.tmp-{liveness.space_tag()}-{os.getpid()}-0000abcd"
    live.write_bytes(b"being written")
    # A dead pid from another pid space (a container sharing this host's name) is not ours to judge.
    elsewhere = tmp_path / f"manifest.json.tmp-{'f' * 12}-{killed_pid(tmp_path)}-0000abcd"
    elsewhere.write_bytes(b"another container's")

    write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, elsewhere.name])
