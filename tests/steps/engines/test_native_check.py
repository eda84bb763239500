"""The llama.cpp guard: a build that crashes on this CPU ends the run with exit 2 and a message.

The broken library is a stand-in package named ``llama_cpp`` put first on PYTHONPATH whose decode
kills its own process with SIGSEGV, exactly what the native build did on AVX-512/AMX Xeons; so the
test does not depend on the machine it runs on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steps.engines import llama_build, native_check
from steps.engines.models import smollm2_gguf

ROOT = Path(__file__).resolve().parents[3]

_STAND_IN = """
import os
import signal

SYSTEM_INFO = b"CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | "


def llama_print_system_info():
    return SYSTEM_INFO


class Llama:
    def __init__(self, model_path, **kwargs):
        self.model_path = model_path

    def tokenize(self, text, add_bos=True):
        return [1, 2, 3]

    def eval(self, tokens):
        {eval_body}
"""


def stand_in(tmp_path: Path, eval_body: str, name: str = "broken") -> Path:
    """A ``llama_cpp`` package whose decode does ``eval_body``; returns the folder to put on PYTHONPATH."""
    root = tmp_path / name
    package = root / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(_STAND_IN).replace("{eval_body}", eval_body))
    (package / "lib" / "libllama.so").write_bytes(name.encode() * 64)
    return root


SEGFAULT = "os.kill(os.getpid(), signal.SIGSEGV)"


def child_env(tmp_path: Path, stand_in_root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(stand_in_root), str(ROOT)])
    env["PREFSMITH_CACHE"] = str(tmp_path / "cache")
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def use(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    """Make ``root``'s stand-in the llama_cpp that this process finds and its child imports."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(ROOT)]))
    monkeypatch.syspath_prepend(str(root))
    return root


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PREFSMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native_check, "_CHECKED", {})
    return tmp_path / "cache" / "native-checks"


@pytest.mark.integration
def test_cli_stops_with_exit_2_and_the_message_before_prefect_and_output(tmp_path: Path) -> None:
    broken = stand_in(tmp_path, SEGFAULT)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.build_prefs", "--output", str(out), "--limit", "2"],
        cwd=ROOT, env=child_env(tmp_path, broken), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert err.startswith("error: llama.cpp crashed with SIGSEGV while decoding one token"), err
    assert "Traceback" not in err
    assert str(broken / "llama_cpp" / "lib" / "libllama.so") in err  # which library
    assert "AVX512 = 1 | AMX_INT8 = 1" in err  # what the build was compiled for, as it reports it
    assert "compile flags unknown" in err  # not the build `make` recorded: its flags are not claimed
    assert llama_build.reinstall_command(sys.executable) in err  # the exact command that fixes it
    assert not out.exists()  # nothing written to the output (not even the writability probe's folder)
    # Prefect never started: importing it makes its home folder, a server or a run would fill it.
    assert not any((tmp_path / "prefect-home").rglob("*"))
    assert "prefect" not in proc.stdout.lower()
    assert not (tmp_path / "cache" / "native-checks").exists()  # a failure is never cached


@pytest.mark.integration
def test_eval_labelers_stops_the_same_way(tmp_path: Path) -> None:
    broken = stand_in(tmp_path, SEGFAULT)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "a", "prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}) + "\n")
    # The default recipe's labelers read through transformers (no check); this judge reads through llama.cpp.
    recipe = tmp_path / "judge.yaml"
    recipe.write_text(
        "name: judge-llama\nlabelers:\n  - kind: judge_pointwise\n    name: judge\n"
        "    model: {model: smollm2-135m-instruct, engine: llama_cpp}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.eval_labelers", "--pairs", str(pairs), "--recipe", str(recipe),
         "--json", str(tmp_path / "r.json")],
        cwd=ROOT, env=child_env(tmp_path, broken), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "llama.cpp crashed with SIGSEGV" in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_passing_build_is_checked_once_per_library_checksum(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = use(monkeypatch, stand_in(tmp_path, "return None", name="good"))
    first = native_check.check_llama_cpp("model.gguf")
    assert not first.cached
    assert "AVX2 = 1" in first.system_info
    assert len(list(isolated_cache.glob("llama_cpp-*.json"))) == 1

    # A new process (no in-memory result) finds the marker and starts no child.
    monkeypatch.setattr(native_check, "_CHECKED", {})

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("the check ran again for an unchanged build")

    monkeypatch.setattr(native_check.subprocess, "run", no_child)
    assert native_check.check_llama_cpp("model.gguf").cached

    # A different build (the library changed: a reinstall) is checked again.
    (good / "llama_cpp" / "lib" / "libllama.so").write_bytes(b"rebuilt")
    monkeypatch.setattr(native_check, "_CHECKED", {})
    with pytest.raises(AssertionError, match="ran again"):
        native_check.check_llama_cpp("model.gguf")


def test_a_build_that_fails_without_a_signal_names_the_error(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, stand_in(tmp_path, "raise RuntimeError('llama_decode returned -1')", name="failing"))
    with pytest.raises(native_check.EngineCrashError, match=r"failed \(exit 1\)") as caught:
        native_check.check_llama_cpp("model.gguf")
    assert "llama_decode returned -1" in str(caught.value)
    assert not isolated_cache.exists()


def test_no_llama_cpp_model_means_no_check(isolated_cache: Path) -> None:
    from tests.conftest import make_recipe

    recipe = make_recipe(
        policy={"model": "smollm2-135m-instruct", "engine": "transformers"}, labelers=[{"kind": "bleu"}]
    )
    assert native_check.check_models([recipe.policy]) is None
    assert not isolated_cache.exists()


@pytest.mark.model
def test_the_installed_build_decodes_here(isolated_cache: Path) -> None:
    """The real library and the real default GGUF: what every `make demo` checks first."""
    result = native_check.check_llama_cpp(str(smollm2_gguf()))
    assert not result.cached
    assert "AVX" in result.system_info or "NEON" in result.system_info
    line = result.describe()
    assert "decodes on this CPU (checked now)" in line and "CPU :" not in line and " AVX" in line


def test_portable_flags_never_ask_for_native_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(llama_build.NATIVE_ENV, raising=False)
    args = llama_build.cmake_args()
    assert "-DGGML_NATIVE=OFF" in args
    assert not any(a.endswith("=ON") and ("AVX512" in a or "AMX" in a) for a in args)
    assert "-DGGML_NATIVE=OFF" in llama_build.reinstall_command()
    monkeypatch.setenv(llama_build.NATIVE_ENV, "1")
    assert llama_build.cmake_args() == ("-DGGML_NATIVE=ON",)
    # A native wheel is filed under this CPU, a portable one is not: another CPU never reuses it.
    assert llama_build.build_id(llama_build.NATIVE) != llama_build.build_id(llama_build.X86_64_PORTABLE)
    assert "-native-" in llama_build.build_id(llama_build.NATIVE)


def test_a_cpu_without_avx2_is_told_to_build_for_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_check, "_has_avx2", lambda: False)
    monkeypatch.setattr(llama_build.platform, "machine", lambda: "x86_64")
    remedy = native_check._remedy()
    assert "no AVX2" in remedy and "PREFSMITH_LLAMA_NATIVE=1 make install" in remedy
    assert "-DGGML_NATIVE=ON" in remedy
    monkeypatch.setattr(native_check, "_has_avx2", lambda: True)
    assert llama_build.reinstall_command() in native_check._remedy()


def test_the_install_record_describes_only_the_library_it_was_written_for(tmp_path: Path) -> None:
    package = tmp_path / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    (package / "lib" / "libllama.so").write_bytes(b"portable build")
    checksum = llama_build.library_checksum(package)
    record = {"cmake_args": list(llama_build.X86_64_PORTABLE), "native": False, "library_checksum": checksum}
    (tmp_path / llama_build.BUILD_RECORD).write_text(json.dumps(record))
    assert llama_build.read_record(checksum, prefix=str(tmp_path)) == record
    (package / "lib" / "libllama.so").write_bytes(b"pip install llama-cpp-python over it")
    assert llama_build.read_record(llama_build.library_checksum(package), prefix=str(tmp_path)) is None


def test_make_installs_llama_cpp_through_the_portable_build_script() -> None:
    """`make` never lets pip build llama.cpp on its own (native, from pip's cache): the script comes first."""
    makefile = (ROOT / "Makefile").read_text()
    assert "steps/engines/llama_build.py install --python $(VPY)" in makefile
    assert "$(STAMP): pyproject.toml Makefile $(LLAMA_STAMP)" in makefile  # before `pip install -e .`
    assert "-DGGML_NATIVE=OFF" in makefile  # the flags are named where a reader looks first
