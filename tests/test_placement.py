"""Stage placement in process: CPU stages on a Dask LocalCluster give the same dataset; bad placements fail early."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import build_prefs as bp
from flows.placement import check_placement, deployment_name
from steps import sampling, writer
from tests.conftest import FakeEngine
from tests.test_resume import markers, rows, write_recipe


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch, prefect_home: Path) -> FakeEngine:
    fake = FakeEngine()
    monkeypatch.setattr(sampling, "load_engine", lambda policy: fake)
    return fake


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
    assert bp.main(argv) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL" in err and "prefect server start" in err
    assert bp.main([*argv[:4], "--batch-shards", "0"]) == 2
    assert "--batch-shards must be at least 1" in capsys.readouterr().err


def test_work_location_is_made_absolute_for_pool_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.chdir(tmp_path)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert check_placement("model-stage", 8, None, "out/.work") == str(tmp_path / "out" / ".work")
        assert check_placement("model-stage", 8, None, "s3://b/work") == "s3://b/work"
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
