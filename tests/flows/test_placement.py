"""Stage placement in process: CPU stages on a Dask LocalCluster give the same dataset; bad placements fail early."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from flows import build_prefs as bp
from flows import cli
from flows.placement import (
    MODEL_FLOW,
    ModelPoolError,
    Placement,
    PlacementError,
    Stall,
    _await_runs,
    check_placement,
    deployment_name,
    gpu_work_in_flow,
    run_model_batches,
)
from schemas.recipe import Recipe, RecipeError
from steps import sampling
from steps.base import ShardResult, StageStats
from steps.publish import writer
from tests.conftest import FakeEngine
from tests.steps.run.test_resume import markers, rows, write_recipe


def test_cpu_stages_on_a_dask_local_cluster_give_the_same_dataset(tmp_path: Path, engine: FakeEngine) -> None:
    recipe = write_recipe(tmp_path)
    bp.build_prefs(recipe=recipe, output=str(tmp_path / "plain"))
    # Sampling stays in this process (the fake engine); BLEU labeling and pairing run in Dask worker processes.
    bp.build_prefs(recipe=recipe, output=str(tmp_path / "dask"), dask="local")
    assert rows(tmp_path / "dask") == rows(tmp_path / "plain")
    writer.verify(str(tmp_path / "dask"))
    done = markers(tmp_path / "dask" / ".work")
    assert (
        sum(1 for p in done if p.startswith("pairing/")) == 3
        and sum(1 for p in done if p.startswith("labels/")) == 3
    )
    # A rerun on Dask finds every shard finished, wherever it was computed.
    calls = engine.calls
    bp.build_prefs(recipe=recipe, output=str(tmp_path / "dask"), dask="local")
    assert engine.calls == calls and markers(tmp_path / "dask" / ".work") == done


def test_model_deployment_without_a_server_fails_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_model(policy: object) -> None:
        raise AssertionError("a model was loaded before the placement was checked")

    monkeypatch.setattr(sampling, "load_engine", no_model)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    argv = [
        "--recipe",
        write_recipe(tmp_path),
        "--output",
        str(tmp_path / "out"),
        "--model-deployment",
        "gpu",
    ]
    assert cli.build_prefs_main(argv) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL" in err and "prefect server start" in err
    assert cli.build_prefs_main([*argv[:4], "--batch-shards", "0"]) == 2
    assert "--batch-shards must be at least 1" in capsys.readouterr().err


def test_work_location_is_made_absolute_for_pool_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.chdir(tmp_path)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert check_placement(Placement("model-stage", 8), "out/.work") == str(tmp_path / "out" / ".work")
        assert check_placement(Placement("model-stage", 8), "s3://b/work") == "s3://b/work"
    assert deployment_name("gpu") == "model-stage/gpu" and deployment_name("a/b") == "a/b"


def test_run_wide_aggregation_on_dask_waits_for_every_label_and_matches_in_process(
    tmp_path: Path, engine: FakeEngine
) -> None:
    """spread and residual need all labels first: on Dask too, then the pairs equal the in-process ones."""
    pairing = {"rule": "best_vs_worst", "scale": "spread", "length_control": {"residual": True}}
    recipe = write_recipe(tmp_path, pairing=pairing)
    bp.build_prefs(recipe=recipe, output=str(tmp_path / "plain"))
    bp.build_prefs(recipe=recipe, output=str(tmp_path / "dask"), dask="local")
    assert rows(tmp_path / "dask") == rows(tmp_path / "plain")


@pytest.fixture
def idle_deployment(prefect_home: Path) -> tuple[str, Any]:
    """A ``model-stage`` deployment on a work pool of its own that no worker polls (yet)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    pool = f"idle-{uuid.uuid4().hex[:8]}"

    async def create() -> Any:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            flow_id = await client.create_flow_from_name(MODEL_FLOW)
            return await client.create_deployment(flow_id, pool, work_pool_name=pool)

    return pool, asyncio.run(create())


def unread_shards(tmp_path: Path, why: str) -> list[ShardResult]:
    """Three prompt shards no worker will read (``why`` says why), in batches of two: 1-2 and 3."""
    shard = tmp_path / "prompts.parquet"
    shard.write_bytes(f"not read: {why}".encode())
    return [ShardResult(str(shard), 1, StageStats("prompts"), "0" * 64) for _ in range(3)]


def failed_batches(pool: str, tmp_path: Path, prompts: list[ShardResult], start_timeout: float) -> str:
    """Sampling's batches submitted to ``pool``'s deployment from a flow; the error they fail it with."""
    from prefect import flow

    @flow
    def pipeline() -> None:
        config = Recipe.model_validate({"name": "batches"})
        placement = Placement(f"{MODEL_FLOW}/{pool}", 2, None, start_timeout)
        run_model_batches(placement, config, str(tmp_path), "sampling", prompts, False)

    with pytest.raises(ModelPoolError) as failed:
        pipeline()
    return str(failed.value)


def test_batches_no_worker_starts_are_cancelled_and_the_run_fails_naming_the_pool(
    tmp_path: Path, idle_deployment: tuple[str, Any]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import StateType

    pool, deployment_id = idle_deployment
    message = failed_batches(pool, tmp_path, unread_shards(tmp_path, "no worker ever starts the batch"), 1.5)
    assert "2 of 2 batch(es) did not start within 1.5 s and were cancelled" in message, message
    assert (
        f"no worker is polling work pool {pool!r}" in message
        and f"prefect worker start --pool {pool}" in message
    )
    assert "batch 1/2 (shards 1-2)" in message and "batch 2/2 (shards 3-3)" in message
    assert "rerun the same command" in message

    async def states() -> list[StateType]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            return [run.state.type for run in runs if run.state is not None]

    assert asyncio.run(states()) == [StateType.CANCELLED] * 2, "no run may stay queued for a later worker"


def test_a_batch_deleted_from_the_server_fails_the_run_instead_of_hanging_it(
    tmp_path: Path, idle_deployment: tuple[str, Any]
) -> None:
    """A deleted run never reaches a final state; a wait that only looked for one would never end."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    pool, deployment_id = idle_deployment
    prompts = unread_shards(tmp_path, "the batches are deleted before any worker could start them")
    deleted: list[Any] = []
    trouble: list[BaseException] = []

    def delete_both() -> None:
        try:
            with get_client(sync_client=True) as client:
                for _ in range(300):
                    runs = client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
                    )
                    if len(runs) == 2:
                        for run in runs:
                            client.delete_flow_run(run.id)
                            deleted.append(run.id)
                        return
                    time.sleep(0.1)
        except BaseException as exc:  # reported below, not lost in the thread
            trouble.append(exc)

    deleter = threading.Thread(target=delete_both)
    deleter.start()
    # Long enough that the deletion (within 30 s) comes first, short enough that a regression ends
    # in the start-timeout failure instead of a hang.
    message = failed_batches(pool, tmp_path, prompts, 60)
    deleter.join()
    assert not trouble and len(deleted) == 2, (trouble, deleted, message)
    assert "2 of 2 batch(es) failed" in message, message
    assert "batch 1/2 (shards 1-2)" in message and "batch 2/2 (shards 3-3)" in message
    assert "is gone from the Prefect server" in message and all(str(i) in message for i in deleted)
    assert "rerun the same command" in message


def test_a_batch_queued_behind_a_running_one_waits_and_a_stuck_pending_one_is_cancelled(
    idle_deployment: tuple[str, Any],
) -> None:
    """The start clock runs only while no batch of the stage runs: a busy pool is not a stalled one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Completed, Pending, Running

    pool, deployment_id = idle_deployment
    ended: list[tuple[int, StateType]] = []

    async def scenario() -> tuple[Stall | None, list[StateType]]:
        async with get_client() as client:
            ids = [(await client.create_flow_run_from_deployment(deployment_id)).id for _ in range(2)]
            # A worker of the pool is online and took both: batch 1 runs, batch 2 stays Pending.
            await client.send_worker_heartbeat(pool, "gpu-host-1")
            for run_id in ids:
                await client.set_flow_run_state(run_id, Pending(), force=True)
            await client.set_flow_run_state(ids[0], Running(), force=True)
            waiting = asyncio.create_task(
                _await_runs(
                    ids,
                    lambda i, run: ended.append((i, run.state.type)),
                    "sampling",
                    logging.getLogger(),
                    0.5,
                    lambda i, run_id: ended.append((i, StateType.CRASHED)),
                )
            )
            await asyncio.sleep(2.5)  # five timeouts while batch 1 runs: batch 2 is queued, not stalled
            assert not waiting.done()
            await client.set_flow_run_state(ids[0], Completed(), force=True)
            stall = await asyncio.wait_for(waiting, 30)
            return stall, [(await client.read_flow_run(run_id)).state.type for run_id in ids]

    stall, states = asyncio.run(scenario())
    assert ended == [(1, StateType.COMPLETED)]
    assert stall is not None and [(i, state) for i, _, state in stall.runs] == [(2, "Pending")]
    assert (
        f"a worker of work pool {pool!r} took them but they never started running (Pending)" in stall.reason
    )
    # A Pending run may have a process or container starting: its worker is asked to stop it.
    assert states == [StateType.COMPLETED, StateType.CANCELLING]


def test_each_reason_a_pool_gives_for_not_starting_batches_is_told_apart(prefect_home: Path) -> None:
    """Paused, missing, no pool at all, and online workers that took nothing: each its own advice."""
    from types import SimpleNamespace

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Scheduled

    from flows.placement import _why_not_started

    paused, busy = f"paused-{uuid.uuid4().hex[:8]}", f"busy-{uuid.uuid4().hex[:8]}"

    def waiting(pool: str | None) -> list[Any]:
        return [SimpleNamespace(work_pool_name=pool, state=Scheduled())]

    async def reasons() -> list[str]:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=paused, type="process", is_paused=True))
            await client.create_work_pool(WorkPoolCreate(name=busy, type="process"))
            await client.send_worker_heartbeat(busy, "gpu-host-1")
            return [
                await _why_not_started(client, waiting(pool)) for pool in (paused, "never-made", None, busy)
            ]

    said = asyncio.run(reasons())
    assert said[0] == f"work pool {paused!r} is paused (prefect work-pool resume {paused})"
    assert said[1].startswith("work pool 'never-made' does not exist (prefect work-pool create never-made")
    assert said[2].startswith("the deployment has no work pool")
    assert said[3].startswith(f"work pool {busy!r} has online workers but none took them")


def test_a_start_timeout_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(
        PlacementError, match="--model-start-timeout must be a positive number of seconds, got 0"
    ):
        check_placement(Placement(None, 8, start_timeout=0), str(tmp_path))


@pytest.mark.parametrize("model", [{"engine": "vllm"}, {"engine": "transformers", "device": "cuda"}])
def test_gpu_work_in_the_flows_own_process_is_refused_with_a_model_pool(model: dict[str, str]) -> None:
    """The pair judge runs in the flow's process (a CPU pool's), not on the model pool: say so up front."""
    judge = {"model": {"model": "org/judge-8B", **model}}
    recipe = Recipe.model_validate({"name": "t", "pairing": {"judge": judge}})
    with pytest.raises(PlacementError, match=r"pairing\.judge \(org/judge-8B.*judge_pairwise"):
        check_placement(Placement("model-stage", 8), "s3://b/work", recipe=recipe)
    check_placement(Placement(None, 8), "/tmp/work", recipe=recipe)  # in one process it runs where the GPU is
    # The eval block measures the labelers in the flow too: refused when one of them needs a GPU.
    labeler = {"kind": "judge_pointwise", "model": {"model": "org/judge-8B", **model}}
    measured = {"name": "t", "labelers": [labeler], "eval": {"pairs": [{"builtin": "hh_harmless_32"}]}}
    with pytest.raises(PlacementError, match=r"eval \(it measures labelers\.0\.model\.model \(judge\)"):
        check_placement(Placement("model-stage", 8), "s3://b/work", recipe=Recipe.model_validate(measured))
    assert gpu_work_in_flow(Recipe.model_validate({**measured, "eval": None})) == []


def test_bad_run_options_stop_the_cli_and_the_flow_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model-start-timeout 0`` from the CLI, ``gc_keep_runs: 0`` as a flow parameter."""

    def no_model(policy: object) -> None:
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(sampling, "load_engine", no_model)
    recipe = write_recipe(tmp_path)
    out = tmp_path / "out"
    assert cli.build_prefs_main(["--recipe", recipe, "--output", str(out), "--model-start-timeout", "0"]) == 2
    assert "--model-start-timeout must be a positive number of seconds, got 0" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="gc_keep_runs must be at least 1"):
        bp.build_prefs(recipe=recipe, output=str(out), gc_keep_runs=0)
    assert (
        cli.build_prefs_main(["--recipe", recipe, "--output", str(out), "--keep-runs", "2"]) == 2
    )  # no --gc
    assert "--keep-runs go with --gc" in capsys.readouterr().err
    assert cli.build_prefs_main(["--gc", "--work", str(tmp_path / "w"), "--keep-runs", "0"]) == 2
    assert "--keep-runs must be at least 1 (got 0)" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


def test_a_model_pool_cannot_use_the_clis_temporary_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the CLI started its temporary server in this process, PREFECT_API_URL names it: workers
    elsewhere cannot poll it, so it must not pass for the server a model deployment needs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows import temp_server

    own = temp_server.TemporaryServer(process=None, port=65000)  # type: ignore[arg-type]
    monkeypatch.setattr(temp_server, "_server", own)
    with (
        temporary_settings({PREFECT_API_URL: own.api_url}),
        pytest.raises(PlacementError, match="PREFECT_API_URL"),
    ):
        check_placement(Placement("model-stage", 8), "s3://b/work")
    with temporary_settings({PREFECT_API_URL: "http://10.0.0.5:4200/api"}):
        assert check_placement(Placement("model-stage", 8), "s3://b/work") == "s3://b/work"
