"""What the GPU check is built from: shapes, plans, a tokenizer made in code, random models, requests,
and the reference computations (a plain causal forward pass) the engine is compared against.

Nothing here is read from a model hub: the tokenizer is a word-level vocabulary with a
Llama-3-style chat template, the models are randomly initialised at the requested shape.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from steps.engines.base import Failed, OptionRequest, ScoreRequest, TokenScores
from steps.engines.transformers_engine import ROW_TOKENS, TransformersEngine

# Initialisation of the tiny model: wide enough that next-token distributions are far from
# uniform (at the usual 0.02 every log-prob sits near -log(vocab) and a mistake moves it too
# little to see), narrow enough that bf16 rounding stays small against a real error.
TINY_INIT = 0.1


NAME = "gpu"  # the bench rows' name and the output file's stem
LLAMA3_VOCAB = 128256  # the big shapes' real vocabulary, whatever the tokenizer's size
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


PAD, UNK = "<|pad|>", "<|unk|>"


# The words the template and the judge path spell out; the filler words come after them.
FIXED_WORDS = ("system", "user", "assistant", "x", "y", "Score", ":", *(str(d) for d in range(10)))


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


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


def random_text(rng: random.Random, words: Sequence[str], n: int) -> str:
    return " ".join(rng.choices(words, k=n))


def preference_requests(plan: Plan, words: Sequence[str], seed: int = 0) -> list[ScoreRequest]:
    """A density-ratio labeling job: each response under its prompt, with and without criteria.

    The responses of one prompt share it, and every criteria-side request shares the criteria:
    the prefix sharing real labelers get, at real lengths.
    """
    rng = random.Random(seed)
    criteria = {"role": "system", "content": random_text(rng, words, plan.system_words)}
    requests = []
    for _ in range(plan.prompts):
        prompt = [{"role": "user", "content": random_text(rng, words, plan.prompt_words)}]
        answers = [random_text(rng, words, plan.response_words) for _ in range(plan.responses)]
        for context in (prompt, [criteria, *prompt]):
            requests += [ScoreRequest(context, answer) for answer in answers]
    return requests


def mixed_requests(words: Sequence[str], seed: int = 1) -> list[ScoreRequest]:
    """Every shape the labelers send, small: answers with and without criteria, follow-up turns
    after each answer (role ``user``), and one unrelated conversation."""
    rng = random.Random(seed)
    criteria = {"role": "system", "content": random_text(rng, words, 9)}
    followups = [random_text(rng, words, 5), random_text(rng, words, 7)]
    requests = []
    for _ in range(3):
        prompt = [{"role": "user", "content": random_text(rng, words, 20)}]
        answers = [random_text(rng, words, rng.randint(6, 14)) for _ in range(3)]
        requests += [ScoreRequest(ctx, a) for ctx in (prompt, [criteria, *prompt]) for a in answers]
        requests += [
            ScoreRequest([*prompt, {"role": "assistant", "content": a}], f, "user")
            for a in answers
            for f in followups
        ]
    return [*requests, ScoreRequest([{"role": "user", "content": "x"}], random_text(rng, words, 4))]


def option_requests(words: Sequence[str], seed: int = 2) -> list[OptionRequest]:
    """Judge-style requests: a shared rubric, then a rating read as one token after a prefill."""
    rng = random.Random(seed)
    rubric = random_text(rng, words, 15)
    options = tuple(str(i) for i in range(6))
    return [
        OptionRequest(
            [{"role": "user", "content": f"{rubric} {random_text(rng, words, 10)}"}], "Score: ", options
        )
        for _ in range(4)
    ]


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


def diff_stats(ours: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Max and mean per-token difference between two runs' log-probs of the same tokens."""
    diffs = [abs(a - b) for x, y in zip(ours, reference, strict=True) for a, b in zip(x, y, strict=True)]
    return max(diffs), statistics.fmean(diffs)


def as_lists(scores: Sequence[TokenScores | Failed]) -> list[list[float]]:
    return [[] if isinstance(s, Failed) else list(s.logprobs) for s in scores]


def options_diff(a: Sequence[dict[str, float] | Failed], b: Sequence[dict[str, float] | Failed]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if not isinstance(x, dict) or not isinstance(y, dict) or set(x) != set(y):
            return float("inf")
        worst = max([worst, *(abs(x[k] - y[k]) for k in x)])
    return worst


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
