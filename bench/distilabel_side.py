"""Side by side with distilabel: the same job in both, wall time and peak memory.

The job: N built-in prompts × 4 samples from the same GGUF file through llama.cpp (same
context size, threads, temperature, top-p, max tokens, with llama.cpp's extra samplers
off on both sides), then chosen = the longest answer and rejected = the shortest.

* ours: ``steps.sampling.sample_table`` with the engine the default recipe loads, a length
  labeler on the real ``Labeler`` base, and ``steps.pairing.pairs.make_pairs``;
* distilabel: ``Pipeline`` with ``LoadDataFromDicts`` → ``TextGeneration`` (``LlamaCppLLM``,
  ``num_generations=4``) → a step that picks the same pair.

distilabel is never a project dependency: it is installed into its own virtualenv
(``outputs/bench/.distilabel-venv``, created once, then reused) with the same
llama-cpp-python version as ours. Each side runs in a fresh process whose whole process
tree is sampled for memory (distilabel runs its steps in worker processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, Row, finish, log, parser, ratio, run_measured
from steps.engines.llama_build import wheel_root

NAME = "distilabel_side"
DISTILABEL_VERSION = "1.5.3"
VENV = DEFAULT_OUT / ".distilabel-venv"
N_GENERATIONS = 4

# Written to a file and run by the distilabel virtualenv's interpreter: it must not import prefsmith.
DISTILABEL_JOB = '''
import json, sys, time
started = time.perf_counter()
cfg = json.loads(sys.argv[1])

from distilabel.models.llms import LlamaCppLLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts, StepInput, step
from distilabel.steps.tasks import TextGeneration


@step(inputs=["generation"], outputs=["chosen", "rejected"])
def PickLongestShortest(inputs: StepInput):
    """The same rule as the prefsmith side: longest answer chosen, shortest rejected, ties no pair."""
    for row in inputs:
        texts = [t for t in row["generation"] if t is not None]
        ranked = sorted(texts, key=len)
        ok = len(ranked) >= 2 and len(ranked[-1]) > len(ranked[0])
        row["chosen"] = ranked[-1] if ok else None
        row["rejected"] = ranked[0] if ok else None
    yield inputs


def output_tokens(meta):
    if isinstance(meta, dict):
        return sum(
            v if k == "output_tokens" and isinstance(v, int) else output_tokens(v) for k, v in meta.items()
        )
    if isinstance(meta, list):
        return sum(output_tokens(v) for v in meta)
    return 0


with Pipeline(name="prefsmith-side-by-side", cache_dir=cfg["cache_dir"]) as pipeline:
    rows = [{"instruction": p} for p in cfg["prompts"]]
    load = LoadDataFromDicts(data=rows, batch_size=len(rows))
    generate = TextGeneration(
        llm=LlamaCppLLM(
            model_path=cfg["model_path"],
            n_ctx=cfg["n_ctx"],
            seed=0,
            extra_kwargs={"n_threads": cfg["threads"]},
            generation_kwargs={
                "max_new_tokens": cfg["max_tokens"],
                "temperature": cfg["temperature"],
                "top_p": cfg["top_p"],
                # llama.cpp's extra samplers off, as the prefsmith engine has them
                "extra_generation_kwargs": {
                    "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
                },
            },
        ),
        num_generations=cfg["n"],
        group_generations=True,
        input_batch_size=len(cfg["prompts"]),
    )
    pick = PickLongestShortest()
    load >> generate >> pick

distiset = pipeline.run(use_cache=False)
rows = distiset["default"]["train"]
import distilabel, llama_cpp
print("RESULT " + json.dumps({
    "rows": len(rows),
    "pairs": sum(1 for r in rows if r["chosen"] is not None),
    "generations": sum(len(r["generation"]) for r in rows),
    "tokens": sum(output_tokens(r.get("distilabel_metadata")) for r in rows),
    "seconds_in_process": time.perf_counter() - started,
    "versions": {"distilabel": distilabel.__version__, "llama_cpp_python": llama_cpp.__version__,
                 "python": sys.version.split()[0]},
}))
'''


def _python311() -> str:
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = shutil.which("python3.11")
    if not found:
        raise RuntimeError("distilabel's virtualenv needs python3.11 on PATH")
    return found


def ensure_venv(venv: Path, install: bool) -> Path | None:
    """The distilabel interpreter; created on first use (idempotent), None when absent and not allowed."""
    import llama_cpp

    python = venv / "bin" / "python"
    marker = venv / ".prefsmith-bench-installed"
    # The very wheel our engine runs (portable build, steps/engines/llama_build.py) when there is one:
    # both sides then run the same native code, and nothing is compiled again.
    ours = sorted(wheel_root().glob(f"llama-cpp-python-{llama_cpp.__version__}-*-portable-*/*.whl"))
    llama = str(ours[-1]) if ours else f"llama-cpp-python=={llama_cpp.__version__}"
    wanted = f"distilabel=={DISTILABEL_VERSION} {Path(llama).name} requests"
    if python.exists() and marker.exists() and marker.read_text().strip() == wanted:
        return python
    if not install:
        return None
    log(f"distilabel: creating {venv} ({wanted})")
    started = time.perf_counter()
    subprocess.run([_python311(), "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
            f"distilabel[llama-cpp]=={DISTILABEL_VERSION}", llama,
            # distilabel imports requests without declaring it
            "requests",
        ],
        check=True,
    )  # fmt: skip
    marker.write_text(wanted + "\n")
    log(f"distilabel: virtualenv ready in {time.perf_counter() - started:.0f}s")
    return python


def _job(args: argparse.Namespace) -> dict[str, Any]:
    from steps.engines import resolve_model
    from steps.engines.models import SMOLLM2_ALIAS

    threads = args.threads or os.cpu_count() or 1
    return {
        "n_prompts": args.prompts or (1 if args.quick else 8),
        "n": N_GENERATIONS,
        "max_tokens": 8 if args.quick else 128,
        "temperature": 0.8,
        "top_p": 0.95,
        "n_ctx": 2048,
        "threads": threads,
        "model": SMOLLM2_ALIAS,  # what the default recipe names; both sides load the file it resolves to
        "model_path": resolve_model(SMOLLM2_ALIAS, "llama_cpp").location,
    }


# ------------------------------------------------------------------ our side, in its own process


def ours_worker(cfg: dict[str, Any], out_dir: Path) -> None:
    started = time.perf_counter()
    from schemas.recipe import BleuConfig, ModelConfig, Recipe, SamplingConfig
    from steps.engines import load_engine
    from steps.labelers.base import Labeler, PromptGroup, Score
    from steps.pairing.pairs import make_pairs
    from steps.prompts.normalise import load_prompts
    from steps.run.files import write_table
    from steps.sampling import sample_table, sampling_params

    class LengthLabel(Labeler):
        """The side-by-side score: answer length in characters (longest is chosen)."""

        signal = "length"

        def score_prompt(self, group: PromptGroup) -> list[Score]:
            return [Score(float(len(text))) for text in group.responses]

    recipe = Recipe(
        name="bench-side-by-side",
        limit=cfg["n_prompts"],
        policy=ModelConfig(model=cfg["model"], n_ctx=cfg["n_ctx"], n_threads=cfg["threads"]),
        sampling=SamplingConfig(
            n=cfg["n"], temperature=cfg["temperature"], top_p=cfg["top_p"], max_tokens=cfg["max_tokens"]
        ),
        # make_pairs reads only each labeler's name and weight: this entry names the length signal.
        labelers=[BleuConfig(kind="bleu", name="length")],
    )
    prompts, _ = load_prompts(recipe.prompts, recipe.limit)
    engine = load_engine(recipe.policy)
    responses, stats = sample_table(prompts, engine, sampling_params(recipe), recipe.sampling.seed)
    labels, _ = LengthLabel().label(prompts, responses)
    pairs, _ = make_pairs(prompts, responses, labels, recipe)
    write_table(pairs, str(out_dir / "pairs.parquet"))
    print(
        "RESULT "
        + json.dumps(
            {
                "rows": prompts.num_rows,
                "pairs": pairs.num_rows,
                "generations": responses.num_rows,
                "tokens": int(stats.counts["tokens"]),
                "seconds_in_process": time.perf_counter() - started,
            }
        )
    )


def _result(outcome: dict[str, Any], who: str) -> dict[str, Any]:
    if outcome["returncode"] != 0:
        raise RuntimeError(f"{who} job failed (exit {outcome['returncode']}):\n{outcome['stderr'][-4000:]}")
    line = next(line for line in outcome["stdout"].splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result.update(seconds=outcome["seconds"], peak_tree_rss_mib=outcome["peak_tree_rss_mib"])
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp

    started = time.perf_counter()
    cfg = _job(args)
    from schemas.recipe import BuiltinPrompts
    from steps.prompts.normalise import load_prompts

    prompts, _ = load_prompts(BuiltinPrompts(), limit=cfg["n_prompts"])
    texts = []
    for messages in prompts.column("messages").to_pylist():
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise ValueError("TextGeneration takes one user instruction; pick single-turn built-in prompts")
        texts.append(messages[0]["content"])
    workload = f"{len(texts)} prompts × {cfg['n']}, ≤{cfg['max_tokens']} tokens, {cfg['threads']} threads"
    log(f"distilabel_side: {workload}")
    scratch = Path(tempfile.mkdtemp(prefix="side-", dir=_scratch(args)))
    try:
        ours = _result(
            run_measured(
                [
                    sys.executable,
                    "-m",
                    "bench.distilabel_side",
                    "--ours-worker",
                    json.dumps(cfg),
                    "--work",
                    str(scratch),
                ]
            ),
            "prefsmith",
        )
        log(f"distilabel_side: ours {ours['seconds']:.1f}s, peak {ours['peak_tree_rss_mib']:.0f} MiB")
        python = ensure_venv(args.venv, install=not args.no_install)
        theirs: dict[str, Any] | None = None
        if python is not None:
            script = scratch / "distilabel_job.py"
            script.write_text(DISTILABEL_JOB)
            job = {**cfg, "prompts": texts, "cache_dir": str(scratch / "distilabel-cache")}
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
            env["DISTILABEL_LOG_LEVEL"] = "WARNING"
            theirs = _result(run_measured([str(python), str(script), json.dumps(job)], env=env), "distilabel")
            peak = theirs["peak_tree_rss_mib"]
            log(f"distilabel_side: distilabel {theirs['seconds']:.1f}s, peak {peak:.0f} MiB")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    status = "ran" if theirs else f"skipped: no virtualenv at {args.venv} (run without --no-install)"
    t = theirs or {}
    versions = t.get("versions", {})
    rows = [
        Row(
            NAME,
            "wall time, same job (sample → pick longest/shortest)",
            workload,
            ours["seconds"],
            t.get("seconds"),
            "s",
            ratio(t.get("seconds"), ours["seconds"]),
            note=f"distilabel {versions.get('distilabel', '–')}; tokens ours {ours['tokens']:,}"
            + (f" vs {t['tokens']:,}" if theirs else ""),
        ),
        Row(
            NAME,
            "peak RSS of the process tree",
            workload,
            ours["peak_tree_rss_mib"],
            t.get("peak_tree_rss_mib"),
            "MiB",
            ratio(t.get("peak_tree_rss_mib"), ours["peak_tree_rss_mib"]),
        ),
        Row(
            NAME,
            "generated tokens/s, end to end",
            workload,
            ours["tokens"] / ours["seconds"],
            t["tokens"] / t["seconds"] if theirs and t.get("tokens") else None,
            "tok/s",
            ratio(ours["tokens"] / ours["seconds"], t["tokens"] / t["seconds"])
            if theirs and t.get("tokens")
            else None,
        ),
    ]
    details = {
        "job": cfg,
        "ours": ours,
        "distilabel": theirs,
        "distilabel_status": status,
        "versions": {
            "prefsmith_llama_cpp_python": llama_cpp.__version__,
            "prefsmith_python": sys.version.split()[0],
            **{f"distilabel_side_{k}": v for k, v in versions.items()},
        },
        "venv": str(args.venv),
    }
    return finish(NAME, args, rows, details, started)


def _scratch(args: argparse.Namespace) -> Path:
    root = Path(args.out) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--prompts", type=int, help="built-in prompts (default 8; --quick 1)")
    p.add_argument("--threads", type=int, help="llama.cpp threads on both sides (default: all cores)")
    p.add_argument("--venv", type=Path, default=VENV, help="distilabel's own virtualenv")
    p.add_argument("--no-install", action="store_true", help="do not create the virtualenv; skip if absent")
    p.add_argument("--ours-worker", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ours_worker:
        ours_worker(json.loads(args.ours_worker), args.work)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
