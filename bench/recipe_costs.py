"""What a GPU recipe costs per 10k prompts: an estimate from measured tokens/s, never a promise.

``python -m bench.recipe_costs pipelines/gpu-onpolicy.yaml`` counts the tokens each model of the
recipe decodes or reads (from its own settings: n, max_tokens, the labelers and their prompts) for
a given mean prompt and answer length, and divides them by the rates ``bench.gpu_rates`` measured
on a GPU (``docs/measurements/gpu_rates_*.json``). A model between or beyond the measured shapes
gets the nearest shape's rate scaled by parameter count (both decode, memory-bound, and prefill,
compute-bound, scale about linearly with it); the table says which rows are scaled.

What makes it an estimate, in the order it matters:

* the rates are Hugging Face ``generate`` and plain forwards; vLLM (which the recipes run) decodes
  faster with paged attention and CUDA graphs, so GPU-hours here are upper bounds for decoding;
* no prefix sharing is counted (our engines and vLLM's prefix cache read a shared prompt once);
* answer length is an input: the policy decides it, and it dominates the policy's cost;
* GPU-hours are summed work; wall time on a node is that divided by its GPUs only if every stage
  keeps every GPU busy (stages run one after another, and a tensor-parallel group idles together).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.recipe import (
    DensityRatioConfig,
    FollowUpConfig,
    PairwiseJudgeConfig,
    PointwiseJudgeConfig,
    Recipe,
    RewardModelConfig,
    load_recipe,
)
from steps.labelers.judging import PAIRWISE, RUBRIC

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RATES = ROOT / "docs" / "measurements" / "gpu_rates_h200_2026-11-26.json"
CHARS_PER_TOKEN = 4  # English prose in Llama-3/Qwen tokenizers; only the judges' fixed text uses it
CHAT_OVERHEAD = 12  # role headers and end-of-turn tokens around one exchange
MARKERS = 16  # BEGIN/END lines around each quoted text in a judge prompt


class CostError(ValueError):
    """The estimate cannot be made; the message says which model or file and what to pass."""


@dataclass(frozen=True)
class Work:
    """Tokens one model decodes and reads for the whole prompt set."""

    role: str
    model: str
    decode: float
    prefill: float


@dataclass(frozen=True)
class Priced:
    work: Work
    billions: float
    shape: str
    scaled: bool
    decode_rate: float
    prefill_rate: float

    @property
    def gpu_hours(self) -> float:
        return (self.work.decode / self.decode_rate + self.work.prefill / self.prefill_rate) / 3600


def billions_of(model: str, sizes: dict[str, float]) -> float:
    """Parameters in billions: ``--size`` if given, else the ``8B``/``32B`` in the model's name."""
    if model in sizes:
        return sizes[model]
    found = [float(m) for m in re.findall(r"(?<![0-9.])(\d+(?:\.\d+)?)[Bb](?![A-Za-z0-9])", model)]
    if not found:
        raise CostError(f"{model!r}: no parameter count in its name; pass --size '{model}=<billions>'")
    return found[-1]


def _tokens(text: str) -> float:
    return len(text) / CHARS_PER_TOKEN


def work_of(recipe: Recipe, prompts: int, prompt_tokens: float, answer_tokens: float) -> list[Work]:
    """Every model's tokens for ``prompts`` prompts; one best-vs-worst pair per prompt."""
    s = recipe.sampling
    answer = min(answer_tokens, s.max_tokens)
    responses = prompts * s.n
    exchange = prompt_tokens + answer + CHAT_OVERHEAD
    pair_read = _tokens(PAIRWISE) + 3 * MARKERS + prompt_tokens + 2 * answer + CHAT_OVERHEAD  # one order
    out = [Work("policy", recipe.policy.model, responses * answer, prompts * (prompt_tokens + CHAT_OVERHEAD))]
    for labeler in recipe.labelers:
        role = f"{labeler.kind} ({labeler.name})"
        if isinstance(labeler, RewardModelConfig):
            out.append(Work(role, labeler.model.model, 0.0, responses * exchange))
        elif isinstance(labeler, PointwiseJudgeConfig):
            read = responses * (_tokens(RUBRIC) + 2 * MARKERS + exchange)
            decode = responses * labeler.n * labeler.max_tokens if labeler.mode == "sampled" else 0.0
            out.append(Work(role, labeler.model.model, decode, read * (labeler.n if decode else 1)))
        elif isinstance(labeler, PairwiseJudgeConfig):
            # every pair of a prompt's n answers, both orders
            pairs = prompts * s.n * (s.n - 1)
            out.append(Work(role, labeler.model.model, 0.0, pairs * pair_read))
        elif isinstance(labeler, DensityRatioConfig):
            for side, config in (("strong", labeler.strong), ("weak", labeler.weak)):
                extra = _tokens(config.system_prompt or "") + (
                    _tokens(config.exemplar.prompt + config.exemplar.response) if config.exemplar else 0.0
                )
                out.append(Work(f"{role}, {side}", config.model.model, 0.0, responses * (exchange + extra)))
        elif isinstance(labeler, FollowUpConfig):
            from steps.labelers.follow_up import load_followups

            followups = [t for d in load_followups(labeler).values() for t in (*d.positive, *d.negative)]
            per_response = sum(exchange + _tokens(t) + CHAT_OVERHEAD for t in followups)
            out.append(Work(role, labeler.model.model, 0.0, responses * per_response))
        # bleu: CPU only
    if recipe.pairing.judge is not None:
        out.append(
            Work(
                "pairing.judge (both orders)", recipe.pairing.judge.model.model, 0.0, 2 * prompts * pair_read
            )
        )
    return out


def load_rates(path: Path) -> tuple[str, dict[str, tuple[float, float, float]]]:
    """The card, and per measured shape: (billions of parameters, decode tok/s, prefill tok/s)."""
    try:
        payload: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        shapes = {
            key: (
                detail["parameters"] / 1e9,
                detail["decode"]["tokens_per_second"],
                detail["prefill"]["tokens_per_second"],
            )
            for key, detail in payload["shapes"].items()
            if "decode" in detail and "prefill" in detail
        }
        card = payload["environment"]["card"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CostError(f"{path}: not a bench.gpu_rates result ({type(exc).__name__}: {exc})") from exc
    if not shapes or payload.get("cpu_smoke"):
        raise CostError(f"{path}: holds no GPU measurement; run `python -m bench.gpu_rates` on a GPU")
    return card, shapes


def price(work: Work, billions: float, shapes: dict[str, tuple[float, float, float]]) -> Priced:
    key = min(shapes, key=lambda k: abs(shapes[k][0] - billions) / shapes[k][0])
    measured, decode, prefill = shapes[key]
    factor = measured / billions
    return Priced(work, billions, key, abs(factor - 1) > 0.1, decode * factor, prefill * factor)


def estimate(
    recipe: Recipe,
    rates: Path,
    prompts: int = 10_000,
    prompt_tokens: float = 150,
    answer_tokens: float = 400,
    sizes: dict[str, float] | None = None,
) -> tuple[str, list[Priced]]:
    card, shapes = load_rates(rates)
    sizes = sizes or {}
    return card, [
        price(w, billions_of(w.model, sizes), shapes)
        for w in work_of(recipe, prompts, prompt_tokens, answer_tokens)
    ]


def table(card: str, priced: list[Priced], gpus: int, usd_per_gpu_hour: float | None) -> str:
    lines = [
        f"Estimate on {card} rates (bench.gpu_rates; transformers, bf16: upper bounds for vLLM decoding)",
        "",
        "| model (role) | params | decode tokens | read tokens | rate from | GPU-hours |",
        "|---|---|---|---|---|---|",
    ]
    for p in priced:
        source = f"{p.shape} shape" + (" (scaled by size)" if p.scaled else "")
        lines.append(
            f"| {p.work.model} ({p.work.role}) | {p.billions:g}B | {p.work.decode / 1e6:.1f} M | "
            f"{p.work.prefill / 1e6:.1f} M | {source} | {p.gpu_hours:.2f} |"
        )
    total = sum(p.gpu_hours for p in priced)
    lines.append(f"| **total** | | | | | **{total:.1f}** |")
    lines.append("")
    lines.append(f"At least {60 * total / gpus:.0f} min on {gpus} GPUs (every GPU busy in every stage).")
    if usd_per_gpu_hour is not None:
        lines.append(
            f"About ${total * usd_per_gpu_hour:,.0f} at ${usd_per_gpu_hour:g} per GPU-hour (your price)."
        )
    return "\n".join(lines)


def _size(text: str) -> tuple[str, float]:
    model, sep, value = text.rpartition("=")
    try:
        billions = float(value)
    except ValueError:
        billions = math.nan
    if not (sep and model and math.isfinite(billions) and billions > 0):
        raise argparse.ArgumentTypeError(
            f"--size {text!r}: expected MODEL=BILLIONS with a positive number, e.g. org/model=7"
        )
    return model, billions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recipe_costs", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="a recipe name in pipelines/ or a YAML path")
    p.add_argument("--rates", type=Path, default=DEFAULT_RATES, help="a bench.gpu_rates JSON")
    p.add_argument("--prompts", type=int, default=10_000)
    p.add_argument("--prompt-tokens", type=float, default=150, help="mean prompt length (default 150)")
    p.add_argument("--answer-tokens", type=float, default=400, help="mean answer length (default 400)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs on the node (default 8)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None)
    p.add_argument(
        "--size", type=_size, action="append", default=[], help="MODEL=BILLIONS, for unnamed sizes"
    )
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        card, priced = estimate(
            recipe, args.rates, args.prompts, args.prompt_tokens, args.answer_tokens, dict(args.size)
        )
    except (CostError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{recipe.name}: {args.prompts:,} prompts × n={recipe.sampling.n}, ~{args.prompt_tokens:g}-token "
        f"prompts, ~{args.answer_tokens:g}-token answers (max_tokens {recipe.sampling.max_tokens})\n"
    )
    print(table(card, priced, args.gpus, args.usd_per_gpu_hour))
    return 0


if __name__ == "__main__":
    sys.exit(main())
