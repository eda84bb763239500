"""Everything that can be wrong with a run request, found before Prefect starts or any model loads.

A typo in a recipe, a model that does not resolve, an unreadable prompt source, an output that
cannot be written or a llama.cpp build that crashes on this CPU costs a second, not a run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import fsspec

from schemas import reasons
from schemas.recipe import Recipe, load_recipe
from steps.base import StageStats, join_uri
from steps.decontaminate import check_sets
from steps.engines.dtypes import resolve_recipe_dtypes
from steps.engines.native_check import check_models
from steps.labelers.checks import preflight, recipe_models
from steps.prompts import check_prompts

WORK_DIR = ".work"


class OutputError(RuntimeError):
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


class NothingSampledError(RuntimeError):
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
