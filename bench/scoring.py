"""Scoring efficiency: the model-reading labelers against raw transformers forward passes.

Density ratio: the real labeler (``build_labeler`` with the default recipe's density-ratio
settings) against a plain ``model(input_ids)`` per sequence over exactly the sequences the
ratio needs (each response after the criteria prompt and after the plain prompt), same
model object, dtype and threads. Tokens/s counts the same tokens for both: every token of
every full sequence, whatever either side manages to skip.

Follow-up likelihood with K = 8 follow-ups per response: the real labeler (which runs the
prompt + response once and reuses its KV cache for the K follow-ups) against naive
recomputation of the whole conversation for every follow-up.

Both baselines also compute the scores themselves, and the table says how far apart the
numbers are: a speed-up that changed the answer would not count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from statistics import fmean
from typing import Any

from bench.common import Row, column_map, finish, interleave, log, median_ratio, parser, ratio, total_seconds
from bench.data import responses_table
from schemas import columns
from schemas.recipe import BuiltinPrompts, DensityRatioConfig, FollowUpConfig, load_recipe
from steps.engines import load_engine
from steps.labelers.density_ratio import side_context
from steps.labelers.follow_up import load_followups
from steps.labelers.registry import build_labeler
from steps.prompts.normalise import load_prompts

NAME = "scoring"
K_FOLLOWUPS = 8


class RawScorer:
    """Log-probs of a turn's content tokens from one full forward pass per sequence.

    The content span is found the way any careful script would: the tokens two different
    one-word turns share are the header, and the turn ends at its first special token.
    """

    def __init__(self, engine: Any) -> None:
        self.model, self.tokenizer, self.device = engine.model, engine.tokenizer, engine.device
        self.special = set(self.tokenizer.all_special_ids)
        self.tokens = 0

    def _ids(self, conversation: list[dict[str, str]]) -> list[int]:
        ids: Any = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=False, tokenize=True
        )
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    def sequence(self, context: list[dict[str, str]], role: str, text: str) -> tuple[list[int], int, int]:
        a = self._ids([*context, {"role": role, "content": "x"}])
        b = self._ids([*context, {"role": role, "content": "y"}])
        start = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        full = self._ids([*context, {"role": role, "content": text}])
        end = start
        while end < len(full) and full[end] not in self.special:
            end += 1
        return full, start, end

    def logprobs(self, full: list[int], start: int, end: int) -> list[float]:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([full], device=self.device)
            logits = self.model(input_ids=ids).logits[0, start - 1 : end - 1].float()
            targets = ids[0, start:end]
            picked = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        self.tokens += len(full)
        return picked.tolist()


def _density(
    args: argparse.Namespace, config: DensityRatioConfig, n_prompts: int, rounds: int
) -> dict[str, Any]:
    prompts, _ = load_prompts(BuiltinPrompts(), limit=n_prompts)
    responses = responses_table(prompts, 2 if args.quick else 4, seed=1)
    labeler = build_labeler(config)
    engine = load_engine(config.strong.model)
    raw = RawScorer(engine)
    messages = column_map(prompts, columns.PROMPT_ID, columns.MESSAGES)
    jobs = []  # (response id, side, full ids, start, end)
    for pid, rid, text in zip(
        responses.column(columns.PROMPT_ID).to_pylist(),
        responses.column(columns.RESPONSE_ID).to_pylist(),
        responses.column(columns.TEXT).to_pylist(),
        strict=True,
    ):
        for side_name, side in (("strong", config.strong), ("weak", config.weak)):
            context = side_context(side, messages[pid])
            jobs.append((rid, side_name, *raw.sequence(context, "assistant", text)))
    tokens = sum(len(full) for _, _, full, _, _ in jobs)

    def ours() -> dict[str, dict[str, float]]:
        table, _ = labeler.label(prompts, responses)
        details = column_map(table, columns.RESPONSE_ID, columns.DETAILS)
        return {rid: json.loads(d) for rid, d in details.items() if d}

    def forward() -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for rid, side, full, start, end in jobs:
            out.setdefault(rid, {})[f"{side}_logp"] = sum(raw.logprobs(full, start, end))
        return out

    ours() and forward()  # warm-up: first calls allocate, later ones are steady state
    before = engine.tokens_processed
    runs = interleave({"ours": ours, "raw": forward}, rounds)
    processed = (engine.tokens_processed - before) / rounds
    mine, theirs = runs["ours"][0].value, runs["raw"][0].value
    diffs = [
        abs(mine[rid][k] - theirs[rid][k])
        for rid in theirs
        for k in ("strong_logp", "weak_logp")
        if rid in mine
    ]
    return {
        "prompts": prompts.num_rows,
        "responses": responses.num_rows,
        "sequences": len(jobs),
        "tokens": tokens,
        "tokens_through_network_ours": processed,
        "seconds": {k: [r.seconds for r in v] for k, v in runs.items()},
        "tokens_per_second": {k: tokens * rounds / total_seconds(v) for k, v in runs.items()},
        "scored": len(mine),
        "max_abs_diff_logp": max(diffs) if diffs else None,
        "median_ratio": median_ratio(runs["ours"], runs["raw"]),
        "compared": len(diffs),
    }


def _followup(args: argparse.Namespace, n_prompts: int) -> dict[str, Any]:
    probe = FollowUpConfig(kind="follow_up", per_dimension=2)
    dims = list(load_followups(probe))[: K_FOLLOWUPS // 4]  # 2 positive + 2 negative per dimension
    config = FollowUpConfig(kind="follow_up", dimensions=dims, per_dimension=2, model={"dtype": args.dtype})
    followups = [
        (polarity, text)
        for dim in load_followups(config).values()
        for polarity, texts in (("positive", dim.positive), ("negative", dim.negative))
        for text in texts
    ]
    prompts, _ = load_prompts(BuiltinPrompts(), limit=n_prompts)
    responses = responses_table(prompts, 2 if args.quick else 4, seed=2)
    labeler = build_labeler(config)
    engine = load_engine(config.model)
    raw = RawScorer(engine)
    messages = column_map(prompts, columns.PROMPT_ID, columns.MESSAGES)
    jobs = []  # (response id, [(polarity, full, start, end)] for its K follow-ups)
    for pid, rid, text in zip(
        responses.column(columns.PROMPT_ID).to_pylist(),
        responses.column(columns.RESPONSE_ID).to_pylist(),
        responses.column(columns.TEXT).to_pylist(),
        strict=True,
    ):
        context = [*messages[pid], {"role": "assistant", "content": text}]
        jobs.append((rid, [(pol, *raw.sequence(context, "user", f)) for pol, f in followups]))

    def ours() -> dict[str, float]:
        table, _ = labeler.label(prompts, responses)
        return column_map(table, columns.RESPONSE_ID, columns.SCORE)

    def naive() -> dict[str, float]:
        out = {}
        for rid, items in jobs:
            means = {"positive": [], "negative": []}  # type: dict[str, list[float]]
            for polarity, full, start, end in items:
                means[polarity].append(fmean(raw.logprobs(full, start, end)))
            out[rid] = fmean(means["positive"]) - fmean(means["negative"])
        return out

    ours()  # warm-up
    before_ours, before_raw = engine.tokens_processed, raw.tokens
    runs = interleave({"ours": ours, "naive": naive}, 1)
    mine, theirs = runs["ours"][0].value, runs["naive"][0].value
    diffs = [abs(mine[rid] - theirs[rid]) for rid in theirs if mine.get(rid) is not None]
    return {
        "prompts": prompts.num_rows,
        "responses": responses.num_rows,
        "followups_per_response": len(followups),
        "dimensions": dims,
        "seconds": {k: [r.seconds for r in v] for k, v in runs.items()},
        "tokens_through_network": {
            "ours": engine.tokens_processed - before_ours,
            "naive": raw.tokens - before_raw,
        },
        "scored": sum(1 for v in mine.values() if v is not None),
        "max_abs_diff_score": max(diffs) if diffs else None,
        "compared": len(diffs),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    started = time.perf_counter()
    recipe = load_recipe("default")
    default_density = next(cfg for cfg in recipe.labelers if isinstance(cfg, DensityRatioConfig))
    dump = default_density.model_dump(mode="json")
    for side in ("strong", "weak"):
        dump[side]["model"]["dtype"] = args.dtype
    density_config = DensityRatioConfig.model_validate(dump)
    engine = load_engine(density_config.strong.model)
    dtype, device = str(engine.model.dtype).removeprefix("torch."), str(engine.device)
    log(f"scoring: {engine.model_id} on {device}, {dtype}, {torch.get_num_threads()} torch threads")
    density = _density(args, density_config, args.prompts or (1 if args.quick else 6), 1 if args.quick else 2)
    log(f"scoring: density ratio done: {density['tokens_per_second']}")
    follow = _followup(args, args.followup_prompts or (1 if args.quick else 2))
    log(f"scoring: follow-up done: {follow['seconds']}")
    tps = density["tokens_per_second"]
    f_ours, f_naive = total_seconds_of(follow, "ours"), total_seconds_of(follow, "naive")
    rows = [
        Row(
            NAME,
            f"density ratio tokens/s vs raw forward ({dtype}, {device})",
            f"{density['responses']} responses × 2 sides, {density['tokens']:,} tokens",
            tps["ours"],
            tps["raw"],
            "tok/s",
            density["median_ratio"],
            target=0.85,
            note=f"max Δ log p {_sci(density['max_abs_diff_logp'])}",
        ),
        Row(
            NAME,
            f"follow-up likelihood, K={follow['followups_per_response']}: shared prefix vs naive recompute",
            f"{follow['responses']} responses × {follow['followups_per_response']} follow-ups",
            f_ours,
            f_naive,
            "s",
            ratio(f_naive, f_ours),
            target=3.0,
            note=f"max Δ score {_sci(follow['max_abs_diff_score'])}",
        ),
    ]
    details = {
        "model_id": engine.model_id,
        "device": device,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_tokens": density_config.strong.model.batch_tokens,
        "density_ratio": density,
        "follow_up": follow,
    }
    return finish(NAME, args, rows, details, started)


def total_seconds_of(result: dict[str, Any], name: str) -> float:
    return float(sum(result["seconds"][name]))


def _sci(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def main(argv: list[str] | None = None) -> int:
    p = parser(NAME, __doc__ or "")
    p.add_argument("--prompts", type=int, help="built-in prompts for the density ratio (default 6)")
    p.add_argument("--followup-prompts", type=int, help="built-in prompts for follow-ups (default 2)")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
        help="the scorer's dtype (auto: what the labelers run in on this machine)",
    )  # fmt: skip
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
