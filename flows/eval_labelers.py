"""``python -m flows.eval_labelers``: how often does each labeler agree with human preference pairs?

A labeler is only worth its compute if it picks the response people pick. This
tool feeds human-labelled pairs through the very code the pipeline uses
(``build_labeler`` → ``Labeler.label`` → ``aggregate_scores``), so the number
measured is the number the pipeline gets, and sets each one against the
"longer wins" baseline that BLEUBERI reports at 65% (docs/design.md, BLEU against references).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import polars as pl
import pyarrow as pa
import yaml

from schemas import columns as c
from schemas.reasons import INVALID_RESPONSE, INVALID_UNICODE, NOT_AN_OBJECT
from schemas.recipe import EvalPairs, Recipe, RecipeError, load_recipe, resolve_recipe_path
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.aggregate import AGG, Aggregation, aggregate_scores, feature, features, run_stats, wide_scores
from steps.base import ShardResult, StageStats, join_uri, read_table, write_table
from steps.cost import JOINTLY, SCORED
from steps.engines import ModelSpecError, derive_seed
from steps.engines.dtypes import resolve_recipe_dtypes
from steps.engines.native_check import EngineCrashError, check_models
from steps.fit_weights import FitResult, fit_weights
from steps.labelers.checks import preflight, recipe_models
from steps.prompts import (
    InvalidRow,
    json_value,
    normalise_messages,
    normalise_references,
    open_parquet,
    parquet_batches,
    prompt_id,
)
from steps.resume import WorkArea, sha256_of
from steps.stages import label_parts

N_RESAMPLES = 2000
LENGTH_ROW = "length (longer wins)"
OUTPUT_DIR = Path("outputs") / "eval_labelers"


class PairsFileError(ValueError):
    """The pairs file cannot be read; the message names the line."""


@dataclass(frozen=True)
class Pair:
    pid: str
    messages: list[dict[str, str]]
    references: list[str]
    chosen: str
    rejected: str
    line: int


def chosen_first(pid: str, seed: int) -> bool:
    """Seeded coin flip per pair: labelers that break ties by order must not see the human choice first.

    Keyed on the pair id (not its position) so ``--limit`` leaves every flip unchanged.
    """
    return derive_seed("eval-flip", seed, pid) % 2 == 0


def _parse_pair(record: Any, line: int, seen: set[str]) -> Pair:
    if not isinstance(record, dict):
        raise InvalidRow(NOT_AN_OBJECT, f"line {line}: expected a JSON object")
    for side in (c.CHOSEN, c.REJECTED):
        text = record.get(side)
        if not isinstance(text, str):
            raise InvalidRow(INVALID_RESPONSE, f"line {line}: {side!r} must be a string")
        try:  # a JSON escape such as "\ud800" decodes to a lone surrogate, which Arrow cannot hold
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRow(
                INVALID_UNICODE, f"line {line}: {side!r} has an unpaired surrogate at character {exc.start}"
            ) from None
    messages = normalise_messages(record.get(c.PROMPT))
    # A pair id is unique by contract, but one prompt often has several pairs: hashing the prompt
    # alone would merge them into one group and let z-scores mix responses of different pairs.
    pid = str(record.get("id") or prompt_id(messages))
    base, k = pid, 1
    while pid in seen:  # "<id>@<line>" may itself be an id given earlier: count on until it is free
        pid = f"{base}@{line}" if k == 1 else f"{base}@{line}.{k}"
        k += 1
    references = normalise_references(record.get("reference"))
    return Pair(pid, messages, references, record[c.CHOSEN], record[c.REJECTED], line)


def _records(source: Path | EvalPairs) -> Iterator[tuple[int, Any]]:
    """(line or row number, record) of a JSONL/Parquet file or a datasets dataset; bad JSON is fatal."""
    if isinstance(source, Path):
        source = EvalPairs(uri=str(source), format="jsonl")
    if source.hf is not None:
        import datasets

        try:
            rows = datasets.load_dataset(source.hf, source.config, split=source.split)
        except Exception as exc:  # datasets raises many types; all mean "cannot read this"
            raise PairsFileError(f"eval pairs {source.hf!r}: cannot load the dataset ({exc})") from None
        yield from enumerate(rows, start=1)
        return
    uri = source.location
    fmt = source.format or ("parquet" if uri.endswith(".parquet") else "jsonl")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        handle = fs.open(path, "rb")
    except (OSError, ValueError) as exc:
        raise PairsFileError(f"pairs file {uri!r} cannot be opened ({exc})") from None
    with handle:
        if fmt == "parquet":
            yield from _parquet_records(handle, uri)
            return
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                # A byte-order mark (some Windows editors write one) is not part of the JSON.
                record = json_value(raw.decode("utf-8-sig" if line == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                raise PairsFileError(f"{uri} line {line}: not valid UTF-8 ({exc.reason})") from None
            except ValueError as exc:
                raise PairsFileError(f"{uri} line {line}: invalid JSON ({exc})") from None
            yield line, record


def _parquet_records(handle: Any, uri: str) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet pairs file, numbered from 1; a file that is not (all) Parquet is named."""

    def unreadable(exc: Exception) -> PairsFileError:
        return PairsFileError(
            f"pairs file {uri!r} is not a readable Parquet file ({exc}); check the file, "
            "or set format: jsonl if it is JSON lines"
        )

    line = 0
    for batch in parquet_batches(open_parquet(handle, unreadable), None, 1024, unreadable):
        for record in batch.to_pylist():
            line += 1
            yield line, record


def read_pairs(source: Path | EvalPairs, limit: int | None = None) -> tuple[list[Pair], Counter[str]]:
    """The first ``limit`` usable pairs, plus skip counts by reason; only unreadable input is fatal.

    ``source`` is a JSONL path or an ``eval`` set of a recipe (whose ``columns`` rename fields).
    """
    columns = source.columns if isinstance(source, EvalPairs) else {}
    pairs: list[Pair] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for line, record in _records(source):
        if limit is not None and len(pairs) >= limit:
            break
        if columns and isinstance(record, dict):
            record = {**record, **{ours: record.get(theirs) for ours, theirs in columns.items()}}
        try:
            pair = _parse_pair(record, line, seen)
        except InvalidRow as exc:
            skipped[exc.reason] += 1
            continue
        seen.add(pair.pid)
        pairs.append(pair)
    return pairs, skipped


def _words(text: str) -> int:
    return len(text.split())


def build_tables(
    pairs: list[Pair], source: str, seed: int
) -> tuple[pa.Table, pa.Table, list[tuple[str, str]]]:
    """PROMPTS and RESPONSES shaped like the pipeline's, plus each pair's (chosen, rejected) response ids."""
    prompts: dict[str, list[Any]] = {name: [] for name in PROMPTS.names}
    responses: dict[str, list[Any]] = {name: [] for name in RESPONSES.names}
    sides: list[tuple[str, str]] = []
    for pair in pairs:
        prompt = {
            c.PROMPT_ID: pair.pid, c.MESSAGES: pair.messages, c.REFERENCES: pair.references,
            c.SOURCE: source, c.SOURCE_ROW: pair.line,
        }  # fmt: skip
        for name, value in prompt.items():
            prompts[name].append(value)
        first = chosen_first(pair.pid, seed)
        ids = (f"{pair.pid}:0", f"{pair.pid}:1")
        sides.append(ids if first else (ids[1], ids[0]))
        prompt_tokens = sum(_words(m[c.CONTENT]) for m in pair.messages)
        for index, text in enumerate((pair.chosen, pair.rejected) if first else (pair.rejected, pair.chosen)):
            row = {
                c.PROMPT_ID: pair.pid, c.RESPONSE_ID: ids[index], c.SAMPLE_INDEX: index, c.TEXT: text,
                c.FINISH_REASON: "stop", c.TRUNCATED: False, c.IS_EMPTY: not text.strip(),
                c.NUM_TOKENS: _words(text), c.PROMPT_TOKENS: prompt_tokens, c.PROMPT_TURNS_DROPPED: 0,
                c.POLICY_MODEL: "human-pairs",
                c.ENGINE: "none", c.TEMPERATURE: 0.0, c.TOP_P: 1.0, c.MAX_TOKENS: _words(text), c.SEED: 0,
            }  # fmt: skip
            for name, value in row.items():
                responses[name].append(value)
    return (
        pa.Table.from_pydict(prompts, schema=PROMPTS),
        pa.Table.from_pydict(responses, schema=RESPONSES),
        sides,
    )


def outcomes(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """+1 agree, -1 disagree, 0 tie; a missing score (NaN) is a tie because the labeler did not decide."""
    return np.nan_to_num(np.sign(chosen - rejected), nan=0.0).astype(np.int8)


def bootstrap_ci(agree: np.ndarray, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of accuracy over resampled pairs.

    Every row gets a fresh Generator from the same seed, so all labelers are judged on the same
    resamples and their intervals are comparable. Resamples go in chunks so memory stays bounded.
    """
    rng, n = np.random.default_rng(seed), len(agree)
    chunk = max(1, 4_000_000 // n)
    means = [
        agree[rng.integers(0, n, size=(min(chunk, N_RESAMPLES - done), n))].mean(axis=1)
        for done in range(0, N_RESAMPLES, chunk)
    ]
    low, high = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(low), float(high)


def summarise(name: str, outcome: np.ndarray, seed: int, seconds: float | None = None) -> dict[str, Any]:
    """Ties count against accuracy (an undecided labeler gives the pipeline no pair), hence both rates."""
    agree, disagree = int((outcome > 0).sum()), int((outcome < 0).sum())
    n = len(outcome)
    low, high = bootstrap_ci((outcome > 0).astype(np.float64), seed)
    decided = agree + disagree
    return {
        "labeler": name, "n": n, "agree": agree, "disagree": disagree, "tie": n - decided,
        "accuracy": agree / n, "ci_low": low, "ci_high": high,
        "accuracy_decided": agree / decided if decided else None,
        "seconds": None if seconds is None else round(seconds, 3),
    }  # fmt: skip


def _side_scores(scores: dict[str, float | None], sides: list[tuple[str, str]]) -> np.ndarray:
    """(chosen, rejected) score per pair; a response with no label row counts as unscored."""
    values = [[scores.get(rid) for rid in ids] for ids in sides]
    return np.array(values, dtype=np.float64).T  # None becomes NaN


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _stored(table: pa.Table, schema: pa.Schema, area: WorkArea, role: str) -> ShardResult:
    """``table`` as a content-addressed input file of the cache, so labels are keyed by what they read."""
    digest = hashlib.sha256()
    for batch in table.to_batches():
        digest.update(batch.serialize())
    uri = join_uri(area.root, "inputs", f"{digest.hexdigest()[:32]}.{role}.parquet")
    checksum = None if area.fresh else sha256_of(uri)
    if checksum is None:
        checksum = sha256_of(write_table(table, uri, schema, what=f"eval {role}"))
        assert checksum is not None
    return ShardResult(uri, table.num_rows, StageStats(role), checksum)


@dataclass(frozen=True)
class Scored:
    """What the labelers said about the pairs, kept for refitting: labels, sides, texts, prompt groups."""

    labels: pa.Table
    sides: list[tuple[str, str]]  # (chosen, rejected) response ids per pair
    lengths: pl.DataFrame  # response id and text, for length control
    groups: list[str]  # the conversation of each pair: folds split by it


def evaluate(
    recipe: Recipe, pairs: list[Pair], source: str, seed: int, area: WorkArea | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Scored]:
    """One row per labeler, then the aggregate, then the length baseline; each pair's scores; the labels.

    The per-pair (chosen, rejected) scores let any subset be summarised again
    without rerunning the models (``summarise_subset``). With ``area``, each
    labeler's scores are kept there under the pipeline's own resume keys (labeler
    settings without its weight, code version, checksums of the pairs it read):
    a rerun recomputes only labelers whose settings changed, and a weight change
    costs nothing but the aggregate. The aggregate is the recipe's own (weights,
    scale, length control), with the run-wide numbers taken over these pairs.
    """
    if area is None:
        with tempfile.TemporaryDirectory(prefix="eval-labelers-") as scratch:
            return evaluate(recipe, pairs, source, seed, WorkArea(scratch))
    prompts, responses, sides = build_tables(pairs, source, seed)
    rows, tables = [], []
    per_pair: list[dict[str, Any]] = [
        {"id": p.pid, "line": p.line, "lengths": [len(p.chosen), len(p.rejected)], "scores": {}}
        for p in pairs
    ]

    def record(name: str, scores: dict[str, float | None]) -> np.ndarray:
        both = _side_scores(scores, sides)
        for entry, chosen, rejected in zip(per_pair, both[0], both[1], strict=True):
            entry["scores"][name] = [_finite(chosen), _finite(rejected)]
        return outcomes(*both)

    stored = (_stored(prompts, PROMPTS, area, "prompts"), _stored(responses, RESPONSES, area, "responses"))
    # One call for all: the labelers not found finished read their models in one pass per engine.
    for config, part in zip(recipe.labelers, label_parts(recipe.labelers, area, *stored), strict=True):
        labels = read_table(part.files["data"], LABELS)
        tables.append(labels)
        scores = dict(zip(labels[c.RESPONSE_ID].to_pylist(), labels[c.SCORE].to_pylist(), strict=True))
        row = summarise(config.name, record(config.name, scores), seed, part.stats.seconds)
        # What a model read cost, like the seconds: of this run or, when reused, of the one that made it.
        cost = {k: part.stats.counts[k] for k in (SCORED, JOINTLY) if part.stats.counts.get(k)}
        rows.append({**row, **cost, "reused": part.resumed})
    all_labels = pa.concat_tables(tables)
    lengths = pl.DataFrame(
        {c.RESPONSE_ID: responses[c.RESPONSE_ID].to_pylist(), c.TEXT: responses[c.TEXT].to_pylist()}
    )
    aggregation = Aggregation.of(recipe)
    numbers = run_stats(wide_scores(all_labels, aggregation.signals, lengths), aggregation)
    frame = aggregate_scores(all_labels, aggregation, numbers, lengths)
    aggregate = dict(zip(frame[c.RESPONSE_ID].to_list(), frame[AGG].to_list(), strict=True))
    rows.append(summarise("aggregate", record("aggregate", aggregate), seed))
    lengths_np = np.array([[len(p.chosen), len(p.rejected)] for p in pairs], dtype=np.float64).T
    rows.append(summarise(LENGTH_ROW, outcomes(*lengths_np), seed))
    groups = [prompt_id(p.messages) for p in pairs]
    return rows, per_pair, Scored(all_labels, sides, lengths, groups)


def pair_features(scored: Scored, aggregation: Aggregation) -> np.ndarray:
    """Pairs × signals: each signal's feature difference chosen − rejected, 0 where it scored neither."""
    wide = wide_scores(scored.labels, aggregation.signals, scored.lengths)
    featured = features(wide, aggregation, run_stats(wide, aggregation))
    index = {rid: i for i, rid in enumerate(featured[c.RESPONSE_ID].to_list())}
    values = featured.select([feature(s) for s in aggregation.signals]).to_numpy().astype(np.float64)
    missing = np.full(len(aggregation.signals), np.nan)
    chosen = np.array([values[index[a]] if a in index else missing for a, _ in scored.sides])
    rejected = np.array([values[index[b]] if b in index else missing for _, b in scored.sides])
    return np.nan_to_num(chosen - rejected, nan=0.0)


def fit_report(
    recipe: Recipe, scored: Scored, seed: int, folds: int, scales: list[str], residual: bool
) -> tuple[list[dict[str, Any]], FitResult]:
    """Equal weights and fitted weights (cross-validated), as rows beside the single signals.

    Every candidate scale gets its own feature matrix; which one the weights use is chosen
    inside the folds, like the L2 strength (``steps.fit_weights``).
    """
    signals = recipe.signals
    equal = dict.fromkeys(signals, 1.0)
    matrices = {scale: pair_features(scored, Aggregation(equal, scale, residual)) for scale in scales}  # type: ignore[arg-type]
    fit = fit_weights(matrices, signals, scored.groups, folds, seed)
    suffix = ", length residual" if residual else ""
    rows = [
        summarise(f"equal weights ({scale}{suffix})", np.sign(x.sum(axis=1)).astype(np.int8), seed)
        for scale, x in matrices.items()
    ]
    fitted = summarise(f"fitted ({folds}-fold CV{suffix})", np.sign(fit.oof_margin).astype(np.int8), seed)
    return [*rows, fitted], fit


def write_recipe(
    recipe_arg: str,
    out: Path,
    fit: FitResult,
    fitted_row: dict[str, Any],
    rows: list[dict[str, Any]],
    residual: bool,
    pairs_path: Path,
    domain: str,
) -> Recipe:
    """The recipe with the fitted weights, scale and length control, and where they came from.

    Starts from the recipe file as written (not a dump of every default), so the result reads
    like the original; YAML comments are lost, so the header says what produced the file.
    """
    source = resolve_recipe_path(recipe_arg)
    data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    for entry in data.get("labelers", []):
        name = entry.get("name") or Recipe.model_validate({"name": "x", "labelers": [entry]}).signals[0]
        entry["weight"] = float(f"{fit.weights[name]:.4g}")
    pairing = data.setdefault("pairing", {})
    pairing["scale"] = fit.choice.scale
    if residual:
        pairing["length_control"] = {**(pairing.get("length_control") or {}), "residual": True}
    singles = [r for r in rows if r["labeler"] in fit.signals]
    best = max(singles, key=lambda r: r["accuracy"])
    equal = next(r for r in rows if r["labeler"].startswith(f"equal weights ({fit.choice.scale}"))
    pairing["weights_fit"] = {
        "pairs": str(pairs_path), "sha256": sha256_of(str(pairs_path)), "domain": domain,
        "n": fitted_row["n"],
        "folds": fit.folds, "cv_accuracy": round(fitted_row["accuracy"], 4),
        "ci_low": round(fitted_row["ci_low"], 4), "ci_high": round(fitted_row["ci_high"], 4),
        "best_single": best["labeler"], "best_single_accuracy": round(best["accuracy"], 4),
        "equal_weights_accuracy": round(equal["accuracy"], 4),
    }  # fmt: skip
    recipe = Recipe.model_validate(data)  # never write a recipe that would not load
    header = (
        f"# Written by `python -m flows.eval_labelers --fit` from {source} and {pairs_path}.\n"
        f"# Weights fitted on {domain!r} pairs; signs need not carry to another domain.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return recipe


def eval_overlap(recipe: Recipe, fitted_on: list[Pair]) -> list[str]:
    """A line per ``eval`` set of ``recipe`` sharing pairs with the fit: its card numbers are in-sample."""
    seen = {(p.pid.split("@")[0], p.chosen, p.rejected) for p in fitted_on}
    lines = []
    for spec in recipe.eval.pairs if recipe.eval is not None else []:
        pairs, _ = read_pairs(spec, spec.limit)
        shared = sum((p.pid.split("@")[0], p.chosen, p.rejected) in seen for p in pairs)
        if shared:
            lines.append(
                f"{shared} of the {len(pairs)} pairs of eval set {spec.label!r} were fitted on, so the "
                "card's numbers for that set are partly in-sample; measure on pairs the fit did not see"
            )
    return lines


def format_weights(fit: FitResult) -> str:
    lines = [f"fitted weights (scale {fit.choice.scale}, L2 {fit.choice.lam:g}; folds chose "
             + ", ".join(f"{c.scale}/{c.lam:g}" for c in fit.fold_choices) + "):"]  # fmt: skip
    lines += [
        f"  {name:<24} {weight:+.4f}"
        + ("  (scored none of these pairs: weight 0, left out)" if weight == 0 else "")
        for name, weight in fit.weights.items()
    ]
    return "\n".join(lines)


class LabelQualityError(RuntimeError):
    """The aggregate missed ``eval.min_accuracy``: the run publishes nothing (exit 1)."""


def check_eval_sets(recipe: Recipe) -> None:
    """Every ``eval`` set reads and has usable pairs: a config error, before any model loads."""
    for spec in recipe.eval.pairs if recipe.eval is not None else []:
        pairs, skipped = read_pairs(spec, spec.limit)
        if not pairs:
            raise PairsFileError(f"eval pairs {spec.label}: no usable pairs (skipped: {dict(skipped)})")


def measure_recipe(recipe: Recipe, area: WorkArea) -> dict[str, Any] | None:
    """The recipe's labelers and aggregate against each of its ``eval`` sets, for the card and stats.json.

    Scores are cached in ``area`` under the labelers' resume keys, so a rerun of the same
    recipe reads them back; raises ``LabelQualityError`` when ``min_accuracy`` is missed.
    """
    if recipe.eval is None:
        return None
    started = time.perf_counter()
    sets = []
    for spec in recipe.eval.pairs:
        pairs, skipped = read_pairs(spec, spec.limit)
        rows, _, _ = evaluate(recipe, pairs, spec.label, recipe.sampling.seed, area)
        sets.append({
            "name": spec.label, "source": f"built-in {spec.builtin}" if spec.builtin else spec.location,
            "domain": spec.domain, "n": len(pairs),
            "skipped": dict(sorted(skipped.items())), "rows": rows,
        })  # fmt: skip
    result = {
        "sets": sets,
        "min_accuracy": recipe.eval.min_accuracy,
        "seconds": time.perf_counter() - started,
    }
    floor = recipe.eval.min_accuracy
    misses = [
        f"{s['name']} ({s['domain']}, n={s['n']}): aggregate {row['accuracy']:.3f} "
        f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] < {floor}"
        for s in sets
        for row in s["rows"]
        if floor is not None and row["labeler"] == "aggregate" and row["accuracy"] < floor
    ]
    if misses:
        best = max(
            (r for s in sets for r in s["rows"] if r["labeler"] != LENGTH_ROW), key=lambda r: r["accuracy"]
        )
        raise LabelQualityError(
            "the labels do not agree with people well enough (eval.min_accuracy): "
            + "; ".join(misses)
            + f". Best row: {best['labeler']} {best['accuracy']:.3f}. Nothing was published; the previous "
            "dataset, if any, is unchanged. Fit the weights on pairs from your domain "
            "(python -m flows.eval_labelers --fit --write-recipe) or change the labelers."
        )
    return result


def summarise_subset(report: dict[str, Any], first: int) -> list[dict[str, Any]]:
    """The rows a ``--limit first`` run would print, from a saved report's per-pair scores.

    Labels do not depend on which other pairs are in the run (up to float noise
    in batching), nor do the coin flips (keyed on pair ids), so this equals the
    limited run without spending its model time. Seconds are not known.
    """
    chosen_rows = report["pairs"][:first]
    names = list(chosen_rows[0]["scores"]) if chosen_rows else []
    rows = []
    for name in names:
        both = np.array([entry["scores"][name] for entry in chosen_rows], dtype=np.float64).T
        rows.append(summarise(name, outcomes(*both), report["seed"]))
    lengths = np.array([entry["lengths"] for entry in chosen_rows], dtype=np.float64).T
    rows.append(summarise(LENGTH_ROW, outcomes(*lengths), report["seed"]))
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _seconds(row: dict[str, Any]) -> str:
    """A labeler's compute time; scores found in the cache say so (the time is from when they were made).

    Labelers scored in one pass with others show an equal share of it (``steps.labelers.joint``).
    """
    if row["seconds"] is None:
        return "-"
    shared = " (shared pass)" if row.get(JOINTLY) else ""
    return f"{row['seconds']:.2f}" + shared + (" (cached)" if row.get("reused") else "")


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "labeler", "n", "agree", "disagree", "tie", "accuracy [95% CI]", "accuracy on decided", "seconds"
    ]  # fmt: skip
    body = [
        [
            r["labeler"], str(r["n"]), str(r["agree"]), str(r["disagree"]), str(r["tie"]),
            f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
            _fmt(r["accuracy_decided"]), _seconds(r),
        ]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.eval_labelers", description="Labeler vs human.")
    parser.add_argument("--pairs", required=True, type=Path, help="JSONL of {id, prompt, chosen, rejected}")
    parser.add_argument("--recipe", default="default", help="a YAML path or a recipe name in pipelines/")
    parser.add_argument("--limit", type=int, default=None, help="only the first N usable pairs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the coin flips and the bootstrap")
    parser.add_argument("--json", type=Path, help="default: outputs/eval_labelers/<recipe name>.json")
    parser.add_argument(
        "--cache",
        default=str(OUTPUT_DIR / ".work"),
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
    args = parser.parse_args(argv)
    if (args.write_recipe or args.domain) and not args.fit:
        parser.error("--write-recipe and --domain need --fit")
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    return args


def _residual(recipe: Recipe) -> bool:
    control = recipe.pairing.length_control
    return control is not None and control.residual


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
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
    except (RecipeError, PairsFileError, ModelSpecError, EngineCrashError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(pairs)} pairs from {args.pairs}; skipped: {dict(sorted(skipped.items())) or 'none'}")
    cache = WorkArea(args.cache, fresh=args.fresh)
    rows, per_pair, scored = evaluate(recipe, pairs, str(args.pairs), args.seed, cache)
    fit: FitResult | None = None
    if args.fit:
        started = time.perf_counter()
        residual = _residual(recipe) if args.length_control == "recipe" else args.length_control == "residual"
        scales = ["zscore", "spread"] if args.scale == "auto" else [args.scale]
        try:
            extra, fit = fit_report(recipe, scored, args.seed, args.folds, scales, residual)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
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
    out = args.json or OUTPUT_DIR / f"{recipe.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "recipe": recipe.name, "pairs_file": str(args.pairs), "limit": args.limit, "seed": args.seed,
        "n_pairs": len(pairs), "skipped": dict(sorted(skipped.items())), "resamples": N_RESAMPLES,
        "rows": rows, "pairs": per_pair,
        "fit": None if fit is None else {
            "weights": fit.weights, "scale": fit.choice.scale, "l2": fit.choice.lam, "folds": fit.folds,
            "fold_choices": [[c.scale, c.lam] for c in fit.fold_choices],
        },
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
