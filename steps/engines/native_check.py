"""Decode one token in a child process before the run loads llama.cpp in its own.

A llama.cpp build compiled for the wrong CPU (or a broken native build, as on AVX-512/AMX Xeons)
does not fail with an exception: the process dies by SIGSEGV or SIGILL inside the first decode,
and the user sees ``exit 139`` with nothing that says why. So before any model loads, the run
loads the recipe's GGUF in a throwaway child and decodes; if the child dies by a signal, the run
stops with exit 2 and a message saying what crashed, what the build was compiled for, and the
command that installs a portable build.

The check runs once per installed build: a passing result is cached under the checksum of the
library files, so every later run pays one hash of ~10 MB. Failures are not cached (the fix is a
reinstall, which changes the checksum anyway).

There is no such guard for the transformers engine: PyTorch ships portable wheels that pick their
CPU kernels at run time, and the vLLM engine runs on CUDA wheels built the same way.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import UsageError
from schemas.recipe import ModelConfig
from steps.engines import llama_build

CHECK_TIMEOUT_S = 300.0
_OK = "PREFSMITH_DECODE_OK"
_INFO = "PREFSMITH_SYSTEM_INFO "

# Run with ``python -c`` (never as a file in steps/engines/, whose llama_cpp.py would shadow the
# package). Two decodes: a prompt batch, then one token, the two paths sampling takes.
_CHILD = f"""
import sys
import llama_cpp
info = llama_cpp.llama_print_system_info()
print({_INFO!r} + (info.decode(errors="replace") if isinstance(info, bytes) else str(info)), flush=True)
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), verbose=False)
tokens = llm.tokenize(b"Hello, how are you?", add_bos=True)
llm.eval(tokens)
llm.eval(tokens[-1:])
print({_OK!r}, flush=True)
"""


class EngineCrashError(UsageError):
    """The installed llama.cpp cannot decode on this machine; raised before any model loads.

    A usage error (exit 2): nothing ran, and the fix is the install (the message gives the command).
    """


@dataclass(frozen=True)
class CheckResult:
    """What the check found, for the one line the run prints about the build it uses."""

    library: str
    system_info: str
    cached: bool
    checksum: str = ""

    def describe(self) -> str:
        """One line: which build (portable or native, by the install record) and what it uses."""
        record = llama_build.read_record(self.checksum)
        if record is None:
            kind = "a build not made by `make`"
        else:
            kind = "native" if record["native"] else "portable"
        parts = [part.strip() for part in self.system_info.split("|")]
        # "CPU : SSE3 = 1 | AVX = 1 | …": the backend's name leads the first entry.
        features = [part.split("=")[0].split(":")[-1].strip() for part in parts if part.endswith("= 1")]
        how = "checked earlier for this build" if self.cached else "checked now"
        return f"llama.cpp: {kind} build using {' '.join(features) or 'no SIMD'}; decodes on this CPU ({how})"


_CHECKED: dict[str, CheckResult] = {}


def library_files() -> tuple[Path, list[Path]]:
    """The llama_cpp package a new interpreter would import (found without importing it), and its libraries.

    The path finder, not ``importlib.util.find_spec``: the latter answers from ``sys.modules`` when
    this process already imported a (possibly different) llama_cpp.
    """
    spec = importlib.machinery.PathFinder.find_spec("llama_cpp", sys.path)
    if spec is None or not spec.submodule_search_locations:
        raise EngineCrashError(
            "llama-cpp-python is not installed but the recipe uses engine llama_cpp; install it with:\n  "
            + llama_build.reinstall_command()
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    return package, llama_build.package_libraries(package)


def _build_flags(checksum: str) -> str:
    record = llama_build.read_record(checksum)
    if record is None:
        return "built outside `make` (compile flags unknown)"
    return f"built with CMAKE_ARGS={' '.join(map(str, record.get('cmake_args', [])))}"


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def check_llama_cpp(model_path: str, n_threads: int = 2) -> CheckResult:
    """Raise ``EngineCrashError`` unless a child process decodes with ``model_path``; cached per build."""
    package, libs = library_files()
    checksum = llama_build.library_checksum(package)
    if checksum in _CHECKED:  # a second call in one process (the flow re-runs prepare) says the same
        return _CHECKED[checksum]
    marker = llama_build.cache_root() / "native-checks" / f"llama_cpp-{checksum[:32]}.json"
    try:
        cached = json.loads(marker.read_text())
        _CHECKED[checksum] = CheckResult(cached["library"], cached["system_info"], True, checksum)
        return _CHECKED[checksum]
    except (OSError, ValueError, KeyError):
        pass
    started = time.monotonic()
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, model_path, str(n_threads)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise EngineCrashError(
            f"llama.cpp did not decode one token with {model_path} in {CHECK_TIMEOUT_S:.0f} s "
            f"(library {package}); the build may be broken on this CPU ({_cpu_name()}). "
            f"Reinstall a portable build:\n  {llama_build.reinstall_command()}"
        ) from None
    info = next((ln[len(_INFO) :] for ln in child.stdout.splitlines() if ln.startswith(_INFO)), "")
    library = str(libs[0] if libs else package)
    if child.returncode == 0 and _OK in child.stdout:
        marker.parent.mkdir(parents=True, exist_ok=True)
        record = {"library": library, "system_info": info.strip(), "checksum": checksum,
                  "seconds": round(time.monotonic() - started, 2)}  # fmt: skip
        tmp = marker.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(marker)
        _CHECKED[checksum] = CheckResult(library, info.strip(), False, checksum)
        return _CHECKED[checksum]
    features = f"the library reports: {info.strip()}" if info else "it died before reporting its features"
    if child.returncode < 0:
        what = f"crashed with {_signal_name(child.returncode)}"
        cause = "the build uses instructions this CPU does not run correctly"
    else:
        tail = "\n    ".join(child.stderr.strip().splitlines()[-5:])
        what = f"failed (exit {child.returncode}):\n    {tail}"
        cause = "the installed build does not work here"
    raise EngineCrashError(
        f"llama.cpp {what} while decoding one token with {model_path} in a test process, before this "
        f"run loaded any model.\n  {cause}.\n  library: {library}\n  {_build_flags(checksum)}; {features}\n"
        f"  this CPU: {_cpu_name()}\n{_remedy()}"
    )


def _remedy() -> str:
    """The portable build needs AVX2 on x86-64; a CPU without it gets a build for itself instead."""
    if llama_build.cmake_args(native=False) == llama_build.X86_64_PORTABLE and not _has_avx2():
        return (
            "This CPU has no AVX2, which the portable x86-64 build needs. Build llama.cpp for this CPU:\n"
            f"  {llama_build.NATIVE_ENV}=1 make install   (or: {llama_build.reinstall_command(native=True)})"
        )
    return (
        "Reinstall a portable build of llama-cpp-python (AVX2 on x86-64, baseline on arm64):\n"
        f"  {llama_build.reinstall_command()}"
    )


def _has_avx2() -> bool:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return True  # unknown: assume the common case and suggest the portable build
    return "avx2" in flags.split()


def check_models(models: list[ModelConfig]) -> CheckResult | None:
    """Run the check for the first local GGUF any llama_cpp model of the recipe uses (None: no llama_cpp).

    A recipe whose llama_cpp models all come from a hub is checked with the default GGUF when it is
    installed: the crash is the build's, not the model's, and downloading one to find out costs more.
    """
    from steps.engines.models import ModelSpecError, resolve_model, smollm2_gguf

    llama = [m for m in models if m.engine == "llama_cpp"]
    if not llama:
        return None
    for model in llama:
        resolved = resolve_model(model.model, model.engine)
        if resolved.kind == "gguf":
            return check_llama_cpp(resolved.location, n_threads=model.n_threads or 2)
    try:
        fallback = smollm2_gguf()
    except ModelSpecError:
        return None
    return check_llama_cpp(str(fallback), n_threads=2)
