"""The data card: ``<output>/README.md`` with HF YAML front matter and an honest account.

The YAML header is produced with ``yaml.safe_dump`` from a dict, never by
templating strings, so a prompt or model name cannot break it. Every
user-controlled string placed in the Markdown body goes through ``md`` (inline)
or ``fence`` (code blocks): the card is a document about untrusted text and
must not be rewritten by it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from schemas import columns
from schemas.recipe import Recipe
from schemas.statistics import RunStatistics
from steps.publish.writer import WrittenFile, package_version

TEMPLATES = Path(__file__).resolve().parents[2] / "data_cards"
# Characters that change meaning inline (emphasis, code, links, HTML, entities, table
# cells). Line-start markers (#, -, +, 1.) cannot occur: values are placed mid-line.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


def md(value: Any) -> str:
    """Escape a value for inline Markdown: no links, HTML, emphasis or table breaks survive."""
    text = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", text)


def code(value: Any) -> str:
    """An inline code span that the value cannot close (longer backtick run, one line)."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def fence(value: Any, lang: str = "") -> str:
    """A fenced block longer than any backtick run inside, so content cannot close it."""
    text = str(value)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


def size_category(n: int) -> str:
    for bound, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if n < bound:
            return label
    return "n>10M"


def front_matter(recipe: Recipe, files: dict[str, list[WrittenFile]], rows: int) -> str:
    """``default`` is the kept pairs; ``dropped`` (if any file) is its own config, loadable by name."""
    configs = [
        {
            "config_name": "default" if split == "train" else split,
            "data_files": [{"split": "train", "path": [f.path for f in entries]}],
        }
        for split, entries in files.items()
        if entries
    ]
    header: dict[str, Any] = {
        "license": recipe.card.license,
        "language": recipe.card.language,
        "task_categories": ["text-generation"],
        "size_categories": [size_category(rows)],
        "tags": sorted({"synthetic", "preference", "dpo", "prefsmith", *recipe.card.tags}),
        "configs": configs,
    }
    if recipe.card.pretty_name:
        header["pretty_name"] = recipe.card.pretty_name
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n"


def _example(sample: pa.Table) -> str | None:
    if not sample.num_rows:
        return None
    row = sample.to_pylist()[0]

    def clip(text: str, limit: int = 600) -> str:
        return text if len(text) <= limit else text[:limit] + " …[truncated]"

    for key in (columns.PROMPT, columns.CHOSEN, columns.REJECTED):
        row[key] = [{**m, columns.CONTENT: clip(m[columns.CONTENT])} for m in row[key]]
    return json.dumps(row, indent=2, ensure_ascii=False)


def render_card(
    recipe: Recipe,
    files: dict[str, list[WrittenFile]],
    stats: RunStatistics,
    scores: dict[str, dict[str, float | int]],
    sample: pa.Table,
    engine: dict[str, str],
    labeler_settings: dict[str, dict[str, Any]],
    images: dict[str, str] | None = None,
) -> str:
    # A sandbox, although only our own template is ever compiled: user strings reach it as data
    # (never as template source), and the sandbox keeps even a bad template from calling into Python.
    env = ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(TEMPLATES),
        undefined=StrictUndefined,
        autoescape=False,  # Markdown, not HTML: escaping is explicit through md/fence
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["md"] = md
    env.filters["fence"] = fence
    env.filters["code"] = code
    env.filters["num"] = lambda v: f"{v:,.4g}" if isinstance(v, float) else f"{v:,}"
    rows = sum(f.rows for f in files.get("train", []))
    body = env.get_template("default.md.j2").render(
        recipe=recipe,
        recipe_hash=recipe.fingerprint(),
        version=package_version(),
        files=files,
        rows=rows,
        stats=stats,
        scores=scores,
        example=_example(sample),
        engine=engine,
        labelers=labeler_settings,
        sampling=recipe.sampling,
        images=images or {},
        dropped=sum(f.rows for f in files.get("dropped", [])),
        recipe_yaml=yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True),
    )
    return front_matter(recipe, files, rows) + body
