"""Every benchmark in --quick mode: it runs, writes the JSON the summary reads, and its
"same answer" checks hold (BLEU equal to sacrebleu, the writer keeps every row, scores
match a raw forward pass). Timings are measured but never asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench import bleu, distilabel_prefs, distilabel_side, portability, sampling, scaling, scoring, writer
from bench.common import format_table

ROW_KEYS = {"bench", "metric", "workload", "ours", "baseline", "unit", "ratio", "target", "direction", "met"}


def load(out: Path, name: str) -> dict[str, Any]:
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["name"] == name and payload["quick"] is True
    assert payload["machine"]["cores"] >= 1
    assert payload["rows"], "a benchmark without a row in the table"
    for row in payload["rows"]:
        assert row.keys() >= ROW_KEYS
        assert row["bench"] == name
    format_table(payload["rows"])  # the summary can print it
    return payload


def test_bleu_scores_equal_sacrebleu(tmp_path: Path) -> None:
    assert bleu.main(["--quick", "--responses", "200", "--out", str(tmp_path)]) == 0
    payload = load(tmp_path, "bleu")
    details = payload["details"]
    assert details["responses"] == 200 and details["references_per_prompt"] == [2]
    assert details["identical"] and details["missing_scores"] == 0 and details["max_abs_diff"] <= 1e-9
    speed = payload["rows"][0]
    assert speed["ours"] > 0 and speed["baseline"] > 0 and speed["target"] == 1


def test_writer_keeps_every_row(tmp_path: Path) -> None:
    assert writer.main(["--quick", "--rows", "1500", "--out", str(tmp_path)]) == 0
    details = load(tmp_path, "writer")["details"]
    assert details["same_rows"] == {"ours": True, "raw": True}
    assert details["rows"] == 1500 and details["output_files"] == 2  # 1000 rows per file
    assert not list((tmp_path / "tmp").glob("writer-*")), "scratch files left behind"


def test_scaling_runs_every_stage_in_its_own_process(tmp_path: Path) -> None:
    assert scaling.main(["--quick", "--sizes", "60", "--out", str(tmp_path)]) == 0
    payload = load(tmp_path, "scaling")
    [result] = payload["details"]["results"]
    assert result["prompts"] == 60 and set(result["stages"]) == set(scaling.STAGES)
    assert result["stages"]["sampling"]["rows"] == 240  # 60 prompts × 4 canned answers
    assert 0 < result["stages"]["publish"]["rows"] <= 60
    assert all(stage["peak_rss_mib"] > 0 for stage in result["stages"].values())
    growth = payload["rows"][-1]
    assert growth["direction"] == "<=" and growth["ratio"] == pytest.approx(1.0)


def test_bench_main_writes_one_summary(tmp_path: Path) -> None:
    assert bench_main.main(["--quick", "--only", "bleu,writer", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"bleu", "writer"}
    assert all(entry["returncode"] == 0 and entry["json"] for entry in summary["benchmarks"].values())
    assert {row["bench"] for row in summary["rows"]} == {"bleu", "writer"}
    assert summary["machine"]["memory_gib"] is None or summary["machine"]["memory_gib"] > 0


@pytest.mark.model
def test_sampling_side_by_side(tmp_path: Path) -> None:
    assert sampling.main(["--quick", "--out", str(tmp_path)]) == 0
    details = load(tmp_path, "sampling")["details"]
    assert details["texts"] == 2  # 1 prompt × n=2
    assert all(details["tokens"][name] > 0 for name in ("single", "plain", "batched"))
    assert details["batched_texts_stable_across_rounds"]
    assert details["model_path"].endswith(".gguf")


@pytest.mark.model
def test_scoring_matches_raw_forward(tmp_path: Path) -> None:
    # fp32, so that batched and one-by-one sums agree to rounding (bf16 rounds each product).
    assert scoring.main(["--quick", "--dtype", "float32", "--out", str(tmp_path)]) == 0
    details = load(tmp_path, "scoring")["details"]
    density, follow = details["density_ratio"], details["follow_up"]
    assert density["scored"] == density["responses"] > 0
    assert density["max_abs_diff_logp"] < 0.05  # sums of ~100 fp32 log-probs, batched vs one by one
    assert follow["followups_per_response"] == scoring.K_FOLLOWUPS
    assert follow["scored"] == follow["responses"] > 0
    assert follow["max_abs_diff_score"] < 1e-2
    assert follow["tokens_through_network"]["ours"] < follow["tokens_through_network"]["naive"]


@pytest.mark.model
def test_distilabel_side_without_its_virtualenv_runs_our_side(tmp_path: Path) -> None:
    absent = tmp_path / "no-venv"
    args = ["--quick", "--no-install", "--venv", str(absent), "--out", str(tmp_path)]
    assert distilabel_side.main(args) == 0
    details = load(tmp_path, "distilabel_side")["details"]
    assert details["distilabel"] is None and details["distilabel_status"].startswith("skipped")
    assert details["ours"]["generations"] == distilabel_side.N_GENERATIONS
    assert 0 <= details["ours"]["pairs"] <= 1
    assert not absent.exists()  # --no-install never creates it


@pytest.mark.model
def test_portability_runs_both_builds_in_their_own_processes(tmp_path: Path) -> None:
    """The portable wheel stands in for the native one: the mechanism runs without a 7-minute compile."""
    from steps.engines import llama_build

    record = llama_build.read_record()
    if record is None:
        pytest.skip("llama-cpp-python was not installed by `make` (no build record to find its wheel)")
    args = ["--quick", "--native-wheel", str(record["wheel"]), "--out", str(tmp_path)]
    assert portability.main(args) == 0
    details = load(tmp_path, "portability")["details"]
    assert details["libraries"]["native"].startswith(str(tmp_path / ".llama-native"))
    assert not details["libraries"]["portable"].startswith(str(tmp_path))
    assert all(tokens[0] > 0 for tokens in details["tokens"].values())
    assert details["identical_texts"] == details["texts"] == 2  # the same build twice: the same texts


def test_distilabel_prefs_counts_unparsed_and_misaligned_ratings_against_the_judge() -> None:
    rows = [
        {"id": "a", "chosen_index": 0},
        {"id": "b", "chosen_index": 1},
        {"id": "c", "chosen_index": 0},
        {"id": "d", "chosen_index": 1},
        {"id": "e", "chosen_index": 0},
    ]
    ratings = {
        "a": [5, 2],  # chosen first, rated higher: agree
        "b": [5, 2],  # chosen second, rated lower: disagree
        "c": [3, 3],  # tie
        "d": [4, None],  # one rating unparsed
        "e": [5, 1, 1],  # three sections for two answers: not aligned, so not read
    }
    counts = distilabel_prefs.distilabel_agreement(rows, ratings)
    assert counts == {"agree": 1, "disagree": 1, "tie": 1, "unparsed": 2, "n": 5, "accuracy": 0.2}


def test_distilabel_prefs_feeds_both_judges_the_same_triples_in_the_same_order(tmp_path: Path) -> None:
    from schemas.recipe import Recipe
    from steps.quality.pairs_file import chosen_first, read_pairs

    cfg = {"model": "smollm2-135m-instruct", "n_ctx": 4096, "threads": 2, "n": 4, "temperature": 0.8,
           "top_p": 0.95, "max_tokens": 128}  # fmt: skip
    recipe = Recipe.model_validate(distilabel_prefs.our_recipe(cfg, 8))
    assert recipe.sampling.n == 4 and recipe.sampling.top_p == 0.95 and recipe.limit == 8
    assert [lab.kind for lab in recipe.labelers] == ["judge_pointwise"]
    assert recipe.labelers[0].model.model == recipe.policy.model and recipe.policy.engine == "llama_cpp"

    pairs, _ = read_pairs(distilabel_prefs.SHIPPED_PAIRS, limit=6)
    rows = distilabel_prefs.agreement_rows(distilabel_prefs.SHIPPED_PAIRS, 6, seed=3)
    assert [row["id"] for row in rows] == [p.pid for p in pairs]
    for pair, row in zip(pairs, rows, strict=True):
        assert row["generations"][row["chosen_index"]] == pair.chosen
        assert row["generations"][1 - row["chosen_index"]] == pair.rejected
        assert (row["chosen_index"] == 0) == chosen_first(pair.pid, 3)
    multi = next(p for p in pairs if len(p.messages) > 1)
    text = distilabel_prefs.transcript(multi.messages)
    assert text.startswith("User: ") and multi.messages[-1]["content"] in text


@pytest.mark.model
def test_distilabel_prefs_without_its_virtualenv_runs_our_cli_and_judge(
    tmp_path: Path, prefect_home: Path
) -> None:
    absent = tmp_path / "no-venv"
    pairs = str(distilabel_prefs.SHIPPED_PAIRS)
    args = ["--quick", "--no-install", "--venv", str(absent), "--out", str(tmp_path), "--pairs", "2",
            "--pairs-file", pairs]  # fmt: skip
    assert distilabel_prefs.main(args) == 0
    payload = load(tmp_path, "distilabel_prefs")
    details = payload["details"]
    assert details["distilabel_status"].startswith("skipped") and not absent.exists()
    for job in (details["ours"]["job"], details["ours"]["job_judge_on_transformers"]):
        assert 0 <= job["pairs"] <= 1 and job["tokens"] > 0
    agreement = details["ours"]["agreement"]
    assert agreement["n"] == 2 and agreement["agree"] + agreement["disagree"] + agreement["tie"] == 2
    assert payload["rows"][0]["metric"].startswith("wall time") and len(payload["rows"]) == 5
