"""``prefsmith``: one command line for what users do, and the one place errors become exit codes.

    prefsmith run  [--recipe R] [--output O] ...  build a dataset         = python -m flows.build_prefs
    prefsmith eval --pairs P [--fit] ...          labelers against people = python -m flows.eval_labelers
    prefsmith gc   [--work W] [--keep-runs N]     remove unused work      = python -m flows.build_prefs --gc

A subcommand is a parser and a handler. Handlers raise; ``main`` turns the two families of
``schemas.errors`` into ``error: …`` and exit 2 (usage) or 1 (run), and a failed write to storage
(``OSError``) into exit 1 with what was and was not published. Nothing else is caught by name.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flows.build_prefs import build_prefs
from flows.checks import WORK_DIR, preflight_run
from flows.console import quiet_console
from flows.placement import DEFAULT_BATCH_SHARDS, DEFAULT_START_TIMEOUT_S, Placement
from flows.temp_server import ensure_server
from schemas.errors import EXIT_OK, EXIT_RUN_ERROR, RunError, UsageError
from schemas.locks import LockSettings, lock_settings
from schemas.recipe import Recipe, load_recipe
from steps.engines.dtypes import resolve_recipe_dtypes
from steps.engines.native_check import check_models
from steps.labelers.checks import preflight, recipe_models
from steps.quality.evaluate import N_RESAMPLES, evaluate
from steps.quality.fit_weights import FitResult
from steps.quality.fitted_recipe import eval_overlap, fit_report, write_recipe
from steps.quality.pairs_file import PairsFileError, read_pairs
from steps.quality.report import format_table, format_weights
from steps.run import lease
from steps.run.files import join_uri
from steps.run.resume import WorkArea
from steps.run.work_gc import DEFAULT_KEEP_RUNS, check_keep_runs, collect

EVAL_OUTPUT_DIR = Path("outputs") / "eval_labelers"
Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------- run


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="default", help="recipe name in pipelines/ or a YAML path")
    parser.add_argument("--output", help="output directory or fsspec URI (default ./outputs/<recipe>)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, help="override sampling.seed")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the dataset as one commit")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--work", metavar="URI", help="where finished shards live (default <output>/.work)")
    parser.add_argument(
        "--fresh", action="store_true", help="recompute every shard instead of reusing finished ones"
    )
    parser.add_argument(
        "--model-deployment",
        metavar="NAME",
        help="run sampling and model labelers as runs of this deployment (e.g. model-stage, bound to a "
        "GPU work pool); needs PREFECT_API_URL and a work location the pool's workers share",
    )
    parser.add_argument(
        "--batch-shards",
        type=int,
        default=DEFAULT_BATCH_SHARDS,
        help=f"shards per model-stage run (default {DEFAULT_BATCH_SHARDS})",
    )
    parser.add_argument(
        "--model-start-timeout",
        type=float,
        default=DEFAULT_START_TIMEOUT_S,
        metavar="SECONDS",
        help="cancel model-stage batches and fail when no worker has started any of them for this long, "
        f"e.g. because none polls the pool (default {DEFAULT_START_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS|local",
        help="run the CPU stages (BLEU labeling, pairing) on Dask: a new LocalCluster or a scheduler address",
    )
    add_lock_arguments(parser)


def add_lock_arguments(parser: argparse.ArgumentParser) -> None:
    locking = parser.add_argument_group("locking (one run at a time per output and work location)")
    locking.add_argument(
        "--on-busy",
        choices=["wait", "fail"],
        help="when another live run holds the output or work location: wait for it (default) or stop",
    )
    locking.add_argument("--max-wait", type=float, metavar="S", help="stop waiting after S seconds")
    locking.add_argument(
        "--lock-expiry",
        type=float,
        metavar="S",
        help="a lease not renewed for S seconds is stale (default 60)",
    )
    locking.add_argument(
        "--lock-renew", type=float, metavar="S", help="renew the lease every S seconds (default 10)"
    )


def _lock_settings(args: argparse.Namespace) -> LockSettings:
    return lock_settings(
        on_busy=args.on_busy, max_wait_s=args.max_wait, expiry_s=args.lock_expiry, renew_s=args.lock_renew
    )


def run_command(args: argparse.Namespace) -> int:
    """Every check first (no Prefect, no model), then the flow on a server that dies with us."""
    settings = _lock_settings(args)
    placement = Placement(args.model_deployment, args.batch_shards, None, args.model_start_timeout, args.dask)
    loaded, _, _ = preflight_run(args.recipe, args.output, args.limit, args.seed, args.work, placement)
    engine_check = check_models([model for _, model in recipe_models(loaded)])  # preflight's, cached
    if engine_check is not None:
        print(engine_check.describe(), file=sys.stderr)
    # Prefect's own temporary server would outlive a run killed by a signal; this one dies with it.
    ensure_server()
    result = build_prefs(
        recipe=args.recipe,
        output=args.output,
        limit=args.limit,
        seed=args.seed,
        push_to_hub=args.push_to_hub,
        private=args.private,
        work=args.work,
        fresh=args.fresh,
        model_deployment=placement.model_deployment,
        batch_shards=placement.batch_shards,
        dask=placement.dask,
        lock=settings,
        model_start_timeout=placement.start_timeout,
    )
    where = str(Path(result).resolve()) if "://" not in result else result
    print(f"\nDataset ready: {where}\n  load it with: datasets.load_dataset({where!r}, split='train')")
    return EXIT_OK


# ---------------------------------------------------------------- gc


def add_gc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="default", help="whose output's work location (with no --work)")
    parser.add_argument("--output", help="the output whose <output>/.work to collect (with no --work)")
    parser.add_argument("--work", metavar="URI", help="the work location to collect")
    parser.add_argument("--dry-run", action="store_true", help="report what would go, remove nothing")
    parser.add_argument(
        "--keep-runs",
        type=int,
        default=None,
        metavar="N",
        help=f"keep the entries of the last N runs per recipe (default {DEFAULT_KEEP_RUNS})",
    )
    add_lock_arguments(parser)


def gc_command(args: argparse.Namespace) -> int:
    """Under the work location's lease, so it never races a live run (which it waits for)."""
    settings = _lock_settings(args)
    keep_runs = DEFAULT_KEEP_RUNS if args.keep_runs is None else args.keep_runs
    check_keep_runs(keep_runs, "--keep-runs")
    work = args.work or join_uri(args.output or load_recipe(args.recipe).output_uri(), WORK_DIR)
    with lease.held(work, settings, "gc (prefsmith gc)", "work location") as held:
        collect(work, keep_runs, dry_run=args.dry_run, check=held.check)
    return EXIT_OK


# ---------------------------------------------------------------- eval


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, type=Path, help="JSONL of {id, prompt, chosen, rejected}")
    parser.add_argument("--recipe", default="default", help="a YAML path or a recipe name in pipelines/")
    parser.add_argument("--limit", type=int, default=None, help="only the first N usable pairs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the coin flips and the bootstrap")
    parser.add_argument("--json", type=Path, help=f"default: {EVAL_OUTPUT_DIR}/<recipe name>.json")
    parser.add_argument(
        "--cache",
        default=str(EVAL_OUTPUT_DIR / ".work"),
        help="where each labeler's scores are kept between runs (a path or URI; default %(default)s)",
    )
    parser.add_argument("--fresh", action="store_true", help="recompute every labeler, ignoring the cache")
    fit = parser.add_argument_group("fitting the aggregate's weights on these pairs")
    fit.add_argument("--fit", action="store_true", help="fit one weight per signal (cross-validated)")
    fit.add_argument("--folds", type=int, default=5, help="k of the k-fold cross-validation (by prompt)")
    fit.add_argument(
        "--scale", choices=["auto", "zscore", "spread"], default="auto",
        help="feature scale: auto lets the inner folds choose between zscore and spread",
    )  # fmt: skip
    fit.add_argument(
        "--length-control", choices=["recipe", "none", "residual"], default="recipe",
        help="fit on length-residual scores (residual), raw ones (none), or as the recipe says",
    )  # fmt: skip
    fit.add_argument("--write-recipe", type=Path, help="write the recipe with the fitted weights here")
    fit.add_argument(
        "--domain", help="what the pairs are about, recorded with the weights (default: file name)"
    )


def _residual(recipe: Recipe, choice: str) -> bool:
    if choice != "recipe":
        return choice == "residual"
    control = recipe.pairing.length_control
    return control is not None and control.residual


def eval_command(args: argparse.Namespace) -> int:
    """Check everything, label the pairs (cached per labeler), print the table, optionally fit."""
    if (args.write_recipe or args.domain) and not args.fit:
        raise UsageError("--write-recipe and --domain need --fit")
    if args.folds < 2:
        raise UsageError("--folds must be at least 2")
    recipe, notes = resolve_recipe_dtypes(load_recipe(args.recipe))
    for note in notes:
        print(note)
    if not args.pairs.is_file():
        raise PairsFileError(f"pairs file {str(args.pairs)!r} does not exist")
    pairs, skipped = read_pairs(args.pairs, args.limit)
    if not pairs:
        raise PairsFileError(f"no usable pairs in {args.pairs} (skipped: {dict(skipped)})")
    preflight(recipe)
    # The labelers' models only: the policy is not loaded here.
    engine_check = check_models([m for key, m in recipe_models(recipe) if key != "policy.model"])
    if engine_check is not None:
        print(engine_check.describe(), file=sys.stderr)
    print(f"{len(pairs)} pairs from {args.pairs}; skipped: {dict(sorted(skipped.items())) or 'none'}")
    rows, per_pair, scored = evaluate(
        recipe, pairs, str(args.pairs), args.seed, WorkArea(args.cache, fresh=args.fresh)
    )
    fit: FitResult | None = None
    if args.fit:
        started = time.perf_counter()
        residual = _residual(recipe, args.length_control)
        scales = ["zscore", "spread"] if args.scale == "auto" else [args.scale]
        extra, fit = fit_report(recipe, scored, args.seed, args.folds, scales, residual)
        rows[-1:-1] = extra  # before the length baseline
        fit_seconds = time.perf_counter() - started
    print(format_table(rows))
    if fit is not None:
        print(format_weights(fit))
        print(f"fit: {fit_seconds:.2f} s on cached scores")
        if args.write_recipe:
            written = write_recipe(
                args.recipe, args.write_recipe, fit, rows[-2], rows, residual, args.pairs,
                args.domain or args.pairs.stem,
            )  # fmt: skip
            print(f"wrote {args.write_recipe} (recipe {written.name!r} with the fitted weights)")
            for warning in eval_overlap(written, pairs):
                print(f"warning: {warning}", file=sys.stderr)
    out = args.json or EVAL_OUTPUT_DIR / f"{recipe.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "recipe": recipe.name, "pairs_file": str(args.pairs), "limit": args.limit, "seed": args.seed,
        "n_pairs": len(pairs), "skipped": dict(sorted(skipped.items())), "resamples": N_RESAMPLES,
        "rows": rows, "pairs": per_pair,
        "fit": None if fit is None else {
            "weights": fit.weights, "scale": fit.choice.scale, "l2": fit.choice.lam, "folds": fit.folds,
            "fold_choices": [[choice.scale, choice.lam] for choice in fit.fold_choices],
        },
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return EXIT_OK


# ---------------------------------------------------------------- the command line

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "run": ("build an on-policy preference dataset", add_run_arguments, run_command),
    "eval": ("how often each labeler agrees with human preference pairs", add_eval_arguments, eval_command),
    "gc": ("remove work entries none of the last runs used", add_gc_arguments, gc_command),
}


def parser(prog: str = "prefsmith") -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=prog, description="Synthetic preference data from your own model.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, add_arguments, handler) in COMMANDS.items():
        command = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        add_arguments(command)
        command.set_defaults(handler=handler)
    return top


def write_failure_message(exc: OSError) -> str:
    """After a failed write a user needs: what happened, that nothing half-done was published, what next."""
    cause = "no space left on device" if exc.errno == errno.ENOSPC else f"{type(exc).__name__}: {exc}"
    where = f" while writing {exc.filename}" if exc.filename else ""
    return (
        f"{cause}{where}. Nothing partial was published: the previous dataset (if any) is intact. "
        "Fix the cause and rerun the same command; finished shards are reused."
    )


def main(argv: list[str] | None = None, prog: str = "prefsmith") -> int:
    try:
        args = parser(prog).parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (exit 2)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if args.command != "eval":
        quiet_console()
    try:
        return int(args.handler(args))
    except (UsageError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(exc.hint, file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {write_failure_message(exc)}", file=sys.stderr)
        return EXIT_RUN_ERROR


def build_prefs_main(argv: list[str] | None = None) -> int:
    """``python -m flows.build_prefs [...]``: ``prefsmith run``, or ``prefsmith gc`` with ``--gc``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gc" in argv:
        return main(["gc", *(a for a in argv if a != "--gc")], prog="python -m flows.build_prefs --gc")
    stray = [flag for flag in ("--dry-run", "--keep-runs") if flag in argv]
    if stray:
        print(f"error: {' and '.join(stray)} go with --gc (a build collects nothing)", file=sys.stderr)
        return UsageError.exit_code
    return main(["run", *argv], prog="python -m flows.build_prefs")


def eval_labelers_main(argv: list[str] | None = None) -> int:
    """``python -m flows.eval_labelers [...]``: ``prefsmith eval``."""
    return main(["eval", *(sys.argv[1:] if argv is None else argv)], prog="python -m flows.eval_labelers")
