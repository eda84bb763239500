"""distilabel's own preference recipe against ours: sample 4, judge, best vs worst; and the judges' agreement.

The job people run in distilabel to make preference data is ``TextGeneration(num_generations=4)``
→ ``UltraFeedback(aspect="overall-rating")`` (the judge *writes* a rating and a rationale for every
answer, parsed with a regular expression) → best vs worst by rating. Ours is the CLI users run,
``python -m flows.build_prefs``, on a recipe with the same sampling and one labeler, the rubric
judge read as an expected score from its rating tokens' probabilities (one forward pass, nothing to
parse) → best vs worst. Both sides load the same GGUF through llama.cpp with the same context,
threads and sampling settings (llama.cpp's extra samplers off on both).

Four numbers per side:

* wall time of the whole job, each in a fresh process (ours includes Prefect's temporary server,
  the data card and the Parquet files; distilabel includes its worker processes and its cache);
* peak RSS of the process tree (distilabel runs each step in its own process);
* usable pairs: the share of prompts that end with a chosen/rejected pair. distilabel needs two
  parsed ratings that differ; a rating its parser cannot read is counted, not guessed;
* agreement with people: the first 100 pairs of the HH-harmless dev set, the same (conversation,
  chosen, rejected) triples rated by each judge, the two answers in the same seeded order on both
  sides. A pair counts as agreed when the human's chosen gets the higher rating; a tie or an
  unparsed rating counts against (it gives no pair), as in ``flows.eval_labelers``.

distilabel is never a project dependency: it lives in its own virtualenv (``bench.distilabel_side``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, Row, finish, log, parser, ratio, run_measured
from bench.distilabel_side import VENV, ensure_venv
from schemas.recipe import EVAL_DIR

NAME = "distilabel_prefs"
N_GENERATIONS = 4
# The team's human-labelled dev set sits beside a checkout; a clone elsewhere falls back to the
# 32 HH pairs the repository ships (the last 32 of the same set).
DEV_PAIRS = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"
SHIPPED_PAIRS = EVAL_DIR / "hh_harmless_32.jsonl"
# The judge writes a rating and a rationale per answer: room for 4 short rationales (2 in the
# agreement part). Its temperature is distilabel's documented default for LlamaCppLLM's generate.
JUDGE_MAX_TOKENS = {"job": 512, "agreement": 256}
JUDGE_TEMPERATURE = 1.0

# Run by distilabel's virtualenv: it must not import prefsmith.
DISTILABEL_JOB = '''
import json, sys, time
started = time.perf_counter()
cfg = json.loads(sys.argv[1])

from distilabel.models.llms import LlamaCppLLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts, StepInput, step
from distilabel.steps.tasks import TextGeneration, UltraFeedback

OFF = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0}


def llm(max_tokens, temperature, top_p):
    return LlamaCppLLM(
        model_path=cfg["model_path"], n_ctx=cfg["n_ctx"], seed=0,
        extra_kwargs={"n_threads": cfg["threads"]},
        generation_kwargs={"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                           "extra_generation_kwargs": OFF},
    )


@step(inputs=["generations", "ratings"], outputs=["chosen", "rejected", "parsed"])
def BestVsWorst(inputs: StepInput):
    """The highest-rated answer chosen, the lowest rejected; no pair unless two parsed ratings differ."""
    for row in inputs:
        ratings = row["ratings"] or []
        # UltraFeedback's parser yields one rating per blank-line-separated section of the judge's
        # text, so a judge that writes more or fewer sections misaligns ratings and answers.
        aligned = len(ratings) == len(row["generations"])
        rated = [(r, g) for r, g in zip(ratings, row["generations"]) if r is not None] if aligned else []
        row["parsed"] = len(rated)
        best = max(rated, key=lambda x: x[0], default=None)
        worst = min(rated, key=lambda x: x[0], default=None)
        ok = best is not None and best[0] > worst[0]
        row["chosen"], row["rejected"] = (best[1], worst[1]) if ok else (None, None)
    yield inputs


def tokens(meta):
    if isinstance(meta, dict):
        return sum(v if k == "output_tokens" and isinstance(v, int) else tokens(v) for k, v in meta.items())
    if isinstance(meta, list):
        return sum(tokens(v) for v in meta)
    return 0


with Pipeline(name="prefsmith-distilabel-prefs", cache_dir=cfg["cache_dir"]) as pipeline:
    judge = UltraFeedback(
        llm=llm(cfg["judge_max_tokens"], cfg["judge_temperature"], 1.0), aspect="overall-rating",
        input_batch_size=max(1, len(cfg["rows"])),
    )
    load = LoadDataFromDicts(data=cfg["rows"], batch_size=max(1, len(cfg["rows"])))
    if cfg["mode"] == "job":
        generate = TextGeneration(
            llm=llm(cfg["max_tokens"], cfg["temperature"], cfg["top_p"]),
            num_generations=cfg["n"], group_generations=True, input_batch_size=len(cfg["rows"]),
            output_mappings={"generation": "generations"},
        )
        load >> generate >> judge >> BestVsWorst()
    else:
        load >> judge

distiset = pipeline.run(use_cache=False)
rows = distiset["default"]["train"]
import distilabel, llama_cpp
out = {
    "rows": len(rows),
    "ratings": [r["ratings"] for r in rows],
    "ids": [r.get("id") for r in rows],
    "tokens": sum(tokens(r.get("distilabel_metadata")) for r in rows),
    "seconds_in_process": time.perf_counter() - started,
    "versions": {"distilabel": distilabel.__version__, "llama_cpp_python": llama_cpp.__version__},
}
if cfg["mode"] == "job":
    out["pairs"] = sum(1 for r in rows if r["chosen"] is not None)
    out["parsed"] = sum(r["parsed"] for r in rows)
print("RESULT " + json.dumps(out))
'''


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from steps.engines import resolve_model
    from steps.engines.models import SMOLLM2_ALIAS

    return {
        "n_prompts": args.prompts or (1 if args.quick else 8),
        "n_pairs": args.pairs if args.pairs is not None else (4 if args.quick else 100),
        "pairs_file": str(args.pairs_file or (DEV_PAIRS if DEV_PAIRS.is_file() else SHIPPED_PAIRS)),
        "n": N_GENERATIONS,
        "max_tokens": 8 if args.quick else 128,
        "temperature": 0.8,
        "top_p": 0.95,
        "n_ctx": 4096,  # HH conversations plus the judge's instructions and two answers
        "threads": args.threads or os.cpu_count() or 1,
        "judge_temperature": JUDGE_TEMPERATURE,
        "model": SMOLLM2_ALIAS,
        "model_path": resolve_model(SMOLLM2_ALIAS, "llama_cpp").location,
    }


def our_recipe(cfg: dict[str, Any], n_prompts: int, judge_engine: str = "llama_cpp") -> dict[str, Any]:
    """The recipe of our side: the same GGUF, sampling and threads; one judge labeler on that GGUF.

    ``judge_engine: transformers`` is how our labelers run by default: the same weights, read
    from the same GGUF file, in the dtype the CPU is fast at (bf16 where it has bf16 kernels).
    """
    model = {"model": cfg["model"], "engine": "llama_cpp", "n_ctx": cfg["n_ctx"], "n_threads": cfg["threads"]}
    judge = model if judge_engine == "llama_cpp" else {**model, "engine": judge_engine, "dtype": "auto"}
    return {
        "name": "bench-distilabel-prefs",
        "description": "distilabel's preference recipe, our way: sample 4, rubric judge, best vs worst",
        "prompts": {"source": "builtin"},
        "limit": n_prompts,
        "policy": model,
        "sampling": {
            "n": cfg["n"], "temperature": cfg["temperature"], "top_p": cfg["top_p"],
            "max_tokens": cfg["max_tokens"], "seed": 0,
        },
        "labelers": [{"kind": "judge_pointwise", "name": "judge", "mode": "expected", "model": judge}],
        # best vs worst by the judge; a tie (no preference) is dropped, as distilabel's side drops it
        "pairing": {"rule": "best_vs_worst"},
        "consistency": {"drop_mislabeled": True},
    }  # fmt: skip


def _checked(outcome: dict[str, Any], who: str) -> dict[str, Any]:
    """``run_measured``'s outcome, or an error carrying the end of the failed command's stderr."""
    if outcome["returncode"] != 0:
        raise RuntimeError(f"{who} failed (exit {outcome['returncode']}):\n{outcome['stderr'][-4000:]}")
    return outcome


def _result(outcome: dict[str, Any], who: str) -> dict[str, Any]:
    _checked(outcome, who)
    lines = [line for line in outcome["stdout"].splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1].removeprefix("RESULT ")) if lines else {}
    result.update(seconds=outcome["seconds"], peak_tree_rss_mib=outcome["peak_tree_rss_mib"])
    return result


def _builtin_instructions(n: int) -> list[str]:
    from schemas import columns
    from schemas.recipe import BuiltinPrompts
    from steps.prompts.normalise import load_prompts

    prompts, _ = load_prompts(BuiltinPrompts(), limit=n)
    texts = []
    for messages in prompts.column(columns.MESSAGES).to_pylist():
        if len(messages) != 1 or messages[0][columns.ROLE] != "user":
            raise ValueError("TextGeneration takes one user instruction; pick single-turn built-in prompts")
        texts.append(messages[0][columns.CONTENT])
    return texts


def transcript(messages: list[dict[str, str]]) -> str:
    """A conversation as UltraFeedback's one ``instruction``: the user's text alone when single-turn."""
    from schemas import columns

    if len(messages) == 1:
        return messages[0][columns.CONTENT]
    return "\n\n".join(f"{m[columns.ROLE].capitalize()}: {m[columns.CONTENT]}" for m in messages)


def agreement_rows(pairs_file: Path, n_pairs: int, seed: int) -> list[dict[str, Any]]:
    """The first ``n_pairs`` pairs as UltraFeedback rows, the two answers in eval_labelers' order."""
    from steps.quality.pairs_file import chosen_first, read_pairs

    pairs, _ = read_pairs(pairs_file, limit=n_pairs)
    rows = []
    for pair in pairs:
        first = chosen_first(pair.pid, seed)
        texts = [pair.chosen, pair.rejected] if first else [pair.rejected, pair.chosen]
        rows.append({"id": pair.pid, "instruction": transcript(pair.messages), "generations": texts,
                     "chosen_index": 0 if first else 1})  # fmt: skip
    return rows


def distilabel_agreement(rows: list[dict[str, Any]], ratings: dict[str, Any]) -> dict[str, Any]:
    """Agree / disagree / tie / unparsed over the pairs, from UltraFeedback's two ratings per pair."""
    counts = {"agree": 0, "disagree": 0, "tie": 0, "unparsed": 0}
    for row in rows:
        pair = ratings.get(row["id"]) or []
        if len(pair) != 2:  # one rating per section of the judge's text: not two, not aligned
            pair = [None, None]
        chosen, rejected = pair[row["chosen_index"]], pair[1 - row["chosen_index"]]
        if chosen is None or rejected is None:
            counts["unparsed"] += 1
        else:
            counts["agree" if chosen > rejected else "disagree" if chosen < rejected else "tie"] += 1
    counts["n"] = len(rows)
    counts["accuracy"] = counts["agree"] / len(rows) if rows else None
    return counts


def _ours_job(cfg: dict[str, Any], scratch: Path, judge_engine: str) -> dict[str, Any]:
    """One CLI run in a fresh process, a fresh output and work location (nothing of the job reused).

    The machine's own cache stays: a llama.cpp build checked on this CPU once, and a GGUF
    converted for transformers once, are what every run after a machine's first finds.
    """
    recipe = scratch / f"recipe-{judge_engine}.yaml"
    recipe.write_text(yaml.safe_dump(our_recipe(cfg, cfg["n_prompts"], judge_engine), sort_keys=False))
    out = scratch / f"ours-out-{judge_engine}"
    cmd = [
        sys.executable,
        "-m",
        "flows.build_prefs",
        "--recipe",
        str(recipe),
        "--output",
        str(out),
        "--fresh",
    ]
    outcome = _checked(run_measured(cmd), "flows.build_prefs")
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stats"]["stages"]
    return {
        "seconds": outcome["seconds"],
        "peak_tree_rss_mib": outcome["peak_tree_rss_mib"],
        "pairs": manifest["splits"]["train"],
        "tokens": stages["sampling"]["counts"].get("tokens", 0),
    }


def _ours_agreement(cfg: dict[str, Any], scratch: Path) -> dict[str, Any]:
    recipe = scratch / "agreement.yaml"
    recipe.write_text(yaml.safe_dump(our_recipe(cfg, 1), sort_keys=False))
    report = scratch / "agreement.json"
    cmd = [
        sys.executable, "-m", "flows.eval_labelers", "--pairs", cfg["pairs_file"], "--recipe", str(recipe),
        "--limit", str(cfg["n_pairs"]), "--json", str(report), "--cache", str(scratch / "eval"), "--fresh",
    ]  # fmt: skip
    outcome = _checked(run_measured(cmd), "flows.eval_labelers")
    rows = json.loads(report.read_text())["rows"]
    judge = next(row for row in rows if row["labeler"] == "judge")
    return {**judge, "seconds": outcome["seconds"]}


def _theirs(
    python: Path, cfg: dict[str, Any], scratch: Path, mode: str, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    script = scratch / "distilabel_job.py"
    script.write_text(DISTILABEL_JOB)
    job = {**cfg, "mode": mode, "rows": rows, "judge_max_tokens": JUDGE_MAX_TOKENS[mode],
           "cache_dir": str(scratch / f"distilabel-cache-{mode}")}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["DISTILABEL_LOG_LEVEL"] = "WARNING"
    return _result(run_measured([str(python), str(script), json.dumps(job)], env=env), f"distilabel ({mode})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = _settings(args)
    instructions = _builtin_instructions(cfg["n_prompts"])
    workload = (
        f"{len(instructions)} prompts × {cfg['n']}, ≤{cfg['max_tokens']} tokens, judge, best vs worst, "
        f"{cfg['threads']} threads"
    )
    pairs_workload = (
        f"first {cfg['n_pairs']} pairs of {Path(cfg['pairs_file']).name}, one judge call per pair"
    )
    log(f"{NAME}: {workload}; agreement on the {pairs_workload}")
    root = Path(args.out) / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="prefs-", dir=root))
    theirs_job: dict[str, Any] | None = None
    theirs_agree: dict[str, Any] | None = None
    try:
        ours_job = _ours_job(cfg, scratch, "llama_cpp")
        log(f"{NAME}: ours {ours_job['seconds']:.1f}s, {ours_job['pairs']} pairs")
        shipped = _ours_job(cfg, scratch, "transformers")
        log(f"{NAME}: ours, judge on transformers {shipped['seconds']:.1f}s, {shipped['pairs']} pairs")
        ours_agree = _ours_agreement(cfg, scratch) if cfg["n_pairs"] else None
        python = ensure_venv(args.venv, install=not args.no_install)
        if python is not None:
            theirs_job = _theirs(python, cfg, scratch, "job", [{"instruction": t} for t in instructions])
            log(f"{NAME}: distilabel {theirs_job['seconds']:.1f}s, {theirs_job['pairs']} pairs")
            if cfg["n_pairs"]:
                rows = agreement_rows(Path(cfg["pairs_file"]), cfg["n_pairs"], args.seed)
                raw = _theirs(python, cfg, scratch, "agreement", rows)
                by_id = dict(zip(raw["ids"], raw["ratings"], strict=True))
                theirs_agree = {
                    **distilabel_agreement(rows, by_id),
                    "seconds": raw["seconds"],
                    "raw_ratings": raw["ratings"][:20],
                }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return finish(
        NAME,
        args,
        table(
            cfg,
            workload,
            pairs_workload,
            (ours_job, shipped),
            ours_agree,
            theirs_job,
            theirs_agree,
            len(instructions),
        ),
        {
            "settings": cfg,
            "judge_max_tokens": JUDGE_MAX_TOKENS,
            "ours": {
                "job": ours_job,
                "job_judge_on_transformers": shipped,
                "agreement": ours_agree,
                "recipe": our_recipe(cfg, cfg["n_prompts"]),
            },
            "distilabel": {"job": theirs_job, "agreement": theirs_agree},
            "distilabel_status": "ran" if theirs_job else f"skipped: no virtualenv at {args.venv}",
        },
        started,
    )


def table(
    cfg: dict[str, Any],
    workload: str,
    pairs_workload: str,
    ours_jobs: tuple[dict[str, Any], dict[str, Any]],
    ours_agree: dict[str, Any] | None,
    theirs_job: dict[str, Any] | None,
    theirs_agree: dict[str, Any] | None,
    n_prompts: int,
) -> list[Row]:
    """The rows: speed against the 2x target, memory, usable pairs, and agreement (equal or better)."""
    tj, ta = theirs_job or {}, theirs_agree or {}
    ours_job, shipped = ours_jobs
    ours_share = ours_job["pairs"] / n_prompts
    theirs_share = tj["pairs"] / n_prompts if theirs_job else None
    parsed = f"distilabel parsed {tj['parsed']} of {n_prompts * cfg['n']} ratings" if theirs_job else ""
    rows = [
        Row(NAME, "wall time, sample 4 → judge → best vs worst", workload, ours_job["seconds"],
            tj.get("seconds"), "s", ratio(tj.get("seconds"), ours_job["seconds"]), target=2.0,
            note="judge on llama.cpp both sides; ours: the CLI (Prefect server, card, Parquet)"),
        Row(NAME, "same, our judge on its default engine (transformers, dtype auto, same GGUF weights)",
            workload, shipped["seconds"], tj.get("seconds"), "s",
            ratio(tj.get("seconds"), shipped["seconds"]), target=2.0, note=f"{shipped['pairs']} pairs"),
        Row(NAME, "peak RSS of the process tree", workload, ours_job["peak_tree_rss_mib"],
            tj.get("peak_tree_rss_mib"), "MiB",
            ratio(tj.get("peak_tree_rss_mib"), ours_job["peak_tree_rss_mib"])),
        Row(NAME, "prompts that end with a usable pair", workload, ours_share, theirs_share, "share",
            ratio(ours_share, theirs_share), note=parsed),
    ]  # fmt: skip
    if ours_agree is not None:
        note = f"ours {ours_agree['agree']}/{ours_agree['disagree']}/{ours_agree['tie']} agree/disagree/tie"
        if theirs_agree:
            note += f"; distilabel {ta['agree']}/{ta['disagree']}/{ta['tie']}, {ta['unparsed']} unparsed"
        rows.append(
            Row(NAME, "judge agrees with people (ties, unparsed count against)", pairs_workload,
                ours_agree["accuracy"], ta.get("accuracy"), "share",
                ratio(ours_agree["accuracy"], ta.get("accuracy")), target=1.0, note=note)
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--prompts", type=int, help="built-in prompts for the job (default 8; --quick 1)")
    p.add_argument(
        "--pairs", type=int, help="dev pairs for the agreement part (default 100; --quick 4; 0 skips)"
    )
    p.add_argument("--threads", type=int, help="llama.cpp threads on both sides (default: all cores)")
    p.add_argument("--pairs-file", type=Path, help=f"human pairs (default: {DEV_PAIRS} if present)")
    p.add_argument("--seed", type=int, default=0, help="the answers' order per pair, as eval_labelers --seed")
    p.add_argument("--venv", type=Path, default=VENV, help="distilabel's own virtualenv")
    p.add_argument("--no-install", action="store_true", help="do not create the virtualenv; skip if absent")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
