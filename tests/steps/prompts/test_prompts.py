"""Prompt sources: built-in set, files through fsspec, HF datasets; normalisation and drops."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import columns
from schemas.recipe import BuiltinPrompts, FilePrompts, HFPrompts
from schemas.records import PROMPTS
from steps.prompts.normalise import load_prompts, normalise_messages, prompt_id
from steps.prompts.sources import PromptSourceError


def jsonl(path: Path, rows: list[object]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_builtin_set_is_varied_and_referenced() -> None:
    table, stats = load_prompts(BuiltinPrompts())
    assert table.schema == PROMPTS
    assert table.num_rows >= 32 and stats.drops == {}
    assert all(refs and 1 <= len(refs) <= 2 for refs in table.column(columns.REFERENCES).to_pylist())
    conversations = table.column(columns.MESSAGES).to_pylist()
    assert sum(len(conv) > 1 for conv in conversations) >= 3  # a few multi-turn
    lines = Path("pipelines/prompts/default.jsonl").read_text(encoding="utf-8").splitlines()
    raw = [json.loads(line) for line in lines]
    categories = {row["category"] for row in raw}
    assert {"advice", "coding", "math", "summarise", "rewrite", "factual", "multi_turn"} <= categories


def test_strings_and_message_lists_both_accepted(tmp_path: Path) -> None:
    rows = [
        {"prompt": "  Hello there  ", "references": "Hi."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
    ]
    table, _ = load_prompts(FilePrompts(source="file", uri=jsonl(tmp_path / "p.jsonl", rows)))
    first, second = table.to_pylist()
    assert first[columns.MESSAGES] == [{"role": "user", "content": "Hello there"}]
    assert first[columns.REFERENCES] == ["Hi."]
    assert [m["role"] for m in second[columns.MESSAGES]] == ["system", "user"]
    assert second[columns.REFERENCES] == []
    assert first[columns.SOURCE_ROW] == 1 and second[columns.SOURCE_ROW] == 2


def test_prompt_id_is_stable_under_normalisation() -> None:
    a = normalise_messages("Café ")
    b = normalise_messages([{"role": "user", "content": "Cafe\u0301"}])  # decomposed é
    assert prompt_id(a) == prompt_id(b)
    assert prompt_id(a) != prompt_id(normalise_messages("Cafe"))
    assert len(prompt_id(a)) == 16 and int(prompt_id(a), 16) >= 0


def test_duplicates_dropped_and_counted_then_limit(tmp_path: Path) -> None:
    rows = [{"prompt": "a"}, {"prompt": " a"}, {"prompt": "b"}, {"prompt": "c"}, {"prompt": "d"}]
    uri = jsonl(tmp_path / "p.jsonl", rows)
    table, stats = load_prompts(FilePrompts(source="file", uri=uri))
    assert table.num_rows == 4 and stats.drops == {"duplicate_prompt": 1}
    limited, _ = load_prompts(FilePrompts(source="file", uri=uri), limit=2)
    assert [m[0]["content"] for m in limited.column(columns.MESSAGES).to_pylist()] == ["a", "b"]


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("   ", "empty_prompt"),
        ([], "empty_prompt"),
        ([{"role": "user", "content": 5}], "non_string_content"),
        ([{"role": "wizard", "content": "x"}], "unknown_role"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "invalid_prompt"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "y"},
                {"role": "user", "content": "z"},
            ],
            "invalid_prompt",
        ),
        (42, "invalid_prompt"),
    ],
)
def test_bad_rows_dropped_with_reason(tmp_path: Path, prompt: object, reason: str) -> None:
    uri = jsonl(tmp_path / "p.jsonl", [{"prompt": prompt}, {"prompt": "fine"}])
    table, stats = load_prompts(FilePrompts(source="file", uri=uri))
    assert table.num_rows == 1
    assert stats.drops == {reason: 1}
    assert stats.examples[reason].startswith("row 1:")


def test_source_errors_name_line_column_and_fix(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptSourceError, match="line 2: invalid JSON"):
        load_prompts(FilePrompts(source="file", uri=str(bad_json)))
    bad_bytes = tmp_path / "latin.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptSourceError, match="line 2: not valid UTF-8"):
        load_prompts(FilePrompts(source="file", uri=str(bad_bytes)))
    with pytest.raises(PromptSourceError, match="prompt_column"):
        load_prompts(FilePrompts(source="file", uri=jsonl(tmp_path / "q.jsonl", [{"question": "x"}])))
    with pytest.raises(PromptSourceError, match="does not exist"):
        load_prompts(FilePrompts(source="file", uri=str(tmp_path / "missing.jsonl")))
    with pytest.raises(PromptSourceError, match="set prompts.format"):
        load_prompts(FilePrompts(source="file", uri=str(tmp_path / "prompts.txt")))
    with pytest.raises(PromptSourceError, match="no usable prompts.*empty_prompt"):
        load_prompts(FilePrompts(source="file", uri=jsonl(tmp_path / "e.jsonl", [{"prompt": " "}])))
    with pytest.raises(PromptSourceError, match="built-in sets"):
        load_prompts(BuiltinPrompts(name="nope"))


def test_parquet_through_memory_filesystem_with_column_mapping() -> None:
    table = pa.table({"instruction": ["Sum 2 and 2.", "Name a colour."], "gold": [["4"], ["red"]]})
    with fsspec.open("memory://prompts/p.parquet", "wb") as handle:
        pq.write_table(table, handle)
    config = FilePrompts(
        source="file", uri="memory://prompts/p.parquet", prompt_column="instruction", references_column="gold"
    )
    loaded, _ = load_prompts(config)
    assert loaded.column(columns.REFERENCES).to_pylist() == [["4"], ["red"]]
    assert loaded.column(columns.SOURCE).to_pylist() == ["memory://prompts/p.parquet"] * 2


def test_jsonl_through_memory_filesystem() -> None:
    with fsspec.open("memory://prompts/p.jsonl", "w") as handle:
        handle.write('{"prompt": "hello", "references": ["hi"]}\n')
    loaded, _ = load_prompts(FilePrompts(source="file", uri="memory://prompts/p.jsonl"))
    assert loaded.num_rows == 1


def test_hf_dataset_from_local_path_with_column_mapping(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    jsonl(
        folder / "train.jsonl",
        [{"q": "What is 3+4?", "a": ["7"]}, {"q": "Capital of France?", "a": ["Paris"]}],
    )
    config = HFPrompts(source="hf", path=str(folder), split="train", prompt_column="q", references_column="a")
    loaded, stats = load_prompts(config)
    assert loaded.num_rows == 2 and stats.rows_in == 2
    assert loaded.column(columns.REFERENCES).to_pylist() == [["7"], ["Paris"]]
    with pytest.raises(PromptSourceError, match="no column"):
        load_prompts(HFPrompts(source="hf", path=str(folder), prompt_column="question"))


# ----------------------------------------------------------------- streaming by shard


def whole_table_reference(config: FilePrompts, limit: int | None) -> tuple[pa.Table, dict[str, object]]:
    """The gather-everything algorithm, kept here to check the stream against."""
    from steps.base import StageStats
    from steps.prompts.normalise import InvalidRow, normalise_references
    from steps.prompts.sources import raw_rows

    stats, seen, rows = StageStats("prompts"), {}, []
    for raw in raw_rows(config):
        if limit is not None and len(seen) >= limit:
            break
        stats.rows_in += 1
        try:
            messages, refs = normalise_messages(raw.prompt), normalise_references(raw.references)
        except InvalidRow as exc:
            stats.drop(exc.reason, example=f"row {raw.index}: {exc}")
            continue
        pid = prompt_id(messages)
        if pid in seen:
            stats.drop("duplicate_prompt", example=f"row {raw.index}: same conversation as row {seen[pid]}")
            continue
        seen[pid] = raw.index
        rows.append(
            {
                columns.PROMPT_ID: pid,
                columns.MESSAGES: messages,
                columns.REFERENCES: refs,
                columns.SOURCE: config.uri,
                columns.SOURCE_ROW: raw.index,
            }
        )
    stats.rows_out = len(rows)
    stats.counts["with_references"] = sum(bool(r[columns.REFERENCES]) for r in rows)
    return pa.Table.from_pylist(rows, schema=PROMPTS), stats.to_dict()


def messy_rows(n: int) -> list[object]:
    """Duplicates far apart (across shards), bad rows, rows with and without references."""
    rows: list[object] = []
    for i in range(n):
        if i % 7 == 3:
            rows.append({"prompt": f"prompt {i // 3}"})  # repeats an earlier prompt
        elif i % 11 == 5:
            rows.append({"prompt": "   "})
        elif i % 13 == 6:
            rows.append({"prompt": [{"role": "bot", "content": "x"}]})
        else:
            rows.append({"prompt": f"prompt {i}", "references": [f"ref {i}"] if i % 2 else []})
    return rows


@pytest.mark.parametrize("shard_rows", [1, 4, 9, 1000])
@pytest.mark.parametrize("limit", [None, 1, 10, 23])
def test_streamed_shards_equal_the_whole_table_path(
    tmp_path: Path, shard_rows: int, limit: int | None
) -> None:
    from steps.base import StageStats
    from steps.prompts.normalise import stream_prompts

    config = FilePrompts(source="file", uri=jsonl(tmp_path / "p.jsonl", messy_rows(60)))
    want, want_stats = whole_table_reference(config, limit)
    assert want.num_rows == (limit or want.num_rows)
    assert limit == 1 or want_stats["drops"].get("duplicate_prompt")  # duplicates seen before the limit
    stats = StageStats("prompts")
    shards = list(stream_prompts(config, stats, shard_rows, limit))
    assert [s.num_rows for s in shards[:-1]] == [shard_rows] * (len(shards) - 1)
    assert 1 <= shards[-1].num_rows <= shard_rows
    for i, shard in enumerate(shards):  # each shard is exactly the whole table's slice
        assert shard.schema == PROMPTS and shard.equals(want.slice(i * shard_rows, shard_rows))
    assert stats.to_dict() == want_stats
    table, gathered = load_prompts(config, limit)
    assert table.equals(want) and gathered.to_dict() == want_stats


def test_parquet_source_is_read_in_batches_with_global_row_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steps.prompts import sources

    rows = messy_rows(30)
    source = pa.table(
        {
            "prompt": [r["prompt"] if isinstance(r["prompt"], str) else " " for r in rows],  # type: ignore[index]
            "references": [r.get("references", []) for r in rows],  # type: ignore[union-attr]
        }
    )
    pq.write_table(source, tmp_path / "p.parquet")
    whole, whole_stats = load_prompts(FilePrompts(source="file", uri=str(tmp_path / "p.parquet")))
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 4)
    batched, batched_stats = load_prompts(FilePrompts(source="file", uri=str(tmp_path / "p.parquet")))
    assert batched.equals(whole) and batched_stats.to_dict() == whole_stats.to_dict()
    assert batched.column(columns.SOURCE_ROW).to_pylist()[-1] == 29  # numbering runs on across batches
    assert whole_stats.drops["duplicate_prompt"] and whole_stats.drops["empty_prompt"]


def test_prompt_shards_stream_into_the_work_area(tmp_path: Path) -> None:
    from steps.run.files import read_table
    from steps.run.resume import WorkArea
    from steps.run.stages import prompt_shards
    from tests.conftest import make_recipe

    uri = jsonl(tmp_path / "p.jsonl", messy_rows(50))
    recipe = make_recipe(prompts={"source": "file", "uri": uri}, limit=20, output={"prompts_per_shard": 6})
    shards, stats = prompt_shards(recipe, WorkArea(str(tmp_path / "work")))
    want, want_stats = whole_table_reference(FilePrompts(source="file", uri=uri), 20)
    assert [s.rows for s in shards] == [6, 6, 6, 2]
    assert pa.concat_tables([read_table(s.uri, PROMPTS) for s in shards]).equals(want)
    assert stats.to_dict() == want_stats


def test_a_check_over_the_whole_source_still_fails_the_stream(tmp_path: Path) -> None:
    from steps.base import StageStats
    from steps.prompts.normalise import stream_prompts

    uri = jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    named = FilePrompts(source="file", uri=uri, references_column="gold")
    with pytest.raises(PromptSourceError, match="no row has the field 'gold'"):
        list(stream_prompts(named, StageStats("prompts"), 2))
    with pytest.raises(ValueError, match="shard_rows"):
        list(stream_prompts(named, StageStats("prompts"), 0))
