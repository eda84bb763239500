"""Kill it anywhere, rerun, same dataset: SIGKILL at several points of a real CLI run, then resume.

The run is the real thing (CLI, Prefect's temporary server, transformers engine,
Parquet files) on a tiny random model so it takes seconds per run. The kills land
at named checkpoints (``steps.run.faults``) and take the whole process group down,
Prefect's server included, as a lost machine would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from schemas import columns
from steps.publish import writer
from steps.run import faults, resume
from tests.conftest import ROOT, smollm2_tokenizer, tiny_llama

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Llama with SmolLM2's tokenizer and chat template: real code paths, no real weights."""
    tokenizer = smollm2_tokenizer()
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recipe(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = {"model": str(tiny_model), "engine": "transformers", "dtype": "float32", "device": "cpu"}
    data: dict[str, Any] = {
        "name": "faults",
        "prompts": {"source": "builtin", "name": "default"},
        "limit": 8,
        "policy": model,
        "sampling": {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 6, "seed": 11},
        "labelers": [
            {"kind": "bleu", "name": "bleu"},
            {
                "kind": "density_ratio",
                "name": "density_ratio",
                "strong": {"model": model, "system_prompt": "Answer helpfully."},
                "weak": {"model": model},
                "reduce": "mean",
            },
        ],
        "consistency": {"min_agree": 1},
        "output": {"prompts_per_shard": 2},
    }
    path = tmp_path_factory.mktemp("recipe") / "faults.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", faults.ENV))}
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-faults"))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return env


def cli(recipe: Path, out: Path, env: dict[str, str], fault: str | None = None) -> int:
    run_env = dict(env)
    if fault:
        run_env[faults.ENV] = fault
    cmd = [sys.executable, "-m", "flows.build_prefs", "--recipe", str(recipe), "--output", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if fault is None:
        assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
    return proc.returncode


def markers(out: Path) -> dict[str, bytes]:
    work = out / ".work"
    return {str(p.relative_to(work)): p.read_bytes() for p in work.rglob(f"*{resume.MARKER_SUFFIX}")}


def dataset(out: Path) -> dict[str, list[dict[str, Any]]]:
    manifest = writer.verify(str(out))
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "dropped": []}
    for entry in manifest["files"]:
        split = entry["path"].rsplit("/", 1)[-1].split("-", 1)[0]
        splits[split] += pq.read_table(out / entry["path"]).to_pylist()
    return {name: sorted(rows, key=lambda r: r[columns.PROMPT_ID]) for name, rows in splits.items()}


def test_killed_anywhere_the_rerun_gives_the_uninterrupted_dataset_without_redoing_work(
    recipe: Path, env: dict[str, str], tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    cli(recipe, reference, env)
    expected = dataset(reference)
    assert expected["train"], "the reference run must produce pairs for the comparison to mean anything"

    out = tmp_path / "out"
    kills = [
        "sampling:done#2",  # during sampling: two of four shards finished
        "label:density_ratio:before-marker#2",  # during labeling: data written, marker not yet
        "pairing:done#1",  # during pairing
        "publish:data",  # during writing: run files written, card and manifest not
        "publish:card",  # after the card, before the manifest
    ]
    seen: dict[str, bytes] = {}
    for point in kills:
        code = cli(recipe, out, env, fault=point)
        assert code == -signal.SIGKILL, f"the run was meant to be killed at {point} (exit {code})"
        now = markers(out)
        changed = [p for p in seen if now.get(p) != seen[p]]
        assert not changed, f"rerun before the kill at {point} redid finished shards: {changed}"
        assert len(now) > len(seen) or point.startswith("publish"), f"no progress before {point}"
        seen = now
        if point == "publish:data":
            assert not (out / "manifest.json").exists() and not (out / "README.md").exists()
    cli(recipe, out, env)
    final = markers(out)
    assert all(final[p] == seen[p] for p in seen), "the final rerun redid finished shards"
    got = dataset(out)
    assert got == expected
    ids = [r[columns.PROMPT_ID] for r in got["train"] + got["dropped"]]
    assert len(ids) == len(set(ids)), "a prompt's pair appears twice"
    manifest = writer.verify(str(out))
    assert {p.name for p in (out / "runs").iterdir()} == {manifest["run_id"]}
