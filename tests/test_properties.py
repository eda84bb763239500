"""Property-based tests of the bad-input contract (issue 17, item 4).

``tests/test_bad_inputs.py`` lists the bad inputs we thought of; these tests generate the ones we
did not: prompt files (JSONL and Parquet) with arbitrary Unicode, nesting, types and sizes, recipes
with arbitrary keys and values, and ``eval_labelers`` pairs files. The property is the README's
"Bad input" promise, checked through the entry points a user hits:

* the input ends in one of *our* error types, whose message names the file and the line, column or
  recipe key at fault — ``PromptSourceError`` (prompt source), ``RecipeError`` / ``ModelSpecError``
  (recipe, its preflight), ``PairsFileError`` (pairs file) — and nothing else: any other exception
  escapes the test and fails it, because a user would see it as a traceback;
* or it is read, and every row read is either kept or dropped with a reason code: rows read ==
  kept + sum of the drops, and rows read == the rows the file has (nothing silently skipped).

Generation is derandomised with a bounded number of examples, so CI sees the same inputs every run
and the module stays well under a minute. To explore further by hand, run it with
``PREFSMITH_PROPERTY_EXAMPLES=2000`` (more examples) and ``PREFSMITH_PROPERTY_RANDOM=1`` (new ones
each run); anything found becomes an ``@example`` here and a line of README's Bad input table.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from schemas import columns
from schemas.recipe import PIPELINES_DIR, EvalPairs, FilePrompts, RecipeError, load_recipe
from steps.base import StageStats
from steps.engines import ModelSpecError
from steps.labelers.checks import preflight
from steps.prompts import sources as prompt_source
from steps.prompts.normalise import ROLES, check_prompts, load_prompts, stream_prompts
from steps.prompts.sources import PromptSourceError
from steps.quality.evaluate import build_tables
from steps.quality.pairs_file import PairsFileError, read_pairs

EXAMPLES = int(os.environ.get("PREFSMITH_PROPERTY_EXAMPLES", "0"))
# Hypothesis keeps a cache of constants under ./.hypothesis even with no example database: send it
# to a temporary folder so a test run writes nothing into the checkout.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="prefsmith-hypothesis-"))


def profile(default_examples: int) -> settings:
    """The fixed profile: same inputs every run, no example database written into the repository.

    ``tmp_path`` is shared by a test's examples; each example overwrites its own files, which is
    why the function-scoped-fixture health check is off.
    """
    return settings(
        max_examples=EXAMPLES or default_examples,
        derandomize=os.environ.get("PREFSMITH_PROPERTY_RANDOM") != "1",
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ----------------------------------------------------------------- building blocks

# Characters that have broken text handling somewhere before: unpaired surrogates (valid in a JSON
# escape, not in UTF-8), NUL, a BOM, zero-width and line/paragraph separators, a combining accent.
ODD_CHARS = ["\ud800", "\udfff", "\x00", "\ufeff", "\u200b", "\u2028", "\x85", "\r", "\u0301", "\u3000"]
# Strings a recipe or a prompt file is likely to contain, right or nearly right.
WORDS = [
    "", " ", "\t\n", "user", "system", "assistant", "tool", "prompt", "references", "content", "role",
    "chosen", "rejected", "bleu", "judge", "smollm2-135m-instruct", "org/name", "org/name:f.gguf",
    "./m.gguf", "/nowhere/m.gguf", "~", "~no-such-user-prefsmith/m.gguf", "{{ x }}", "Café", "e\u0301",
    "a" * 300,
]  # fmt: skip


def text(surrogates: bool = True, max_size: int = 12) -> st.SearchStrategy[str]:
    """Any Unicode, with the odd characters drawn as often as the rest (a list of characters, not
    ``st.text``, which would fold them into the whole code space and almost never draw one)."""
    odd = [ch for ch in ODD_CHARS if surrogates or not 0xD800 <= ord(ch) <= 0xDFFF]
    chars = st.one_of(st.sampled_from(odd), st.characters(exclude_categories=() if surrogates else ["Cs"]))
    return st.sampled_from(WORDS) | st.lists(chars, max_size=max_size).map("".join)


def scalars(surrogates: bool = True) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(),  # NaN and ±inf included
        text(surrogates),
    )


def values(surrogates: bool = True) -> st.SearchStrategy[Any]:
    """Arbitrary JSON-like data: scalars in lists and mappings, a few levels deep."""
    return st.recursive(
        scalars(surrogates),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text(surrogates), inner, max_size=3),
        max_leaves=8,
    )


def messages() -> st.SearchStrategy[Any]:
    """Message lists that are often right and often nearly right."""
    message = st.fixed_dictionaries(
        {},
        optional={
            columns.ROLE: st.sampled_from(ROLES) | values(),
            columns.CONTENT: text() | values(),
            "name": values(),
        },
    )
    return st.lists(
        st.fixed_dictionaries({columns.ROLE: st.sampled_from(ROLES), columns.CONTENT: text()})
        | message
        | values(),
        max_size=4,
    )


def number_literal() -> st.SearchStrategy[bytes]:
    """Integers as JSON/YAML spell them, up to past CPython's 4,300-digit int() limit."""
    return st.builds(
        lambda sign, digits: sign + b"9" * digits,
        st.sampled_from([b"", b"-"]),
        st.sampled_from([1, 19, 20, 400, 4300, 4301, 10_000]),
    )


def nesting() -> st.SearchStrategy[bytes]:
    """Lists nested shallow to far past the interpreter's recursion limit."""
    return st.sampled_from([1, 50, 900, 5_000, 100_000]).map(lambda depth: b"[" * depth + b"]" * depth)


def json_line(record: st.SearchStrategy[Any], fields: list[str]) -> st.SearchStrategy[bytes]:
    """One line of a JSONL file: mostly a record, else another JSON value, junk, a blank or an extreme.

    Text is written escaped or raw; raw unpaired surrogates become bytes that are not UTF-8. Records
    dominate because one unreadable line ends the read, and the rows after it are what gets tested.
    """

    def dump(value: Any, ascii_only: bool) -> bytes:
        return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")

    escaped = st.builds(dump, record, st.just(True))
    other = st.builds(dump, record | values(), st.booleans())
    extreme = st.builds(
        lambda field, literal: b'{"' + field.encode() + b'": ' + literal + b"}",
        st.sampled_from(fields),
        number_literal() | nesting(),
    )
    junk = (st.binary(max_size=16) | text().map(lambda s: s.encode("utf-8", "surrogatepass"))).map(
        lambda line: line.replace(b"\n", b" ")
    )
    blank = st.sampled_from([b"", b" ", b"\t", b"\r"])
    kinds = [escaped] * 6 + [other, extreme, junk, blank]
    return st.sampled_from(kinds).flatmap(lambda kind: kind)


def jsonl_file(record: st.SearchStrategy[Any], fields: list[str]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda bom, lines, newline: (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + newline,
        st.booleans(),
        st.lists(json_line(record, fields), max_size=8),
        st.sampled_from([b"", b"\n"]),
    )


def content_lines(data: bytes, strip: Callable[[bytes, int], bool]) -> list[int]:
    """1-based numbers of the lines a reader must account for (``strip`` says the line is not blank)."""
    return [n for n, line in enumerate(data.split(b"\n"), start=1) if strip(line, n)]


# Arrow types for Parquet: scalars, lists, structs (often shaped like messages) and maps, nested.
ARROW_SCALARS = [
    pa.string(), pa.large_string(), pa.binary(), pa.int64(), pa.float64(),
    pa.bool_(), pa.null(), pa.dictionary(pa.int32(), pa.string()),
]  # fmt: skip
FIELD_NAMES = st.sampled_from([columns.ROLE, columns.CONTENT, "name", "text"]) | text(
    surrogates=False, max_size=4
)


def arrow_types() -> st.SearchStrategy[pa.DataType]:
    def nested(inner: st.SearchStrategy[pa.DataType]) -> st.SearchStrategy[pa.DataType]:
        struct = st.dictionaries(FIELD_NAMES, inner, min_size=1, max_size=3).map(
            lambda fields: pa.struct(list(fields.items()))
        )
        return st.one_of(
            inner.map(pa.list_),
            inner.map(pa.large_list),
            struct,
            inner.map(lambda value: pa.map_(pa.string(), value)),
        )

    message = pa.struct([(columns.ROLE, pa.string()), (columns.CONTENT, pa.string())])
    categorical = pa.struct(
        [(columns.ROLE, pa.dictionary(pa.int32(), pa.string())), (columns.CONTENT, pa.string())]
    )
    return st.one_of(
        # string_view only at the top: pyarrow 26 cannot write it nested in row groups.
        st.sampled_from(
            [pa.string(), pa.string_view(), pa.list_(message), pa.list_(categorical), pa.list_(pa.string())]
        ),
        st.recursive(st.sampled_from(ARROW_SCALARS), nested, max_leaves=4),
    )


def arrow_values(kind: pa.DataType, name: str = "") -> st.SearchStrategy[Any]:
    """Python values of ``kind`` (None anywhere); a ``role`` field draws real roles more often."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        strings = text(surrogates=False)  # Arrow holds UTF-8 only
        value: st.SearchStrategy[Any] = st.sampled_from(ROLES) | strings if name == columns.ROLE else strings
    elif pa.types.is_binary(kind):
        value = st.binary(max_size=8)
    elif pa.types.is_integer(kind):
        value = st.integers(-(2**63), 2**63 - 1)
    elif pa.types.is_floating(kind):
        value = st.floats()
    elif pa.types.is_boolean(kind):
        value = st.booleans()
    elif pa.types.is_null(kind):
        return st.none()
    elif pa.types.is_map(kind):
        value = st.lists(st.tuples(text(surrogates=False), arrow_values(kind.item_type)), max_size=2)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        value = st.lists(arrow_values(kind.value_type), max_size=3)
    elif pa.types.is_struct(kind):
        fields = [kind.field(i) for i in range(kind.num_fields)]
        value = st.fixed_dictionaries({f.name: arrow_values(f.type, f.name) for f in fields})
    else:  # pragma: no cover - arrow_types() makes no other kind
        raise AssertionError(f"no values for {kind}")
    return st.none() | value


@st.composite
def arrow_column(draw: st.DrawFn, rows: int) -> pa.Array:
    kind = draw(arrow_types())
    return pa.array([draw(arrow_values(kind)) for _ in range(rows)], type=kind)


@st.composite
def parquet_file(draw: st.DrawFn, names: list[str]) -> tuple[bytes, int | None]:
    """A Parquet file whose columns are some of ``names`` (or others), of any types, in row groups of
    any size; or a file cut off mid-copy, or not Parquet at all. Returns its bytes and its row count
    (None: no reader can take it).
    """
    rows = draw(st.integers(0, 6))
    # The first name (the column a reader looks for) is there most of the time, so types get tested.
    first = [names[0]] if draw(st.integers(0, 5)) else []
    others = st.sampled_from(names[1:]) | text(surrogates=False, max_size=6)
    wanted = first + [n for n in draw(st.lists(others, max_size=3, unique=True)) if n not in first]
    table = pa.table({name: draw(arrow_column(rows)) for name in wanted} or {"unrelated": pa.nulls(rows)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=draw(st.integers(1, 4)))
    data = sink.getvalue().to_pybytes()
    damage = draw(st.sampled_from(["none"] * 8 + ["cut", "junk"]))
    if damage == "cut":
        return data[: draw(st.integers(0, len(data) - 1))], None
    if damage == "junk":
        return draw(st.binary(max_size=32)), None
    return data, rows


def categorical_messages(rows: int = 2) -> tuple[bytes, int]:
    """Messages whose ``role`` is categorical (pandas writes that), one row per row group: found by
    the Parquet properties, pyarrow could not return such a column across row groups."""
    role = pa.dictionary(pa.int32(), pa.string())
    kind = pa.list_(pa.struct([(columns.ROLE, role), (columns.CONTENT, pa.string())]))
    prompts = [[{columns.ROLE: "user", columns.CONTENT: f"q{i}"}] for i in range(rows)]
    sink = pa.BufferOutputStream()
    data = {"prompt": pa.array(prompts, kind), "chosen": ["a"] * rows, "rejected": ["b"] * rows}
    pq.write_table(pa.table(data), sink, row_group_size=1)
    return sink.getvalue().to_pybytes(), rows


# ----------------------------------------------------------------- 1. prompt files

REFERENCES = st.none() | text() | st.lists(text() | values(), max_size=3) | values()
PROMPT_RECORDS = st.fixed_dictionaries(
    {"prompt": text() | messages()}, optional={"references": REFERENCES, "id": values()}
) | st.fixed_dictionaries({}, optional={"prompt": values(), "references": REFERENCES, "id": values()})


def prompt_config(uri: str, named_refs: str | None, prompt_column: str = "prompt") -> FilePrompts:
    """Default references column, or one the recipe names (which then must exist), or none."""
    extra: dict[str, Any] = {} if named_refs == "default" else {"references_column": named_refs}
    return FilePrompts(source="file", uri=uri, prompt_column=prompt_column, **extra)


def check_prompt_outcome(
    config: FilePrompts, rows_in_file: list[int], last_row: int
) -> tuple[pa.Table, StageStats] | None:
    """The property for one prompt source; returns what loaded (None: a clean error)."""
    try:
        table, stats = load_prompts(config)
    except PromptSourceError as exc:
        message = str(exc)
        assert config.uri in message, message
        line = re.search(r" line (\d+):", message)
        if line is not None:
            assert 1 <= int(line.group(1)) <= last_row, message
        else:
            assert re.search(
                r"no usable prompts|no row has the field|column |not a readable Parquet", message
            )
        # The CLI's early check agrees on a source that has no usable row at all.
        if "no usable prompts" in message:
            with pytest.raises(PromptSourceError, match="no usable prompts"):
                check_prompts(config)
        return None
    # Every row read is kept or dropped with a reason, and every row of the file is read.
    assert stats.rows_in == stats.rows_out + sum(stats.drops.values()), stats
    assert stats.rows_in == len(rows_in_file), (stats, rows_in_file)
    assert table.num_rows == stats.rows_out and set(stats.examples) <= set(stats.drops)
    kept_rows = table.column(columns.SOURCE_ROW).to_pylist()
    assert set(kept_rows) <= set(rows_in_file) and len(set(kept_rows)) == len(kept_rows)
    ids = table.column(columns.PROMPT_ID).to_pylist()
    assert len(set(ids)) == len(ids)
    for conversation in table.column(columns.MESSAGES).to_pylist():
        assert conversation[-1][columns.ROLE] == "user" and conversation[-1][columns.CONTENT]
    check_prompts(config)  # the CLI's check passes whatever the loader accepts
    # Streaming in small shards gives the same prompts and the same counts.
    shard_stats = StageStats("prompts")
    shards = list(stream_prompts(config, shard_stats, shard_rows=2))
    assert pa.concat_tables(shards).combine_chunks().equals(table)
    assert shard_stats.to_dict() == stats.to_dict()
    return table, stats


@profile(120)
@given(data=jsonl_file(PROMPT_RECORDS, ["prompt", "references"]), refs=st.sampled_from(["default", "gold"]))
# Found by this property (each was a traceback): an integer of over 4,300 digits, nesting past the
# recursion limit.
@example(data=b'{"prompt": "fine"}\n{"prompt": ' + b"9" * 4301 + b"}\n", refs="default")
@example(data=b'{"prompt": "fine"}\n{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}\n", refs="default")
def test_any_jsonl_prompt_file_is_read_or_named_as_bad(tmp_path: Path, data: bytes, refs: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(data)

    def not_blank(line: bytes, n: int) -> bool:
        try:
            return bool(line.decode("utf-8-sig" if n == 1 else "utf-8").strip())
        except UnicodeDecodeError:
            return True

    rows = content_lines(data, not_blank)
    check_prompt_outcome(prompt_config(str(path), refs), rows, data.count(b"\n") + 1)


@profile(120)
@given(
    file=parquet_file(["prompt", "references", "gold"]),
    refs=st.sampled_from(["default", "gold", None]),
    batch_rows=st.sampled_from([1, 2, 4096]),
)
@example(file=categorical_messages(), refs="default", batch_rows=4096)  # found: a traceback, now read
def test_any_parquet_prompt_file_is_read_or_named_as_bad(
    tmp_path: Path, file: tuple[bytes, int | None], refs: str | None, batch_rows: int
) -> None:
    data, rows = file
    path = tmp_path / "prompts.parquet"
    path.write_bytes(data)
    config = prompt_config(str(path), refs)
    with mock.patch.object(prompt_source, "PARQUET_BATCH_ROWS", batch_rows):
        loaded = check_prompt_outcome(config, list(range(rows or 0)), rows or 0)
    assert loaded is None or rows is not None  # a cut or junk file is never read as prompts


# ----------------------------------------------------------------- 2. recipes

SHIPPED = yaml.safe_load((PIPELINES_DIR / "default.yaml").read_text(encoding="utf-8"))
# Every other section and labeler kind, valid as written, so mutations reach their validators.
KITCHEN_SINK: dict[str, Any] = {
    "name": "sink",
    "prompts": {"source": "file", "uri": "prompts.jsonl", "format": "jsonl", "references_column": "refs"},
    "policy": {"model": "smollm2-135m-instruct", "engine": "transformers", "device": "cpu", "n_threads": 2},
    "sampling": {"n": 2, "temperature": 0.7, "too_long": "truncate_left"},
    "labelers": [
        {"kind": "bleu", "variant": "sacrebleu", "weight": -0.5},
        {"kind": "judge_pairwise", "name": "pw"},
        {"kind": "judge_pointwise", "mode": "sampled", "n": 2, "temperature": 1.0, "max_tokens": 32},
        {"kind": "density_ratio", "strong": {"exemplar": {"prompt": "p", "response": "r"}}},
    ],
    "pairing": {
        "rule": "best_vs_random", "scale": "spread", "min_margin": 0.5,
        "length_control": {"max_ratio": 3.0},
    },
    "consistency": {
        "min_agree": 1, "ambiguous_below": 0.1, "length_guard": {"max_ratio": 2.0, "unless_agreement": 0.5},
        "rank_signals": ["bleu", "pw"], "min_rank_consistency": 0.2,
    },
    "output": {"uri": "out", "format": "arrow", "rows_per_shard": 5, "prompts_per_shard": 2},
    "card": {"license": "mit", "pretty_name": "x", "language": ["en", "fr"], "tags": ["t"]},
    "eval": {"pairs": ["pairs.jsonl", {"uri": "p.parquet", "columns": {"prompt": "q"}}], "min_accuracy": 0.5},
}  # fmt: skip


def key_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a recipe (list items by index), the root included."""
    paths = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            paths += key_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            paths += key_paths(value, (*prefix, i))
    return paths


NUMBERS = [0, -1, 1, 2, 10**30, -(10**30), 0.5, 1e-300, 1e300, math.nan, math.inf, -math.inf]


def yaml_values(like: Any = None) -> st.SearchStrategy[Any]:
    """A value to put where ``like`` was: mostly a near miss of its own type (a number: 0, -1, huge,
    NaN, ±inf; a string: an odd or nearly right word), else anything at all."""
    anything = st.sampled_from(["", [], {}, None]) | values(surrogates=False)  # YAML holds no lone surrogate
    if isinstance(like, bool) or like is None:
        return anything
    if isinstance(like, int | float):
        return st.sampled_from(NUMBERS) | st.sampled_from(NUMBERS) | anything
    if isinstance(like, str):
        return text(surrogates=False) | text(surrogates=False) | anything
    return anything


@st.composite
def mutated_recipe(draw: st.DrawFn) -> Any:
    """A valid recipe with 1-3 keys changed, removed, added (any Unicode) or renamed; values are
    changed more often than structure, since each validator guards values."""
    recipe = json.loads(json.dumps(draw(st.sampled_from([SHIPPED, KITCHEN_SINK]))))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one: most recipes stay valid
        paths = key_paths(recipe)
        leaves = [p for p in paths if p and not isinstance(get_path(recipe, p), dict | list)] or paths
        path = draw(st.sampled_from(leaves) | st.sampled_from(leaves) | st.sampled_from(paths))
        if not path:
            recipe = draw(yaml_values()) if draw(st.integers(0, 9)) == 0 else recipe
            continue
        parent = get_path(recipe, path[:-1])
        leaf = path[-1]
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add", "rename"]))
        if op == "set":
            parent[leaf] = draw(yaml_values(parent[leaf]))
        elif op == "delete":
            del parent[leaf]
        elif isinstance(parent, dict):
            new = draw(text(surrogates=False) | st.integers() | st.none())
            if op == "add":
                parent[new] = draw(yaml_values())
            else:
                parent[new] = parent.pop(leaf)
        if not isinstance(recipe, dict | list):
            break
    return recipe


def get_path(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


def recipe_text() -> st.SearchStrategy[bytes]:
    """A recipe file's bytes: generated YAML, or text that may not be YAML (or UTF-8) at all."""
    as_yaml = st.builds(
        lambda data, unicode: yaml.safe_dump(data, allow_unicode=unicode).encode("utf-8"),
        mutated_recipe() | values(surrogates=False),
        st.booleans(),
    )
    extreme = st.builds(
        lambda key, literal: b"name: t\n" + key + b": " + literal + b"\n",
        st.sampled_from([b"limit", b"labelers", b"description"]),
        number_literal() | nesting(),
    )
    raw = st.binary(max_size=24) | text().map(lambda s: s.encode("utf-8", "surrogatepass"))
    tagged = st.sampled_from(
        [b"name: !!python/object/apply:os.system ['true']\n", b"---\nname: a\n---\nname: b\n"]
    )
    return st.one_of(as_yaml, as_yaml, as_yaml, extreme, raw, tagged)


def check_recipe_error(exc: Exception, path: Path) -> None:
    """A recipe error names the file, and each validation problem the key path it is at."""
    message = str(exc)
    assert str(path) in message, message
    first, *problems = message.splitlines()
    if first.endswith("is invalid:"):
        assert problems and all(re.match(r"  \S[^\n]*: ", line) for line in problems), message


@profile(150)
@given(data=recipe_text())
# Found by this property: tracebacks (non-UTF-8 bytes, a 4,301-digit integer, deep nesting, a model
# path "~user" of no such user), a message split mid-line by a key or value holding a line break,
# and temperature: .inf accepted (then written to the manifest as Infinity). 2024-02-30 takes the
# integer's path (a ValueError from the YAML constructor).
@example(data=b"name: caf\xe9\n")
@example(data=b"name: t\nlimit: " + b"9" * 4301 + b"\n")
@example(data=b"name: t\nlabelers: " + b"[" * 5000 + b"]" * 5000 + b"\n")
@example(data=b"name: t\ndescription: 2024-02-30\n")
@example(data=b"name: t\npolicy: {model: '~no-such-user-prefsmith/m.gguf'}\n")
@example(data=b'name: t\nsampling: {"\\n": 1}\n')
@example(data=b'name: t\nprompts: {source: "\\u2028"}\n')
@example(data=b"name: t\nsampling: {temperature: .inf}\n")
def test_any_recipe_is_accepted_whole_or_rejected_naming_the_key(tmp_path: Path, data: bytes) -> None:
    """What ``python -m flows.build_prefs --recipe FILE`` does before Prefect starts, minus the I/O checks."""
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    try:
        recipe = load_recipe(str(path))
    except RecipeError as exc:
        check_recipe_error(exc, path)
        return
    # An accepted recipe survives what the run does with it: CLI overrides (revalidated), the
    # manifest (strict JSON: no NaN or Infinity, which most JSON readers reject) and the card's
    # recipe YAML, which reads back as the same recipe.
    overridden = recipe.with_overrides(**{"limit": 3, "sampling.seed": 7, "output.uri": str(tmp_path / "o")})
    assert overridden.sampling.seed == 7
    dumped = recipe.model_dump(mode="json")
    json.dumps(dumped, allow_nan=False)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(dumped, allow_unicode=True), encoding="utf-8")
    assert load_recipe(str(again)).fingerprint() == recipe.fingerprint()
    try:
        preflight(recipe)
    except (ModelSpecError, RecipeError) as exc:
        assert re.match(r"(policy|labelers\.\d+|pairing\.judge)[.\w ()]*: ", str(exc)), str(exc)


# ----------------------------------------------------------------- 3. eval_labelers pairs files

PAIR_IDS = st.sampled_from(["a", "a@2", "a@3", "b", 0, ""]) | values()
PAIR_RECORDS = st.fixed_dictionaries(
    {columns.PROMPT: text() | messages(), columns.CHOSEN: text(), columns.REJECTED: text()},
    optional={"reference": REFERENCES, "id": PAIR_IDS},
) | st.fixed_dictionaries(
    {},
    optional={
        columns.PROMPT: text() | messages() | values(),
        columns.CHOSEN: text() | values(),
        columns.REJECTED: text() | values(),
        "reference": REFERENCES,
        "id": PAIR_IDS,
    },
)
PAIR_FIELDS = [columns.PROMPT, columns.CHOSEN, columns.REJECTED, "reference", "id"]


def check_pairs_outcome(source: EvalPairs, rows_in_file: list[int], last_row: int) -> bool:
    """The property for one pairs file; True if it was read (False: a clean error)."""
    try:
        pairs, skipped = read_pairs(source)
    except PairsFileError as exc:
        message = str(exc)
        assert source.location in message, message
        line = re.search(r" line (\d+):", message)
        if line is not None:
            assert 1 <= int(line.group(1)) <= last_row, message
        else:  # a whole-file problem: it says which, and what to do
            assert re.search(r"not a readable Parquet file .*set format: jsonl|cannot be opened", message)
        return False
    assert len(pairs) + sum(skipped.values()) == len(rows_in_file), (len(pairs), skipped, rows_in_file)
    assert {p.line for p in pairs} <= set(rows_in_file)
    ids = [p.pid for p in pairs]
    assert len(set(ids)) == len(ids), ids  # two pairs sharing an id would be scored as one group
    # What measure_recipe / main do next with the pairs: the pipeline's own tables.
    prompts, responses, sides = build_tables(pairs, source.label, seed=0)
    assert prompts.num_rows == len(pairs) and responses.num_rows == 2 * len(pairs) == 2 * len(sides)
    assert len(set(responses.column(columns.RESPONSE_ID).to_pylist())) == responses.num_rows
    return True


@profile(120)
@given(data=jsonl_file(PAIR_RECORDS, PAIR_FIELDS))
# Found by this property: tracebacks for a 4,301-digit integer and for a lone surrogate in chosen
# or rejected (read, then refused by Arrow when the tables were built).
@example(data=b'{"prompt": "p", "chosen": "a", "rejected": ' + b"9" * 4301 + b"}\n")
@example(data=b'{"prompt": "p", "chosen": "a", "rejected": "b", "id": ' + b"[" * 5000 + b"]" * 5000 + b"}")
@example(data=b'{}\n{"prompt": "user", "chosen": "system", "rejected": "\\ud800"}')
def test_any_jsonl_pairs_file_is_read_or_named_as_bad(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(data)
    rows = content_lines(data, lambda line, n: bool(line.strip()))
    check_pairs_outcome(EvalPairs(uri=str(path)), rows, data.count(b"\n") + 1)


@profile(100)
@given(
    file=parquet_file([*PAIR_FIELDS, "q"]),
    columns=st.sampled_from([{}, {"prompt": "q"}, {"chosen": "rejected"}, {"id": "nowhere"}]),
)
# Found by this property: tracebacks for a file that is not Parquet, and for categorical messages.
@example(file=(b"", None), columns={})
@example(file=categorical_messages(), columns={})
def test_any_parquet_pairs_file_is_read_or_named_as_bad(
    tmp_path: Path, file: tuple[bytes, int | None], columns: dict[str, str]
) -> None:
    data, rows = file
    path = tmp_path / "pairs.parquet"
    path.write_bytes(data)
    source = EvalPairs(uri=str(path), columns=columns)
    read = check_pairs_outcome(source, list(range(1, (rows or 0) + 1)), rows or 0)
    assert not read or rows is not None  # a cut or junk file is never read as pairs


@profile(60)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["p", "q"]), st.sampled_from([None, "", "a", "a@2", "a@3", "a@3.2", "b"])),
        max_size=6,
    )
)
@example(rows=[("p", "a@3"), ("p", "a"), ("p", "a")])  # found: line 3 became "a@3", line 1's id
def test_pair_ids_stay_unique_whatever_ids_the_file_gives(
    tmp_path: Path, rows: list[tuple[str, str]]
) -> None:
    """Two pairs with one id would be one prompt group: their responses' z-scores would mix."""
    records = [
        {"prompt": p, "chosen": "x", "rejected": "y", **({"id": i} if i is not None else {})} for p, i in rows
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    pairs, skipped = read_pairs(EvalPairs(uri=str(path)))
    assert len(pairs) == len(rows) and not skipped
    assert len({p.pid for p in pairs}) == len(pairs), [p.pid for p in pairs]


def test_what_the_properties_found_is_read_not_refused(tmp_path: Path) -> None:
    """The finds whose fix is to read the input: the properties only ask for no traceback."""
    data, rows = categorical_messages(3)
    path = tmp_path / "categorical.parquet"
    path.write_bytes(data)
    table, stats = load_prompts(prompt_config(str(path), "default"))
    assert table.num_rows == stats.rows_in == rows
    assert table.column(columns.MESSAGES).to_pylist()[2] == [{columns.ROLE: "user", columns.CONTENT: "q2"}]
    assert len(read_pairs(EvalPairs(uri=str(path)))[0]) == rows
    # A byte-order mark starts a pairs file as it may start a prompts file.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    [pair], _ = read_pairs(EvalPairs(uri=str(bom)))
    assert pair.messages == [{columns.ROLE: "user", columns.CONTENT: "p"}]
    # A lone surrogate in a response is that pair's drop, named, not a failure when tables are built.
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text(
        '{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
    )
    pairs, skipped = read_pairs(EvalPairs(uri=str(surrogate)))
    assert len(pairs) == 1 and dict(skipped) == {"invalid_unicode": 1}
