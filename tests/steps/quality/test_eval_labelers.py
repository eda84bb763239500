"""Labeler-vs-human evaluation: hand-predictable BLEU pairs, coin flips, skips, the CLI and its JSON."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows.cli import eval_labelers_main as main
from schemas import columns
from steps.quality.evaluate import bootstrap_ci, build_tables, outcomes, summarise_subset
from steps.quality.pairs_file import PairsFileError, chosen_first, read_pairs

REF = "the cat sat on the mat by the open door"
OTHER = "dogs run fast"


def pair(
    i: int, chosen: str, rejected: str, reference: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    record: dict[str, Any] = {"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}"}]}
    record.update(chosen=chosen, rejected=rejected, **extra)
    if reference is not None:
        record["reference"] = reference
    return record


# BLEU: 3 agree (chosen == reference), 1 disagree, 2 ties (no reference).
# Length: 4 agree (chosen longer), 1 disagree, 1 tie (equal length).
PAIRS = [
    pair(0, REF, OTHER, [REF]),
    pair(1, REF, OTHER, [REF]),
    pair(2, REF, OTHER, [REF, "something else entirely"]),
    pair(3, OTHER, REF, [REF]),
    pair(4, "abc def", "xyz uvw"),
    {**pair(5, "a longer answer here", "short"), "prompt": "a plain string prompt"},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "pairs.jsonl", [json.dumps(p) for p in PAIRS])


def write_recipe(tmp_path: Path, labelers: str = "  - {kind: bleu, name: bleu}") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: eval-test\nlabelers:\n{labelers}\n", encoding="utf-8")
    return path


def run(tmp_path: Path, pairs: Path, *extra: str, recipe: Path | None = None) -> dict[str, Any]:
    out = tmp_path / "report.json"
    recipe = recipe or write_recipe(tmp_path)
    cache = ["--cache", str(tmp_path / "cache")]
    assert main(["--pairs", str(pairs), "--recipe", str(recipe), "--json", str(out), *cache, *extra]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def rows_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["labeler"]: row for row in report["rows"]}


def counts(row: dict[str, Any]) -> tuple[int, int, int, int]:
    return row["n"], row["agree"], row["disagree"], row["tie"]


def test_bleu_and_length_counts_are_exact(tmp_path: Path, pairs_file: Path) -> None:
    rows = rows_by_name(run(tmp_path, pairs_file))
    assert counts(rows["bleu"]) == (6, 3, 1, 2)
    assert rows["bleu"]["accuracy"] == pytest.approx(3 / 6)
    assert rows["bleu"]["accuracy_decided"] == pytest.approx(3 / 4)
    assert counts(rows["aggregate"]) == (6, 3, 1, 2)
    assert counts(rows["length (longer wins)"]) == (6, 4, 1, 1)
    for row in rows.values():
        assert 0.0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1.0
    assert rows["bleu"]["seconds"] >= 0.0 and rows["aggregate"]["seconds"] is None


def test_json_report_records_the_run(tmp_path: Path, pairs_file: Path) -> None:
    report = run(tmp_path, pairs_file, "--seed", "3")
    assert report["recipe"] == "eval-test"
    assert report["pairs_file"] == str(pairs_file)
    assert (report["limit"], report["seed"], report["n_pairs"], report["skipped"]) == (None, 3, 6, {})
    assert [row["labeler"] for row in report["rows"]] == ["bleu", "aggregate", "length (longer wins)"]
    expected = {
        "n",
        "agree",
        "disagree",
        "tie",
        "accuracy",
        "ci_low",
        "ci_high",
        "accuracy_decided",
        "seconds",
    }
    assert expected <= set(report["rows"][0])


def test_default_json_path_is_under_outputs(
    tmp_path: Path, pairs_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["--pairs", str(pairs_file), "--recipe", str(recipe)]) == 0
    written = Path("outputs") / "eval_labelers" / "eval-test.json"
    assert written.is_file()
    printed = capsys.readouterr().out
    assert f"wrote {written}" in printed
    assert "accuracy [95% CI]" in printed and "length (longer wins)" in printed


def test_limit_takes_the_first_pairs(tmp_path: Path, pairs_file: Path) -> None:
    report = run(tmp_path, pairs_file, "--limit", "2")
    assert report["limit"] == 2 and report["n_pairs"] == 2
    assert counts(rows_by_name(report)["bleu"]) == (2, 2, 0, 0)


def test_coin_flip_puts_chosen_second_for_some_pairs() -> None:
    flips = [chosen_first(f"p{i}", seed=0) for i in range(200)]
    assert 60 < sum(flips) < 140
    assert flips == [chosen_first(f"p{i}", seed=0) for i in range(200)]
    assert flips != [chosen_first(f"p{i}", seed=1) for i in range(200)]


def test_build_tables_keeps_track_of_the_human_choice(pairs_file: Path) -> None:
    pairs, _ = read_pairs(pairs_file)
    many = [replace(p, pid=f"{p.pid}-{k}") for k, p in enumerate(pairs * 10)]
    prompts, responses, sides = build_tables(many, "pairs.jsonl", seed=0)
    assert prompts.num_rows == len(many) and responses.num_rows == 2 * len(many)
    text = dict(
        zip(responses[columns.RESPONSE_ID].to_pylist(), responses[columns.TEXT].to_pylist(), strict=True)
    )
    index = dict(
        zip(
            responses[columns.RESPONSE_ID].to_pylist(),
            responses[columns.SAMPLE_INDEX].to_pylist(),
            strict=True,
        )
    )
    assert all(
        text[chosen] == p.chosen and text[rejected] == p.rejected
        for p, (chosen, rejected) in zip(many, sides, strict=True)
    )
    chosen_index = [index[chosen] for chosen, _ in sides]
    assert 0 in chosen_index and 1 in chosen_index
    assert prompts[columns.REFERENCES].to_pylist()[0] == [REF]
    assert prompts[columns.SOURCE_ROW].to_pylist()[:6] == [1, 2, 3, 4, 5, 6]


def test_bad_prompt_is_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_role = {**pair(7, REF, OTHER, [REF]), "prompt": [{"role": "robot", "content": "hi"}]}
    empty = {**pair(8, REF, OTHER, [REF]), "prompt": []}
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(p) for p in [*PAIRS, bad_role, empty]])
    report = run(tmp_path, path)
    assert report["skipped"] == {"unknown_role": 1, "empty_prompt": 1}
    assert report["n_pairs"] == 6
    assert "unknown_role" in capsys.readouterr().out


def test_invalid_json_line_is_an_error_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(PAIRS[0]), json.dumps(PAIRS[1]), "{not json"])
    with pytest.raises(PairsFileError, match="line 3"):
        read_pairs(path)
    assert main(["--pairs", str(path), "--recipe", str(write_recipe(tmp_path))]) == 2
    assert "line 3" in capsys.readouterr().err


def test_missing_file_and_bad_recipe_exit_2(tmp_path: Path, pairs_file: Path) -> None:
    assert main(["--pairs", str(tmp_path / "nope.jsonl"), "--recipe", str(write_recipe(tmp_path))]) == 2
    assert main(["--pairs", str(pairs_file), "--recipe", str(tmp_path / "missing.yaml")]) == 2
    bad = write_recipe(tmp_path, "  - {kind: bleu, name: bleu, colour: red}")
    assert main(["--pairs", str(pairs_file), "--recipe", str(bad)]) == 2


def test_two_bleu_labelers_get_an_aggregate_row(tmp_path: Path, pairs_file: Path) -> None:
    labelers = "  - {kind: bleu, name: b1, variant: bleuberi}\n  - {kind: bleu, name: b2, variant: sacrebleu}"
    rows = rows_by_name(run(tmp_path, pairs_file, recipe=write_recipe(tmp_path, labelers)))
    assert list(rows) == ["b1", "b2", "aggregate", "length (longer wins)"]
    for name in ("b1", "b2", "aggregate"):
        assert counts(rows[name]) == (6, 3, 1, 2)


def test_outcomes_treat_missing_scores_as_ties() -> None:
    chosen = np.array([2.0, 1.0, 1.0, np.nan, 1.0])
    rejected = np.array([1.0, 2.0, 1.0, 1.0, np.nan])
    assert outcomes(chosen, rejected).tolist() == [1, -1, 0, 0, 0]


def test_bootstrap_interval_is_seeded_and_bounded() -> None:
    agree = np.array([1.0] * 30 + [0.0] * 20)
    low, high = bootstrap_ci(agree, seed=0)
    assert 0.0 <= low < 0.6 < high <= 1.0
    assert bootstrap_ci(agree, seed=0) == (low, high)
    assert bootstrap_ci(np.ones(10), seed=0) == (1.0, 1.0)


def test_per_pair_scores_reproduce_a_limited_run(tmp_path: Path, pairs_file: Path) -> None:
    """The report keeps each pair's scores, so a prefix of it summarises exactly like ``--limit``."""
    two_bleus = "  - {kind: bleu, name: a}\n  - {kind: bleu, name: b, variant: sacrebleu}"
    recipe = write_recipe(tmp_path, two_bleus)
    full = run(tmp_path, pairs_file, recipe=recipe)
    assert [entry["id"] for entry in full["pairs"]] == [f"p{i}" for i in range(6)]
    assert full["pairs"][4]["scores"]["a"] == [None, None]  # no reference, no BLEU: null, not NaN
    assert full["pairs"][0]["lengths"] == [len(REF), len(OTHER)]
    limited = rows_by_name(run(tmp_path, pairs_file, "--limit", "4", recipe=recipe))
    recomputed = summarise_subset(full, 4)
    assert [row["labeler"] for row in recomputed] == ["a", "b", "aggregate", "length (longer wins)"]
    for row in recomputed:
        expected = {k: v for k, v in limited[row["labeler"]].items() if k not in ("seconds", "reused")}
        assert {k: v for k, v in row.items() if k != "seconds"} == expected


def test_cached_scores_are_reused_until_the_labeler_or_the_pairs_change(
    tmp_path: Path, pairs_file: Path
) -> None:
    """A rerun reads each labeler's scores back; only a changed labeler (not its weight) is recomputed."""
    two = "  - {kind: bleu, name: a, weight: %s}\n  - {kind: bleu, name: b, variant: %s}"

    def reused(report: dict[str, Any]) -> dict[str, bool]:
        return {row["labeler"]: row["reused"] for row in report["rows"] if "reused" in row}

    first = run(tmp_path, pairs_file, recipe=write_recipe(tmp_path, two % (1.0, "sacrebleu")))
    assert reused(first) == {"a": False, "b": False}
    again = run(tmp_path, pairs_file, recipe=write_recipe(tmp_path, two % (1.0, "sacrebleu")))
    assert reused(again) == {"a": True, "b": True}
    strip = lambda r: [{k: v for k, v in row.items() if k != "reused"} for row in r["rows"]]  # noqa: E731
    assert strip(again) == strip(first) and again["pairs"] == first["pairs"]
    reweighted = run(tmp_path, pairs_file, recipe=write_recipe(tmp_path, two % (3.0, "sacrebleu")))
    assert reused(reweighted) == {"a": True, "b": True}
    changed = run(tmp_path, pairs_file, recipe=write_recipe(tmp_path, two % (1.0, "bleuberi")))
    assert reused(changed) == {"a": True, "b": False}
    assert reused(run(tmp_path, pairs_file, "--limit", "3", recipe=write_recipe(tmp_path))) == {"bleu": False}
    fresh = run(tmp_path, pairs_file, "--fresh", recipe=write_recipe(tmp_path, two % (1.0, "bleuberi")))
    assert reused(fresh) == {"a": False, "b": False}


def test_fit_reports_cross_validated_rows_and_writes_a_recipe_with_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    records = []
    for i in range(24):
        ref = " ".join(words[(i + k) % len(words)] for k in range(8))
        close = ref.rsplit(" ", i % 3 + 1)[0]  # the reference minus one to three words
        records.append(pair(i, close, "nothing alike here at all", [ref]))
    pairs_file = write_lines(tmp_path / "pairs.jsonl", [json.dumps(r) for r in records])
    recipe = write_recipe(
        tmp_path, "  - {kind: bleu, name: bleu}\n  - {kind: bleu, name: sacre, variant: sacrebleu, weight: 2}"
    )
    out = tmp_path / "fitted.yaml"
    report = run(
        tmp_path, pairs_file, "--fit", "--folds", "3", "--write-recipe", str(out), "--domain", "toy overlap",
        recipe=recipe,
    )  # fmt: skip
    rows = rows_by_name(report)
    assert {"equal weights (zscore)", "equal weights (spread)", "fitted (3-fold CV)"} <= set(rows)
    assert rows["fitted (3-fold CV)"]["accuracy"] == 1.0 and rows["fitted (3-fold CV)"]["n"] == 24
    assert report["fit"]["scale"] in {"zscore", "spread"} and len(report["fit"]["fold_choices"]) == 3
    assert all(w > 0 for w in report["fit"]["weights"].values())
    printed = capsys.readouterr().out
    assert "fitted weights" in printed and "on cached scores" in printed

    from schemas.recipe import load_recipe

    fitted = load_recipe(str(out))
    assert [x.weight for x in fitted.labelers] == pytest.approx(
        list(report["fit"]["weights"].values()), rel=1e-3
    )
    provenance = fitted.pairing.weights_fit
    assert provenance is not None and provenance.domain == "toy overlap" and provenance.n == 24
    assert provenance.sha256 == hashlib.sha256(pairs_file.read_bytes()).hexdigest()
    assert provenance.cv_accuracy == 1.0 and provenance.folds == 3
    assert fitted.pairing.scale == report["fit"]["scale"]
    assert out.read_text(encoding="utf-8").startswith("# Written by `python -m flows.eval_labelers --fit`")


def test_fit_needs_enough_pairs_and_write_recipe_needs_fit(tmp_path: Path, pairs_file: Path) -> None:
    out = tmp_path / "r.json"
    args = ["--pairs", str(pairs_file), "--recipe", str(write_recipe(tmp_path)), "--json", str(out)]
    assert main([*args, "--cache", str(tmp_path / "c"), "--fit"]) == 2  # 6 pairs < 2 x 5 folds
    assert main([*args, "--write-recipe", str(tmp_path / "x.yaml")]) == 2  # a usage error: exit 2


def test_write_recipe_warns_when_its_eval_set_was_fitted_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [pair(i, REF, OTHER if i % 2 else "the cat sat", [REF]) for i in range(12)]
    pairs_file = write_lines(tmp_path / "pairs.jsonl", [json.dumps(r) for r in records])
    recipe = tmp_path / "recipe.yaml"
    labelers = "  - {kind: bleu, name: bleu}\n  - {kind: bleu, name: sacre, variant: sacrebleu}"
    recipe.write_text(
        f"name: eval-test\nlabelers:\n{labelers}\neval:\n  pairs: {pairs_file}\n", encoding="utf-8"
    )
    run(
        tmp_path,
        pairs_file,
        "--fit",
        "--folds",
        "2",
        "--write-recipe",
        str(tmp_path / "out.yaml"),
        recipe=recipe,
    )
    assert "12 of the 12 pairs of eval set 'pairs.jsonl' were fitted on" in capsys.readouterr().err
