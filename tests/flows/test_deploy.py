"""The README's "Run on a schedule and on GPU pools", literally: server, pools, workers, deploy, trigger.

A real ``prefect server start`` on loopback, two process work pools (``cpu`` for
the pipeline, ``gpu`` for the model stage; the CPU stands in for the GPU here),
one ``prefect worker start`` per pool, the repo's prefect.yaml deployed with Prefect's own
``prefect deploy --all``, Prefect's ``ls`` commands, and ``prefect deployment run`` of the nightly deployment with a
tiny random model. The model-stage runs happen on the gpu worker; the pipeline
then finds their shards finished. Every subprocess runs in its own process group
and is killed at the end, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flows.build_prefs import build_prefs
from schemas.locks import LockSettings
from steps.publish import writer
from steps.run import faults, resume, work_gc
from tests.conftest import ROOT
from tests.flows.test_end_to_end import free_port
from tests.steps.run.test_faults import tiny_model  # noqa: F401  (a fixture, used by name)

pytestmark = pytest.mark.model

PREFECT = [sys.executable, "-m", "prefect"]


class Processes:
    """Long-running subprocesses started by the test, each its own process group, all killed at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        handle = log.open("wb")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc, _ in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # and whatever else is left in its group
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for _, log in self.procs
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Server, pools, deployments and one worker per pool, set up with the README's commands."""
    base = tmp_path_factory.mktemp("deploy")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", faults.ENV))}
    env.update(
        PREFECT_HOME=str(base / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=api,
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_HEARTBEAT_SECONDS="5",
        PYTHONPATH=str(ROOT),
    )
    procs = Processes()
    try:
        server = procs.start(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env,
            base / "server.log",
        )
        wait_healthy(api, server)
        for pool in ("cpu", "gpu"):
            run_cli(["work-pool", "create", pool, "--type", "process"], env)
        # README: `prefect deploy --all` from the checkout (with fastapi>=0.151 it stopped with HTTP 422
        # after the first deployment: see pyproject.toml).
        run_cli(["--no-prompt", "deploy", "--all"], env)
        for pool in ("cpu", "gpu"):
            procs.start([*PREFECT, "worker", "start", "--pool", pool], env, base / f"worker-{pool}.log")
        yield {"api": api, "env": env, "base": base, "procs": procs}
    finally:
        procs.stop()


def wait_healthy(api: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError("prefect server exited during start")
        time.sleep(0.5)
    raise RuntimeError("prefect server did not become healthy in 180 s")


def run_cli(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([*PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def trigger(stack: dict[str, Any], params: dict[str, Any]) -> str:
    """`prefect deployment run` of the nightly deployment; returns the new flow run's id."""
    out = run_cli(
        ["deployment", "run", "build-prefs/build-prefs-nightly", "--params", json.dumps(params)], stack["env"]
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def wait_final(stack: dict[str, Any], run_id: str, timeout: float = 420) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{stack['api']}/flow_runs/{run_id}", timeout=10).json()
        if run["state"] and run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s\n{stack['procs'].logs()}")


def flow_runs(stack: dict[str, Any], flow_name: str) -> list[dict[str, Any]]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = httpx.post(f"{stack['api']}/flow_runs/filter", json=body, timeout=10).json()
    return [r for r in runs if r["state"]["type"] != "SCHEDULED"]  # not the nightly schedule's future runs


def run_logs(stack: dict[str, Any], run_id: str, newest: bool = False, until: str | None = None) -> str:
    """A run's log messages, the first 200 (the API's most per request) or, with ``newest``, the last.

    A run is marked finished before its process has shipped its last log lines (Prefect sends them
    in the background, in batches), so ``until`` waits, up to 60 s, for a line containing it.
    """
    order = "TIMESTAMP_DESC" if newest else "TIMESTAMP_ASC"
    body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": order, "limit": 200}
    deadline = time.monotonic() + 60
    while True:
        rows = httpx.post(f"{stack['api']}/logs/filter", json=body, timeout=10).json()
        text = "\n".join(r["message"] for r in rows)
        if until is None or until in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def tiny_recipe(path: Path, model: Path, labelers: list[dict[str, Any]]) -> Path:
    spec = {"model": str(model), "engine": "transformers", "dtype": "float32", "device": "cpu"}
    data = {
        "name": "pools",
        "prompts": {"source": "builtin", "name": "default"},
        "limit": 4,
        "policy": spec,
        "sampling": {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 5, "seed": 5},
        "labelers": labelers,
        "consistency": {"min_agree": 1},
        "output": {"prompts_per_shard": 1},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def markers(work: Path, stage: str) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in (work / stage).rglob(f"*{resume.MARKER_SUFFIX}")}


def test_prefect_yaml_defines_the_scheduled_and_the_gpu_deployment() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in config["deployments"]}
    nightly, model = by_name["build-prefs-nightly"], by_name["model-stage"]
    assert nightly["entrypoint"] == "flows/build_prefs.py:build_prefs"
    assert nightly["schedules"][0]["cron"] and nightly["work_pool"]["name"] == "cpu"
    assert nightly["parameters"]["model_deployment"] == "model-stage"
    assert "recipe" in nightly["parameters"]
    # The nightly run collects the work location's garbage, and its parameters are ones the flow takes.
    assert nightly["parameters"]["gc_keep_runs"] >= 1
    valid = build_prefs.validate_parameters(nightly["parameters"])
    assert valid["lock"] == LockSettings(on_busy="wait", max_wait_s=3600)
    assert model["entrypoint"] == "flows/model_stage.py:model_stage" and model["work_pool"]["name"] == "gpu"


def test_prefects_own_cli_lists_what_the_server_holds(stack: dict[str, Any]) -> None:
    """`prefect ... ls` send null filter fields; a server on fastapi>=0.151 answered them with HTTP 422."""
    env = {**stack["env"], "COLUMNS": "250"}  # rich cuts table cells to the terminal's width
    pools = run_cli(["work-pool", "ls"], env)
    assert "cpu" in pools and "gpu" in pools
    deployments = run_cli(["deployment", "ls"], env)
    assert "build-prefs/build-prefs-nightly" in deployments and "model-stage/model-stage" in deployments
    run_cli(["flow-run", "ls"], env)
    for out in (pools, deployments):
        assert "Unprocessable" not in out  # (a bare "422" can be part of an id)


def test_nightly_deployment_runs_its_model_stage_on_the_gpu_pool(
    stack: dict[str, Any],
    tiny_model: Path,  # noqa: F811
) -> None:
    base: Path = stack["base"]
    model_labeler = {
        "kind": "density_ratio",
        "name": "density_ratio",
        "strong": {
            "model": {
                "model": str(tiny_model),
                "engine": "transformers",
                "dtype": "float32",
                "device": "cpu",
            },
            "system_prompt": "Answer helpfully.",
        },
        "weak": {
            "model": {"model": str(tiny_model), "engine": "transformers", "dtype": "float32", "device": "cpu"}
        },
        "reduce": "mean",
    }
    recipe = tiny_recipe(base / "pools.yaml", tiny_model, [{"kind": "bleu", "name": "bleu"}, model_labeler])
    out, work = base / "out", base / "work"
    run_id = trigger(stack, {"recipe": str(recipe), "output": str(out), "work": str(work), "batch_shards": 2})
    run = wait_final(stack, run_id)
    assert run["state"]["type"] == "COMPLETED", (
        f"{run['state']}\n{run_logs(stack, run_id)}\n{stack['procs'].logs()}"
    )
    manifest = writer.verify(str(out))
    assert manifest["splits"]["train"] > 0

    # Two batches of two shards per model stage, each a run of the model-stage deployment on the gpu pool.
    remote = flow_runs(stack, "model-stage")
    assert len(remote) == 4, [r["name"] for r in remote]
    assert all(r["state"]["type"] == "COMPLETED" for r in remote)
    assert sorted(r["parameters"]["stage"] for r in remote) == ["labeling"] * 2 + ["sampling"] * 2
    assert {r["work_pool_name"] for r in remote} == {"gpu"}
    assert len(markers(work, "sampling")) == 4 and len(markers(work, "label/density_ratio")) == 4
    # ... and the pipeline itself found those shards finished instead of computing them again.
    # The nightly parameters collect garbage last, after publishing. Logs arrive in order, so once the
    # GC's line is on the server every earlier line is too.
    last = run_logs(stack, run_id, newest=True, until="gc of ")
    assert "gc of " in last and "removed 0 entries" in last, last
    logs = run_logs(stack, run_id)
    assert logs.count("found finished earlier, reused") >= 4, logs
    records = list((work / work_gc.RECORDS_DIR / "pools").glob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["status"] == "finished"
    # All of the run's log fits the 200 lines read (else the check below would look at nothing).
    assert "published run " in logs, logs
    assert not re.search(r"sampling shard \d/4: .* in [\d.]+s;", logs), logs


def test_failed_gpu_batch_fails_the_run_naming_it_and_the_rerun_resumes(
    stack: dict[str, Any],
    tiny_model: Path,  # noqa: F811
) -> None:
    base: Path = stack["base"]
    recipe = tiny_recipe(base / "bleu.yaml", tiny_model, [{"kind": "bleu", "name": "bleu"}])
    out, work = base / "out-fail", base / "work-fail"
    params: dict[str, Any] = {"recipe": str(recipe), "output": str(out), "work": str(work), "batch_shards": 2}
    # Each model-stage process is killed right after finishing its first shard, as a lost GPU host would be.
    kill = {"env": {faults.ENV: "sampling:done#1"}}
    run_id = trigger(stack, {**params, "model_job_variables": kill})
    run = wait_final(stack, run_id)
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"] + run_logs(stack, run_id)
    assert "model-stage/model-stage" in message and re.search(r"batch [12]/2 \(shards", message), message
    assert "rerun the same command" in message
    survived = markers(work, "sampling")
    assert len(survived) == 2, "each killed batch finished exactly one shard before dying"
    assert writer.read_manifest(str(out)) is None

    rerun = wait_final(stack, trigger(stack, params))
    assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
    after = markers(work, "sampling")
    assert len(after) == 4 and all(after[p] == survived[p] for p in survived), "finished shards are reused"
    writer.verify(str(out))
