"""Scaling and memory: 10k → 50k → 200k prompts × 4 responses through the real stages.

The prompt stage runs a second time, in its own process, with ``prompts.decontaminate`` against a
10k-prompt eval set (one item copies a built-in prompt, so ~2.6% of the pool is contaminated): the
time it adds and its peak RSS are reported as ratios against the plain prompt stage of the same
size and run.

The policy is the null engine (instant canned answers), so what is measured is the
pipeline's own cost: prompt loading, sampling bookkeeping, BLEU labels, pairing,
consistency and publication. Every stage of every size runs in a fresh process that
reports its own peak RSS, so one size or stage cannot inflate another's number. A stage
that streams shard by shard keeps a flat peak as prompts grow; one that gathers
everything grows with them, and the table names it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, Row, finish, log, parser, peak_rss_mib, ratio, run_measured

NAME = "scaling"
STAGES = ("prompts", "sampling", "labeling", "pairing", "consistency", "publish")
FULL_SIZES = (10_000, 50_000, 200_000)
QUICK_SIZES = (100, 400)
GROWTH_TARGET = 1.5  # peak RSS at the largest size over the smallest; "flat" below this
DECONTAMINATED = "prompts_decontaminated"  # the prompt stage with prompts.decontaminate on
EVAL_SIZE, QUICK_EVAL_SIZE = 10_000, 200
# Eval items that copy a pool prompt. The pool cycles the built-in prompts (a variant number keeps
# ids unique), so one copy contaminates that prompt's every variant: 1 of 39, ~2.6% of any size.
EVAL_COPIES = 1


def _recipe(quick: bool) -> Any:
    from schemas.recipe import OutputConfig, Recipe

    # 1000 prompts per shard: the default 16 is sized for model-bound stages, and 12,500 shards of
    # canned answers would measure file-system overhead instead of the pipeline.
    per_shard = 50 if quick else 1_000
    return Recipe(name="bench-scaling", output=OutputConfig(prompts_per_shard=per_shard))


# ------------------------------------------------------------------ worker (one stage, one process)


def _shards(work: Path, stage: str) -> list[str]:
    return sorted(str(p) for p in (work / stage).glob("shard-*.parquet"))


def _save_stats(work: Path, stage: str, stats: Any) -> None:
    (work / "stats").mkdir(exist_ok=True)
    (work / "stats" / f"{stage}.json").write_text(json.dumps(stats.to_dict()))


def _run_stage(stage: str, work: Path, quick: bool) -> int:
    """Run one stage over every shard with the pipeline's own functions; returns rows produced."""
    from schemas.recipe import FilePrompts
    from schemas.records import PROMPTS
    from steps.base import merge_stats
    from steps.run.files import shard_uri, write_table

    recipe = _recipe(quick)
    if stage in ("prompts", DECONTAMINATED):
        from steps.base import StageStats
        from steps.prompts.normalise import stream_prompts
        from steps.run.stages import PromptFilters

        # As steps.run.stages.prompt_shards does: the source streamed one shard at a time.
        stats = StageStats("prompts")
        source = FilePrompts(source="file", uri=str(work / "source.jsonl"))
        filters, folder = PromptFilters(), "prompts"
        if stage == DECONTAMINATED:
            from schemas.recipe import DecontaminationConfig
            from steps.prompts.decontaminate import Decontaminator
            from steps.run.resume import WorkArea

            start = time.perf_counter()
            spec = {"name": "bench_eval", "uri": str(work / "eval.jsonl")}
            config = DecontaminationConfig(sets=[spec])
            filters = PromptFilters(Decontaminator(config, WorkArea(str(work / ".work"))))
            (work / "index_seconds.json").write_text(json.dumps(time.perf_counter() - start))
            folder = "prompts-decontaminated"
        for i, shard in enumerate(stream_prompts(source, stats, recipe.output.prompts_per_shard)):
            shard = filters.apply(shard, stats)
            write_table(shard, shard_uri(str(work), folder, i), PROMPTS, what="prompts")
        _save_stats(work, stage, stats)
        return stats.rows_out
    prompts = _shards(work, "prompts")
    if stage == "sampling":
        import steps.sampling as sampling
        from bench.data import NullEngine

        engine = NullEngine()
        # The engine is the boundary being replaced: sample_shard itself runs unchanged.
        sampling.load_engine = lambda policy: engine  # type: ignore[assignment]
        results = [
            sampling.sample_shard(recipe, p, shard_uri(str(work), "responses", i)).result
            for i, p in enumerate(prompts)
        ]
    elif stage == "labeling":
        from steps.labelers.registry import label_shard

        responses = _shards(work, "responses")
        results = [
            label_shard(recipe, p, r, shard_uri(str(work), "labels", i))
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
    elif stage == "pairing":
        from steps.pairing.pairs import pair_shard

        triples = zip(prompts, _shards(work, "responses"), _shards(work, "labels"), strict=True)
        results = [
            pair_shard(recipe, p, r, lab, shard_uri(str(work), "pairs", i))
            for i, (p, r, lab) in enumerate(triples)
        ]
    elif stage == "consistency":
        from steps.pairing.consistency import consistency_stage

        kept, dropped = shard_uri(str(work), "kept", 0), shard_uri(str(work), "dropped", 0)
        stats, report = consistency_stage(recipe, _shards(work, "pairs"), kept, dropped)
        (work / "length.json").write_text(json.dumps(report))
        _save_stats(work, stage, stats)
        return stats.rows_out
    elif stage == "publish":
        from steps.publish.release import publish

        stages = {s: json.loads((work / "stats" / f"{s}.json").read_text()) for s in STAGES[:-1]}
        stats = {
            "prompts": {"source": "bench:scaling"},
            "stages": stages,
            "length": json.loads((work / "length.json").read_text()),
        }
        manifest = publish(
            recipe, str(work / "dataset"), _shards(work, "kept"), stats, _shards(work, "dropped")
        )
        return int(manifest["splits"].get("train", 0))
    else:
        raise ValueError(f"unknown stage {stage!r}")
    _save_stats(work, stage, merge_stats(stage, [r.stats for r in results]))
    return sum(r.rows for r in results)


def worker(stage: str, work: Path, quick: bool) -> None:
    base = peak_rss_mib()  # interpreter + pipeline imports, before any data
    start = time.perf_counter()
    rows = _run_stage(stage, work, quick)
    result = {
        "stage": stage,
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "import_rss_mib": base,
        "peak_rss_mib": peak_rss_mib(),
    }
    (work / f"result-{stage}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------ driver


def _write_source(path: Path, size: int) -> None:
    from bench.data import prompts_table
    from schemas import columns

    table = prompts_table(size)
    with path.open("w", encoding="utf-8") as handle:
        for messages, refs in zip(
            table.column(columns.MESSAGES).to_pylist(),
            table.column(columns.REFERENCES).to_pylist(),
            strict=True,
        ):
            handle.write(json.dumps({"prompt": messages, "references": refs}, ensure_ascii=False) + "\n")


def _write_eval_set(path: Path, size: int) -> None:
    """An eval set of ``size`` prompts: word salads of the built-in references, plus a copied pool prompt.

    Its n-grams rarely meet the pool's by chance (as a real benchmark's), and ``EVAL_COPIES`` of its
    items are pool prompts word for word, so the match path runs too.
    """
    import random

    from bench.data import builtin, perturb, prompts_table
    from schemas import columns

    rng = random.Random(7)
    references = [ref for _, refs in builtin() for ref in refs]
    copies = prompts_table(EVAL_COPIES).column(columns.MESSAGES).to_pylist()
    with path.open("w", encoding="utf-8") as handle:
        for i in range(size):
            if i < len(copies):
                text = copies[i][-1][columns.CONTENT]
            else:
                salad = [perturb(rng.choice(references), rng) for _ in range(2)]
                text = f"Item {i}: {' '.join(salad)}"
            handle.write(json.dumps({"prompt": text}, ensure_ascii=False) + "\n")


def measure_size(size: int, scratch: Path, quick: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"scaling-{size}-", dir=scratch))
    try:
        _write_source(work / "source.jsonl", size)
        _write_eval_set(work / "eval.jsonl", QUICK_EVAL_SIZE if quick else EVAL_SIZE)
        stages: dict[str, Any] = {}
        wall = time.perf_counter()
        for stage in (*STAGES, DECONTAMINATED):
            cmd = [sys.executable, "-m", "bench.scaling", "--worker", stage, "--work", str(work)]
            outcome = run_measured([*cmd, *(["--quick"] if quick else [])])
            if outcome["returncode"] != 0:
                raise RuntimeError(
                    f"scaling stage {stage} at {size} prompts failed:\n{outcome['stderr'][-3000:]}"
                )
            result = json.loads((work / f"result-{stage}.json").read_text())
            if stage == DECONTAMINATED:
                result["index_seconds"] = json.loads((work / "index_seconds.json").read_text())
                saved = json.loads((work / "stats" / f"{stage}.json").read_text())
                result["drops"] = saved["drops"]
                result["filter_seconds"] = saved["timings"].get("decontaminate", 0.0)
            result["process_seconds"] = outcome["seconds"]
            result["peak_tree_rss_mib_sampled"] = outcome["peak_tree_rss_mib"]  # cross-check, 50 ms polls
            stages[stage] = result
            log(
                f"scaling {size:>7,}: {stage:<11} {result['seconds']:7.1f}s  "
                f"peak {result['peak_rss_mib']:6.0f} MiB  rows {result['rows']:,}"
            )
        wall = time.perf_counter() - wall
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decontaminated = stages.pop(DECONTAMINATED)  # a variant of the prompt stage, not one more stage
    peak_stage = max(stages, key=lambda s: stages[s]["peak_rss_mib"])
    return {
        "prompts": size,
        "decontamination": decontaminated,
        "stage_seconds": sum(s["seconds"] for s in stages.values()),
        "wall_seconds": wall,  # including one interpreter start and import per stage
        "peak_rss_mib": stages[peak_stage]["peak_rss_mib"],
        "peak_stage": peak_stage,
        "stages": stages,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    scratch = Path(args.out or DEFAULT_OUT) / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    results = [measure_size(size, scratch, args.quick) for size in sizes]
    small, large = results[0], results[-1]
    growth = {
        stage: ratio(large["stages"][stage]["peak_rss_mib"], small["stages"][stage]["peak_rss_mib"])
        for stage in STAGES
    }
    growing = [s for s, g in growth.items() if g is not None and g > GROWTH_TARGET]
    recipe = _recipe(args.quick)
    rows = [
        Row(
            NAME,
            "wall time, all stages (null engine)",
            f"{r['prompts']:,} prompts × 4",
            r["stage_seconds"],
            None,
            "s",
            None,
            note=f"peak RSS {r['peak_rss_mib']:.0f} MiB in {r['peak_stage']}; "
            f"{r['prompts'] / r['stage_seconds']:,.0f} prompts/s",
        )
        for r in results
    ]
    rows.append(
        Row(
            NAME,
            "peak RSS growth, largest / smallest size",
            f"{small['prompts']:,} → {large['prompts']:,} prompts",
            large["peak_rss_mib"],
            small["peak_rss_mib"],
            "MiB",
            ratio(large["peak_rss_mib"], small["peak_rss_mib"]),
            target=GROWTH_TARGET,
            direction="<=",
            note="grows in: " + (", ".join(f"{s} {growth[s]:.1f}×" for s in growing) if growing else "none"),
        )
    )
    eval_size = QUICK_EVAL_SIZE if args.quick else EVAL_SIZE
    for r in results:
        d, plain = r["decontamination"], r["stages"]["prompts"]
        rows.append(
            Row(
                NAME,
                "prompt stage with decontamination: time / without (same run)",
                f"{r['prompts']:,} prompts vs {eval_size:,}-prompt eval set",
                d["seconds"],
                plain["seconds"],
                "s",
                ratio(d["seconds"], plain["seconds"]),
                note=f"adds {d['seconds'] - plain['seconds']:.1f} s (matching {d['filter_seconds']:.1f} s, "
                f"index build {d['index_seconds']:.1f} s); peak RSS {d['peak_rss_mib']:.0f} vs "
                f"{plain['peak_rss_mib']:.0f} MiB "
                f"({ratio(d['peak_rss_mib'], plain['peak_rss_mib']) or 0:.2f}×); drops {d['drops']}",
            )
        )
    first_d, last_d = small["decontamination"], large["decontamination"]
    rows.append(
        Row(
            NAME,
            "peak RSS growth with decontamination, largest / smallest size",
            f"{small['prompts']:,} → {large['prompts']:,} prompts",
            last_d["peak_rss_mib"],
            first_d["peak_rss_mib"],
            "MiB",
            ratio(last_d["peak_rss_mib"], first_d["peak_rss_mib"]),
            target=GROWTH_TARGET,
            direction="<=",
        )
    )
    details = {
        "sizes": list(sizes),
        "responses_per_prompt": recipe.sampling.n,
        "prompts_per_shard": recipe.output.prompts_per_shard,
        "rows_per_file": recipe.output.rows_per_shard,
        "labelers": recipe.signals,
        "results": results,
        "peak_growth_by_stage": growth,
        "stages_not_flat": growing,
    }
    return finish(NAME, args, rows, details, started)


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument(
        "--sizes", type=int, nargs="+", help="prompt counts (default 10k 50k 200k; --quick 100 400)"
    )
    p.add_argument("--worker", choices=(*STAGES, DECONTAMINATED), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.work, args.quick)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
