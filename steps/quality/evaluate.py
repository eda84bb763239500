"""How often does each labeler agree with human preference pairs, with a bootstrap interval?

A labeler is only worth its compute if it picks the response people pick. The pairs go
through the very code the pipeline uses (``label_parts`` → ``Labeler.label`` →
``aggregate_scores``), so the number measured is the number the pipeline gets, set against
the "longer wins" baseline that BLEUBERI reports at 65% (docs/design.md, BLEU against
references). ``measure_recipe`` is the run's gate: a recipe's ``eval`` block, measured before
sampling, stops the run when the aggregate misses ``min_accuracy``.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from schemas import columns
from schemas.errors import RunError
from schemas.recipe import Recipe
from schemas.records import LABELS, PROMPTS, RESPONSES
from steps.base import ShardResult, StageStats
from steps.pairing.aggregate import (
    AGG,
    Aggregation,
    aggregate_scores,
    run_stats,
    wide_scores,
)
from steps.prompts.normalise import prompt_id
from steps.publish.cost import JOINTLY, SCORED
from steps.quality.pairs_file import Pair, chosen_first, read_pairs
from steps.run.files import join_uri, read_table, write_table
from steps.run.resume import WorkArea, sha256_of
from steps.run.stages import label_parts

N_RESAMPLES = 2000


LENGTH_ROW = "length (longer wins)"


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
            columns.PROMPT_ID: pair.pid, columns.MESSAGES: pair.messages, columns.REFERENCES: pair.references,
            columns.SOURCE: source, columns.SOURCE_ROW: pair.line,
        }  # fmt: skip
        for name, value in prompt.items():
            prompts[name].append(value)
        first = chosen_first(pair.pid, seed)
        ids = (f"{pair.pid}:0", f"{pair.pid}:1")
        sides.append(ids if first else (ids[1], ids[0]))
        prompt_tokens = sum(_words(m[columns.CONTENT]) for m in pair.messages)
        for index, text in enumerate((pair.chosen, pair.rejected) if first else (pair.rejected, pair.chosen)):
            row = {
                columns.PROMPT_ID: pair.pid, columns.RESPONSE_ID: ids[index], columns.SAMPLE_INDEX: index,
                columns.TEXT: text, columns.FINISH_REASON: "stop", columns.TRUNCATED: False,
                columns.IS_EMPTY: not text.strip(), columns.NUM_TOKENS: _words(text),
                columns.PROMPT_TOKENS: prompt_tokens, columns.PROMPT_TURNS_DROPPED: 0,
                columns.POLICY_MODEL: "human-pairs", columns.ENGINE: "none", columns.TEMPERATURE: 0.0,
                columns.TOP_P: 1.0, columns.MAX_TOKENS: _words(text), columns.SEED: 0,
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
        scores = dict(
            zip(labels[columns.RESPONSE_ID].to_pylist(), labels[columns.SCORE].to_pylist(), strict=True)
        )
        row = summarise(config.name, record(config.name, scores), seed, part.stats.seconds)
        # What a model read cost, like the seconds: of this run or, when reused, of the one that made it.
        cost = {k: part.stats.counts[k] for k in (SCORED, JOINTLY) if part.stats.counts.get(k)}
        rows.append({**row, **cost, "reused": part.resumed})
    all_labels = pa.concat_tables(tables)
    lengths = pl.DataFrame(
        {
            columns.RESPONSE_ID: responses[columns.RESPONSE_ID].to_pylist(),
            columns.TEXT: responses[columns.TEXT].to_pylist(),
        }
    )
    aggregation = Aggregation.of(recipe)
    numbers = run_stats(wide_scores(all_labels, aggregation.signals, lengths), aggregation)
    frame = aggregate_scores(all_labels, aggregation, numbers, lengths)
    aggregate = dict(zip(frame[columns.RESPONSE_ID].to_list(), frame[AGG].to_list(), strict=True))
    rows.append(summarise("aggregate", record("aggregate", aggregate), seed))
    lengths_np = np.array([[len(p.chosen), len(p.rejected)] for p in pairs], dtype=np.float64).T
    rows.append(summarise(LENGTH_ROW, outcomes(*lengths_np), seed))
    groups = [prompt_id(p.messages) for p in pairs]
    return rows, per_pair, Scored(all_labels, sides, lengths, groups)


class LabelQualityError(RunError):
    """The aggregate missed ``eval.min_accuracy``: the run publishes nothing (exit 1)."""


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
