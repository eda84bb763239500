"""Security (issue 5 §6): safe YAML, no unpickling, no remote code by default, a card that user text cannot rewrite."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import DatasetCard
from jinja2.exceptions import SecurityError
from pydantic import ValidationError

from schemas import columns
from schemas.recipe import ModelConfig, RecipeError, load_recipe
from steps.engines import load_engine
from steps.pairing.pairs import make_pairs
from steps.publish import card as card_module
from steps.publish.card import md, render_card
from steps.publish.writer import WrittenFile
from tests.conftest import ROOT, make_recipe
from tests.steps.labelers.test_labeling import responses
from tests.steps.pairing.test_pairing import labels_for
from tests.steps.test_sampling import prompts_table

# ----------------------------------------------------------------- YAML


def test_recipe_with_a_python_object_tag_is_rejected(tmp_path: Path) -> None:
    """A tag that would run code under yaml.load is a clear error, and nothing runs."""
    marker = tmp_path / "pwned"
    for payload in (
        f"name: !!python/object/apply:os.system ['touch {marker}']\n",
        f"name: t\ndescription: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n",
        "name: !!python/name:os.system\n",
    ):
        path = tmp_path / "evil.yaml"
        path.write_text(payload)
        with pytest.raises(RecipeError, match=r"is not valid YAML.*could not determine a constructor"):
            load_recipe(str(path))
    assert not marker.exists()


# Calls that deserialise arbitrary objects (code execution on untrusted input).
_UNSAFE_CALLS = {
    ("yaml", "load"),
    ("yaml", "load_all"),
    ("yaml", "unsafe_load"),
    ("yaml", "unsafe_load_all"),
    ("yaml", "full_load"),
    ("yaml", "full_load_all"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}
_UNSAFE_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def unsafe_deserialisation(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that may unpickle or construct arbitrary objects, as ``file:line what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"{where} imports {n}" for n in names if n.split(".")[0] in _UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (
            (func.value.id, func.attr)
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            else None
        )
        keywords = {k.arg: k.value for k in node.keywords}
        loader = keywords.get("Loader")
        safe_loader = loader is not None and "Safe" in ast.unparse(loader)
        if name in _UNSAFE_CALLS and not (name in {("yaml", "load"), ("yaml", "load_all")} and safe_loader):
            found.append(f"{where} {name[0]}.{name[1]}")  # type: ignore[index]
        elif name == ("torch", "load"):
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where} torch.load without weights_only=True")
        elif name is not None and name[1] == "load" and name[0] in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"{where} numpy.load(allow_pickle=True)")
        if loader is not None and not safe_loader:
            found.append(f"{where} YAML with Loader={ast.unparse(loader)}")
        if (
            keywords.get("trust_remote_code") is not None
            and ast.unparse(keywords["trust_remote_code"]) == "True"
        ):
            found.append(f"{where} trust_remote_code=True hard-coded")
    return found


def test_the_scanner_finds_what_it_must() -> None:
    """The scan below is only worth something if it catches each pattern (and not the safe ones)."""
    bad = """
import pickle
from dill import loads
yaml.load(text)
yaml.load(text, Loader=yaml.FullLoader)
yaml.unsafe_load(text)
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
pd.read_pickle(path)
AutoModel.from_pretrained(x, trust_remote_code=True)
"""
    assert len(unsafe_deserialisation(bad)) == 11
    safe = """
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
torch.load(path, weights_only=True)
np.load(path)
model.eval()
AutoModel.from_pretrained(x, trust_remote_code=config.trust_remote_code)
"""
    assert unsafe_deserialisation(safe) == []


def test_no_unsafe_deserialisation_in_our_code() -> None:
    """No yaml.load/unsafe_load, pickle, or torch.load without weights_only=True under steps/ schemas/ flows/."""
    files = sorted(p for folder in ("steps", "schemas", "flows") for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        found += unsafe_deserialisation(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert found == []
    # And the plain-text form the issue names, in case a call hides from the AST walk (getattr etc.).
    pattern = re.compile(
        r"yaml\.load\(|yaml\.unsafe_load|pickle\.load|torch\.load\((?![^)]*weights_only=True)"
    )
    assert [str(p) for p in files if pattern.search(p.read_text(encoding="utf-8"))] == []


# ----------------------------------------------------------------- trust_remote_code


class _Stop(Exception):
    pass


def test_trust_remote_code_is_off_unless_the_recipe_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What reaches transformers' from_pretrained, for a policy and for a labeler's model."""
    import transformers

    calls: list[tuple[str, dict[str, Any]]] = []

    def tokenizer(location: str, *args: Any, **kwargs: Any) -> object:
        calls.append(("tokenizer", kwargs))
        return object()

    def model(location: str, *args: Any, **kwargs: Any) -> object:
        calls.append(("model", kwargs))
        raise _Stop  # enough: the arguments are what this test is about

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    recipe = make_recipe(
        policy={"model": str(folder), "engine": "transformers", "device": "cpu"},
        labelers=[
            {
                "kind": "judge_pointwise",
                "model": {"model": str(folder), "engine": "transformers", "device": "cpu"},
            }
        ],
    )
    for config in (recipe.policy, recipe.labelers[0].model):  # type: ignore[union-attr]
        assert config.trust_remote_code is False
        calls.clear()
        with pytest.raises(_Stop):
            load_engine(config)
        assert [kind for kind, _ in calls] == ["tokenizer", "model"]
        for _, kwargs in calls:
            assert kwargs["trust_remote_code"] is False
            assert kwargs.get("weights_only", True) is True  # never asks transformers to unpickle freely

    opted_in = ModelConfig(model=str(folder), engine="transformers", device="cpu", trust_remote_code=True)
    calls.clear()
    with pytest.raises(_Stop):
        load_engine(opted_in)
    assert [kwargs["trust_remote_code"] for _, kwargs in calls] == [True, True]


def test_gguf_conversion_never_trusts_remote_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from steps.engines.gguf_cache import materialise
    from steps.engines.models import resolve_model

    seen: list[dict[str, Any]] = []

    def record(location: str, *args: Any, **kwargs: Any) -> object:
        seen.append(kwargs)
        raise _Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    monkeypatch.setenv("PREFSMITH_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(_Stop):
        materialise(resolve_model(str(gguf), "transformers"))
    assert seen and not seen[0].get("trust_remote_code", False)


# ----------------------------------------------------------------- the data card

HOSTILE = "{{ 7*7 }} {% for x in range(3) %}loop{% endfor %} {{ ''.__class__.__mro__ }}"
STATS = {
    "prompts": {"source": "prompts {{ 7*7 }}.jsonl"},
    "stages": {
        name: {"rows_in": 1, "rows_out": 1, "drops": {}, "counts": {}, "examples": {}, "seconds": 0.0}
        for name in ("prompts", "sampling", "labeling", "pairing")
    },
}


def hostile_card(**card: Any) -> tuple[str, Any]:
    recipe = make_recipe(
        description=f"desc {HOSTILE}",
        labelers=[{"kind": "bleu", "name": "b_x"}],
        card={"pretty_name": f"Pretty {HOSTILE}", "tags": ["math", "{{ 7*7 }}"], **card},
    )
    prompts = prompts_table([f"prompt {HOSTILE}"])
    resp = responses(prompts, ["good {{ 7*7 }}", "bad {% raw %}"])
    sample, _ = make_pairs(prompts, resp, labels_for(resp, {"b_x": [2.0, 1.0]}), recipe)
    files = {"train": [WrittenFile("data/train-00000-of-00001.parquet", 1, "0" * 64, 10)]}
    # Recipes refuse such a labeler name (test below); the card escapes one anyway.
    scores = {columns.signal_column("b{{ 7*7 }}`x", columns.CHOSEN): {"count": 1, "mean": 2.0, "std": 0.0, "min": 2.0,
              "median": 2.0, "max": 2.0}}  # fmt: skip
    engine = {"model_id": "org/{{ 7*7 }}-model", "engine": "llama_cpp"}
    text = render_card(
        recipe, files, STATS, scores, sample, engine, {"b{{ 7*7 }}`x": {"variant": "bleuberi"}}
    )
    return text, recipe


def front_matter(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    header = text[4:].split("\n---\n", 1)[0]
    data = yaml.safe_load(header)
    assert isinstance(data, dict)
    return data


def test_card_shows_user_strings_literally_never_evaluates_them() -> None:
    text, recipe = hostile_card()
    body = text.split("\n---\n", 1)[1]
    assert "49" not in body.replace(recipe.fingerprint(), "")  # no {{ 7*7 }} was evaluated anywhere
    assert "looploop" not in body and "{% for x in range(3) %}loop{% endfor %}" in body
    assert md(f"desc {HOSTILE}") in body  # description: literal, Markdown-escaped
    assert f"# {md('Pretty ' + HOSTILE)}" in body  # pretty_name heading
    assert md("org/{{ 7*7 }}-model") in body  # model name
    assert md("prompts {{ 7*7 }}.jsonl") in body  # source
    example = body.split("## Example row", 1)[1].split("## Files", 1)[0]
    fenced = example.strip().split("\n", 1)[1].rsplit("\n", 1)[0]
    row = json.loads(fenced)
    assert (
        row[columns.PROMPT][0][columns.CONTENT] == f"prompt {HOSTILE}"
    )  # the prompt, character for character
    assert row[columns.CHOSEN][0][columns.CONTENT] == "good {{ 7*7 }}"
    # A signal name with a backtick cannot break out of its code span in the scores table.
    assert "| ``score_b{{ 7*7 }}`x_chosen`` |" in body


@pytest.mark.parametrize(
    "name", ["b{{ 7*7 }}`x", "has space", "dash-ed", "_private", "text", "prompt_id", "é"]
)
def test_labeler_names_that_cannot_be_columns_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="labelers: name"):
        make_recipe(labelers=[{"kind": "bleu", "name": name}])


def test_card_template_renders_in_a_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a template that reaches for Python internals cannot (the user strings never become template source)."""
    (tmp_path / "default.md.j2").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    monkeypatch.setattr(card_module, "TEMPLATES", tmp_path)
    with pytest.raises(SecurityError):
        hostile_card()
    (tmp_path / "default.md.j2").write_text("{% set _ = stats.update({'x': 1}) %}")
    with pytest.raises(SecurityError):  # immutable: the template cannot change the numbers it reports
        hostile_card()


def test_card_front_matter_cannot_be_injected() -> None:
    injected = "Name\nconfigs: []\nlicense: mit\n---\n# fake"
    text, _ = hostile_card(pretty_name=injected, license="apache-2.0\nconfigs: []", tags=["a\nb: c"])
    data = front_matter(text)
    assert data["pretty_name"] == injected
    assert data["license"] == "apache-2.0\nconfigs: []"
    assert "a\nb: c" in data["tags"] and "b" not in data
    expected_configs = [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": ["data/train-00000-of-00001.parquet"]}],
        }
    ]
    assert data["configs"] == expected_configs
    assert set(data) == {
        "license",
        "language",
        "task_categories",
        "size_categories",
        "tags",
        "configs",
        "pretty_name",
    }
    card = DatasetCard(text)  # the Hub's own parser reads the same metadata
    assert card.data.pretty_name == injected and card.data.configs == expected_configs
