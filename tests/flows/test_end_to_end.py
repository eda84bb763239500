"""The whole job as a user runs it: CLI → Prefect → real model → dataset that datasets and TRL load."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import httpx
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard

from schemas import columns
from tests.conftest import ROOT, smollm2_tokenizer, tiny_llama

pytestmark = pytest.mark.model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return env


@pytest.fixture(scope="module")
def prefect_server(prefect_env: dict[str, str]) -> Iterator[str]:
    """A real `prefect server start` on loopback, for the PREFECT_API_URL path."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=prefect_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("prefect server exited during start")
            time.sleep(0.5)
        else:
            raise RuntimeError("prefect server did not become healthy in 120 s")
        yield api
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def build(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Seed 2: three of the first four prompts get two or more finished answers with this build
    # (batched decode). Seed 1 gives each prompt exactly one, so no pair, and nothing to test here.
    cmd = [sys.executable, "-m", "flows.build_prefs", "--limit", "4", "--output", str(out), "--seed", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, prefect_env: dict[str, str], prefect_server: str
) -> dict[str, object]:
    base = tmp_path_factory.mktemp("e2e")
    ephemeral = build(base / "a", prefect_env)
    served = build(base / "b", {**prefect_env, "PREFECT_API_URL": prefect_server})
    return {
        "a": base / "a",
        "b": base / "b",
        "log_a": ephemeral.stdout + ephemeral.stderr,
        "log_b": served.stdout + served.stderr,
        "api": prefect_server,
    }


def test_output_layout_and_loading(runs: dict[str, object]) -> None:
    out = runs["a"]
    assert isinstance(out, Path)
    assert (out / "README.md").is_file() and (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    run = out / "runs" / manifest["run_id"]
    assert list((run / "data").glob("train-*.parquet"))
    ds = datasets.load_dataset(str(out), split="train")
    assert ds.num_rows == manifest["splits"]["train"] >= 1
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user"
    assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert row["score_chosen"] > row["score_rejected"]
    assert row["policy_model"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    card = DatasetCard.load(out / "README.md")
    names = [cfg["config_name"] for cfg in card.data.configs]
    n_dropped = manifest["splits"]["dropped"]
    assert names == (["default", "dropped"] if n_dropped else ["default"])
    if n_dropped:  # an empty split has no file and no config: `datasets` cannot read 0-row files
        dropped = datasets.load_dataset(str(out), "dropped", split="train")
        assert dropped.num_rows == n_dropped and all(dropped["drop_reason"])
    assert ds.num_rows + n_dropped == manifest["stats"]["stages"]["pairing"]["rows_out"]
    for name in ("funnel", "signals", "agreement", "margins", "length_vs_score"):
        assert (run / "images" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        assert f"runs/{manifest['run_id']}/images/{name}.png" in card.text
    for column in (
        "agreement",
        "strength_mean",
        "strength_std",
        "consistency",
        "p_chosen",
        "judge_swap_agree",
    ):
        assert column in ds.column_names
    assert (run / "stats.json").is_file()


def test_one_pair_per_prompt_whose_samples_scored_differently(runs: dict[str, object]) -> None:
    out = runs["a"]
    assert isinstance(out, Path)
    labels = [
        row
        for shard in sorted((out / ".work" / "labels").glob("*.data.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]
    # The default recipe pairs finished answers only (pairing.finished_only).
    finished = {
        row[columns.RESPONSE_ID]
        for shard in sorted((out / ".work" / "sampling").glob("*.data.parquet"))
        for row in pq.read_table(shard, columns=[columns.RESPONSE_ID, columns.TRUNCATED]).to_pylist()
        if not row[columns.TRUNCATED]
    }
    by_prompt: dict[str, set[float]] = {}
    n_finished: dict[str, set[str]] = {}
    for label in labels:
        if label[columns.SCORE] is not None and label[columns.RESPONSE_ID] in finished:
            by_prompt.setdefault(label[columns.PROMPT_ID], set()).add(label[columns.SCORE])
            n_finished.setdefault(label[columns.PROMPT_ID], set()).add(label[columns.RESPONSE_ID])
    varied = {pid for pid, scores in by_prompt.items() if len(scores) > 1 and len(n_finished[pid]) > 1}
    kept = set(datasets.load_dataset(str(out), split="train")["prompt_id"])
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = (
        set(datasets.load_dataset(str(out), "dropped", split="train")["prompt_id"])
        if manifest["splits"]["dropped"]
        else set()
    )
    assert not kept & dropped  # one candidate pair per prompt, in exactly one config
    assert varied and varied <= kept | dropped
    # ... and every prompt without two finished answers is counted under its own reason.
    prompts = {label[columns.PROMPT_ID] for label in labels}
    short = {pid for pid in prompts if len(n_finished.get(pid, ())) < 2}
    drops = manifest["stats"]["stages"]["pairing"]["drops"]
    assert drops.get("fewer_than_two_finished", 0) == len(short)


def test_same_command_twice_gives_identical_rows(runs: dict[str, object]) -> None:
    a, b = runs["a"], runs["b"]
    assert isinstance(a, Path) and isinstance(b, Path)
    rows_a = datasets.load_dataset(str(a), split="train").to_list()
    rows_b = datasets.load_dataset(str(b), split="train").to_list()
    assert rows_a == rows_b


def test_progress_is_visible_and_output_path_printed(runs: dict[str, object]) -> None:
    log = str(runs["log_a"])
    assert "sampling shard 1/1" in log and "ETA" in log
    assert f"Dataset ready: {runs['a']}" in log
    assert "temporary server" in log  # ephemeral mode out of the box
    assert "temporary server" not in str(runs["log_b"])  # used the running server instead


def test_console_says_which_llama_build_and_holds_no_library_noise(runs: dict[str, object]) -> None:
    log = str(runs["log_a"])
    assert "llama.cpp: portable build using" in log and "decodes on this CPU" in log
    for noise in ("Loading weights", "Finished in state Completed()", "FutureWarning", "docs.prefect.io"):
        assert noise not in log, noise


def test_default_recipe_pairs_only_finished_answers(runs: dict[str, object]) -> None:
    out = runs["a"]
    assert isinstance(out, Path)
    for config in ("default", "dropped"):
        if config == "dropped" and not json.loads((out / "manifest.json").read_text())["splits"]["dropped"]:
            continue
        rows = datasets.load_dataset(str(out), config, split="train").to_list()
        assert all(r["chosen_finish_reason"] == r["rejected_finish_reason"] == "stop" for r in rows)


def test_run_and_artifact_recorded_on_the_running_server(runs: dict[str, object]) -> None:
    api = str(runs["api"])
    flow_runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
    assert any(r["state_type"] == "COMPLETED" for r in flow_runs)
    artifacts = httpx.post(f"{api}/artifacts/filter", json={}, timeout=10).json()
    summary = [a for a in artifacts if a["key"] == "build-prefs-summary"]
    assert summary and "pairs" in summary[0]["data"] and "| sampling |" in summary[0]["data"]
    assert "Funnel:" in summary[0]["data"] and "| consistency |" in summary[0]["data"]


def test_trl_dpo_trainer_consumes_rows_unchanged(runs: dict[str, object], tmp_path: Path) -> None:
    """One DPO step on a tiny random model with the policy's tokenizer: the format is what TRL expects."""
    from trl import DPOConfig, DPOTrainer

    tokenizer = smollm2_tokenizer()
    model = tiny_llama(tokenizer, max_positions=1024)
    ds = datasets.load_dataset(str(runs["a"]), split="train")
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=256,
        logging_steps=1,
    )
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=ds, processing_class=tokenizer
    )
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss == pytest.approx(0.6931, abs=0.05)
