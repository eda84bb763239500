"""Shared test fixtures: tiny recipes, a ~20-line fake engine, isolated Prefect state."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect stops its temporary server from an atexit hook and logs it to the console, whose stream
# pytest has closed by then: without this, every run ends in a "--- Logging error ---" traceback.
logging.raiseExceptions = False
# Prefect's temporary server gets 20 s to start by default; a busy 2-core CI machine can need more.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `datasets` keys its cache of a local folder by the folder's name, not its content: a stale entry
# from an earlier run with the same folder name would be served instead of the files. Tests get
# a private cache (set before `datasets` is imported anywhere).
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="prefsmith-hf-datasets-")


def _pin_xdist_worker() -> None:
    """Under pytest-xdist, each worker (and every process it starts) gets its own share of the CPUs.

    Without it two workers each run torch, llama.cpp and OpenMP with a thread per CPU, and on two
    cores their spinning threads slowed a model run 2.5x. torch and OpenMP size their thread pools
    from the affinity mask, and so does the llama.cpp engine (``usable_cpus``). Set before either
    is imported; children inherit it.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if int(count) > len(cpus):
        return  # more workers than CPUs: sharing is all there is
    os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) :: int(count)])


_pin_xdist_worker()

from schemas.recipe import Recipe  # noqa: E402
from steps.engines.base import Completion, Conversation, Failed, SamplingParams, sample_seed  # noqa: E402


class FakeEngine:
    """Canned, seed-dependent answers; fails prompts containing TOO_LONG like a real context limit."""

    model_id = "fake/model"
    engine_name = "fake"

    def __init__(self, answers: Sequence[str] = ("alpha beta", "gamma", "", "alpha beta gamma delta")):
        self.answers = list(answers)
        self.calls = 0

    def generate(
        self, conversations: Sequence[Conversation], params: SamplingParams, seeds: Sequence[int]
    ) -> list[list[Completion] | Failed]:
        self.calls += 1
        out: list[list[Completion] | Failed] = []
        for conv, base in zip(conversations, seeds, strict=True):
            if "TOO_LONG" in conv[-1]["content"]:
                out.append(Failed("prompt_too_long", "fake context limit"))
                continue
            samples = []
            for i in range(params.n):
                seed = sample_seed(base, i)
                text = self.answers[(seed + i) % len(self.answers)]
                finish = "length" if len(text.split()) >= params.max_tokens else "stop"
                samples.append(Completion(text, len(text.split()), finish, 7, seed))
            out.append(samples)
        return out


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


def make_recipe(**data: object) -> Recipe:
    base: dict[str, object] = {"name": "test"}
    base.update(data)
    return Recipe.model_validate(base)


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private Prefect home so tests never touch the user's database."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    return home


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch, prefect_home: Path) -> FakeEngine:
    """The fake policy wherever sampling loads one, with a private Prefect home: for flow-level runs."""
    from steps import sampling

    fake = FakeEngine()
    monkeypatch.setattr(sampling, "load_engine", lambda policy: fake)
    return fake


def smollm2_tokenizer() -> Any:
    """The default model's tokenizer (and chat template), from the locally installed package."""
    from transformers import AutoTokenizer

    from steps.engines import resolve_model
    from steps.engines.gguf_cache import materialise

    return AutoTokenizer.from_pretrained(materialise(resolve_model("smollm2-135m-instruct", "transformers")))


def tiny_llama(tokenizer: Any, max_positions: int = 2048, **overrides: Any) -> Any:
    """A 1-layer random Llama over ``tokenizer``'s vocabulary: the real code paths in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    return LlamaForCausalLM(config)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop the suite with the guard's message if the installed llama.cpp crashes on this CPU.

    Tests load llama.cpp in the pytest process; a broken build would end the suite with a
    segfault at the first of them and no word of why.
    """
    from steps.engines.models import ModelSpecError, smollm2_gguf
    from steps.engines.native_check import EngineCrashError, check_llama_cpp

    try:
        check_llama_cpp(str(smollm2_gguf()))
    except ModelSpecError:
        return  # no default model: the tests that need it say so themselves
    except EngineCrashError as exc:
        pytest.exit(f"the installed llama.cpp cannot run the tests on this machine:\n{exc}", returncode=2)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets one lane: ``model``, ``vllm`` or ``integration`` as marked, else ``unit`` (make test-fast).

    A test that runs a Prefect flow (it asks for ``prefect_home``, directly or through a fixture)
    starts Prefect's temporary server: integration.
    """
    for item in items:
        if item.get_closest_marker("model") or item.get_closest_marker("vllm"):
            continue
        if "prefect_home" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        elif not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.unit)
    _longest_files_first(items)


# make test runs the suite on two workers, a whole file per worker at a time (pytest-xdist,
# --dist loadfile, so a module's fixtures are built once). Files are handed out in collection order:
# the long lanes go first, so they run beside the short files instead of after them all.
_HEAVY = ("vllm", "slow", "model", "integration")


def _file_rank(items: list[pytest.Item]) -> int:
    marks = {mark.name for item in items for mark in item.iter_markers()}
    return next((rank for rank, name in enumerate(_HEAVY) if name in marks), len(_HEAVY))


def _longest_files_first(items: list[pytest.Item]) -> None:
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(str(item.path), []).append(item)
    ordered = sorted(by_file.values(), key=_file_rank)  # stable: same-rank files keep their order
    items[:] = [item for group in ordered for item in group]
