"""BLEU: our labeler stage against a ``sacrebleu.sentence_bleu`` loop, with identical numbers.

Ours is the real stage (``build_labeler(...).label`` over Arrow tables, sacrebleu variant);
the baseline is what a user writes by hand: one ``sentence_bleu`` call per response. Both
score the same responses against the same two references per prompt, and every score must
agree to 1e-9, or the speed-up means nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench.common import Row, column_map, finish, interleave, log, median_ratio, parser, total_seconds
from bench.data import prompts_table, responses_table
from schemas import columns
from schemas.recipe import BleuConfig
from steps.labelers.registry import build_labeler

NAME = "bleu"
PER_PROMPT = 4
TOLERANCE = 1e-9


def run(args: argparse.Namespace) -> dict[str, Any]:
    import sacrebleu

    started = time.perf_counter()
    total = args.responses or (400 if args.quick else 100_000)
    # One round: the sacrebleu loop alone takes ~80 s on 2 cores, and the gap is far beyond noise.
    rounds = 1
    prompts = prompts_table(max(1, total // PER_PROMPT))
    responses = responses_table(prompts, PER_PROMPT)
    refs = column_map(prompts, columns.PROMPT_ID, columns.REFERENCES)
    ids = responses.column(columns.RESPONSE_ID).to_pylist()
    jobs = [
        (text, refs[pid])
        for pid, text in zip(
            responses.column(columns.PROMPT_ID).to_pylist(),
            responses.column(columns.TEXT).to_pylist(),
            strict=True,
        )
    ]
    n_refs = sorted({len(r) for r in refs.values()})
    log(f"bleu: {len(jobs)} responses, {len(refs)} prompts, references per prompt {n_refs}")

    def labeler_scores(variant: str) -> dict[str, float | None]:
        labeler = build_labeler(BleuConfig(kind="bleu", variant=variant))  # type: ignore[arg-type]
        table, _ = labeler.label(prompts, responses)
        return column_map(table, columns.RESPONSE_ID, columns.SCORE)

    def ours() -> dict[str, float | None]:
        return labeler_scores("sacrebleu")

    def loop() -> dict[str, float]:
        return {
            rid: sacrebleu.sentence_bleu(hyp, list(r)).score for rid, (hyp, r) in zip(ids, jobs, strict=True)
        }

    runs = interleave({"ours": ours, "sacrebleu": loop}, rounds)
    ours_scores, base_scores = runs["ours"][0].value, runs["sacrebleu"][0].value
    diffs = [abs((ours_scores.get(rid) or 0.0) - base_scores[rid]) for rid in ids]
    missing = sum(1 for rid in ids if ours_scores.get(rid) is None)
    max_diff = max(diffs) if diffs else 0.0
    exact = sum(1 for d in diffs if d == 0.0)
    identical = missing == 0 and len(ours_scores) == len(base_scores) and max_diff <= TOLERANCE
    ours_s, base_s = total_seconds(runs["ours"]), total_seconds(runs["sacrebleu"])
    n = len(jobs) * rounds
    bleuberi = interleave({"bleuberi": lambda: labeler_scores("bleuberi")}, 1)["bleuberi"]
    workload = f"{len(jobs):,} responses × {n_refs[-1]} refs"
    rows = [
        Row(
            NAME,
            "responses/s, labeler (sacrebleu variant) vs sentence_bleu loop",
            workload,
            n / ours_s,
            n / base_s,
            "resp/s",
            median_ratio(runs["ours"], runs["sacrebleu"]),
            # Was 10x; BLEU is under 1% of a default run's time (the card's "What it cost"), so
            # what matters is equal scores and never being slower than sacrebleu's own loop.
            target=1.0,
            note=f"identical: {identical}, max Δ {max_diff:.1e}; BLEU is <1% of a default run",
        ),
        Row(
            NAME,
            "responses/s, labeler (bleuberi variant, the default)",
            workload,
            len(jobs) / bleuberi[0].seconds,
            None,
            "resp/s",
            None,
        ),
    ]
    details = {
        "responses": len(jobs),
        "prompts": len(refs),
        "references_per_prompt": n_refs,
        "rounds": rounds,
        "seconds": {
            "ours": [r.seconds for r in runs["ours"]],
            "sacrebleu": [r.seconds for r in runs["sacrebleu"]],
            "bleuberi": bleuberi[0].seconds,
        },
        "identical": identical,
        "max_abs_diff": max_diff,
        "exactly_equal": exact,
        "missing_scores": missing,
        "sacrebleu_version": sacrebleu.__version__,
    }
    return finish(NAME, args, rows, details, started)


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--responses", type=int, help="number of responses (default 100k; --quick 400)")
    payload = run(p.parse_args(argv))
    return 0 if payload["details"]["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
