"""Record the parts of vLLM's API that prefsmith touches, read from a downloaded wheel or sdist.

vLLM cannot be installed on CPU-only machines, so its API is read from source
with ``ast`` (nothing is imported or executed) and written to
``tests/fakes/vllm_api.json``. ``tests/steps/engines/test_vllm_engine.py`` checks the fake
``vllm`` package against that file, so the fake cannot drift from the real
signatures unnoticed. Refresh it when the supported range changes::

    for v in 0.6.0 0.11.1 0.33.0; do pip download vllm==$v --no-deps --only-binary :all: \
        --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 --python-version 3.12 -d /tmp/vllm_wheel; done
    python tests/fakes/snapshot_vllm_api.py /tmp/vllm_wheel/vllm-*.whl

Each archive becomes one entry under ``versions``; the newest is what the fake
mirrors, the oldest is the lower bound declared in ``pyproject.toml``. 0.11.1 is
the first release whose pooling API the reward-model scorer can use
(``LLM.classify`` with ``PoolingParams(use_activation=False)``: raw logits).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "vllm_api.json"
_VERSION = re.compile(r"^vllm-(\d+(?:\.\d+)*(?:\.post\d+)?)[-.]")


def _sources(archive: Path) -> Iterator[tuple[str, str]]:
    """(path under ``vllm/``, text) for every Python file of the package in a wheel or sdist."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith("vllm/") and name.endswith(".py"):
                    yield name, zf.read(name).decode("utf-8", errors="replace")
        return
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            parts = member.name.split("/", 1)
            if (
                member.isfile()
                and len(parts) == 2
                and parts[1].startswith("vllm/")
                and parts[1].endswith(".py")
            ):
                handle = tf.extractfile(member)
                if handle is not None:
                    yield parts[1], handle.read().decode("utf-8", errors="replace")


def _default(node: ast.expr | None) -> Any:
    """A default as JSON: the literal value when it is one, else its source text under ``expr``."""
    if node is None:
        return {"required": True}
    try:
        return {"value": ast.literal_eval(node)}
    except (ValueError, SyntaxError, TypeError):
        return {"expr": ast.unparse(node)}


def _fields(cls: ast.ClassDef) -> dict[str, Any]:
    """Annotated class-level fields (dataclasses, msgspec Structs, TypedDicts) with their defaults."""
    out = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = _default(stmt.value)
    return out


def _params(fn: ast.FunctionDef) -> dict[str, Any]:
    args = fn.args
    out: dict[str, Any] = {}
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        if i == 0 and arg.arg == "self":
            continue
        kind = "positional_only" if i < len(args.posonlyargs) else "positional_or_keyword"
        out[arg.arg] = {"kind": kind, **_default(default)}
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        out[arg.arg] = {"kind": "keyword_only", **_default(default)}
    return {"params": out, "var_kwargs": args.kwarg is not None, "var_args": args.vararg is not None}


def _implementation(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    """The last definition of a method: ``@overload`` stubs come first, the body last."""
    found = None
    for stmt in cls.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == name:
            decorators = {ast.unparse(d) for d in stmt.decorator_list}
            if "overload" not in decorators and "typing.overload" not in decorators:
                found = stmt
    return found


def _method(
    classes: dict[str, list[tuple[str, ast.ClassDef]]], cls: ast.ClassDef, name: str
) -> ast.FunctionDef | None:
    """A method of ``cls`` or of a base class defined in the package (vLLM moved pooling into mixins)."""
    found = _implementation(cls, name)
    if found is not None:
        return found
    for base in cls.bases:
        base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
        for _, node in classes.get(base_name or "", []):
            found = _method(classes, node, name)
            if found is not None:
                return found
    return None


def _assigns_self(fn: ast.FunctionDef | None, attr: str) -> bool:
    if fn is None:
        return False
    for node in ast.walk(fn):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr == attr
                and ast.unparse(target.value) == "self"
            ):
                return True
    return False


def snapshot(archive: Path) -> tuple[str, dict[str, Any]]:
    match = _VERSION.match(archive.name)
    if not match:
        raise SystemExit(f"cannot read a vLLM version from the file name {archive.name!r}")
    classes: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    texts: dict[str, str] = {}
    for path, text in _sources(archive):
        texts[path] = text
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append((path, node))

    def maybe(name: str, where: str) -> ast.ClassDef | None:
        for path, node in classes.get(name, []):
            if path.startswith(where):
                return node
        return None

    def one(name: str, where: str) -> ast.ClassDef:
        found = maybe(name, where)
        if found is None:
            raise SystemExit(f"{archive.name}: class {name} not found under {where}")
        return found

    llm = one("LLM", "vllm/entrypoints/llm.py")
    init = _implementation(llm, "__init__")
    api: dict[str, Any] = {
        "SamplingParams": {"fields": _fields(one("SamplingParams", "vllm/sampling_params.py"))},
        "LLM.__init__": _params(init) if init else {},
        "LLM.__init__.sets_llm_engine": _assigns_self(init, "llm_engine"),
        "EngineArgs": {"fields": _fields(one("EngineArgs", "vllm/engine/arg_utils.py"))},
        "RequestOutput.__init__": _params(
            _implementation(one("RequestOutput", "vllm/outputs.py"), "__init__")
        ),
        "CompletionOutput": {"fields": _fields(one("CompletionOutput", "vllm/outputs.py"))},
        "Logprob": {"fields": _fields(one("Logprob", "vllm/"))},
        "TokensPrompt": {"fields": _fields(one("TokensPrompt", "vllm/inputs/"))},
        "exports": {
            "vllm": sorted(
                n
                for n in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "PoolingParams")
                if re.search(rf"\b{n}\b", texts.get("vllm/__init__.py", ""))
            ),
            "vllm.inputs": ["TokensPrompt"]
            if "TokensPrompt" in texts.get("vllm/inputs/__init__.py", "")
            else [],
        },
    }
    for method in ("generate", "chat", "get_tokenizer", "classify"):
        fn = _method(classes, llm, method)
        api[f"LLM.{method}"] = _params(fn) if fn else None
    # The pooling API the reward-model scorer reads (absent or different in older releases: None).
    pooling = maybe("PoolingParams", "vllm/pooling_params.py")
    api["PoolingParams"] = {"fields": _fields(pooling)} if pooling else None
    classification = maybe("ClassificationOutput", "vllm/outputs.py")
    api["ClassificationOutput"] = {"fields": _fields(classification)} if classification else None
    pooled = maybe("PoolingRequestOutput", "vllm/outputs.py")
    pooled_init = _implementation(pooled, "__init__") if pooled else None
    api["PoolingRequestOutput.__init__"] = _params(pooled_init) if pooled_init else None
    engines = classes.get("LLMEngine", [])
    api["LLMEngine.sets_model_config"] = any(
        _assigns_self(_implementation(node, "__init__"), "model_config") for _, node in engines
    )
    model_config = [node for _, node in classes.get("ModelConfig", [])]
    api["ModelConfig.has_max_model_len"] = any(
        "max_model_len" in _fields(node) or _assigns_self(_implementation(node, "__init__"), "max_model_len")
        for node in model_config
    )
    return match.group(1), api


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("archives", nargs="+", type=Path, help="vllm-*.whl or vllm-*.tar.gz files")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    versions = dict(snapshot(a) for a in args.archives)
    data = {
        "about": "vLLM API facts read with ast from the released archives by tests/fakes/snapshot_vllm_api.py",
        "versions": dict(
            sorted(versions.items(), key=lambda kv: [int(p) for p in re.findall(r"\d+", kv[0])])
        ),
    }
    args.out.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} for vLLM {', '.join(versions)}")


if __name__ == "__main__":
    main()
