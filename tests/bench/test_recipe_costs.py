"""bench.recipe_costs: the per-10k-prompt estimates README prints for the GPU recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import recipe_costs as rc
from schemas.recipe import load_recipe
from tests.conftest import make_recipe


def rates_file(tmp_path: Path, smoke: bool = False) -> Path:
    payload = {
        "cpu_smoke": smoke,
        "environment": {"card": "Test GPU"},
        "shapes": {
            "8b": {
                "parameters": 8e9,
                "decode": {"tokens_per_second": 1000.0},
                "prefill": {"tokens_per_second": 4000.0},
            },
            "32b": {
                "parameters": 32e9,
                "decode": {"tokens_per_second": 250.0},
                "prefill": {"tokens_per_second": 1000.0},
            },
        },
    }
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(payload))
    return path


def test_reward_model_reads_every_exchange_once_and_the_policy_decodes_every_answer(tmp_path: Path) -> None:
    recipe = make_recipe(
        policy={"engine": "vllm", "model": "org/policy-8B"},
        sampling={"n": 4, "max_tokens": 300},
        labelers=[{"kind": "reward_model", "model": {"model": "org/rm-32B", "engine": "vllm"}}],
    )
    card, priced = rc.estimate(recipe, rates_file(tmp_path), prompts=100, prompt_tokens=50, answer_tokens=500)
    assert card == "Test GPU"
    policy, reward = priced
    # answers are capped at max_tokens: 100 prompts x 4 answers x 300 tokens
    assert policy.work.decode == 100 * 4 * 300
    assert reward.work.prefill == 100 * 4 * (50 + 300 + rc.CHAT_OVERHEAD) and reward.work.decode == 0
    assert reward.prefill_rate == 1000.0 and not reward.scaled
    expected = (policy.work.decode / 1000.0 + policy.work.prefill / 4000.0) / 3600
    assert policy.gpu_hours == pytest.approx(expected)


def test_judges_and_the_density_ratio_count_what_they_read_and_write(tmp_path: Path) -> None:
    """Each formula by hand: 10 prompts x n=4, 50-token prompts, 100-token answers."""
    from steps.labelers.judging import PAIRWISE, RUBRIC

    vllm = {"engine": "vllm", "model": "org/judge-8B"}
    recipe = make_recipe(
        policy={"engine": "vllm", "model": "org/policy-8B"},
        sampling={"n": 4, "max_tokens": 300},
        labelers=[
            {"kind": "judge_pointwise", "name": "expected", "model": vllm},
            {"kind": "judge_pointwise", "name": "sampled", "model": vllm, "mode": "sampled", "n": 3},
            {"kind": "judge_pairwise", "model": vllm},
            {
                "kind": "density_ratio",
                "strong": {"model": vllm, "system_prompt": "x" * 40},
                "weak": {"model": vllm},
            },
        ],
        pairing={"judge": {"model": vllm}},
    )
    work = {w.role: w for w in rc.work_of(recipe, prompts=10, prompt_tokens=50, answer_tokens=100)}
    responses, exchange, quoted = 10 * 4, 50 + 100 + rc.CHAT_OVERHEAD, len(RUBRIC) / rc.CHARS_PER_TOKEN
    expected = work["judge_pointwise (expected)"]
    assert expected.decode == 0 and expected.prefill == pytest.approx(
        responses * (quoted + 2 * rc.MARKERS + exchange)
    )
    sampled = work["judge_pointwise (sampled)"]
    assert sampled.decode == responses * 3 * 256 and sampled.prefill == pytest.approx(3 * expected.prefill)
    pairwise_read = len(PAIRWISE) / rc.CHARS_PER_TOKEN + 3 * rc.MARKERS + 50 + 2 * 100 + rc.CHAT_OVERHEAD
    pairwise = work["judge_pairwise (pairwise)"]
    assert pairwise.prefill == pytest.approx(10 * 4 * 3 * pairwise_read)  # every ordered pair of 4 answers
    strong, weak = work["density_ratio (density_ratio), strong"], work["density_ratio (density_ratio), weak"]
    assert weak.prefill == responses * exchange and strong.prefill == responses * (
        exchange + 40 / rc.CHARS_PER_TOKEN
    )
    assert work["pairing.judge (both orders)"].prefill == pytest.approx(2 * 10 * pairwise_read)


def test_sizes_between_shapes_scale_the_nearest_rate(tmp_path: Path) -> None:
    recipe = make_recipe(policy={"engine": "vllm", "model": "org/Big-70B-Instruct"})
    _, (policy, *_) = rc.estimate(recipe, rates_file(tmp_path))
    assert policy.shape == "32b" and policy.scaled
    assert policy.decode_rate == pytest.approx(250.0 * 32 / 70)


def test_a_model_without_a_size_in_its_name_needs_one(tmp_path: Path) -> None:
    recipe = make_recipe(policy={"engine": "vllm", "model": "org/mystery"})
    with pytest.raises(rc.CostError, match="--size 'org/mystery=<billions>'"):
        rc.estimate(recipe, rates_file(tmp_path))
    _, (policy, *_) = rc.estimate(recipe, rates_file(tmp_path), sizes={"org/mystery": 8.0})
    assert policy.billions == 8.0


def test_names_give_their_size() -> None:
    assert rc.billions_of("meta-llama/Llama-3.1-8B-Instruct", {}) == 8.0
    assert rc.billions_of("Qwen/Qwen2.5-32B-Instruct", {}) == 32.0
    assert rc.billions_of("HuggingFaceTB/SmolLM2-1.7B-Instruct", {}) == 1.7


def test_a_smoke_run_is_not_a_measurement(tmp_path: Path) -> None:
    with pytest.raises(rc.CostError, match="no GPU measurement"):
        rc.load_rates(rates_file(tmp_path, smoke=True))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(rc.CostError, match="not a bench.gpu_rates result"):
        rc.load_rates(tmp_path / "bad.json")


MEASURED = sorted(rc.DEFAULT_RATES.parent.glob("gpu_rates_*.json"))


def test_both_target_cards_are_measured() -> None:
    cards = {rc.load_rates(path)[0] for path in MEASURED}
    assert any("H100" in c for c in cards) and any("H200" in c for c in cards), cards


@pytest.mark.parametrize("rates", MEASURED, ids=lambda p: p.stem)
@pytest.mark.parametrize("name", ["gpu-onpolicy", "ultrafeedback-like"])
def test_shipped_recipes_price_on_each_shipped_measurement(
    name: str, rates: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rc.main([name, "--rates", str(rates), "--usd-per-gpu-hour", "3"]) == 0
    out = capsys.readouterr().out
    card, _ = rc.load_rates(rates)
    assert "GPU-hours" in out and "per GPU-hour (your price)" in out and card in out
    _, priced = rc.estimate(load_recipe(name), rates)
    assert all(p.gpu_hours > 0 for p in priced)


@pytest.mark.parametrize("bad", ["org/model", "=7", "org/model=0", "org/model=-3", "org/model=x", "m=nan"])
def test_a_size_that_is_not_model_equals_positive_billions_is_refused(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        rc.main(["gpu-onpolicy", "--size", bad])
    assert exit_.value.code == 2 and "expected MODEL=BILLIONS" in capsys.readouterr().err
    assert rc._size("org/model=7.5") == ("org/model", 7.5)
