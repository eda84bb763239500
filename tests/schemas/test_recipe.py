"""Recipe contract: everything wrong is rejected up front, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schemas.recipe import Recipe, RecipeError, load_recipe, resolve_recipe_path
from tests.conftest import ROOT


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_default_recipe_loads_and_matches_design() -> None:
    recipe = load_recipe("default")
    assert recipe.policy.model == "smollm2-135m-instruct"
    assert recipe.policy.engine == "llama_cpp"
    assert recipe.sampling.n == 4
    assert recipe.signals == ["bleu", "density_ratio", "follow_up", "judge"]
    assert recipe.pairing.judge is not None
    assert recipe.pairing.rule == "best_vs_worst"
    assert recipe.output_uri() == str(Path("outputs") / "default")


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"sampling": {"n": 1}}, "sampling.n"),
        ({"sampling": {"temperature": -0.1}}, "sampling.temperature"),
        ({"sampling": {"temperature": 0}}, "sampling.temperature"),
        ({"sampling": {"temperature": [0.7, 0.7]}}, "repeat a value"),
        ({"sampling": {"temperature": [0.7, 0.0]}}, "temperature 0"),
        ({"sampling": {"temperature": []}}, "sampling.temperature"),
        ({"sampling": {"n": 4, "temperature": [0.6, 0.8, 1.0]}}, "does not split evenly"),
        ({"sampling": {"top_p": 1.5}}, "sampling.top_p"),
        ({"sampling": {"max_tokens": 0}}, "sampling.max_tokens"),
        ({"sampling": {"n": "four"}}, "sampling.n"),
        ({"sampling": {"tempreature": 0.7}}, "sampling.tempreature"),
        ({"pairing": {"rule": "best_vs_best"}}, "pairing.rule"),
        ({"pairing": {"min_margin": -1}}, "pairing.min_margin"),
        ({"labelers": []}, "labelers"),
        ({"labelers": [{"kind": "bleu", "variant": "chrf"}]}, "labelers.0.bleu.variant"),
        ({"labelers": [{"kind": "bleu"}, {"kind": "bleu"}]}, "labelers: names must be unique"),
        ({"labelers": [{"kind": "magic"}]}, "labelers.0"),
        ({"policy": {"engine": "vllm2"}}, "policy.engine"),
        ({"policy": {"decode": "parallel"}}, "policy.decode"),
        ({"policy": {"engine": "transformers", "decode": "single"}}, "decode: single is a llama_cpp option"),
        ({"output": {"rows_per_shard": 0}}, "output.rows_per_shard"),
        ({"unknown_top": 1}, "unknown_top"),
        ({"limit": 0}, "limit"),
        ({"consistency": {"min_agree": 2}}, "consistency.min_agree"),
        ({"consistency": {"require_swap_agreement": True}}, "needs pairing.judge"),
        ({"consistency": {"rank_signals": ["bleu", "nope"]}}, "consistency.rank_signals"),
        ({"consistency": {"min_rank_consistency": 0.5}}, "needs rank_signals"),
        ({"consistency": {"ambiguous_quantile": 1.5}}, "consistency.ambiguous_quantile"),
        ({"consistency": {"length_guard": {"max_ratio": 0.5}}}, "consistency.length_guard.max_ratio"),
        ({"labelers": [{"kind": "density_ratio", "strong": {}, "weak": {}}]}, "identical"),
        ({"labelers": [{"kind": "follow_up", "per_dimension": 0}]}, "per_dimension"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(tmp_path: Path, patch: dict, key: str) -> None:
    data = {"name": "t", **patch}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, data))
    assert key in str(info.value)


def test_unknown_key_message_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(write(tmp_path, {"name": "t", "sampling": {"seeed": 1}}))


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))


def test_non_mapping_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, [1, 2]))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match="shipped recipes"):
        resolve_recipe_path("no-such-recipe")


def test_overrides_revalidate_and_fingerprint_tracks_data_not_location() -> None:
    recipe = load_recipe("default")
    seeded = recipe.with_overrides(**{"sampling.seed": 7, "output.uri": "/tmp/elsewhere"})
    assert seeded.sampling.seed == 7
    assert seeded.output_uri() == "/tmp/elsewhere"
    assert seeded.fingerprint() != recipe.fingerprint()
    assert recipe.with_overrides(**{"output.uri": "/x"}).fingerprint() == recipe.fingerprint()
    with pytest.raises(RecipeError, match="sampling.seed"):
        recipe.with_overrides(**{"sampling.seed": -1})


def test_recipe_is_immutable() -> None:
    recipe = Recipe(name="x")
    with pytest.raises(Exception, match="frozen"):
        recipe.limit = 3  # type: ignore[misc]


@pytest.mark.integration
def test_cli_rejects_bad_config_before_prefect_or_model(tmp_path: Path) -> None:
    """A wrong model path fails before Prefect starts, a model loads or the output is touched."""
    path = write(tmp_path, {"name": "t", "policy": {"model": str(tmp_path / "missing.gguf")}})
    proc = subprocess.run(
        [sys.executable, "-m", "flows.build_prefs", "--recipe", path, "--output", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "missing.gguf" in proc.stderr and "does not exist" in proc.stderr
    assert "temporary server" not in proc.stdout + proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_cli_rejects_typo_in_recipe(tmp_path: Path) -> None:
    path = write(tmp_path, {"name": "t", "sampling": {"nn": 4}})
    proc = subprocess.run(
        [sys.executable, "-m", "flows.build_prefs", "--recipe", path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "sampling.nn: unknown key" in proc.stderr


def test_decode_mode_defaults_to_batched_and_is_in_the_sampling_key() -> None:
    """The two modes give different texts for the same seeds, so finished samples of one never stand in."""
    from steps.run.stages import sampling_settings

    batched = Recipe(name="t")
    single = Recipe(name="t", policy={"decode": "single"})
    assert batched.policy.decode == "batched"
    assert load_recipe("default").policy.decode == "batched"
    assert sampling_settings(batched)["policy"]["decode"] == "batched"
    assert sampling_settings(batched) != sampling_settings(single)
    assert sampling_settings(batched) == sampling_settings(Recipe(name="t", policy={"n_threads": 1}))


def test_setting_lists_come_from_the_settings_metadata() -> None:
    """Resume keys, the card and the vLLM check read one source: each field's own tags."""
    from schemas.recipe import NOT_SHAPING, OFF_CARD_SETTINGS, VLLM_ONLY, ModelConfig

    assert {"n_threads", "batch_tokens", "weight"} == NOT_SHAPING
    assert {"n_threads", "batch_tokens", "trust_remote_code", "device"} == OFF_CARD_SETTINGS
    assert {
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_model_len",
        "enforce_eager",
        "kv_cache_gib",
    } == VLLM_ONLY
    assert set(ModelConfig.model_fields) > VLLM_ONLY
    for option, value in [("tensor_parallel_size", 2), ("enforce_eager", True)]:
        with pytest.raises(ValueError, match=f"{option}: vllm options, but engine is transformers"):
            ModelConfig(engine="transformers", **{option: value})


@pytest.mark.parametrize("name", ["gpu-onpolicy", "ultrafeedback-like"])
def test_gpu_recipes_validate_and_split_the_gpus(name: str) -> None:
    """The shipped cluster recipes: valid, vLLM throughout, and their labelers' shares fit one GPU."""
    from steps.labelers.checks import check_gpu_shares, recipe_models

    recipe = load_recipe(name)
    models = [model for _, model in recipe_models(recipe)]
    assert all(model.engine == "vllm" for model in models)
    check_gpu_shares(recipe)
    from flows.placement import gpu_work_in_flow

    assert gpu_work_in_flow(recipe) == []  # all their GPU work runs on the pool
    labeling = {m.model_dump_json(): m for k, m in recipe_models(recipe) if k != "policy.model"}
    assert 0.8 <= sum(m.gpu_memory_utilization for m in labeling.values()) <= 1.0
    assert len({m.tensor_parallel_size for m in labeling.values()}) == 1  # a group's GPUs load alike
    assert 8 % max(m.tensor_parallel_size for m in models) == 0  # groups tile an 8-GPU node


def test_ultrafeedback_like_samples_at_several_temperatures() -> None:
    recipe = load_recipe("ultrafeedback-like")
    assert len(recipe.sampling.temperatures) == 3 and recipe.sampling.n % 3 == 0


def test_labelers_claiming_more_than_a_gpu_fail_before_loading(tmp_path: Path) -> None:
    from steps.labelers.checks import check_gpu_shares

    vllm = {"engine": "vllm", "gpu_memory_utilization": 0.6}
    data = {
        "name": "t",
        "policy": {"engine": "vllm", "model": "org/policy-8B"},
        "labelers": [
            {"kind": "reward_model", "model": {"model": "org/rm-8B", **vllm}},
            {"kind": "judge_pointwise", "model": {"model": "org/judge-32B", **vllm}},
            # the same settings as the judge's load once: not counted twice
            {"kind": "judge_pointwise", "name": "judge2", "model": {"model": "org/judge-32B", **vllm}},
        ],
    }
    with pytest.raises(RecipeError, match=r"claim 1\.20 of each GPU.*labelers\.0\.model\.model"):
        check_gpu_shares(load_recipe(write(tmp_path, data)))
    data["labelers"] = data["labelers"][1:]
    check_gpu_shares(load_recipe(write(tmp_path, data)))


@pytest.mark.parametrize("name", ["gpu-onpolicy", "ultrafeedback-like"])
def test_a_gpu_recipe_without_a_model_pool_stops_because_the_policy_stays_loaded(name: str) -> None:
    """In one process, sampling's engine is still cached when labeling loads: 0.9 + the labelers' 0.9."""
    from flows.placement import Placement, check_placement

    recipe = load_recipe(name)
    with pytest.raises(RecipeError, match=r"policy\.model: 0\.9.*--model-deployment"):
        check_placement(Placement(None, 8), "/tmp/work", recipe=recipe)


def test_a_policy_whose_engine_a_labeler_shares_counts_once_in_one_process(tmp_path: Path) -> None:
    from steps.labelers.checks import check_gpu_shares

    policy = {"engine": "vllm", "model": "org/policy-8B", "gpu_memory_utilization": 0.6}
    data = {
        "name": "t",
        "policy": policy,
        "labelers": [{"kind": "judge_pointwise", "model": policy}],  # the policy judges itself: one load
    }
    check_gpu_shares(load_recipe(write(tmp_path, data)), policy_resident=True)
    data["labelers"] = [{"kind": "judge_pointwise", "model": {**policy, "model": "org/judge-8B"}}]
    check_gpu_shares(load_recipe(write(tmp_path, data)))  # on a pool, sampling's process is gone
    with pytest.raises(
        RecipeError, match=r"claim 1\.20 .*policy\.model: 0\.6, labelers\.0\.model\.model \(judge\): 0\.6"
    ):
        check_gpu_shares(load_recipe(write(tmp_path, data)), policy_resident=True)


def test_a_reward_model_and_a_judge_of_one_checkpoint_are_two_loads(tmp_path: Path) -> None:
    """Equal settings, but a classifier and a causal LM: two models in memory, two shares."""
    from steps.labelers.checks import check_gpu_shares

    model = {"engine": "vllm", "model": "org/both-8B", "gpu_memory_utilization": 0.6}
    data = {
        "name": "t",
        "policy": {"engine": "vllm", "model": "org/policy-8B"},
        "labelers": [
            {"kind": "reward_model", "model": model},
            {"kind": "judge_pointwise", "model": model},
        ],
    }
    with pytest.raises(RecipeError, match=r"claim 1\.20 of each GPU"):
        check_gpu_shares(load_recipe(write(tmp_path, data)))
    data["labelers"] = [{"kind": "judge_pointwise", "model": model}, {"kind": "follow_up", "model": model}]
    check_gpu_shares(load_recipe(write(tmp_path, data)))  # two readers of one causal LM: one load
