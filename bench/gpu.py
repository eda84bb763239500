"""GPU check (``make gpu-check``): the transformers engine on CUDA, at the shapes people will run.

Three parts, each printed as it finishes so that a run cut short still says how far it got:

1. **Correctness** on a tiny random Llama. The scoring core (token trie, tree-attention rows,
   cached paths) is exact arithmetic rearranged, so its log-probs must equal an ordinary causal
   forward pass of each request on the same device, and the CUDA fp32 engine must equal the CPU
   fp32 engine. Two controls prove the comparison can fail: a tree mask that lets sibling branches
   see each other, and 30% noise in one weight matrix, must both be caught.
2. **Scoring throughput** with randomly initialised bf16 models of real shapes (Llama-3.2-1B and
   Llama-3.1-8B: no download, built directly on the GPU): ``engine.score`` on a preference-labeling
   workload against a raw batched ``model(input_ids)`` + log-softmax over the same full sequences,
   interleaved in the same process. Tokens/s counts the baseline's tokens for both sides.
3. **Generation throughput**: ``engine.generate`` (n samples of one prompt per call, as sampling
   runs it) against one batched ``model.generate`` over all the prompts at once.

The tokenizer is built in code (a word-level vocabulary with a Llama-3-style chat template) so
nothing is read from a model hub or the default model package; the big models' vocabulary is
the real 128,256 regardless. Exit status: 0 when every correctness check passes, 1 when one
fails, 3 without CUDA (``--cpu-smoke`` runs everything at tiny sizes on CPU instead), 4 when a
throughput part raised (the others still ran; the table says which).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, Row, format_table, machine, write_json
from bench.gpu_correctness import Check, correctness, correctness_table
from bench.gpu_kit import (
    FULL,
    NAME,
    SHAPES,
    SMOKE,
    SMOKE_SHAPES,
    Clock,
    Plan,
    Shape,
    build_model,
    build_tokenizer,
    free_memory,
    sync,
)
from bench.gpu_throughput import generation, scoring

EXIT_OK = 0


EXIT_INCORRECT = 1


EXIT_NO_CUDA = 3  # not 2: argparse already uses 2 for a bad command line


EXIT_ERROR = 4  # correctness passed, but a throughput part raised (its traceback is in the log)


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info |= {
            "card": torch.cuda.get_device_name(0),
            "cuda": torch.version.cuda,
            "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
            "multiprocessors": props.multi_processor_count,
        }
    else:
        info["card"] = "CPU (smoke run: tiny sizes, not a measurement)"
    return info


def _output(args: argparse.Namespace) -> tuple[Path, str]:
    """``--out`` if given; else ``$OUT/gpu_check.json`` (the GPU machine returns that folder); else
    ``outputs/bench/gpu.json`` next to the other benchmarks."""
    if args.out is not None:
        return args.out, NAME
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]), "gpu_check"
    return DEFAULT_OUT, NAME


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the whole check at tiny sizes on CPU (seconds)")
    p.add_argument("--shapes", default="1b,8b", help="which model shapes, in order (default 1b,8b)")
    p.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds; later timing rounds and shapes are skipped past it (default 360)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu.json (default: $OUT as gpu_check.json, else outputs/bench)",
    )
    args = p.parse_args(argv)
    with one_thread_if(args.cpu_smoke):
        return run(args)


@contextlib.contextmanager
def one_thread_if(cpu_smoke: bool) -> Iterator[None]:
    """One torch thread for a CPU smoke run (every bench that has one uses this).

    Tiny matrices gain nothing from threads, and on a busy machine two threads spinning at
    every barrier made each one 200 times slower than one thread.
    """
    if not cpu_smoke:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    import torch

    plan = SMOKE if args.cpu_smoke else FULL
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "bench.gpu needs a CUDA GPU (torch.cuda.is_available() is False here);\n"
            "`python -m bench.gpu --cpu-smoke` runs the same code at tiny sizes on CPU.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    shapes = SMOKE_SHAPES if args.cpu_smoke else SHAPES
    wanted = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in shapes]
    if unknown:
        print(f"unknown shape(s) {unknown}; choose from {sorted(shapes)}", file=sys.stderr)
        return 2
    clock = Clock(args.budget)
    out_dir, out_name = _output(args)
    payload: dict[str, Any] = {
        "name": NAME,
        "cpu_smoke": args.cpu_smoke,
        "complete": False,
        "environment": environment(plan.device),
        "plan": asdict(plan),
        "correctness": [],
        "rows": [],
        "details": {},
        "skipped": [],
        "errors": [],
    }
    env = payload["environment"]
    clock.log(f"{env['card']}; torch {env['torch']}, transformers {env['transformers']}")
    rows: list[Row] = []

    def save() -> Path:
        payload["seconds"] = round(clock.elapsed(), 1)
        payload["rows"] = [row.to_dict() for row in rows]
        return write_json(out_dir, out_name, payload)

    checks: list[Check] = []
    try:
        checks, payload["details"]["correctness"] = correctness(plan, plan.device, clock)
    except Exception as exc:  # the throughput parts still run: one GPU run must tell all it can
        record_failure(payload, "correctness", exc, clock)
    payload["correctness"] = [check.to_dict() for check in checks]
    save()
    tokenizer = build_tokenizer(plan.filler_words)
    for key in wanted:
        shape = shapes[key]
        if clock.over():
            payload["skipped"].append(f"{shape.name}: time budget spent")
            clock.log(f"{shape.name}: skipped, time budget spent")
            continue
        detail: dict[str, Any] = {"shape": asdict(shape)}
        payload["details"][key] = detail
        try:
            _shape(plan, shape, tokenizer, clock, detail, payload, rows, save)
        except Exception as exc:  # e.g. out of memory: the next shape may still fit
            record_failure(payload, shape.name, exc, clock)
        free_memory(plan.device)
        save()
    payload["complete"] = True
    path = save()
    passed = bool(checks) and all(check.passed for check in checks)
    print(
        f"\n**GPU check** on {env['card']}: torch {env['torch']}, transformers {env['transformers']}; "
        f"bf16 models, batch_tokens {plan.batch_tokens}; {payload['seconds']:.0f} s\n"
    )
    print(format_table(rows))
    print()
    print(correctness_table(checks))
    for note in payload["skipped"]:
        print(f"\nskipped: {note}")
    for error in payload["errors"]:
        print(f"\nERROR in {error['part']}: {error['error']}")
    print(f"\ncorrectness: {'all passed' if passed else 'FAILED'}; wrote {path}", file=sys.stderr)
    if not passed:
        return EXIT_INCORRECT
    return EXIT_ERROR if payload["errors"] else EXIT_OK


def _shape(
    plan: Plan,
    shape: Shape,
    tokenizer: Any,
    clock: Clock,
    detail: dict[str, Any],
    payload: dict[str, Any],
    rows: list[Row],
    save: Callable[[], Path],
) -> None:
    """Build one shape's model, score, then generate with it; ``detail`` and ``rows`` fill in as it
    goes, so that what finished before an error is kept."""
    import torch

    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    built = time.perf_counter()
    model = build_model(shape, tokenizer, plan.device, torch.bfloat16)
    sync(plan.device)
    params = sum(p.numel() for p in model.parameters())
    detail |= {
        "parameters": params,
        "attention": model.config._attn_implementation,
        "init_seconds": round(time.perf_counter() - built, 1),
    }
    clock.log(f"{shape.name}: {params / 1e9:.2f} B parameters built in {detail['init_seconds']} s")
    more, detail["scoring"] = scoring(plan, shape, model, tokenizer, clock)
    rows += more
    save()
    if clock.over():
        payload["skipped"].append(f"{shape.name} generation: time budget spent")
    else:
        more, detail["generation"] = generation(plan, shape, model, tokenizer, clock)
        rows += more
    if plan.device.startswith("cuda"):
        detail["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 1)


def record_failure(payload: dict[str, Any], part: str, exc: Exception, clock: Clock) -> None:
    traceback.print_exc()
    payload["errors"].append({"part": part, "error": f"{type(exc).__name__}: {exc}"})
    clock.log(f"{part}: ERROR {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
