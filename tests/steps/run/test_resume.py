"""Resume and atomic publication, in process with the fake engine: what is reused, what is redone, what readers see."""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from flows import build_prefs as bp
from flows import cli
from flows.checks import NothingSampledError
from schemas import columns
from steps import sampling
from steps.publish import release as publish_mod
from steps.publish import writer
from steps.run import resume
from tests.conftest import FakeEngine

PROMPTS = [{"prompt": f"Question number {i}: name a colour.", "reference": ["red", "blue"]} for i in range(6)]


def write_recipe(tmp_path: Path, **changes: Any) -> str:
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    recipe: dict[str, Any] = {
        "name": "resume-test",
        "prompts": {"source": "file", "uri": str(prompts), "references_column": "reference"},
        "sampling": {"n": 4, "max_tokens": 8, "seed": 3},
        "labelers": [
            {"kind": "bleu", "name": "bleu", "variant": "bleuberi"},
            {"kind": "bleu", "name": "bleu_sacre", "variant": "sacrebleu"},
        ],
        "pairing": {"rule": "best_vs_worst"},
        "consistency": {"min_agree": 1},
        "output": {"prompts_per_shard": 2},
    }
    for dotted, value in changes.items():
        node = recipe
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / f"recipe-{abs(hash(json.dumps(changes, sort_keys=True)))}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def markers(work: Path) -> dict[str, bytes]:
    """Every completion marker under the work location, by path: a rewritten one means redone work."""
    return {str(p.relative_to(work)): p.read_bytes() for p in work.rglob(f"*{resume.MARKER_SUFFIX}")}


def stage_of(path: str) -> str:
    return path.split("/")[0]


def rows(out: Path) -> list[dict[str, Any]]:
    manifest = writer.read_manifest(str(out))
    assert manifest is not None
    tables = [pq.read_table(out / f["path"]) for f in manifest["files"] if "/train-" in f["path"]]
    return sorted((r for t in tables for r in t.to_pylist()), key=lambda r: r[columns.PROMPT_ID])


def run(recipe: str, out: Path, **kwargs: Any) -> str:
    return bp.build_prefs(recipe=recipe, output=str(out), **kwargs)


def test_rerun_reuses_every_shard_and_republishes_nothing(tmp_path: Path, engine: FakeEngine) -> None:
    recipe, out = write_recipe(tmp_path), tmp_path / "out"
    run(recipe, out)
    first = markers(out / ".work")
    manifest = (out / "manifest.json").read_bytes()
    assert {stage_of(p) for p in first} == {
        "prompts",
        "sampling",
        "label",
        "labels",
        "pairing",
        "consistency",
    }
    assert sum(1 for p in first if stage_of(p) == "sampling") == 3  # 6 prompts, 2 per shard
    calls = engine.calls
    run(recipe, out)
    assert engine.calls == calls, "a finished sampling shard was sampled again"
    assert markers(out / ".work") == first
    assert (out / "manifest.json").read_bytes() == manifest, "identical content must not be republished"
    assert writer.verify(str(out))["splits"]["train"] == len(rows(out))


def test_changing_the_filter_reuses_samples_labels_and_pairs(tmp_path: Path, engine: FakeEngine) -> None:
    out = tmp_path / "out"
    run(write_recipe(tmp_path), out)
    before = markers(out / ".work")
    calls = engine.calls
    run(write_recipe(tmp_path, **{"consistency.min_agree": 2}), out)
    after = markers(out / ".work")
    assert engine.calls == calls
    new = {stage_of(p) for p in set(after) - set(before)}
    assert new == {"consistency"}
    assert all(after[p] == before[p] for p in before)


def test_changing_one_labeler_recomputes_that_labeler_and_later_stages_only(
    tmp_path: Path, engine: FakeEngine
) -> None:
    out = tmp_path / "out"
    run(write_recipe(tmp_path), out)
    before = markers(out / ".work")
    changed = write_recipe(
        tmp_path,
        labelers=[
            {"kind": "bleu", "name": "bleu", "variant": "bleuberi"},
            {"kind": "bleu", "name": "bleu_sacre", "variant": "bleuberi"},
        ],
    )
    run(changed, out)
    new = [p for p in markers(out / ".work") if p not in before]
    label_parts = [p for p in new if stage_of(p) == "label"]
    assert len(label_parts) == 3, "only the changed labeler's 3 shards are relabelled"
    assert {stage_of(p) for p in new} == {"label", "labels", "pairing", "consistency"}


def test_weights_do_not_relabel_but_do_repair(tmp_path: Path, engine: FakeEngine) -> None:
    out = tmp_path / "out"
    run(write_recipe(tmp_path), out)
    before = markers(out / ".work")
    run(
        write_recipe(
            tmp_path,
            labelers=[
                {"kind": "bleu", "name": "bleu", "variant": "bleuberi", "weight": 3.0},
                {"kind": "bleu", "name": "bleu_sacre", "variant": "sacrebleu"},
            ],
        ),
        out,
    )
    new = {stage_of(p) for p in markers(out / ".work") if p not in before}
    assert new == {"pairing", "consistency"}


def test_code_version_bump_recomputes_that_stage_and_what_its_output_feeds(
    tmp_path: Path, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe, out = write_recipe(tmp_path), tmp_path / "out"
    run(recipe, out)
    before = markers(out / ".work")
    # A new sampling version whose code now answers differently: sampling and everything after it is redone.
    monkeypatch.setitem(resume.CODE_VERSIONS, "sampling", resume.CODE_VERSIONS["sampling"] + 1)
    engine.answers = ["delta epsilon", "zeta", "eta theta iota", "kappa"]
    calls = engine.calls
    run(recipe, out)
    assert engine.calls == calls + 3
    new = {stage_of(p) for p in markers(out / ".work") if p not in before}
    assert new == {"sampling", "label", "labels", "pairing", "consistency"}
    # A version bump whose output is byte-identical: that stage is redone, later keys (built from its
    # output's checksum) are unchanged, so later stages are reused.
    before = markers(out / ".work")
    monkeypatch.setitem(resume.CODE_VERSIONS, "labels", resume.CODE_VERSIONS["labels"] + 1)
    run(recipe, out)
    new = {stage_of(p) for p in markers(out / ".work") if p not in before}
    assert new == {"labels"}


def test_corrupt_or_truncated_shard_is_detected_and_recomputed(tmp_path: Path, engine: FakeEngine) -> None:
    recipe, out = write_recipe(tmp_path), tmp_path / "out"
    run(recipe, out)
    reference = rows(out)
    shard = sorted((out / ".work" / "sampling").glob("*.data.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:50])  # truncated, as a kill mid-copy would leave it
    calls = engine.calls
    run(recipe, out)
    assert engine.calls == calls + 1, "exactly the damaged shard is sampled again"
    assert rows(out) == reference


def test_torn_marker_is_ignored(tmp_path: Path, engine: FakeEngine) -> None:
    recipe, out = write_recipe(tmp_path), tmp_path / "out"
    run(recipe, out)
    marker = sorted((out / ".work" / "sampling").glob(f"*{resume.MARKER_SUFFIX}"))[0]
    marker.write_text(marker.read_text()[:20])
    calls = engine.calls
    run(recipe, out)
    assert engine.calls == calls + 1


def test_fresh_recomputes_everything(tmp_path: Path, engine: FakeEngine) -> None:
    recipe, out = write_recipe(tmp_path), tmp_path / "out"
    run(recipe, out)
    reference, calls = rows(out), engine.calls
    run(recipe, out, fresh=True)
    assert engine.calls == 2 * calls
    assert rows(out) == reference


def test_work_location_can_live_elsewhere(tmp_path: Path, engine: FakeEngine) -> None:
    recipe, out, work = write_recipe(tmp_path), tmp_path / "out", tmp_path / "scratch"
    run(recipe, out, work=str(work))
    assert markers(work) and not (out / ".work").exists()


class _FailingPublish(Exception):
    pass


def test_reader_sees_old_or_new_dataset_never_a_mix(
    tmp_path: Path, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    run(write_recipe(tmp_path), out)
    old_manifest = writer.verify(str(out))
    old_rows = rows(out)
    old_card = (out / "README.md").read_text()

    def crash(point: str) -> None:
        if point == "publish:data":
            raise _FailingPublish(point)

    monkeypatch.setattr(publish_mod.faults, "checkpoint", crash)
    with pytest.raises(_FailingPublish):
        run(write_recipe(tmp_path, **{"sampling.seed": 4}), out)
    # New shards were written under a new run prefix, but the root still describes the old dataset.
    assert len(list((out / "runs").iterdir())) == 2
    assert (out / "README.md").read_text() == old_card
    assert writer.verify(str(out)) == old_manifest
    loaded = datasets.load_dataset(str(out), split="train", download_mode="force_redownload")
    assert sorted(loaded.to_list(), key=lambda r: r[columns.PROMPT_ID]) == old_rows

    monkeypatch.undo()
    monkeypatch.setattr(sampling, "load_engine", lambda policy: engine)
    run(write_recipe(tmp_path, **{"sampling.seed": 4}), out)
    new_manifest = writer.verify(str(out))
    assert new_manifest["run_id"] != old_manifest["run_id"]
    # The previous run stays for readers that opened it a moment ago; anything older is removed.
    assert {p.name for p in (out / "runs").iterdir()} == {old_manifest["run_id"], new_manifest["run_id"]}
    listed = {f["path"] for f in new_manifest["files"] + new_manifest["extras"]}
    assert all(p.startswith(f"runs/{new_manifest['run_id']}/") for p in listed)
    run(write_recipe(tmp_path, **{"sampling.seed": 5}), out)
    third = writer.verify(str(out))
    assert {p.name for p in (out / "runs").iterdir()} == {new_manifest["run_id"], third["run_id"]}


class FullDiskFileSystem(MemoryFileSystem):
    """An in-memory store whose disk fills up once ``full`` is set: every new write raises ENOSPC."""

    protocol = "fulldisk"
    full = False

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode and FullDiskFileSystem.full and "/runs/" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def full_disk() -> Iterator[type[FullDiskFileSystem]]:
    import fsspec

    fsspec.register_implementation("fulldisk", FullDiskFileSystem, clobber=True)
    FullDiskFileSystem.full = False
    yield FullDiskFileSystem
    FullDiskFileSystem.full = False
    FullDiskFileSystem.store.clear()


def test_disk_full_during_publication_publishes_nothing_partial(
    tmp_path: Path,
    engine: FakeEngine,
    full_disk: type[FullDiskFileSystem],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = "fulldisk://datasets/prefs"
    assert cli.build_prefs_main(["--recipe", write_recipe(tmp_path), "--output", out]) == 0
    before = writer.verify(out)
    full_disk.full = True
    assert (
        cli.build_prefs_main(["--recipe", write_recipe(tmp_path, **{"sampling.seed": 9}), "--output", out])
        == 1
    )
    message = capsys.readouterr().err
    assert "no space left on device" in message and "rerun the same command" in message
    assert "Traceback" not in message
    assert writer.verify(out) == before, "the previous dataset must stay complete and unchanged"
    full_disk.full = False
    calls = engine.calls
    assert (
        cli.build_prefs_main(["--recipe", write_recipe(tmp_path, **{"sampling.seed": 9}), "--output", out])
        == 0
    )
    assert engine.calls == calls, "the rerun after freeing space reuses every finished shard"
    assert writer.verify(out)["run_id"] != before["run_id"]


def test_unwritable_output_fails_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_model(policy: object) -> None:
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(sampling, "load_engine", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli.build_prefs_main(["--recipe", write_recipe(tmp_path), "--output", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and str(blocker / "out") in err
    assert cli.build_prefs_main(["--recipe", write_recipe(tmp_path), "--work", str(blocker / "work")]) == 2
    assert "work location" in capsys.readouterr().err


def test_token_never_reaches_outputs_logs_or_prefect(
    tmp_path: Path,
    engine: FakeEngine,
    monkeypatch: pytest.MonkeyPatch,
    prefect_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A planted token must not appear in the dataset, the work files, the logs or Prefect's database."""
    from steps.publish import hub
    from tests.steps.publish.test_hub import SignatureCheckedApi

    secret = "hf_PLANTEDfaketoken0123456789abcdefXYZ"
    monkeypatch.setenv("HF_TOKEN", secret)
    api = SignatureCheckedApi()
    real_client = hub.HfHubClient
    monkeypatch.setattr(hub, "HfHubClient", lambda: real_client(api))
    out = tmp_path / "out"
    assert (
        cli.build_prefs_main(
            ["--recipe", write_recipe(tmp_path), "--output", str(out), "--push-to-hub", "org/prefs"]
        )
        == 0
    )
    assert "README.md" in api.files and "manifest.json" in api.files
    captured = capsys.readouterr()
    places = {"stdout": captured.out.encode(), "stderr": captured.err.encode()}
    places.update({f"hub:{path}": data for path, data in api.files.items()})
    for root in (out, prefect_home):
        places.update({str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()})
    assert any("prefect.db" in name for name in places), "Prefect's database must be among the scanned files"
    leaks = [name for name, data in places.items() if secret.encode() in data]
    assert not leaks, f"token found in {leaks}"


def test_a_run_that_samples_nothing_fails_and_leaves_the_old_dataset(
    tmp_path: Path, engine: FakeEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every prompt dropped by sampling is an error naming the reason, not an empty dataset."""
    recipe, out = write_recipe(tmp_path), tmp_path / "out"
    run(recipe, out)
    manifest = (out / "manifest.json").read_bytes()
    too_long = tmp_path / "too-long.jsonl"
    too_long.write_text("".join(json.dumps({"prompt": f"TOO_LONG {i}"}) + "\n" for i in range(3)))
    empty = write_recipe(tmp_path, **{"prompts.uri": str(too_long), "prompts.references_column": None})
    with pytest.raises(NothingSampledError, match=r"all 3 prompt\(s\) were dropped \(prompt_too_long x3\)"):
        run(empty, out)
    assert (out / "manifest.json").read_bytes() == manifest
    assert cli.build_prefs_main(["--recipe", empty, "--output", str(out)]) == 1
    message = capsys.readouterr().err
    assert "sampling.too_long: truncate_left" in message and "nothing was published" in message


def published_stats(out: Path) -> dict[str, Any]:
    manifest = writer.read_manifest(str(out))
    assert manifest is not None
    return json.loads((out / "runs" / manifest["run_id"] / "stats.json").read_text())


def eval_pairs(tmp_path: Path, agree: int, n: int = 6) -> str:
    """Pairs on which BLEU (reference "red") sides with the human choice ``agree`` times out of ``n``."""
    path = tmp_path / f"eval-{agree}.jsonl"
    lines = []
    for i in range(n):
        good, bad = ("red", "green") if i < agree else ("green", "red")
        lines.append(json.dumps({"prompt": f"q{i}", "chosen": good, "rejected": bad, "reference": ["red"]}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_eval_gate_publishes_nothing_and_costs_no_sampling(
    tmp_path: Path, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PREFSMITH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    passing = write_recipe(tmp_path, eval={"pairs": eval_pairs(tmp_path, 5), "min_accuracy": 0.6})
    run(passing, out)
    manifest = (out / "manifest.json").read_bytes()
    stats = published_stats(out)
    (only,) = stats["eval"]["sets"]
    assert {r["labeler"]: r["agree"] for r in only["rows"]}["aggregate"] == 5
    assert "## Label quality" in (out / "README.md").read_text()
    cost = stats["cost"]
    assert set(cost["labelers"]) == {"bleu", "bleu_sacre"} and cost["total"]["tokens_generated"] > 0
    assert cost["per_kept_pair"]["seconds"] > 0 and cost["seconds"]["label_quality"] > 0
    assert "## What it cost" in (out / "README.md").read_text()
    calls = engine.calls
    failing = write_recipe(tmp_path, eval={"pairs": eval_pairs(tmp_path, 2), "min_accuracy": 0.6})
    assert cli.build_prefs_main(["--recipe", failing, "--output", str(out), "--fresh"]) == 1
    message = capsys.readouterr().err
    assert "aggregate 0.333" in message and "< 0.6" in message and "Nothing was published" in message
    assert (out / "manifest.json").read_bytes() == manifest, "the previous dataset must stay"
    assert engine.calls == calls, "the gate runs before sampling"
    missing = write_recipe(tmp_path, eval={"pairs": str(tmp_path / "nope.jsonl")})
    assert cli.build_prefs_main(["--recipe", missing, "--output", str(out)]) == 2


def test_run_wide_scale_and_length_control_pair_every_shard_alike_and_resume(
    tmp_path: Path, engine: FakeEngine
) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path, pairing={"rule": "best_vs_worst", "scale": "spread", "length_control": {"residual": True}}
    )
    run(recipe, out)
    numbers = published_stats(out)["aggregation"]
    assert set(numbers["spread"]) == {"bleu", "bleu_sacre"} and set(numbers["slope"]) == {
        "bleu",
        "bleu_sacre",
    }
    assert set(numbers["length_corr"]) == {"before", "after"}
    first = markers(out / ".work")
    run(recipe, out)
    assert markers(out / ".work") == first, (
        "the same labels give the same run-wide numbers, so nothing re-pairs"
    )
