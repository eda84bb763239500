"""Everything that can be wrong with a run request, found before Prefect starts or any model loads.

A typo in a recipe, a model that does not resolve, an unreadable prompt source, an output that
cannot be written or a llama.cpp build that crashes on this CPU costs a second, not a run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import fsspec

from flows.placement import Placement, check_placement
from schemas import reasons
from schemas.errors import RunError, UsageError
from schemas.recipe import Recipe, RecipeError, load_recipe
from steps.base import StageStats
from steps.engines.dtypes import resolve_recipe_dtypes
from steps.engines.native_check import check_models
from steps.labelers.checks import preflight, recipe_models
from steps.prompts.decontaminate import check_sets
from steps.prompts.normalise import check_prompts
from steps.quality.pairs_file import check_eval_sets
from steps.run.files import join_uri
from steps.run.work_gc import check_keep_runs

WORK_DIR = ".work"


class OutputError(UsageError):
    """The output or work location cannot be written; raised before any model loads."""


def check_writable(uri: str, what: str) -> None:
    """Create the location and write/remove a probe, so a read-only target fails now, not after hours."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.prefsmith-probe-{os.getpid()}"
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except (OSError, ValueError) as exc:
        raise OutputError(
            f"{what} {uri!r} is not writable ({type(exc).__name__}: {exc}); "
            f"choose another location with --output/--work or fix its permissions"
        ) from exc


def prepare(
    recipe: str = "default",
    output: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    work: str | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[Recipe, str, str]:
    """Everything that can be wrong with the request, checked without loading a model.

    The recipe comes back with every ``dtype: auto`` made concrete for this machine; ``report``
    gets one line per such choice.
    """
    loaded = load_recipe(recipe).with_overrides(
        **{"limit": limit, "sampling.seed": seed, "output.uri": output}
    )
    preflight(loaded)  # every model of the recipe (policy, labelers, pair judge), errors name the key
    loaded, notes = resolve_recipe_dtypes(loaded)  # dtype: auto → what this machine is fast at
    for note in notes:
        if report is not None:
            report(note)
    check_prompts(loaded.prompts)
    out = loaded.output_uri()
    work_uri = work or join_uri(out, WORK_DIR)
    if loaded.prompts.decontaminate is not None:
        check_sets(loaded.prompts.decontaminate)  # reads each eval set's first rows; writes nothing
    # A llama.cpp build that crashes on this CPU dies in a child here, not in the run (exit 139), and
    # before anything is written to the output.
    check_models([model for _, model in recipe_models(loaded)])
    check_writable(out, "output")
    check_writable(work_uri, "work location")
    return loaded, out, work_uri


def preflight_run(
    recipe: str,
    output: str | None,
    limit: int | None,
    seed: int | None,
    work: str | None,
    placement: Placement,
    gc_keep_runs: int | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[Recipe, str, str]:
    """The one list of checks before a run, for the CLI and for the flow (a deployment skips the CLI).

    Returns the recipe with every ``dtype: auto`` made concrete, the output and the work location as
    every worker must name it. Each check raises a ``UsageError`` naming what to change.
    """
    if limit is not None and limit < 1:
        raise RecipeError("--limit must be at least 1")
    loaded, out, work_uri = prepare(recipe, output, limit, seed, work, report)
    work_uri = check_placement(placement, work_uri, loaded)
    check_eval_sets(loaded)
    if gc_keep_runs is not None:  # found now, not after the run has published
        check_keep_runs(gc_keep_runs, "gc_keep_runs")
    return loaded, out, work_uri


class NothingSampledError(RunError):
    """Sampling dropped every prompt: publishing an empty dataset would hide that."""


def require_responses(sampled: StageStats) -> None:
    """Stop before labeling when no prompt got a response, naming each drop reason and an example."""
    if sampled.rows_out > 0:
        return
    counted = sampled.drops.most_common()
    listed = ", ".join(f"{reason} x{count}" for reason, count in counted) or "none recorded"
    examples = "".join(f"\n  {reason}: {text}" for reason, text in sorted(sampled.examples.items()))
    hint = (
        "\nraise policy.n_ctx, shorten the prompts or set sampling.too_long: truncate_left"
        if reasons.PROMPT_TOO_LONG in sampled.drops
        else ""
    )
    raise NothingSampledError(
        f"sampling produced no response: all {sampled.rows_in} prompt(s) were dropped ({listed}){examples}"
        f"{hint}\nnothing was published; the previous dataset (if any) is unchanged"
    )
