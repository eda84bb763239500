"""``bench.gpu`` off the GPU: the whole check at tiny sizes on CPU, so that the one run on a GPU
machine (scarce, timed) cannot fail on a bug any CPU would have shown.

The numbers of a smoke run mean nothing; what is checked is that every part runs, writes its
rows, and that the correctness comparison would fail on a wrong engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import gpu, gpu_correctness
from bench.common import format_table


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matrices on a busy 2-core machine: two threads spin at every barrier (see bench.gpu)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_smoke_runs_every_part(tmp_path: Path) -> None:
    assert gpu.main(["--cpu-smoke", "--out", str(tmp_path)]) == gpu.EXIT_OK
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert payload["complete"] and payload["cpu_smoke"] and not payload["skipped"]
    assert payload["environment"]["torch"] and payload["environment"]["transformers"]
    format_table(payload["rows"])
    scoring = [row for row in payload["rows"] if row["metric"].startswith("score tok/s")]
    generating = [row for row in payload["rows"] if row["metric"].startswith("generate tok/s")]
    assert len(scoring) == 2 * len(gpu.SMOKE.row_tokens) and len(generating) == 2  # two shapes
    for row in payload["rows"]:
        assert row["ours"] > 0 and row["baseline"] > 0 and row["ratio"] > 0
    for key in ("1b", "8b"):
        detail = payload["details"][key]
        assert detail["attention"]
        for engine in detail["scoring"]["engines"].values():
            # shared prompts and criteria run once; the raw forward runs every full sequence
            assert 0 < engine["tokens_through_network"] < detail["scoring"]["tokens"]
            assert engine["max_abs_diff_logp"] < gpu_correctness.TOL_BF16
        tokens = detail["generation"]["tokens"]
        assert tokens["engine"][0] > 0 and tokens["batched"][0] > 0
    checks = payload["correctness"]
    assert all(check["passed"] for check in checks)
    controls = [check for check in checks if check["control"]]
    assert len(controls) == 2
    assert all(check["max_abs_diff"] > 3 * check["tolerance"] for check in controls)


def test_correctness_fails_on_a_wrong_engine(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """Rows positioned from zero, forgetting the cached tokens before them: the check must catch it.

    (A constant shift would not do: rotary attention sees only distances between positions.)
    """
    forward = gpu_correctness.TransformersEngine._forward

    def from_zero(self: Any, ids: Any, positions: Any, *rest: Any) -> Any:
        return forward(self, ids, positions - positions[:, :1], *rest)

    monkeypatch.setattr(gpu_correctness.TransformersEngine, "_forward", from_zero)
    checks, _ = gpu_correctness.correctness(gpu.SMOKE, "cpu", gpu.Clock(60))
    failed = {check.name for check in checks if not check.passed}
    assert "reference, CPU fp32: engine.score vs plain forward" in failed
    assert "cpu fp32: engine.score vs plain forward" in failed


def test_without_cuda_it_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == gpu.EXIT_NO_CUDA
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_part_that_raises_leaves_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One GPU run must report all it can: an error in generation (say, out of memory) keeps the
    scoring rows, still runs the next shape, and exits with its own code."""

    def out_of_memory(*args: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu, "generation", out_of_memory)
    assert gpu.main(["--cpu-smoke", "--out", str(tmp_path)]) == gpu.EXIT_ERROR
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert [error["part"] for error in payload["errors"]] == [s.name for s in gpu.SMOKE_SHAPES.values()]
    assert len(payload["rows"]) == 2 * len(gpu.SMOKE.row_tokens)  # both shapes' scoring rows
    assert "ERROR in" in capsys.readouterr().out


def test_rates_smoke_measures_every_part(tmp_path: Path, one_thread: None) -> None:
    """The recipe-cost rates (bench.gpu_rates) at toy sizes: both shapes, prefill and decode."""
    from bench import gpu_rates

    assert gpu_rates.main(["--cpu-smoke", "--out", str(tmp_path)]) == gpu_rates.EXIT_OK
    payload = json.loads((tmp_path / "gpu_rates.json").read_text())
    assert not payload["errors"] and not payload["skipped"]
    for key in ("8b", "32b"):
        detail = payload["shapes"][key]
        assert detail["decode"]["batch"] == gpu_rates.SMOKE.decode_batch[key]
        assert detail["decode"]["tokens_per_second"] > 0 and detail["prefill"]["tokens_per_second"] > 0
    assert len(payload["rows"]) == 4
