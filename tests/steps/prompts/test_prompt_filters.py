"""The prompt filters: decontamination against eval sets and MinHash near-duplicates, on their edges.

Everything is tiny data made here; the engine is the fake one, counting the prompts it is asked to
sample, so "reused" means the engine never saw the prompt again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows import build_prefs as bp
from flows import cli
from schemas import columns, reasons
from schemas.recipe import (
    DecontaminationConfig,
    EvalPromptSet,
    NearDuplicatesConfig,
    Recipe,
    RecipeError,
    load_recipe,
)
from schemas.records import PROMPTS
from steps import sampling
from steps.base import StageStats
from steps.engines.base import Completion, Conversation, Failed, SamplingParams
from steps.prompts.decontaminate import Decontaminator, check_sets, word_grams
from steps.prompts.near_duplicates import NearDuplicates
from steps.prompts.normalise import normalise_messages, prompt_id
from steps.prompts.sources import PromptSourceError
from steps.publish.release import funnel_steps
from steps.run import stages
from steps.run.resume import WorkArea
from tests.conftest import FakeEngine
from tests.steps.prompts.test_prompts import jsonl

# A 16-word benchmark question: covering 8 of its words is exactly the default threshold (0.5).
EVAL_QUESTION = "Natalia sold clips to 48 of her friends in April and half as many in May"
SHORT_EVAL = "What is 2+2?"


def eval_file(tmp_path: Path, name: str = "bench.jsonl", column: str = "question") -> str:
    rows = [{column: EVAL_QUESTION}, {column: SHORT_EVAL}, {column: "?!"}, {column: "Name three primes."}]
    return jsonl(tmp_path / name, rows)


def prompts_table(texts: Sequence[str]) -> pa.Table:
    """A prompts shard as the prompt stage makes it (normalised, with ids), one row per text."""
    rows: dict[str, list[Any]] = {name: [] for name in PROMPTS.names}
    for i, text in enumerate(texts):
        messages = normalise_messages(text)
        rows[columns.PROMPT_ID].append(prompt_id(messages))
        rows[columns.MESSAGES].append(messages)
        rows[columns.REFERENCES].append([])
        rows[columns.SOURCE].append("test")
        rows[columns.SOURCE_ROW].append(i)
    return pa.Table.from_pydict(rows, schema=PROMPTS)


def user_texts(table: pa.Table) -> list[str]:
    return [m[-1][columns.CONTENT] for m in table.column(columns.MESSAGES).to_pylist()]


# ------------------------------------------------------------------ the recipe


def test_recipe_checks_eval_set_names_and_sources(tmp_path: Path) -> None:
    good = {"name": "a", "uri": "x.jsonl"}
    assert DecontaminationConfig(sets=[good]).ngram == 8  # Tülu 3's n
    assert DecontaminationConfig(sets=[good]).threshold == 0.5
    with pytest.raises(ValueError, match="names must be unique"):
        DecontaminationConfig(sets=[good, {"name": "a", "hf": "org/set"}])
    for bad in ("", "has space", "a/b", "x" * 65, "-lead"):
        with pytest.raises(ValueError, match="letters, digits"):
            EvalPromptSet(name=bad, uri="x.jsonl")
    with pytest.raises(ValueError, match="exactly one of uri"):
        EvalPromptSet(name="a", uri="x.jsonl", hf="org/set")
    with pytest.raises(ValueError, match="exactly one of uri"):
        EvalPromptSet(name="a")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"name": "r", "prompts": {"source": "builtin", "decontaminate": {"sets": [good], "n": 8}}}
        )
    )
    with pytest.raises(RecipeError, match="prompts.builtin.decontaminate.n: unknown key"):
        load_recipe(str(recipe))
    assert reasons.contaminated("gsm8k") == "contaminated:gsm8k"


def test_the_default_recipe_keeps_both_filters_off() -> None:
    prompts = load_recipe("default").prompts
    assert prompts.decontaminate is None and prompts.near_duplicates is None


# ------------------------------------------------------------------ decontamination


def test_word_ngrams_never_cross_from_one_text_into_the_next() -> None:
    grams = word_grams(["One, two THREE", "", "four five"], 2)
    assert grams.doc.tolist() == [0, 0, 2] and grams.pos.tolist() == [0, 1, 0]
    assert grams.words.tolist() == [3, 0, 2]
    again = word_grams(["one two three"], 2)
    assert again.gram.tolist() == grams.gram[:2].tolist()  # case and punctuation do not change a gram


def test_decontamination_drops_overlaps_and_names_both_texts(tmp_path: Path) -> None:
    config = DecontaminationConfig(
        sets=[{"name": "mini", "uri": eval_file(tmp_path), "columns": {"prompt": "question"}}]
    )
    first_half = " ".join(EVAL_QUESTION.split()[:8])
    texts = [
        EVAL_QUESTION.upper() + "!!",  # the same words: 100%
        f"Please help me with my homework. {EVAL_QUESTION}. Show your work step by step.",  # pasted inside
        f"{first_half} and then something else entirely different here.",  # exactly 8 of 16 words: 0.5
        " ".join(EVAL_QUESTION.split()[:7]) + " zebra crossing",  # 7 words: no 8-gram at all
        "what is 2 + 2",  # the short eval item, same words
        "Tell me: what is 2 2 in binary and why?",  # the short item inside a longer prompt: no match
        "Write a poem about autumn leaves.",
    ]
    table = prompts_table(texts)
    stats = StageStats("prompts", rows_in=len(texts), rows_out=len(texts))
    kept = Decontaminator(config, WorkArea(str(tmp_path / "work"))).apply(table, stats)
    assert user_texts(kept) == texts[3:4] + texts[5:]
    assert stats.drops == {"contaminated:mini": 4}
    assert stats.rows_out == 3
    example = stats.examples["contaminated:mini"]
    assert "NATALIA SOLD CLIPS" in example and "Natalia sold clips" in example and "100%" in example
    assert "decontaminate" in stats.timings
    stricter = DecontaminationConfig(**{**config.model_dump(), "threshold": 0.6})
    again = Decontaminator(stricter, WorkArea(str(tmp_path / "work"))).apply(table, StageStats("prompts"))
    assert texts[2] in user_texts(again), "0.5 of the item covered is below a 0.6 threshold"


def test_the_index_is_built_once_per_set_checksum(tmp_path: Path) -> None:
    uri = eval_file(tmp_path)
    spec = {"name": "mini", "uri": uri, "columns": {"prompt": "question"}}
    area = WorkArea(str(tmp_path / "work"))
    first = Decontaminator(DecontaminationConfig(sets=[spec]), area).indexes[0]
    assert not first.resumed
    assert first.stats.rows_in == 4 and first.stats.rows_out == 3  # "?!" has no word
    assert first.stats.drops == {reasons.NO_WORDS: 1} and first.stats.counts["short_items"] == 2
    again = Decontaminator(DecontaminationConfig(sets=[spec], threshold=0.9), area).indexes[0]
    assert again.resumed, "a threshold is applied when matching; the index is reused"
    Path(uri).write_text(Path(uri).read_text() + json.dumps({"question": "A new item here."}) + "\n")
    changed = Decontaminator(DecontaminationConfig(sets=[spec]), area).indexes[0]
    assert not changed.resumed and changed.stats.rows_in == 5


def test_the_index_built_in_small_batches_equals_one_built_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eval set streams into the index batch by batch: batching must not change what it holds."""
    from steps.prompts import decontaminate

    spec = {"name": "mini", "uri": eval_file(tmp_path), "columns": {"prompt": "question"}}
    whole = Decontaminator(DecontaminationConfig(sets=[spec]), WorkArea(str(tmp_path / "a"))).indexes[0]
    monkeypatch.setattr(decontaminate, "INDEX_BATCH_ROWS", 1)
    batched = Decontaminator(DecontaminationConfig(sets=[spec]), WorkArea(str(tmp_path / "b"))).indexes[0]
    assert whole.grams.height > 0
    assert batched.grams.sort(["gram", "item", "pos"]).equals(whole.grams.sort(["gram", "item", "pos"]))
    assert batched.items.equals(whole.items) and batched.stats.to_dict() == whole.stats.to_dict()


def test_several_sets_from_parquet_and_datasets_each_name_their_drops(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["Name three primes."]}), tmp_path / "a.parquet")
    folder = tmp_path / "hfset"
    folder.mkdir()
    jsonl(folder / "test.jsonl", [{"q": [{"role": "user", "content": EVAL_QUESTION}]}])
    config = DecontaminationConfig(
        sets=[
            {"name": "pq", "uri": str(tmp_path / "a.parquet"), "columns": {"prompt": "text"}},
            {"name": "hf", "hf": str(folder), "split": "test", "columns": {"prompt": "q"}},
        ]
    )
    table = prompts_table(["name three primes", EVAL_QUESTION, "Something unrelated entirely."])
    stats = StageStats("prompts")
    kept = Decontaminator(config, WorkArea(str(tmp_path / "work"))).apply(table, stats)
    assert user_texts(kept) == ["Something unrelated entirely."]
    assert stats.drops == {"contaminated:pq": 1, "contaminated:hf": 1}
    # A prompt in two sets is dropped once, under the first set that holds it.
    both = DecontaminationConfig(sets=[*config.sets[1:], config.sets[1].model_copy(update={"name": "again"})])
    stats = StageStats("prompts")
    kept = Decontaminator(both, WorkArea(str(tmp_path / "work"))).apply(table, stats)
    assert stats.drops == {"contaminated:hf": 1} and kept.num_rows == 2


def test_eval_set_errors_name_the_key(tmp_path: Path) -> None:
    area = WorkArea(str(tmp_path / "work"))
    missing = DecontaminationConfig(sets=[{"name": "gone", "uri": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(PromptSourceError, match=r"sets\[0\] \(gone\).*does not exist"):
        Decontaminator(missing, area)
    wrong = DecontaminationConfig(sets=[{"name": "b", "uri": eval_file(tmp_path)}])  # column is "question"
    with pytest.raises(
        PromptSourceError,
        match=r"sets\[0\] \(b\).*no 'prompt' field.*set prompts\.decontaminate\.sets\[0\]\.columns\.prompt",
    ):
        Decontaminator(wrong, area)
    # A file whose format cannot be told, or that is not the Parquet it claims: the set's own format key.
    odd = tmp_path / "eval.data"
    odd.write_text('{"prompt": "What is the capital of France?"}\n')
    unknown = DecontaminationConfig(sets=[{"name": "odd", "uri": str(odd)}])
    with pytest.raises(
        PromptSourceError,
        match=r"^prompts\.decontaminate\.sets\[0\] \(odd\): .*set prompts\.decontaminate\.sets\[0\]\.format",
    ) as told:
        check_sets(unknown)
    assert "set prompts.format" not in str(told.value)
    junk = DecontaminationConfig(sets=[{"name": "junk", "uri": str(odd), "format": "parquet"}])
    with pytest.raises(
        PromptSourceError,
        match=r"^prompts\.decontaminate\.sets\[0\] \(junk\): .*set prompts\.decontaminate\.sets\[0\]\.format: jsonl",
    ):
        check_sets(junk)


def test_bad_eval_set_fails_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_models(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was checked or loaded before the eval set")

    monkeypatch.setattr("flows.checks.check_models", no_models)
    recipe = tmp_path / "r.yaml"
    sets = [{"name": "b", "uri": eval_file(tmp_path), "columns": {"prompt": "text"}}]
    recipe.write_text(
        yaml.safe_dump({"name": "r", "prompts": {"source": "builtin", "decontaminate": {"sets": sets}}})
    )
    assert cli.build_prefs_main(["--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 2
    assert "no 'text' field" in capsys.readouterr().err


# ------------------------------------------------------------------ near-duplicates

PARAPHRASES = [
    (
        "Explain how photosynthesis works in plants, step by step.",
        "explain how photosynthesis works in plants step-by-step!",
    ),
    (
        "Summarise the following article in three bullet points: the city council voted on Tuesday "
        "to expand the bike lane network.",
        "Summarize the following article in three bullet points: The city council voted on Tuesday "
        "to expand the bike-lane network.",
    ),
    (
        "Can you explain the difference between a list and a tuple in Python?",
        "Could you explain the difference between a list and a tuple in Python?",
    ),
]
DISTINCT = [
    ("What is the capital of France?", "What is the capital of Spain?"),
    ("Write a haiku about winter.", "Write a limerick about winter."),
    ("What is 17 times 23?", "What is 18 times 23?"),
]


def near_dups(texts: list[str], shards: int = 1, **settings: Any) -> tuple[list[str], StageStats]:
    table = prompts_table(texts)
    stats = StageStats("prompts", rows_in=len(texts), rows_out=len(texts))
    step = NearDuplicates(NearDuplicatesConfig(**settings))
    size = -(-table.num_rows // shards)
    kept = [step.apply(table.slice(i, size), stats) for i in range(0, table.num_rows, size)]
    return [t for part in kept for t in user_texts(part)], stats


def test_paraphrases_merge_into_their_first_and_distinct_prompts_do_not() -> None:
    texts = [a for a, _ in PARAPHRASES] + [x for pair in DISTINCT for x in pair] + [b for _, b in PARAPHRASES]
    kept, stats = near_dups(texts, shards=3)  # the index of kept prompts lives across shards
    assert kept == texts[: len(PARAPHRASES) + 2 * len(DISTINCT)]
    assert stats.drops == {reasons.NEAR_DUPLICATE: len(PARAPHRASES)}
    example = stats.examples[reasons.NEAR_DUPLICATE]
    assert "step-by-step" in example and "step by step" in example and "Jaccard" in example
    assert "near_duplicates" in stats.timings


def test_near_duplicates_are_deterministic_for_a_seed_and_honour_the_threshold() -> None:
    texts = [x for pair in PARAPHRASES + DISTINCT for x in pair]
    first, first_stats = near_dups(texts, seed=7)
    again, again_stats = near_dups(texts, seed=7)
    assert (first, first_stats.drops, first_stats.examples) == (
        again,
        again_stats.drops,
        again_stats.examples,
    )
    loose, _ = near_dups(texts, threshold=0.5)
    assert "What is the capital of Spain?" not in loose, "at 0.5 the one-word change merges"
    strict, _ = near_dups(texts, threshold=1.0)
    assert len(strict) == len(texts) - 1, "at 1.0 only the pair that normalises to the same words merges"
    blank, stats = near_dups(["?!", "...", "Hello there"])
    assert blank == ["?!", "...", "Hello there"] and not stats.drops, "no words: nothing to compare"


# ------------------------------------------------------------------ resume: filters never resample


class CountingEngine(FakeEngine):
    """The fake engine, remembering every prompt it was asked to sample."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        self.prompts += [conv[-1]["content"] for conv in conversations]
        return super().generate(conversations, params, seeds)


def recipe_with(tmp_path: Path, decontaminate: dict[str, Any] | None) -> Recipe:
    texts = [f"Question {i}: name a colour you like." for i in range(6)]
    texts[3] = "TOO_LONG prompt here"  # the engine fails it: in the second shard, with 4 and 5
    source = jsonl(tmp_path / "prompts.jsonl", [{"prompt": t, "references": ["red"]} for t in texts])
    prompts: dict[str, Any] = {"source": "file", "uri": source}
    if decontaminate:
        prompts["decontaminate"] = decontaminate
    return Recipe.model_validate(
        {
            "name": "filters",
            "prompts": prompts,
            "sampling": {"n": 2, "max_tokens": 8},
            "output": {"prompts_per_shard": 3},
        }
    )


def sample_all(recipe: Recipe, area: WorkArea) -> dict[str, list[dict[str, Any]]]:
    shards, _ = stages.prompt_shards(recipe, area)
    out: dict[str, list[dict[str, Any]]] = {}
    for shard in shards:
        result = stages.sample(recipe, area, shard)
        for row in pq.read_table(result.uri).to_pylist():
            out.setdefault(row[columns.PROMPT_ID], []).append(row)
    return out


def test_a_changed_decontamination_setting_resamples_no_surviving_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = CountingEngine()
    monkeypatch.setattr(sampling, "load_engine", lambda policy: engine)
    area = WorkArea(str(tmp_path / "work"))
    before = sample_all(recipe_with(tmp_path, None), area)
    assert len(engine.prompts) == 6 and len(before) == 5  # TOO_LONG is dropped by sampling

    eval_a = jsonl(tmp_path / "a.jsonl", [{"prompt": "Question 1: name a colour you like."}])
    engine.prompts.clear()
    dropped_one = sample_all(recipe_with(tmp_path, {"sets": [{"name": "a", "uri": eval_a}]}), area)
    assert engine.prompts == [], "every surviving prompt's samples were found, none resampled"
    assert len(dropped_one) == 4 and all(dropped_one[p] == before[p] for p in dropped_one)

    # Another set drops another prompt; the one dropped before comes back (the first run's shard).
    eval_b = jsonl(tmp_path / "b.jsonl", [{"prompt": "Question 4: name a colour you like."}])
    shards, stats = stages.prompt_shards(
        recipe_with(tmp_path, {"sets": [{"name": "b", "uri": eval_b}]}), area
    )
    assert stats.drops == {"contaminated:b": 1}
    results = [
        stages.sample(recipe_with(tmp_path, {"sets": [{"name": "b", "uri": eval_b}]}), area, s)
        for s in shards
    ]
    assert engine.prompts == []
    reused = sum(res.stats.counts.get("prompts_reused", 0) for res in results if not res.resumed)
    assert reused == 2, "the changed shard: question 5's samples and TOO_LONG's failure, both reused"
    assert sum(res.stats.drops.get("prompt_too_long", 0) for res in results) == 1, (
        "the failure is reported again"
    )


def test_build_prefs_reports_the_filters_in_stats_card_and_funnel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_home: Path
) -> None:
    engine = CountingEngine()
    monkeypatch.setattr(sampling, "load_engine", lambda policy: engine)
    texts = [f"Question {i}: name a colour you like best today." for i in range(4)]
    texts += ["question 0 - name a colour you like best, today!", EVAL_QUESTION]
    source = jsonl(tmp_path / "p.jsonl", [{"prompt": t, "references": ["red"]} for t in texts])
    spec = {"name": "gsm_mini", "uri": eval_file(tmp_path), "columns": {"prompt": "question"}}
    recipe = tmp_path / "r.yaml"
    data = {
        "name": "filters",
        "prompts": {
            "source": "file",
            "uri": source,
            "decontaminate": {"sets": [spec]},
            "near_duplicates": {},
        },
        "sampling": {"n": 4, "max_tokens": 8, "seed": 3},
        "output": {"prompts_per_shard": 2},
    }
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    bp.build_prefs(recipe=str(recipe), output=str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    prompts = manifest["stats"]["stages"]["prompts"]
    assert prompts["drops"] == {"contaminated:gsm_mini": 1, reasons.NEAR_DUPLICATE: 1}
    assert manifest["stats"]["prompts"]["decontamination"]["sets"]["gsm_mini"]["items"] == 3
    assert manifest["stats"]["prompts"]["decontamination"]["sets"]["gsm_mini"]["dropped"] == 1
    assert manifest["stats"]["prompts"]["near_duplicates"]["library"] == "datasketch"
    steps = dict(funnel_steps(manifest["stats"], 0))
    assert (
        steps["unique prompts"] == 6 and steps["not contaminated"] == 5 and steps["not near-duplicates"] == 4
    )
    card = (out / "README.md").read_text()
    assert "contaminated:gsm\\_mini: 1" in card and "near\\_duplicate: 1" in card
    assert "| decontamination |" in card and "| near-duplicates |" in card
    stats_file = next(out.glob("runs/*/stats.json"))
    assert json.loads(stats_file.read_text())["stages"]["prompts"]["drops"] == prompts["drops"]
    assert sorted(engine.prompts) == sorted(texts[:4])


def test_filters_that_drop_every_prompt_stop_the_run_with_counts(tmp_path: Path) -> None:
    every = jsonl(
        tmp_path / "all.jsonl",
        [{"prompt": f"Question {i}: name a colour you like."} for i in range(6)]
        + [{"prompt": "TOO_LONG prompt here"}],
    )
    recipe = recipe_with(tmp_path, {"sets": [{"name": "all", "uri": every}], "threshold": 0.1})
    with pytest.raises(PromptSourceError, match=r"dropped every prompt.*contaminated:all x6"):
        stages.prompt_shards(recipe, WorkArea(str(tmp_path / "work")))


def test_gc_keeps_the_eval_index_and_the_slot_lists_a_run_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's record names the filters' work entries too: GC after the run leaves the rerun
    nothing to rebuild (the eval set index) and nothing to resample after a filter change (slots)."""
    from steps.run.work_gc import RunRecord, collect

    monkeypatch.setattr(sampling, "load_engine", lambda policy: CountingEngine())
    eval_a = jsonl(tmp_path / "a.jsonl", [{"prompt": "Question 1: name a colour you like."}])
    recipe = recipe_with(tmp_path, {"sets": [{"name": "a", "uri": eval_a}]})
    work = str(tmp_path / "work")
    area = WorkArea(work)
    entries: set[str] = set()
    shards, _ = stages.prompt_shards(recipe, area, entries=entries)
    responses = [stages.sample(recipe, area, s) for s in shards]
    assert entries and all(e.startswith("decontamination/") for e in entries)
    record = RunRecord(work, recipe.name, str(tmp_path / "out"))
    slots = stages.slot_entries(recipe, area, shards)
    assert len(slots) == len(shards)
    record.add([*entries, *(area.entry_of(s.uri) for s in [*shards, *responses]), *slots])
    record.finish()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "work").rglob("*") if p.is_file())
    unused = tmp_path / "work" / "sampling" / f"{'0' * 32}.data.parquet"  # no record names it
    unused.write_bytes(b"x")
    collect(work, keep_runs=1, report=lambda _: None)
    assert not unused.exists(), "the control: GC does remove what no run used"
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert after == before, "GC removed something the run used"
    again: set[str] = set()
    stages.prompt_shards(recipe, area, entries=again)
    assert again == entries


def test_shingles_are_characters_in_every_script() -> None:
    """A byte shingle covers under two Chinese characters; the setting says characters."""
    from steps.prompts.near_duplicates import shingles

    for text in ("how do i keep basil alive", "如何让罗勒保持活力"):
        got = shingles(text, 5)
        assert len(got) == len(text) - 4 and all(len(s.decode("utf-8")) == 5 for s in got)
    assert shingles("短文", 5) == ["短文".encode()]
