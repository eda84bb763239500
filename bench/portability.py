"""What the portable llama.cpp build costs: sampling tokens/s of the portable build vs a native one.

The Makefile installs llama.cpp compiled for x86-64-v3 (AVX2/FMA/F16C), because a
``-march=native`` build crashed on AVX-512/AMX Xeons. This measures the price on the machine at
hand: the same workload (``steps.sampling.sample_table`` through our llama.cpp engine, the default
GGUF, the same seeds) runs in child processes, one importing the installed portable build and one
importing a native build of the same version put first on ``PYTHONPATH``, interleaved round by
round (P N, N P, …). Model loading is outside the clock.

The native wheel is compiled once (``PREFSMITH_LLAMA_NATIVE=1``, about 7 minutes on 2 cores) into
the same wheel cache the Makefile uses; ``--native-wheel`` names any other wheel instead (the test
passes the portable wheel itself, to run the mechanism without a compile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row, finish, log, parser
from steps.engines import llama_build

NAME = "portability"


def worker(prompts: int, n: int, max_tokens: int, threads: int) -> dict[str, Any]:
    """One timed sampling pass in this process, with whichever llama_cpp it imports."""
    import llama_cpp

    from schemas import columns
    from schemas.recipe import ModelConfig, Recipe, SamplingConfig
    from steps.engines import load_engine
    from steps.prompts.normalise import load_prompts
    from steps.sampling import sample_table, sampling_params

    recipe = Recipe(
        name="bench-portability",
        limit=prompts,
        policy=ModelConfig(n_ctx=2048, n_threads=threads),
        sampling=SamplingConfig(n=n, max_tokens=max_tokens),
    )
    params = sampling_params(recipe)
    table, _ = load_prompts(recipe.prompts, recipe.limit)
    engine = load_engine(recipe.policy)
    from dataclasses import replace

    sample_table(table.slice(0, 1), engine, replace(params, n=1, max_tokens=4), 1)  # warm-up
    start = time.perf_counter()
    out, stats = sample_table(table, engine, params, recipe.sampling.seed)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": int(stats.counts["tokens"]),
        "texts": out.column(columns.TEXT).to_pylist(),
        "library": str(Path(llama_cpp.__file__).parent),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }


def native_site(wheel: Path, out: Path) -> Path:
    """The wheel unpacked into a folder of its own (no dependencies): put first on PYTHONPATH to use it."""
    # Named after the wheel's folder: portable and native wheels of one version share a file name.
    target = out / ".llama-native" / f"{wheel.parent.name}-{wheel.stem}"
    if not (target / "llama_cpp").is_dir():
        log(f"portability: unpacking {wheel.name} into {target}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
            check=True,
        )
    return target


def run_child(site: Path | None, args: argparse.Namespace, spec: tuple[int, int, int, int]) -> dict[str, Any]:
    env = dict(os.environ)
    if site is not None:
        rest = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), *rest])
    prompts, n, max_tokens, threads = spec
    sizes = ["--prompts", str(prompts), "--n", str(n), "--max-tokens", str(max_tokens)]
    sizes += ["--threads", str(threads)]
    cmd = [sys.executable, "-m", "bench.portability", "--worker", "--out", str(args.out), *sizes]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"portability worker failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    threads = args.threads or os.cpu_count() or 1
    spec = (
        args.prompts or (1 if args.quick else 4),
        args.n or (2 if args.quick else 4),
        args.max_tokens or (8 if args.quick else 128),
        threads,
    )
    rounds = args.rounds or (1 if args.quick else 3)
    wheel = args.native_wheel
    if wheel is None:
        cached = sorted((llama_build.wheel_root() / llama_build.build_id(llama_build.NATIVE)).glob("*.whl"))
        if not cached and args.no_install:
            log("portability: skipped, no native wheel built yet (run without --no-install to compile one)")
            metric = "SKIPPED: no native llama.cpp wheel (--no-install)"
            skipped = Row(NAME, metric, "", None, None, "tok/s", None)
            return finish(NAME, args, [skipped], {"native_wheel": None}, started)
        wheel = cached[-1] if cached else llama_build.build_wheel(sys.executable, llama_build.NATIVE)
    site = native_site(Path(wheel), args.out)
    workload = f"{spec[0]} prompts × {spec[1]}, ≤{spec[2]} tokens, {threads} threads"
    log(f"portability: {workload}; native side from {wheel}")
    runs: dict[str, list[dict[str, Any]]] = {"portable": [], "native": []}
    for i in range(rounds):
        for side in ("portable", "native") if i % 2 == 0 else ("native", "portable"):
            result = run_child(None if side == "portable" else site, args, spec)
            runs[side].append(result)
            log(f"  round {i + 1} {side}: {result['tokens'] / result['seconds']:.1f} tok/s")
    per_round = [
        (p["tokens"] / p["seconds"]) / (q["tokens"] / q["seconds"])
        for p, q in zip(runs["portable"], runs["native"], strict=True)
    ]
    rate = {side: sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs) for side, rs in runs.items()}
    same = sum(a == b for a, b in zip(runs["portable"][0]["texts"], runs["native"][0]["texts"], strict=True))
    texts = len(runs["portable"][0]["texts"])
    import statistics

    rows = [
        Row(
            NAME,
            "tokens/s, portable llama.cpp build (x86-64-v3) vs native (-march=native), sample_table",
            workload,
            rate["portable"],
            rate["native"],
            "tok/s",
            statistics.median(per_round),
            target=0.9,
            note=f"same seeds; {same}/{texts} texts identical; median of {rounds} rounds",
        )
    ]
    details = {
        "native_wheel": str(wheel),
        "portable_cmake_args": list(llama_build.cmake_args(native=False)),
        "libraries": {side: rs[0]["library"] for side, rs in runs.items()},
        "system_info": {side: rs[0]["system_info"] for side, rs in runs.items()},
        "tokens": {side: [r["tokens"] for r in rs] for side, rs in runs.items()},
        "seconds": {side: [r["seconds"] for r in rs] for side, rs in runs.items()},
        "tokens_per_second": rate,
        "ratio_per_round": per_round,
        "identical_texts": same,
        "texts": texts,
        "rounds": rounds,
    }
    return finish(NAME, args, rows, details, started)


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--native-wheel", type=Path, help="the other build (default: compile the native one)")
    p.add_argument("--prompts", type=int, help="built-in prompts (default 4; --quick 1)")
    p.add_argument("--n", type=int, help="samples per prompt (default 4; --quick 2)")
    p.add_argument("--max-tokens", type=int, help="default 128; --quick 8")
    p.add_argument("--threads", type=int, help="default: all cores")
    p.add_argument("--rounds", type=int, help="interleaved rounds per side (default 3; --quick 1)")
    p.add_argument("--no-install", action="store_true", help="never compile the native wheel; skip if absent")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.prompts, args.n, args.max_tokens, args.threads)))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
