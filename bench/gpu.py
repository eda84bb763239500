"""GPU check (``make gpu-check``): the transformers engine on CUDA, at the shapes people will run.

Three parts, each printed as it finishes so that a run cut short still says how far it got:

1. **Correctness** on a tiny random Llama. The scoring core (token trie, tree-attention rows,
   cached paths) is exact arithmetic rearranged, so its log-probs must equal an ordinary causal
   forward pass of each request on the same device, and the CUDA fp32 engine must equal the CPU
   fp32 engine. Two controls prove the comparison can fail: a tree mask that lets sibling branches
   see each other, and 30% noise in one weight matrix, must both be caught.
2. **Scoring throughput** with randomly initialised bf16 models of real shapes (Llama-3.2-1B and
   Llama-3.1-8B: no download, built directly on the GPU): ``engine.score`` on a preference-labeling
   workload against a raw batched ``model(input_ids)`` + log-softmax over the same full sequences,
   interleaved in the same process. Tokens/s counts the baseline's tokens for both sides.
3. **Generation throughput**: ``engine.generate`` (n samples of one prompt per call, as sampling
   runs it) against one batched ``model.generate`` over all the prompts at once.

The tokenizer is built in code (a word-level vocabulary with a Llama-3-style chat template) so
nothing is read from a model hub or the default model package; the big models' vocabulary is
the real 128,256 regardless. Exit status: 0 when every correctness check passes, 1 when one
fails, 3 without CUDA (``--cpu-smoke`` runs everything at tiny sizes on CPU instead), 4 when a
throughput part raised (the others still ran; the table says which).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, Row, format_table, machine, write_json
from steps.engines.base import Failed, OptionRequest, SamplingParams, ScoreRequest, TokenScores
from steps.engines.transformers_engine import ROW_TOKENS, TransformersEngine

NAME = "gpu"
EXIT_OK = 0
EXIT_INCORRECT = 1
EXIT_NO_CUDA = 3  # not 2: argparse already uses 2 for a bad command line
EXIT_ERROR = 4  # correctness passed, but a throughput part raised (its traceback is in the log)

# Per-token log-prob agreement. fp32 sums the same products in another order (tree rows and
# cached paths against one causal pass; cuBLAS against the CPU's kernels): rounding only.
TOL_FP32 = 1e-3
# bf16 keeps 8 bits of mantissa: on the tiny model (log-probs spread with a standard deviation
# of about 0.85 nats) bf16 differed from fp32 by at most 0.045 nats on CPU over four seeds and
# two transformers versions (5.17, 5.24). A sibling-visible mask moves scores by nats, 30% noise in one
# matrix by about one nat: both far outside this.
TOL_BF16 = 0.2
# Initialisation of the tiny model: wide enough that next-token distributions are far from
# uniform (at the usual 0.02 every log-prob sits near -log(vocab) and a mistake moves it too
# little to see), narrow enough that bf16 rounding stays small against a real error.
TINY_INIT = 0.1

SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
PAD, UNK = "<|pad|>", "<|unk|>"
# The words the template and the judge path spell out; the filler words come after them.
FIXED_WORDS = ("system", "user", "assistant", "x", "y", "Score", ":", *(str(d) for d in range(10)))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_VOCAB = 128256


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama that decide its cost; the values themselves are random."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool


SHAPES = {
    "1b": Shape("Llama-3.2-1B shape", 2048, 16, 32, 8, 8192, LLAMA3_VOCAB, True),
    "8b": Shape("Llama-3.1-8B shape", 4096, 32, 32, 8, 14336, LLAMA3_VOCAB, False),
}
TINY = Shape("tiny", 64, 2, 4, 2, 128, 0, False)  # the correctness model; vocab: the tokenizer's
SMOKE_SHAPES = {
    "1b": Shape("1B stand-in (smoke)", 64, 2, 4, 2, 128, 1024, True),
    "8b": Shape("8B stand-in (smoke)", 96, 3, 4, 2, 192, 1024, False),
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real check on CUDA, or the same code at toy sizes on CPU."""

    device: str
    filler_words: int
    prompts: int
    responses: int
    system_words: int
    prompt_words: int
    response_words: int
    batch_tokens: int
    row_tokens: tuple[int, ...]
    scoring_rounds: int
    gen_prompts: int
    gen_n: int
    gen_max_tokens: int
    gen_rounds: int
    # Correctness: (batch_tokens, row_tokens) layouts of the trie, from one row for everything to
    # rows so small that the trie splits into cached paths and padded batches of short rows.
    layouts: tuple[tuple[int, int], ...]


FULL = Plan(
    device="cuda",
    filler_words=4000,
    prompts=64,
    responses=4,
    system_words=64,
    prompt_words=200,
    response_words=200,
    batch_tokens=16384,
    row_tokens=(ROW_TOKENS, 1024),
    scoring_rounds=3,
    gen_prompts=4,
    gen_n=4,
    gen_max_tokens=128,
    gen_rounds=2,
    layouts=((16384, 4096), (16384, ROW_TOKENS), (64, 64), (4096, 24)),
)
SMOKE = replace(
    FULL,
    device="cpu",
    filler_words=300,
    prompts=3,
    responses=2,
    system_words=5,
    prompt_words=12,
    response_words=10,
    batch_tokens=256,
    row_tokens=(48, 128),
    scoring_rounds=1,
    gen_prompts=2,
    gen_n=2,
    gen_max_tokens=6,
    gen_rounds=1,
)


class Clock:
    """Seconds since start, on every progress line, and the budget that later rounds must fit."""

    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over(self, share: float = 1.0) -> bool:
        return self.elapsed() > self.budget * share

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tokenizer, models, requests


def build_tokenizer(filler_words: int) -> Any:
    """A word-level tokenizer (one token per word) with Llama-3's special tokens and turn layout.

    One token per word makes every request's length known from its word count, and random text
    is just random words; the engine only needs a chat template and end-of-turn tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*FIXED_WORDS, *(f"w{i}" for i in range(filler_words))]
    vocab = {token: i for i, token in enumerate([*SPECIALS, PAD, UNK, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[4],
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(SPECIALS[1:4]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def filler(tokenizer: Any) -> list[str]:
    """The filler words in id order (``get_vocab`` comes from a hash map: its order varies by run)."""
    vocab = tokenizer.get_vocab()
    return sorted((w for w in vocab if w.startswith("w") and w[1:].isdigit()), key=vocab.__getitem__)


def build_model(shape: Shape, tokenizer: Any, device: str, dtype: Any, init_range: float = 0.02) -> Any:
    """A randomly initialised Llama made where it will run, in its dtype: no fp32 copy, no disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        # Llama 3's rope_theta; its long-context rope scaling changes no cost, so it is left out.
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=shape.tie_embeddings,
        initializer_range=init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _text(rng: random.Random, words: Sequence[str], n: int) -> str:
    return " ".join(rng.choices(words, k=n))


def preference_requests(plan: Plan, words: Sequence[str], seed: int = 0) -> list[ScoreRequest]:
    """A density-ratio labeling job: each response under its prompt, with and without criteria.

    The responses of one prompt share it, and every criteria-side request shares the criteria:
    the prefix sharing real labelers get, at real lengths.
    """
    rng = random.Random(seed)
    criteria = {"role": "system", "content": _text(rng, words, plan.system_words)}
    requests = []
    for _ in range(plan.prompts):
        prompt = [{"role": "user", "content": _text(rng, words, plan.prompt_words)}]
        answers = [_text(rng, words, plan.response_words) for _ in range(plan.responses)]
        for context in (prompt, [criteria, *prompt]):
            requests += [ScoreRequest(context, answer) for answer in answers]
    return requests


def mixed_requests(words: Sequence[str], seed: int = 1) -> list[ScoreRequest]:
    """Every shape the labelers send, small: answers with and without criteria, follow-up turns
    after each answer (role ``user``), and one unrelated conversation."""
    rng = random.Random(seed)
    criteria = {"role": "system", "content": _text(rng, words, 9)}
    followups = [_text(rng, words, 5), _text(rng, words, 7)]
    requests = []
    for _ in range(3):
        prompt = [{"role": "user", "content": _text(rng, words, 20)}]
        answers = [_text(rng, words, rng.randint(6, 14)) for _ in range(3)]
        requests += [ScoreRequest(ctx, a) for ctx in (prompt, [criteria, *prompt]) for a in answers]
        requests += [
            ScoreRequest([*prompt, {"role": "assistant", "content": a}], f, "user")
            for a in answers
            for f in followups
        ]
    return [*requests, ScoreRequest([{"role": "user", "content": "x"}], _text(rng, words, 4))]


def option_requests(words: Sequence[str], seed: int = 2) -> list[OptionRequest]:
    """Judge-style requests: a shared rubric, then a rating read as one token after a prefill."""
    rng = random.Random(seed)
    rubric = _text(rng, words, 15)
    options = tuple(str(i) for i in range(6))
    return [
        OptionRequest([{"role": "user", "content": f"{rubric} {_text(rng, words, 10)}"}], "Score: ", options)
        for _ in range(4)
    ]


# ---------------------------------------------------------------- reference computations


def sequences(engine: TransformersEngine, requests: Sequence[ScoreRequest]) -> list[tuple[list[int], int]]:
    """Each request as (header + content ids, header length), split by the engine's own rules."""
    out = []
    for request in requests:
        split = engine.chat.split(request)
        if isinstance(split, Failed):
            raise RuntimeError(f"a check request failed to tokenise: {split}")
        header, content = split
        out.append(([*header, *content], len(header)))
    return out


def plain_forward(model: Any, seqs: Sequence[tuple[list[int], int]]) -> list[list[float]]:
    """Log-probs of each sequence's content from one ordinary causal pass over it alone."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for ids, start in seqs:
            tensor = torch.tensor([ids], device=device)
            logprobs = torch.log_softmax(model(input_ids=tensor).logits[0, start - 1 : -1].float(), -1)
            out.append(logprobs.gather(1, tensor[0, start:, None]).squeeze(1).tolist())
    return out


def batched_forward(
    model: Any, seqs: Sequence[tuple[list[int], int]], batch_tokens: int, pad: int
) -> list[list[float]]:
    """The baseline a careful script runs: sequences sorted by length, right-padded into batches
    of about ``batch_tokens``, one ``model(input_ids)`` each, log-softmax of the scored positions.

    Right padding needs no attention mask: a causal model's real tokens never see the padding
    after them, so attention runs its plain causal kernel.
    """
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    batches: list[list[int]] = [[]]
    for i in order:
        width = len(seqs[i][0])  # the longest so far: sorted
        if batches[-1] and (len(batches[-1]) + 1) * width > batch_tokens:
            batches.append([])
        batches[-1].append(i)
    picked: dict[int, Any] = {}
    with torch.inference_mode():
        for batch in batches:
            width = max(len(seqs[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            ids = ids.to(device)
            logits = model(input_ids=ids).logits
            for row, i in enumerate(batch):
                n, start = len(seqs[i][0]), seqs[i][1]
                logprobs = torch.log_softmax(logits[row, start - 1 : n - 1].float(), -1)
                picked[i] = logprobs.gather(1, ids[row, start:n, None]).squeeze(1)
            del logits
    flat = torch.cat([picked[i] for i in range(len(seqs))]).tolist()  # one device sync
    out, at = [], 0
    for ids, start in seqs:
        out.append(flat[at : at + len(ids) - start])
        at += len(ids) - start
    return out


def max_abs_diff(ours: Sequence[TokenScores | Failed], reference: Sequence[Sequence[float]]) -> float:
    """Largest per-token log-prob difference; infinite when a request failed or lengths differ."""
    worst = 0.0
    for scores, expected in zip(ours, reference, strict=True):
        if isinstance(scores, Failed) or len(scores.logprobs) != len(expected):
            return float("inf")
        worst = max([worst, *(abs(a - b) for a, b in zip(scores.logprobs, expected, strict=True))])
    return worst


def _diff_stats(ours: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Max and mean per-token difference between two runs' log-probs of the same tokens."""
    diffs = [abs(a - b) for x, y in zip(ours, reference, strict=True) for a, b in zip(x, y, strict=True)]
    return max(diffs), statistics.fmean(diffs)


def _as_lists(scores: Sequence[TokenScores | Failed]) -> list[list[float]]:
    return [[] if isinstance(s, Failed) else list(s.logprobs) for s in scores]


def options_diff(a: Sequence[dict[str, float] | Failed], b: Sequence[dict[str, float] | Failed]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not isinstance(x, dict) or not isinstance(y, dict) or set(x) != set(y):
            return float("inf")
        worst = max([worst, *(abs(x[k] - y[k]) for k in x)])
    return worst


class LeakyMaskEngine(TransformersEngine):
    """The control bug: tokens of one row also see earlier tokens of sibling branches.

    A plain causal mask over each packed row is the mistake a tree-attention core is most
    likely to make; the correctness check must catch it or it checks nothing.
    """

    def _forward(
        self, ids: Any, positions: Any, allowed: Any, cache: Any, keep: bool, real: int
    ) -> tuple[Any, Any]:
        import torch

        causal = torch.ones(allowed.shape[-2:], dtype=torch.bool).tril()
        return super()._forward(ids, positions, allowed | causal, cache, keep, real)


# ---------------------------------------------------------------- part 1: correctness


@dataclass
class Check:
    name: str
    max_abs_diff: float
    tolerance: float
    # A control passes when the comparison *fails* it: the difference must exceed the tolerance.
    control: bool = False

    @property
    def passed(self) -> bool:
        within = self.max_abs_diff <= self.tolerance
        return not within if self.control else within

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def correctness(plan: Plan, device: str, clock: Clock) -> tuple[list[Check], dict[str, Any]]:
    """The tiny-model checks; ``device`` is where the engine under test runs (CPU in a smoke run)."""
    import torch

    torch.set_float32_matmul_precision("highest")  # fp32 means fp32 on CUDA too (no TF32)
    tokenizer = build_tokenizer(200)
    words = filler(tokenizer)
    torch.manual_seed(0)
    reference = build_model(
        replace(TINY, vocab=len(tokenizer)), tokenizer, "cpu", torch.float32, init_range=TINY_INIT
    )
    requests = mixed_requests(words)
    options = option_requests(words)

    def engine(
        model: Any, layout: tuple[int, int], kind: type[TransformersEngine] = TransformersEngine
    ) -> Any:
        return kind.from_loaded(model, tokenizer, "tiny", batch_tokens=layout[0], row_tokens=layout[1])

    base = engine(reference, plan.layouts[0])
    seqs = sequences(base, requests)
    expected = base.score(requests)
    raw_cpu = plain_forward(reference, seqs)
    spread = statistics.pstdev(v for scores in _as_lists(expected) for v in scores)
    details: dict[str, Any] = {
        "requests": len(requests),
        "tokens": sum(len(ids) for ids, _ in seqs),
        "logprob_std": spread,
        "layouts": [list(layout) for layout in plan.layouts],
    }
    checks = [
        Check(
            "reference, CPU fp32: engine.score vs plain forward",
            max(max_abs_diff(engine(reference, lay).score(requests), raw_cpu) for lay in plan.layouts),
            TOL_FP32,
        )
    ]
    on_device = {
        "fp32": copy.deepcopy(reference).to(device=device, dtype=torch.float32),
        "bf16": copy.deepcopy(reference).to(device=device, dtype=torch.bfloat16),
    }
    for label, model in on_device.items():
        tol = TOL_FP32 if label == "fp32" else TOL_BF16
        raw = plain_forward(model, seqs)
        runs = [engine(model, lay).score(requests) for lay in plan.layouts]
        checks.append(
            Check(
                f"{device} {label}: engine.score vs plain forward",
                max(max_abs_diff(s, raw) for s in runs),
                tol,
            )
        )
        checks.append(
            Check(
                f"{device} {label}: engine.score vs CPU fp32 engine",
                max(max_abs_diff(s, _as_lists(expected)) for s in runs),
                tol,
            )
        )
    fp32 = engine(on_device["fp32"], plan.layouts[0])
    checks.append(
        Check(
            f"{device} fp32: option_logprobs vs CPU fp32 engine",
            options_diff(fp32.option_logprobs(options), base.option_logprobs(options)),
            TOL_FP32,
        )
    )
    # Controls: the same comparisons must fail on a broken mask and on perturbed weights.
    leaky = engine(on_device["fp32"], plan.layouts[0], LeakyMaskEngine)
    checks.append(
        Check(
            f"control: {device} fp32 with sibling branches visible is caught",
            max_abs_diff(leaky.score(requests), raw_cpu),
            TOL_FP32,
            control=True,
        )
    )
    perturbed = copy.deepcopy(on_device["bf16"])
    with torch.no_grad():
        weight = perturbed.model.layers[0].self_attn.o_proj.weight
        # Drawn on CPU from its own generator: the same perturbation on every device.
        noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(weight)
        weight.add_(noise * 0.3 * float(weight.float().std()))
    checks.append(
        Check(
            f"control: {device} bf16 with 30% noise in one layer's o_proj is caught",
            max_abs_diff(engine(perturbed, plan.layouts[0]).score(requests), raw_cpu),
            TOL_BF16,
            control=True,
        )
    )
    for check in checks:
        verdict = "ok" if check.passed else "FAILED"
        clock.log(f"correctness: {check.name}: max |Δ log p| {check.max_abs_diff:.2e} ({verdict})")
    return checks, details


# ---------------------------------------------------------------- parts 2 and 3: throughput


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _rounds(
    fns: dict[str, Callable[[], Any]], rounds: int, device: str, clock: Clock, label: str
) -> dict[str, list[tuple[float, Any]]]:
    """Interleaved timing (A B C, C B A, …) with a device sync on both ends of every run.

    Rounds after the first are dropped once the run is past two thirds of its budget: the
    check must finish, and one round already gives every number.
    """
    names = list(fns)
    out: dict[str, list[tuple[float, Any]]] = {name: [] for name in names}
    for index in range(rounds):
        if index and clock.over(2 / 3):
            clock.log(f"{label}: time budget: stopping after {index} round(s)")
            break
        for name in names if index % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            value = fns[name]()
            _sync(device)
            seconds = time.perf_counter() - start
            out[name].append((seconds, value))
            clock.log(f"{label}: round {index + 1}, {name}: {seconds:.2f} s")
    return out


def _median_speedup(
    ours: list[tuple[float, Any]], baseline: list[tuple[float, Any]], work: Callable[[Any], float]
) -> float:
    return statistics.median(
        (work(a) / ta) / (work(b) / tb) for (ta, a), (tb, b) in zip(ours, baseline, strict=True)
    )


def scoring(
    plan: Plan, shape: Shape, model: Any, tokenizer: Any, clock: Clock
) -> tuple[list[Row], dict[str, Any]]:
    """``engine.score`` at each row size against the raw batched forward, same model, same requests.

    The engine's time includes templating and tokenising the requests (it takes conversations);
    the baseline gets its token ids ready-made, so that cost, measured once, is in the details.
    """
    words = filler(tokenizer)
    requests = preference_requests(plan, words)
    engines = {
        f"engine, row_tokens {rows}": TransformersEngine.from_loaded(
            model, tokenizer, shape.name, batch_tokens=plan.batch_tokens, row_tokens=rows
        )
        for rows in plan.row_tokens
    }
    first = next(iter(engines.values()))
    started = time.perf_counter()
    seqs = sequences(first, requests)
    tokenise_seconds = time.perf_counter() - started
    tokens = sum(len(ids) for ids, _ in seqs)

    def counted(engine: TransformersEngine) -> Callable[[], tuple[list[list[float]], int]]:
        def run() -> tuple[list[list[float]], int]:
            before = engine.tokens_processed
            scores = engine.score(requests)
            if any(isinstance(s, Failed) for s in scores):
                raise RuntimeError(f"{shape.name}: the engine failed a scoring request")
            return _as_lists(scores), engine.tokens_processed - before

        return run

    def raw() -> tuple[list[list[float]], int]:
        return batched_forward(model, seqs, plan.batch_tokens, first._pad), tokens

    fns: dict[str, Callable[[], Any]] = {name: counted(engine) for name, engine in engines.items()}
    fns["raw forward"] = raw
    clock.log(f"{shape.name}: scoring {len(requests)} requests, {tokens:,} tokens; warm-up")
    warm = {name: fn() for name, fn in fns.items()}  # first calls allocate; their answers are compared
    _sync(plan.device)
    diffs = {name: _diff_stats(warm[name][0], warm["raw forward"][0]) for name in engines}
    runs = _rounds(fns, plan.scoring_rounds, plan.device, clock, f"{shape.name} scoring")
    base = runs["raw forward"]
    base_tps = tokens * len(base) / sum(t for t, _ in base)
    rows = []
    per_engine: dict[str, Any] = {}
    for name in engines:
        ours = runs[name]
        tps = tokens * len(ours) / sum(t for t, _ in ours)
        through = ours[0][1][1]
        per_engine[name] = {
            "seconds": [t for t, _ in ours],
            "tokens_per_second": tps,
            "tokens_through_network": through,
            "max_abs_diff_logp": diffs[name][0],
            "mean_abs_diff_logp": diffs[name][1],
        }
        rows.append(
            Row(
                NAME,
                f"score tok/s: {name} vs raw batched forward",
                f"{shape.name}: {plan.prompts} prompts × {plan.responses} answers × 2 contexts, "
                f"{tokens:,} tokens",
                tps,
                base_tps,
                "tok/s",
                _median_speedup(ours, base, lambda _: 1.0),
                note=f"{through:,} tokens through the network; Δ log p max {diffs[name][0]:.2g}, "
                f"mean {diffs[name][1]:.1g}",
            )
        )
    details = {
        "requests": len(requests),
        "tokens": tokens,
        "batch_tokens": plan.batch_tokens,
        "tokenise_seconds": tokenise_seconds,
        "raw_seconds": [t for t, _ in base],
        "raw_tokens_per_second": base_tps,
        "engines": per_engine,
    }
    return rows, details


def generation(
    plan: Plan, shape: Shape, model: Any, tokenizer: Any, clock: Clock
) -> tuple[list[Row], dict[str, Any]]:
    """``engine.generate`` as sampling calls it (one prompt, n samples, per ``model.generate``)
    against one ``model.generate`` over every prompt at once: what batching prompts would gain.

    A random model almost never samples its end-of-turn token among 128k, so every sample runs
    to ``max_tokens`` on both sides and the token counts match.
    """
    import torch

    engine = TransformersEngine.from_loaded(model, tokenizer, shape.name, batch_tokens=plan.batch_tokens)
    words = filler(tokenizer)
    rng = random.Random(3)
    conversations = [
        [{"role": "user", "content": _text(rng, words, plan.prompt_words)}] for _ in range(plan.gen_prompts)
    ]
    params = SamplingParams(n=plan.gen_n, temperature=0.8, top_p=0.95, max_tokens=plan.gen_max_tokens)
    seeds = list(range(len(conversations)))
    prompts = [engine.chat.ids(c, True) for c in conversations]
    eos = set(engine._eos)

    def ours() -> int:
        results = engine.generate(conversations, params, seeds)
        return sum(c.num_tokens for r in results if not isinstance(r, Failed) for c in r)

    def batched(max_new_tokens: int = params.max_tokens) -> int:
        # Every prompt has the same number of words, hence of tokens: no padding is needed.
        ids = torch.tensor(prompts, device=engine.device)
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=params.n,
                pad_token_id=engine._pad,
                eos_token_id=sorted(eos),
            )
        count = 0
        for row in out[:, ids.shape[1] :].tolist():
            count += next((k for k, t in enumerate(row) if t in eos), len(row))
        return count

    clock.log(f"{shape.name}: generation warm-up")
    engine.generate(conversations[:1], replace(params, max_tokens=4), seeds[:1])
    batched(4)
    runs = _rounds(
        {"engine.generate": ours, "batched model.generate": batched},
        plan.gen_rounds,
        plan.device,
        clock,
        f"{shape.name} generation",
    )
    mine, base = runs["engine.generate"], runs["batched model.generate"]
    tps = sum(n for _, n in mine) / sum(t for t, _ in mine)
    base_tps = sum(n for _, n in base) / sum(t for t, _ in base)
    row = Row(
        NAME,
        "generate tok/s: engine.generate (a call per prompt) vs one batched model.generate",
        f"{shape.name}: {plan.gen_prompts} prompts × n={plan.gen_n}, ≤{plan.gen_max_tokens} new tokens, "
        f"{len(prompts[0])}-token prompts",
        tps,
        base_tps,
        "tok/s",
        _median_speedup(mine, base, lambda n: float(n)),
    )
    details = {
        "tokens": {"engine": [n for _, n in mine], "batched": [n for _, n in base]},
        "seconds": {"engine": [t for t, _ in mine], "batched": [t for t, _ in base]},
        "tokens_per_second": {"engine": tps, "batched": base_tps},
    }
    return [row], details


# ---------------------------------------------------------------- driver


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info |= {
            "card": torch.cuda.get_device_name(0),
            "cuda": torch.version.cuda,
            "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
            "multiprocessors": props.multi_processor_count,
        }
    else:
        info["card"] = "CPU (smoke run: tiny sizes, not a measurement)"
    return info


def _output(args: argparse.Namespace) -> tuple[Path, str]:
    """``--out`` if given; else ``$OUT/gpu_check.json`` (the GPU machine returns that folder); else
    ``outputs/bench/gpu.json`` next to the other benchmarks."""
    if args.out is not None:
        return args.out, NAME
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]), "gpu_check"
    return DEFAULT_OUT, NAME


def correctness_table(checks: Sequence[Check]) -> str:
    lines = ["| correctness check (tiny Llama) | max abs Δ log p | tolerance | result |", "|---|---|---|---|"]
    for check in checks:
        rule = f"> {check.tolerance:g} (must be caught)" if check.control else f"≤ {check.tolerance:g}"
        result = "pass" if check.passed else "FAIL"
        lines.append(f"| {check.name} | {check.max_abs_diff:.2e} | {rule} | {result} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the whole check at tiny sizes on CPU (seconds)")
    p.add_argument("--shapes", default="1b,8b", help="which model shapes, in order (default 1b,8b)")
    p.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds; later timing rounds and shapes are skipped past it (default 360)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu.json (default: $OUT as gpu_check.json, else outputs/bench)",
    )
    args = p.parse_args(argv)
    with one_thread_if(args.cpu_smoke):
        return run(args)


@contextlib.contextmanager
def one_thread_if(cpu_smoke: bool) -> Iterator[None]:
    """One torch thread for a CPU smoke run (every bench that has one uses this).

    Tiny matrices gain nothing from threads, and on a busy machine two threads spinning at
    every barrier made each one 200 times slower than one thread.
    """
    if not cpu_smoke:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    import torch

    plan = SMOKE if args.cpu_smoke else FULL
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "bench.gpu needs a CUDA GPU (torch.cuda.is_available() is False here);\n"
            "`python -m bench.gpu --cpu-smoke` runs the same code at tiny sizes on CPU.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    shapes = SMOKE_SHAPES if args.cpu_smoke else SHAPES
    wanted = [name.strip() for name in args.shapes.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in shapes]
    if unknown:
        print(f"unknown shape(s) {unknown}; choose from {sorted(shapes)}", file=sys.stderr)
        return 2
    clock = Clock(args.budget)
    out_dir, out_name = _output(args)
    payload: dict[str, Any] = {
        "name": NAME,
        "cpu_smoke": args.cpu_smoke,
        "complete": False,
        "environment": _environment(plan.device),
        "plan": asdict(plan),
        "correctness": [],
        "rows": [],
        "details": {},
        "skipped": [],
        "errors": [],
    }
    env = payload["environment"]
    clock.log(f"{env['card']}; torch {env['torch']}, transformers {env['transformers']}")
    rows: list[Row] = []

    def save() -> Path:
        payload["seconds"] = round(clock.elapsed(), 1)
        payload["rows"] = [row.to_dict() for row in rows]
        return write_json(out_dir, out_name, payload)

    checks: list[Check] = []
    try:
        checks, payload["details"]["correctness"] = correctness(plan, plan.device, clock)
    except Exception as exc:  # the throughput parts still run: one GPU run must tell all it can
        _failed(payload, "correctness", exc, clock)
    payload["correctness"] = [check.to_dict() for check in checks]
    save()
    tokenizer = build_tokenizer(plan.filler_words)
    for key in wanted:
        shape = shapes[key]
        if clock.over():
            payload["skipped"].append(f"{shape.name}: time budget spent")
            clock.log(f"{shape.name}: skipped, time budget spent")
            continue
        detail: dict[str, Any] = {"shape": asdict(shape)}
        payload["details"][key] = detail
        try:
            _shape(plan, shape, tokenizer, clock, detail, payload, rows, save)
        except Exception as exc:  # e.g. out of memory: the next shape may still fit
            _failed(payload, shape.name, exc, clock)
        _free(plan.device)
        save()
    payload["complete"] = True
    path = save()
    passed = bool(checks) and all(check.passed for check in checks)
    print(
        f"\n**GPU check** on {env['card']}: torch {env['torch']}, transformers {env['transformers']}; "
        f"bf16 models, batch_tokens {plan.batch_tokens}; {payload['seconds']:.0f} s\n"
    )
    print(format_table(rows))
    print()
    print(correctness_table(checks))
    for note in payload["skipped"]:
        print(f"\nskipped: {note}")
    for error in payload["errors"]:
        print(f"\nERROR in {error['part']}: {error['error']}")
    print(f"\ncorrectness: {'all passed' if passed else 'FAILED'}; wrote {path}", file=sys.stderr)
    if not passed:
        return EXIT_INCORRECT
    return EXIT_ERROR if payload["errors"] else EXIT_OK


def _shape(
    plan: Plan,
    shape: Shape,
    tokenizer: Any,
    clock: Clock,
    detail: dict[str, Any],
    payload: dict[str, Any],
    rows: list[Row],
    save: Callable[[], Path],
) -> None:
    """Build one shape's model, score, then generate with it; ``detail`` and ``rows`` fill in as it
    goes, so that what finished before an error is kept."""
    import torch

    if plan.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    built = time.perf_counter()
    model = build_model(shape, tokenizer, plan.device, torch.bfloat16)
    _sync(plan.device)
    params = sum(p.numel() for p in model.parameters())
    detail |= {
        "parameters": params,
        "attention": model.config._attn_implementation,
        "init_seconds": round(time.perf_counter() - built, 1),
    }
    clock.log(f"{shape.name}: {params / 1e9:.2f} B parameters built in {detail['init_seconds']} s")
    more, detail["scoring"] = scoring(plan, shape, model, tokenizer, clock)
    rows += more
    save()
    if clock.over():
        payload["skipped"].append(f"{shape.name} generation: time budget spent")
    else:
        more, detail["generation"] = generation(plan, shape, model, tokenizer, clock)
        rows += more
    if plan.device.startswith("cuda"):
        detail["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 1)


def _failed(payload: dict[str, Any], part: str, exc: Exception, clock: Clock) -> None:
    traceback.print_exc()
    payload["errors"].append({"part": part, "error": f"{type(exc).__name__}: {exc}"})
    clock.log(f"{part}: ERROR {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
