"""How llama-cpp-python is built and installed: portable by default, never quietly native.

`pip install llama-cpp-python` compiles llama.cpp with ``GGML_NATIVE=ON`` (``-march=native``).
Such a build can crash on the very machine that built it (seen: every decode segfaults on an
Intel Xeon with AVX-512/AMX) and on any other CPU it is copied to, and pip's wheel cache keys a
built wheel by the sdist alone, so a native wheel built once is silently reused by every later
install. So the Makefile installs through this script, which:

* builds with explicit instruction sets (x86-64: AVX2/FMA/F16C/BMI2, the x86-64-v3 level every
  Intel CPU since Haswell and AMD CPU since Zen 1 has; arm64: the baseline), unless
  ``PREFSMITH_LLAMA_NATIVE=1`` asks for a native build;
* builds with ``--no-cache-dir`` into a wheel folder of ours named after the version, platform and
  a hash of the flags (and, for native builds, of this CPU's model and flags), so a later install
  reuses exactly the build it asks for and nothing else;
* records the flags next to the interpreter (``<prefix>/prefsmith-llama-build.json``), where the
  runtime guard (``steps.engines.native_check``) reads them for its message.

It imports only the standard library: the Makefile runs it before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
LIB_SUFFIXES = (".so", ".dylib", ".dll")
NATIVE_ENV = "PREFSMITH_LLAMA_NATIVE"
BUILD_RECORD = "prefsmith-llama-build.json"

# Every instruction set named explicitly: with GGML_NATIVE=OFF, ggml's defaults for these depend
# on how CMake was invoked (cross builds turn them all off), so nothing is left to a default.
X86_64_PORTABLE = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_SSE42=ON",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_BMI2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_AVX_VNNI=OFF",
    "-DGGML_AVX512=OFF",
    "-DGGML_AVX512_VBMI=OFF",
    "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
)
# arm64 without GGML_CPU_ARM_ARCH compiles for the compiler's baseline (armv8-a with NEON).
OTHER_PORTABLE = ("-DGGML_NATIVE=OFF",)
NATIVE = ("-DGGML_NATIVE=ON",)


def wants_native() -> bool:
    return os.environ.get(NATIVE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def cmake_args(native: bool | None = None) -> tuple[str, ...]:
    if native if native is not None else wants_native():
        return NATIVE
    return X86_64_PORTABLE if platform.machine().lower() in {"x86_64", "amd64"} else OTHER_PORTABLE


def cpu_fingerprint() -> str:
    """This CPU's model and flags: a native build is only reusable on a CPU that prints the same."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in {"model name", "flags", "Features", "CPU part"}]
    return "\n".join(sorted(set(keep)))


def build_id(args: tuple[str, ...]) -> str:
    digest = hashlib.sha256(" ".join(args).encode())
    if args == NATIVE:
        digest.update(cpu_fingerprint().encode())
    kind = "native" if args == NATIVE else "portable"
    return f"llama-cpp-python-{LLAMA_CPP_VERSION}-{platform.machine()}-{kind}-{digest.hexdigest()[:12]}"


def cache_root() -> Path:
    """Where prefsmith keeps what it builds or converts once (``PREFSMITH_CACHE`` moves it)."""
    return Path(os.environ.get("PREFSMITH_CACHE") or Path.home() / ".cache" / "prefsmith")


def wheel_root() -> Path:
    return cache_root() / "wheels"


def reinstall_command(python: str | None = None, native: bool = False) -> str:
    """The one command that replaces whatever llama-cpp-python is installed with a portable build."""
    py = python or sys.executable
    args = " ".join(cmake_args(native=native))
    return (
        f"CMAKE_ARGS={shlex.quote(args)} {shlex.quote(py)} -m pip install --force-reinstall --no-deps "
        f"--no-cache-dir --no-binary llama-cpp-python llama-cpp-python=={LLAMA_CPP_VERSION}"
    )


def build_wheel(python: str, args: tuple[str, ...]) -> Path:
    """The wheel for ``args``: ours from an earlier install, else compiled now (never from pip's cache)."""
    folder = wheel_root() / build_id(args)
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    flags = " ".join(args)
    if wheels:
        print(f"llama-cpp-python {LLAMA_CPP_VERSION}: reusing {wheels[-1]} (built with CMAKE_ARGS={flags})")
    else:
        print(f"llama-cpp-python {LLAMA_CPP_VERSION}: compiling llama.cpp with CMAKE_ARGS={flags}")
        if args == NATIVE:
            print(f"  {NATIVE_ENV}=1: a native build runs only on CPUs like this one; never copy it")
        print("  (about 7 minutes on 2 cores; the wheel is kept in", folder, "for later installs)")
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed build left
        tmp.mkdir(parents=True)
        env = dict(os.environ, CMAKE_ARGS=flags)
        subprocess.run(
            [python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
             "--no-binary", "llama-cpp-python", "-w", str(tmp), f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
            env=env, check=True,
        )  # fmt: skip
        tmp.replace(folder)
        wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
        if not wheels:
            raise SystemExit(f"pip wheel left no llama-cpp-python wheel in {folder}")
    return wheels[-1]


def install(python: str) -> Path:
    args = cmake_args()
    wheel = build_wheel(python, args)
    subprocess.run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)],
                   check=True)  # fmt: skip
    # Its dependencies (numpy, jinja2, diskcache, typing-extensions) come from the index as usual.
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True)
    where = (
        "import importlib.util, sys; print(sys.prefix); "
        "print(list(importlib.util.find_spec('llama_cpp').submodule_search_locations)[0])"
    )
    found = subprocess.run([python, "-c", where], capture_output=True, text=True, check=True)
    prefix, package = found.stdout.strip().splitlines()[:2]
    record = {"version": LLAMA_CPP_VERSION, "cmake_args": list(args), "native": args == NATIVE,
              "machine": platform.machine(), "wheel": str(wheel),
              "library_checksum": library_checksum(Path(package))}  # fmt: skip
    Path(prefix, BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return wheel


def package_libraries(package: Path) -> list[Path]:
    """The native libraries inside an installed llama_cpp package."""
    return sorted(p for p in package.rglob("*") if p.is_file() and any(s in p.name for s in LIB_SUFFIXES))


def library_checksum(package: Path) -> str:
    """Checksum of the native code; a package without libraries (a stand-in) hashes its Python files."""
    digest = hashlib.sha256()
    for path in package_libraries(package) or sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_record(checksum: str | None = None, prefix: str | None = None) -> dict[str, object] | None:
    """The install record, or None; with ``checksum``, only if it describes that library.

    A llama_cpp installed over ours by hand (``pip install llama-cpp-python``) must not be
    reported with our flags.
    """
    try:
        record = json.loads(Path(prefix or sys.prefix, BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if checksum is not None and record.get("library_checksum") != checksum:
        return None
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cmake-args", help="print the CMake flags an install would use")
    sub.add_parser("build-id", help="print the name of the wheel folder an install would use")
    sub.add_parser("wheel", help="build (or reuse) the wheel only and print its path")
    inst = sub.add_parser("install", help="build (or reuse) and install the wheel into PYTHON's environment")
    inst.add_argument("--python", default=sys.executable)
    ns = parser.parse_args(argv)
    if ns.cmd == "cmake-args":
        print(" ".join(cmake_args()))
    elif ns.cmd == "build-id":
        print(build_id(cmake_args()))
    elif ns.cmd == "wheel":
        print(build_wheel(sys.executable, cmake_args()))
    else:
        install(ns.python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
