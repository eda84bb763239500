"""Engines: spec resolution without loading, sandboxed templates, and the real default model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError

from schemas.recipe import PolicyConfig
from steps.engines import Failed, OptionRequest, SamplingParams, ScoreRequest, load_engine, resolve_model
from steps.engines.base import continuation_span, derive_seed, render_chat, sample_seed
from steps.engines.models import SMOLLM2_ALIAS, ModelSpecError

CONV = [{"role": "user", "content": "Name one fruit that is yellow."}]


def test_alias_resolves_to_shipped_gguf() -> None:
    model = resolve_model(SMOLLM2_ALIAS, "llama_cpp")
    assert model.kind == "gguf" and model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.path.is_file() and "SmolLM2-135M-Instruct" in model.model_id


@pytest.mark.parametrize(
    ("spec", "engine", "message"),
    [
        ("/nope/model.gguf", "llama_cpp", "does not exist"),
        ("./missing-dir", "transformers", "does not exist"),
        ("org/model", "llama_cpp", "org/name:file.gguf"),
        ("not a model!", "transformers", "is not the alias"),
    ],
)
def test_bad_specs_fail_without_loading(spec: str, engine: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        resolve_model(spec, engine)


def test_local_dirs_and_hub_ids(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), "transformers").kind == "hf_dir"
    with pytest.raises(ModelSpecError, match="needs a .gguf"):
        resolve_model(str(tmp_path), "llama_cpp")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", "transformers").kind == "hub"
    assert resolve_model("org/name:model.Q4.gguf", "llama_cpp").kind == "hub"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model(str(empty), "transformers")


def test_chat_templates_render_in_a_sandbox() -> None:
    text = render_chat("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}", CONV, False)
    assert text == "[user]Name one fruit that is yellow."
    with pytest.raises(SecurityError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", CONV, False)


def test_seed_derivation_is_stable_and_bounded() -> None:
    assert derive_seed(1, "abc") == derive_seed(1, "abc") != derive_seed(2, "abc")
    assert derive_seed(0, "x") == 5043433155909824765  # same on every machine and Python version
    assert all(0 <= sample_seed(derive_seed(s, "p"), i) < 2**31 for s in range(20) for i in range(8))


def test_continuation_span_uses_token_ids() -> None:
    assert continuation_span([1, 2, 3], [1, 2, 3, 4, 5]) == (3, 5)
    assert continuation_span([1, 2, 9], [1, 2, 3, 4]) is None


# ----------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def llama() -> object:
    return load_engine(PolicyConfig(n_ctx=512, n_threads=2))


@pytest.mark.model
def test_llama_cpp_same_seed_same_samples(llama: object) -> None:
    params = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_tokens=12)
    first = llama.generate([CONV], params, [11])[0]  # type: ignore[attr-defined]
    again = llama.generate([CONV], params, [11])[0]  # type: ignore[attr-defined]
    other = llama.generate([CONV], params, [12])[0]  # type: ignore[attr-defined]
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.text for c in first] != [c.text for c in other]
    assert len({c.seed for c in first}) == 3
    for completion in first:
        assert 1 <= completion.num_tokens <= 12 and completion.prompt_tokens > 5
        assert completion.finish_reason in ("stop", "length")
    assert load_engine(PolicyConfig(n_ctx=512, n_threads=2)) is llama  # loaded once per process


@pytest.mark.model
def test_llama_cpp_truncation_and_context_limit(llama: object) -> None:
    params = SamplingParams(n=2, temperature=0.8, top_p=1.0, max_tokens=2)
    essay = [{"role": "user", "content": "Write a long essay about the history of bread."}]
    for completion in llama.generate([essay], params, [1])[0]:  # type: ignore[attr-defined]
        assert completion.finish_reason == "length" and completion.num_tokens == 2
    huge = [{"role": "user", "content": "word " * 600}]
    result = llama.generate([huge, CONV], params, [1, 2])  # type: ignore[attr-defined]
    assert isinstance(result[0], Failed) and result[0].reason == "prompt_too_long"
    assert not isinstance(result[1], Failed)


POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.mark.model
def test_llama_cpp_batched_samples_do_not_depend_on_other_prompts(llama: object) -> None:
    """Batched decoding (the default) is reproducible per (seed, prompt, sample index).

    A prompt's samples come out the same alone, after another prompt, or in another order, so
    reruns, resumed shards and different shard sizes give the same rows.
    """
    assert llama.decode == "batched"  # type: ignore[attr-defined]
    params = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_tokens=16)
    together = llama.generate([CONV, POEM], params, [11, 12])  # type: ignore[attr-defined]
    swapped = llama.generate([POEM, CONV], params, [12, 11])  # type: ignore[attr-defined]
    alone = llama.generate([POEM], params, [12])  # type: ignore[attr-defined]
    texts = [[c.text for c in result] for result in together]
    assert texts == [[c.text for c in result] for result in swapped[::-1]]
    assert texts[1] == [c.text for c in alone[0]]
    assert len(set(texts[1])) > 1  # each sample has its own seed
    assert [c.seed for c in together[0]] == [sample_seed(11, i) for i in range(4)]


@pytest.mark.model
def test_llama_cpp_batched_finish_reasons_and_token_counts(llama: object) -> None:
    """ "length" exactly at max_tokens or the end of the context, "stop" only before it; counts exact."""
    engine: Any = llama
    stop_early = [{"role": "user", "content": "Answer with one word: what colour is the sky?"}]
    params = SamplingParams(n=4, temperature=0.7, top_p=0.95, max_tokens=24)
    results = engine.generate([stop_early, POEM], params, [3, 4])
    reasons = set()
    for conversation, completions in zip([stop_early, POEM], results, strict=True):
        prompt = engine.chat.ids(conversation, True)
        for completion in completions:
            assert completion.prompt_tokens == len(prompt)
            assert (completion.finish_reason == "length") == (completion.num_tokens == 24)
            assert 0 <= completion.num_tokens <= 24
            reasons.add(completion.finish_reason)
    assert reasons == {"stop", "length"}
    # Two positions left in the context: every sample ends there, as "length".
    words = 400
    while len(engine.chat.ids([{"role": "user", "content": "a " * words}], True)) < 510:
        words += 1
    long = [{"role": "user", "content": "a " * words}]
    room = 512 - len(engine.chat.ids(long, True))
    assert 0 < room <= 2
    [completions] = engine.generate(
        [long], SamplingParams(n=3, temperature=1.0, top_p=1.0, max_tokens=50), [5]
    )
    for completion in completions:
        assert completion.prompt_tokens + completion.num_tokens <= 512
        if completion.finish_reason == "length":
            assert completion.num_tokens == room


@pytest.mark.model
def test_llama_cpp_batched_truncate_left_and_no_tokens_counted(llama: object) -> None:
    """The context rules are the engine's, not the decoder's; sampling adds nothing to what scoring read."""
    engine: Any = llama
    old = [
        {"role": "user", "content": "word " * 300},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Name one fruit that is yellow."},
    ]
    params = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_tokens=300, too_long="truncate_left")
    before = engine.tokens_processed
    [completions] = engine.generate([old], params, [7])
    assert engine.tokens_processed == before  # generation is not scoring (steps/publish/cost.py reads it)
    for completion in completions:
        assert completion.prompt_turns_dropped == 2
        assert completion.prompt_tokens + completion.num_tokens <= 512
    # too_long: drop keeps every turn that fits and caps the answers at the room left.
    [kept] = engine.generate([old], SamplingParams(n=2, temperature=0.8, top_p=0.95, max_tokens=300), [7])
    for completion in kept:
        assert completion.prompt_turns_dropped == 0
        assert completion.prompt_tokens + completion.num_tokens <= 512


@pytest.mark.model
def test_llama_cpp_text_is_decoded_from_whole_characters(llama: object) -> None:
    """Characters split over several tokens come out whole: bytes are joined before decoding."""
    engine: Any = llama
    text = "café 日本 🙂 naïve"
    tokens = engine._encode_text(text)
    pieces = [engine._llm.detokenize([t]) for t in tokens]
    assert any(not _is_utf8(piece) for piece in pieces)  # the tokenizer does split a character
    assert engine.text_of(tokens) == text
    cut = engine._encode_text("🙂")[:-1]  # a sample that ends inside a character
    assert cut and engine.text_of(cut) == ""  # the partial bytes are dropped, never shown as U+FFFD


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.model
def test_llama_cpp_single_decode_is_create_completion_per_sample() -> None:
    """decode: single is the earlier path: one create_completion per sample, the same texts."""
    from steps.engines.llama_cpp import LlamaCppEngine

    engine = LlamaCppEngine(
        resolve_model(SMOLLM2_ALIAS, "llama_cpp"), n_ctx=512, n_threads=2, decode="single"
    )
    try:
        params = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_tokens=12)
        [ours] = engine.generate([CONV], params, [11])
        prompt = engine.chat.ids(CONV, True)
        for i, completion in enumerate(ours):
            engine._llm.reset()
            reference = engine._llm.create_completion(
                prompt, max_tokens=12, temperature=0.9, top_p=0.95, top_k=0, min_p=0.0, typical_p=1.0,
                repeat_penalty=1.0, seed=sample_seed(11, i),
            )  # fmt: skip
            assert completion.text == reference["choices"][0]["text"]
            assert completion.num_tokens == reference["usage"]["completion_tokens"]
            assert completion.seed == sample_seed(11, i)
        # Both modes can live in one process; a batched engine frees its own context on close.
        batched = LlamaCppEngine(resolve_model(SMOLLM2_ALIAS, "llama_cpp"), n_ctx=512, n_threads=2)
        assert len(batched.generate([CONV], params, [11])[0]) == 3  # type: ignore[arg-type]
        batched.close()
        assert batched._batcher is None
    finally:
        engine.close()


@pytest.mark.model
def test_llama_cpp_and_transformers_score_the_same_tokens(llama: object) -> None:
    """Both engines take the continuation boundary from token ids and agree on log-probs.

    Tolerance measured on this model: llama.cpp runs the Q4_1 weights with quantised
    activations, transformers the dequantised fp32 weights; the mean per-token gap was
    about 0.05 nats (0.04-0.09 over several replies and follow-ups), so 0.25 leaves room
    without hiding a misaligned token. Follow-up turns (role user) align the same way.
    """
    hf = load_engine(PolicyConfig(engine="transformers", device="cpu"))
    text = "A banana is yellow when it is ripe."
    [a], [b] = llama.score([ScoreRequest(CONV, text)]), hf.score([ScoreRequest(CONV, text)])  # type: ignore[attr-defined]
    assert not isinstance(a, Failed) and not isinstance(b, Failed)
    assert a.token_ids == b.token_ids and len(a.token_ids) >= 8
    gaps = [abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)]
    assert sum(gaps) / len(gaps) < 0.25
    assert all(lp <= 0 for lp in a.logprobs + b.logprobs)
    context = [*CONV, {"role": "assistant", "content": text}]
    followups = [ScoreRequest(context, f, "user") for f in ("Thanks, that helps.", "That is wrong.")]
    before = llama.tokens_processed  # type: ignore[attr-defined]
    scored = llama.score(followups)  # type: ignore[attr-defined]
    read = llama.tokens_processed - before  # type: ignore[attr-defined]
    # The second follow-up reuses the shared context from the KV cache: fewer tokens than both in full.
    total = sum(
        len(llama.chat.split(f)[0]) + len(x.token_ids) for f, x in zip(followups, scored, strict=True)
    )  # type: ignore[attr-defined]
    assert 0 < read < total
    for x, y in zip(scored, hf.score(followups), strict=True):  # type: ignore[attr-defined]
        assert x.token_ids == y.token_ids
        assert sum(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) / len(x.logprobs) < 0.25


@pytest.mark.model
def test_transformers_score_matches_an_independent_forward_pass() -> None:
    import torch

    hf = load_engine(PolicyConfig(engine="transformers", device="cpu"))
    text = "Lemons are yellow."
    [scores] = hf.score([ScoreRequest(CONV, text)])
    full = hf.tokenizer.apply_chat_template([*CONV, {"role": "assistant", "content": text}], tokenize=False)
    ids = hf.tokenizer(full, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    reply = hf.tokenizer(text, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(reply)].tolist() == reply)
    with torch.no_grad():
        logits = hf.model(ids[None]).logits[0].double()
    expected = [float(torch.log_softmax(logits[start + k - 1], -1)[reply[k]]) for k in range(len(reply))]
    assert scores.token_ids == reply
    assert scores.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.model
def test_transformers_generation_is_seeded() -> None:
    hf = load_engine(PolicyConfig(engine="transformers", device="cpu"))
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=6)
    first = hf.generate([CONV], params, [5])[0]
    assert [c.text for c in first] == [c.text for c in hf.generate([CONV], params, [5])[0]]
    assert all(c.num_tokens <= 6 for c in first)


# ----------------------------------------------------------------- the scoring trie


def test_trie_merges_shared_prefixes_and_orders_parents_first() -> None:
    from steps.engines.token_trie import TokenTrie

    trie = TokenTrie()
    a, b, c = trie.add([1, 2, 3]), trie.add([1, 2, 4, 5]), trie.add([6])
    assert a[:2] == b[:2] and a[2] != b[2] and c[0] not in a + b
    assert trie.end_of((1, 2)) == a[1] and trie.end_of(()) == 0
    assert trie.add([5], start=b[2]) == [b[3]]  # an existing path creates nothing
    trie.seal()
    assert trie.size[0] == 1 + 6 and trie.size[a[0]] == 5 and trie.size[c[0]] == 1
    order = trie.subtree(a[0])
    assert set(order) == {*a, *b}
    assert all(order.index(trie.parent[n]) < order.index(n) for n in order[1:])
    assert [trie.depth[n] for n in b] == [0, 1, 2, 3]
    assert trie.only_child(b[2]) == b[3] and trie.only_child(a[1]) is None


def test_row_plans_pack_to_save_padding_but_not_to_waste_attention() -> None:
    from steps.engines.token_trie import plan_rows

    # one long and one short branch under a long cached prompt: one packed row, no padding
    assert plan_rows({1: 200, 2: 60}, cached=400, row_tokens=512, batch_tokens=4096) == [[[1, 2]]]
    # equal branches: packing pairs of them would only add attention, so one branch per row
    equal = plan_rows({i: 250 for i in range(8)}, cached=200, row_tokens=512, batch_tokens=4096)
    assert sorted(len(row) for batch in equal for row in batch) == [1] * 8
    sizes = {i: 5 + (i * 37) % 300 for i in range(60)}
    batches = plan_rows(sizes, cached=0, row_tokens=512, batch_tokens=2048)
    roots = [root for batch in batches for row in batch for root in row]
    assert sorted(roots) == list(sizes)  # every subtree exactly once
    for batch in batches:
        width = max(sum(sizes[r] for r in row) for row in batch)
        assert width <= 512 and (len(batch) == 1 or len(batch) * width <= 2048)


SLEEP = [{"role": "user", "content": "Give me two tips for sleeping better."}]
ANSWERS = ["Keep the room dark and cool.", "Bananas are yellow, and so is the sun."]
FOLLOW = [
    "Thanks, that helps a lot.",
    "That's not what I asked.",
    "Can you say more?",
    "Great.",
    "Hmm, I tried both of those already and I still lie awake for hours.",
    "Why?",
    "That was clear and useful, thank you very much.",
    "I do not think that is right at all.",
]


def _mixed_requests() -> list[ScoreRequest]:
    """The shapes the labelers send: follow-ups of two answers to one prompt, answers with and
    without a criteria system prompt (density ratio), and an unrelated conversation."""
    criteria = [{"role": "system", "content": "Answer carefully and correctly."}, *SLEEP]
    requests = [
        ScoreRequest([*SLEEP, {"role": "assistant", "content": a}], f, "user")
        for a in ANSWERS
        for f in FOLLOW
    ]
    requests += [ScoreRequest(context, a) for context in (SLEEP, criteria) for a in ANSWERS]
    return [*requests, ScoreRequest([{"role": "user", "content": "Hi"}], "Hello! How can I help?")]


def _full_ids(hf: Any, context: list[dict[str, str]], turn: dict[str, str] | None = None) -> list[int]:
    ids = hf.tokenizer.apply_chat_template([*context, *([turn] if turn else [])], tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _plain_forward(hf: Any, request: ScoreRequest) -> tuple[list[int], list[float]]:
    """Content tokens and their log-probs from one ordinary causal forward over the whole chat."""
    import torch

    full = _full_ids(hf, list(request.context), {"role": request.role, "content": request.continuation})
    start = len(hf.chat.header(request.context, request.role))
    end = next(k for k in range(start, len(full)) if hf.chat.is_special(full[k]))
    with torch.no_grad():
        logprobs = torch.log_softmax(hf.model(torch.tensor([full])).logits[0].double(), -1)
    return full[start:end], [float(logprobs[k - 1, full[k]]) for k in range(start, end)]


@pytest.mark.model
@pytest.mark.parametrize(("batch_tokens", "row_tokens"), [(4096, 512), (64, 64), (4096, 24)])
def test_trie_scoring_equals_a_plain_forward_per_request(
    batch_tokens: int, row_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tree-packed rows, padding, cached paths and split subtrees change no score beyond float noise.

    The defaults run the whole trie as one row; a 64-token budget splits it into
    cached paths and rows with repeated short stretches; 24-token rows batch
    several rows of different lengths (so with padding) on copies of the cache.
    """
    from steps.engines.transformers_engine import TransformersEngine

    model = resolve_model(SMOLLM2_ALIAS, "transformers")
    hf = TransformersEngine(model, device="cpu", batch_tokens=batch_tokens, row_tokens=row_tokens)
    requests = _mixed_requests()
    row_sizes: list[list[int]] = []
    run_rows = hf._run_rows

    def spy(trie: Any, rows: list[Any], cache: Any, out: Any) -> None:
        row_sizes.append([sum(len(above) + trie.size[root] for above, root in row) for row in rows])
        run_rows(trie, rows, cache, out)

    monkeypatch.setattr(hf, "_run_rows", spy)
    before = hf.tokens_processed
    distinct: set[tuple[int, ...]] = set()
    for request, scores in zip(requests, hf.score(requests), strict=True):
        tokens, expected = _plain_forward(hf, request)
        assert not isinstance(scores, Failed) and scores.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(scores.logprobs, expected, strict=True)) <= 1e-4
        sequence = [*hf.chat.header(request.context, request.role), *tokens]
        distinct.update(tuple(sequence[:k]) for k in range(1, len(sequence) + 1))
    if row_tokens < 512:  # the trie was split
        assert len(row_sizes) > 1
    if row_tokens == 24:  # and some batch held rows of different lengths
        assert any(len(set(sizes)) > 1 for sizes in row_sizes)
    # short stretches may be repeated in a few rows rather than run alone; never much more
    assert len(distinct) <= hf.tokens_processed - before <= 1.05 * len(distinct)


@pytest.mark.model
def test_every_distinct_prefix_runs_exactly_once() -> None:
    """tokens_processed equals the number of distinct token prefixes: nothing shared is recomputed."""
    from steps.labelers import judging as judges

    hf = load_engine(PolicyConfig(engine="transformers", device="cpu"))
    requests = _mixed_requests()
    sequences = []
    for request in requests:
        tokens, _ = _plain_forward(hf, request)
        sequences.append([*hf.chat.header(request.context, request.role), *tokens])
    distinct = {tuple(s[:k]) for s in sequences for k in range(1, len(s) + 1)}
    before = hf.tokens_processed
    hf.score(requests)
    assert hf.tokens_processed - before == len(distinct) < sum(len(s) for s in sequences) * 0.6
    # the judge: every request shares the rubric, and each runs only what follows it
    options = [
        OptionRequest(judges.pointwise_prompt(SLEEP, a), "Score: ", judges.SCORE_OPTIONS) for a in ANSWERS
    ]
    sequences = [hf.chat.options(request)[0] for request in options]
    distinct = {tuple(s[:k]) for s in sequences for k in range(1, len(s) + 1)}
    before = hf.tokens_processed
    hf.option_logprobs(options)
    assert hf.tokens_processed - before == len(distinct) < sum(len(s) for s in sequences) * 0.8


@pytest.mark.model
def test_llama_cpp_reads_judge_options_like_transformers() -> None:
    """Every engine is an ``Engine``: a judge on llama.cpp reads the same rating probabilities."""
    from steps.engines import Engine
    from steps.labelers import judging as judges

    llama = load_engine(PolicyConfig(n_ctx=2048, n_threads=2))
    hf = load_engine(PolicyConfig(engine="transformers", device="cpu"))
    assert isinstance(llama, Engine) and isinstance(hf, Engine)
    requests = [
        OptionRequest(judges.pointwise_prompt(SLEEP, a), judges.SCORE_PREFILL, judges.SCORE_OPTIONS)
        for a in ANSWERS
    ]
    ours, reference = llama.option_logprobs(requests), hf.option_logprobs(requests)
    for a, b in zip(ours, reference, strict=True):
        assert isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b) == set(judges.SCORE_OPTIONS)
        # Q4_1 kernels with 8-bit activations against the same weights dequantised to fp32
        assert max(abs(a[k] - b[k]) for k in a) < 0.15, (a, b)  # measured: 0.07
    # The second request (same rubric, other reply) reused the first one's cached prefix: same answer alone.
    [alone] = llama.option_logprobs(requests[1:])
    assert alone == pytest.approx(ours[1], abs=1e-4)
    too_long = OptionRequest([{"role": "user", "content": "word " * 3000}], "Score: ", judges.SCORE_OPTIONS)
    [failed] = llama.option_logprobs([too_long])
    assert isinstance(failed, Failed) and failed.reason == "too_long"
