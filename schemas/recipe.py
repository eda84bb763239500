"""The typed recipe: everything a run depends on, validated before any model loads.

A recipe is YAML read with ``yaml.safe_load`` into these pydantic models. Unknown
keys, wrong types and values that cannot produce a preference dataset are
rejected with a message that names the key path, so a typo costs a second,
not a model load.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.records import LABELS, PROMPTS, RESPONSES

PIPELINES_DIR = Path(__file__).resolve().parent.parent / "pipelines"
EVAL_DIR = PIPELINES_DIR / "eval"


class RecipeError(ValueError):
    """The recipe cannot be used; the message names the offending key and what to do."""


class _Strict(BaseModel):
    # No NaN or ±inf anywhere: `temperature: .inf` would pass every bound (inf >= 0), reach the
    # engine and be written to the manifest as `Infinity`, which strict JSON readers reject.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# What a setting does, carried by the field itself (``json_schema_extra``) so that every list of
# "speed-only", "vllm-only" or "not on the card" settings is derived here, never kept by hand:
#   shapes_output=False  changes speed (or only the aggregation), never what a stage writes: a change
#                        must not invalidate finished shards, and the card does not list it;
#   engine="vllm"        does nothing unless the model runs on vLLM (rejected for other engines);
#   on_card=False        shapes nothing a dataset user needs to know (where or how safely it ran);
#   shapes_labels=False  a labeler setting the labels do not depend on (only the aggregate does).
SPEED_ONLY: dict[str, Any] = {"shapes_output": False}
AGGREGATE_ONLY: dict[str, Any] = {"shapes_labels": False}
VLLM: dict[str, Any] = {"engine": "vllm"}
OFF_CARD: dict[str, Any] = {"on_card": False}


def tagged(model: type[BaseModel], **tags: Any) -> frozenset[str]:
    """The fields of ``model`` whose metadata carries every one of ``tags``."""
    out = set()
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if all(extra.get(key) == value for key, value in tags.items()):
            out.add(name)
    return frozenset(out)


def _signed_weight(value: float) -> float:
    """A weight may be negative (an inverted signal is evidence too) or 0 (kept as a column, not counted).

    Weight 0 is what a fit gives a signal that scored none of its pairs: nothing says which way it
    points, so it stays out of the aggregate, ``agreement`` and ``min_agree``.
    """
    if not math.isfinite(value):
        raise ValueError(
            f"weight {value} must be a finite number (negative inverts the signal, 0 ignores it)"
        )
    return value


# A labeler's weight in the aggregate; the sign says which way the signal points (docs/design.md).
Weight = Annotated[float, AfterValidator(_signed_weight)]


EVAL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class EvalPromptSet(_Strict):
    """An evaluation set whose prompts must stay out of training: JSONL/Parquet via fsspec, or ``datasets``.

    ``columns: {prompt: <column>}`` names the column that holds the prompt (a string or a list
    of {role, content} messages; default ``prompt``).
    """

    name: str = Field(description="names the drop reason contaminated:<name>; letters, digits, _ . -")
    uri: str | None = Field(None, description="JSONL or Parquet, local path or fsspec URI")
    hf: str | None = Field(None, description="a datasets.load_dataset path (hub name or local directory)")
    config: str | None = None
    split: str = "test"
    format: Literal["jsonl", "parquet"] | None = Field(None, description="default: from the file suffix")
    columns: dict[Literal["prompt"], str] = {}

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # The name becomes part of a reason code, a stats key and a card cell: keep it plain.
        if not EVAL_SET_NAME.fullmatch(value):
            raise ValueError(
                f"name {value!r} must start with a letter or digit and use only letters, digits, _ . - "
                "(at most 64 characters); it becomes the drop reason contaminated:<name>"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EvalPromptSet:
        if (self.uri is None) == (self.hf is None):
            raise ValueError("give exactly one of uri (a JSONL/Parquet file) or hf (a datasets path)")
        return self

    @property
    def prompt_column(self) -> str:
        return self.columns.get("prompt", "prompt")


class DecontaminationConfig(_Strict):
    """Drop prompts that overlap evaluation sets by word n-grams (docs/design.md, Decontamination).

    A prompt is contaminated by an eval item when the item's words covered by n-grams that also
    occur in the prompt's user turns are at least ``threshold`` of the item's words, after the
    prompt-id normalisation (NFC, trimmed) plus lower-casing and splitting into words (punctuation
    dropped). The defaults are Tülu 3's (open-instruct's ``decontamination/``): 8-grams, and a
    match when at least half of the eval instance is covered by one training prompt. Eight words
    are long enough that a shared n-gram is rarely chance and short enough to catch a benchmark
    question pasted inside a longer prompt; measuring the share of the *eval item* (not of the
    prompt) is what catches that case. An eval item shorter than ``ngram`` words only matches a
    prompt with the same words.
    """

    sets: list[EvalPromptSet] = Field(min_length=1)
    ngram: int = Field(8, ge=1, le=64, description="words per n-gram (Tülu 3: 8)")
    threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="share of an eval item's words a prompt must cover (Tülu 3: 0.5)"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> DecontaminationConfig:
        names = [s.name for s in self.sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sets: names must be unique (each is a drop reason), repeated: {dupes}")
        return self


class NearDuplicatesConfig(_Strict):
    """Drop a prompt whose MinHash-estimated Jaccard similarity to an earlier kept one reaches ``threshold``.

    Shingles are character n-grams of the normalised text (lower-cased words joined by one space),
    which keeps short prompts comparable. 0.8 merges rewordings that keep most of the text (a
    word added, punctuation, a typo) and keeps apart prompts that differ in the word that matters
    in a short question ("the capital of France" vs "of Spain" is ~0.6). Templated prompts that
    differ in one slot of a long text can still reach it: raise the threshold for such pools.
    """

    threshold: float = Field(0.8, gt=0.0, le=1.0, description="estimated Jaccard similarity to drop at")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: a finer estimate)")
    shingle: int = Field(5, ge=1, le=32, description="characters per shingle")
    seed: int = Field(1, ge=0, description="MinHash permutation seed: a fixed seed gives the same drops")


class _PromptSource(_Strict):
    """What every prompt source shares: the filters applied after exact de-duplication."""

    decontaminate: DecontaminationConfig | None = Field(
        None, description="drop prompts that overlap evaluation sets (off: no sets to check)"
    )
    near_duplicates: NearDuplicatesConfig | None = Field(
        None, description="drop MinHash near-duplicates of earlier prompts (off unless given)"
    )


class BuiltinPrompts(_PromptSource):
    """Prompts shipped in ``pipelines/prompts/<name>.jsonl``."""

    source: Literal["builtin"] = "builtin"
    name: str = "default"


class FilePrompts(_PromptSource):
    """JSONL or Parquet read through fsspec (local path, ``memory://``, ``s3://`` …)."""

    source: Literal["file"]
    uri: str
    format: Literal["jsonl", "parquet"] | None = None
    prompt_column: str = "prompt"
    references_column: str | None = "references"


class HFPrompts(_PromptSource):
    """A dataset read with ``datasets.load_dataset`` (hub name or local path)."""

    source: Literal["hf"]
    path: str
    config: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    references_column: str | None = None


PromptsConfig = Annotated[BuiltinPrompts | FilePrompts | HFPrompts, Field(discriminator="source")]


# How llama.cpp decodes a prompt's n samples: together as sequences of one batch after one
# prefill (faster on CPU), or one create_completion after another (llama-cpp-python's own loop).
# The two give different texts for the same seeds, so the mode is part of the sampling key.
DecodeMode = Literal["batched", "single"]


class ModelConfig(_Strict):
    """A model and the engine that runs it (the policy, or a model a labeler reads)."""

    model: str = "smollm2-135m-instruct"
    engine: Literal["llama_cpp", "transformers", "vllm"] = "llama_cpp"
    n_ctx: int = Field(2048, ge=128)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=OFF_CARD)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="auto: vllm reads the checkpoint's dtype; transformers picks bf16 where this machine "
        "has bf16 kernels, else fp32 (steps/engines/dtypes.py); llama_cpp runs the GGUF as it is",
    )
    n_threads: int | None = Field(None, ge=1, json_schema_extra=SPEED_ONLY)
    decode: DecodeMode = Field(
        "batched",
        description="llama_cpp: decode a prompt's n samples together (batched) or one after another "
        "(single); the texts differ, so a change resamples. Other engines always batch",
    )
    trust_remote_code: bool = Field(False, json_schema_extra=OFF_CARD)
    batch_tokens: int = Field(
        4096, ge=64, description="token budget of one scoring batch", json_schema_extra=SPEED_ONLY
    )
    # vllm only (engine: vllm); one engine per process, see steps/engines/gpu_pool.py for several GPUs
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm: GPUs one model is split across", json_schema_extra=VLLM
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vllm: share of GPU memory", json_schema_extra=VLLM
    )
    max_model_len: int | None = Field(
        None, ge=128, description="vllm: context length (default: the model's)", json_schema_extra=VLLM
    )
    enforce_eager: bool = Field(
        False, description="vllm: no CUDA graphs (faster start, slower decoding)", json_schema_extra=VLLM
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vllm: KV cache size in GiB, instead of what gpu_memory_utilization leaves; on a CPU "
        "build of vLLM (where gpu_memory_utilization is a share of RAM) the way to size it",
        json_schema_extra=VLLM,
    )

    @model_validator(mode="before")
    @classmethod
    def _vllm_dtype_default(cls, data: Any) -> Any:
        """vLLM runs the checkpoint's own dtype unless told otherwise; float32 would halve its speed."""
        if isinstance(data, dict) and data.get("engine") == "vllm" and "dtype" not in data:
            return {**data, "dtype": "auto"}
        return data

    @model_validator(mode="after")
    def _engine_options_match(self) -> ModelConfig:
        if self.decode == "single" and self.engine != "llama_cpp":
            raise ValueError(f"decode: single is a llama_cpp option; engine {self.engine} always batches")
        if self.engine != "vllm":
            # Compared with the defaults, not model_fields_set: overrides revalidate a full dump.
            fields = type(self).model_fields
            given = [k for k in sorted(VLLM_ONLY) if getattr(self, k) != fields[k].default]
            if given:
                raise ValueError(f"{', '.join(given)}: vllm options, but engine is {self.engine}")
        return self


VLLM_ONLY = tagged(ModelConfig, **VLLM)

# The policy is the model whose on-policy samples become the responses.
PolicyConfig = ModelConfig


LABELER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_RESERVED_NAMES = frozenset(PROMPTS.names) | frozenset(RESPONSES.names) | frozenset(LABELS.names)


class ScorerModelConfig(ModelConfig):
    """A model a labeler reads: transformers unless the recipe says otherwise.

    On CPU transformers' prefill is 2-4x llama.cpp's (docs/design.md, Engines). A labeler
    given only part of a model (``model: {model: ...}``) keeps that default.
    """

    engine: Literal["llama_cpp", "transformers", "vllm"] = "transformers"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto",
        description="auto: bf16 where this machine has bf16 kernels, else fp32 (made concrete per run)",
    )


DEFAULT_CRITERIA = (
    "You are a careful, expert assistant. Answer the user's request directly and correctly, "
    "stay on topic, give concrete and accurate details, follow every instruction in the request, "
    "and keep the answer clear and well organised."
)


class Exemplar(_Strict):
    """One worked example shown before the real prompt (customised CDR)."""

    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)


class ContrastSide(_Strict):
    """One side of a density ratio: a model plus what it is told before the prompt."""

    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)
    system_prompt: str | None = None
    exemplar: Exemplar | None = None


class DensityRatioConfig(_Strict):
    """log p_strong(y|x) - log p_weak(y|x) over response tokens (CDR; docs/design.md, Density ratio)."""

    kind: Literal["density_ratio"]
    name: str = "density_ratio"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    strong: ContrastSide = ContrastSide(system_prompt=DEFAULT_CRITERIA)
    weak: ContrastSide = ContrastSide()
    reduce: Literal["sum", "mean"] = "sum"

    @model_validator(mode="after")
    def _sides_differ(self) -> DensityRatioConfig:
        if self.strong == self.weak:
            raise ValueError("strong and weak are identical, so every ratio would be 0")
        return self


class FollowUpConfig(_Strict):
    """Likelihood of positive minus negative follow-up user turns (docs/design.md, Follow-up likelihood)."""

    kind: Literal["follow_up"]
    name: str = "follow_up"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)
    followups: str = Field("default", description="a set in pipelines/followups/ or a YAML path")
    dimensions: list[str] | None = Field(None, description="only these dimensions (default: all)")
    per_dimension: int | None = Field(None, ge=1, description="first k positive and k negative per dimension")


class PointwiseJudgeConfig(_Strict):
    """An additive 0-5 rubric judged by a model (Self-Rewarding LMs)."""

    kind: Literal["judge_pointwise"]
    name: str = "judge"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)
    mode: Literal["expected", "sampled"] = "expected"
    n: int = Field(3, ge=1, description="judgements sampled per response (mode: sampled)")
    temperature: float = Field(0.7, gt=0.0)
    max_tokens: int = Field(256, ge=8)


class PairwiseJudgeConfig(_Strict):
    """Round-robin pairwise verdicts (both orders) fitted to per-response Bradley-Terry scores."""

    kind: Literal["judge_pairwise"]
    name: str = "pairwise"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)


class RewardModelConfig(_Strict):
    """A sequence-classification model's reward for (conversation, response) (docs/design.md, Reward model).

    There is no default model: no reward model ships with prefsmith, and a causal LM
    quietly standing in for one would score nothing meaningful.
    """

    kind: Literal["reward_model"]
    name: str = "reward"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)
    model: ScorerModelConfig = Field(
        description="a *ForSequenceClassification checkpoint: a Hugging Face directory or hub id"
    )
    head: int | None = Field(
        None, ge=0, description="which output of a multi-objective head (default: the model's only one)"
    )

    @model_validator(mode="before")
    @classmethod
    def _model_is_named(cls, data: Any) -> Any:
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(data, dict) and (model is None or (isinstance(model, dict) and "model" not in model)):
            raise ValueError(
                "model.model: name the reward model (a Hugging Face directory or hub id of a "
                "*ForSequenceClassification checkpoint); there is no default"
            )
        return data

    @model_validator(mode="after")
    def _engine_has_heads(self) -> RewardModelConfig:
        if self.model.engine == "llama_cpp":
            raise ValueError(
                "model.engine: llama_cpp has no classifier heads; "
                "use engine: transformers (CPU or CUDA) or vllm"
            )
        return self


class SamplingConfig(_Strict):
    n: int = Field(4, ge=2, description="responses per prompt; a pair needs two")
    temperature: float | list[float] = Field(
        0.8,
        description="one temperature, or several (UltraFeedback-style diversity from one policy): "
        "n is split evenly over them, each with its own seeds; every response records its temperature",
    )
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    seed: int = Field(0, ge=0)
    too_long: Literal["drop", "truncate_left"] = Field(
        "drop",
        description="a prompt longer than the policy's context: drop it (reason prompt_too_long), or leave "
        "out its oldest turns until the last user turn and max_tokens fit (counted, and marked per row)",
    )

    @field_validator("n", mode="before")
    @classmethod
    def _two_or_more(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            raise ValueError(f"{value} response(s) per prompt cannot make a pair; use n >= 2 (default 4)")
        return value

    @field_validator("temperature")
    @classmethod
    def _not_greedy(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("an empty list samples nothing; give one temperature or several")
        for t in values:
            if t < 0.0:  # inf and NaN never get here: the models refuse them (allow_inf_nan=False)
                raise ValueError(f"temperature {t} is not a sampling temperature; use a value > 0")
            if t == 0.0:
                raise ValueError("temperature 0 makes every sample identical, so no pair can form; use > 0")
        if len(set(values)) != len(values):
            raise ValueError(f"temperatures {values} repeat a value; list each once")
        return value

    @model_validator(mode="after")
    def _n_splits_over_temperatures(self) -> SamplingConfig:
        if isinstance(self.temperature, list) and self.n % len(self.temperature):
            raise ValueError(
                f"n={self.n} does not split evenly over {len(self.temperature)} temperatures "
                f"{self.temperature}; use a multiple of {len(self.temperature)}"
            )
        return self

    @property
    def temperatures(self) -> list[float]:
        return self.temperature if isinstance(self.temperature, list) else [self.temperature]


class BleuConfig(_Strict):
    """Smoothed sentence BLEU-4 against the prompt's references (docs/design.md, BLEU against references)."""

    kind: Literal["bleu"] = "bleu"
    name: str = "bleu"
    variant: Literal["bleuberi", "sacrebleu"] = "bleuberi"
    weight: Weight = Field(1.0, json_schema_extra=AGGREGATE_ONLY)


LabelerConfig = Annotated[
    BleuConfig
    | DensityRatioConfig
    | FollowUpConfig
    | PointwiseJudgeConfig
    | PairwiseJudgeConfig
    | RewardModelConfig,
    Field(discriminator="kind"),
]


_LABELER_CONFIGS = (
    BleuConfig,
    DensityRatioConfig,
    FollowUpConfig,
    PointwiseJudgeConfig,
    PairwiseJudgeConfig,
    RewardModelConfig,
)
# Left out of the resume keys of every stage: changing them must not invalidate finished shards.
NOT_SHAPING = tagged(ModelConfig, **SPEED_ONLY).union(
    *(tagged(config, **AGGREGATE_ONLY) for config in _LABELER_CONFIGS)
)
# Left out of what the card says about a model.
OFF_CARD_SETTINGS = tagged(ModelConfig, **SPEED_ONLY) | tagged(ModelConfig, **OFF_CARD)


class PairJudgeConfig(_Strict):
    """Judge the chosen/rejected candidate pair in both orders after pairing."""

    model: ScorerModelConfig = Field(default_factory=ScorerModelConfig)


class LengthControl(_Strict):
    """Length is the best-known confounder of preference labels (docs/design.md, Length control)."""

    residual: bool = Field(
        False,
        description="take out of each signal's score what response length predicts (a slope per signal "
        "on log characters, fitted within prompts over the whole run) before aggregating",
    )
    max_ratio: float | None = Field(
        None,
        gt=1.0,
        description="never pair responses whose lengths (characters) differ by more than this ratio; "
        "the next-best candidate is tried instead",
    )


class WeightsFit(_Strict):
    """Where fitted weights came from (``eval_labelers --fit --write-recipe``); the card shows it.

    Fitted weights belong to the domain of the pairs they were fitted on: a signal that
    agrees with people on harmlessness can be inverted on helpfulness.
    """

    pairs: str = Field(description="the human-labelled pairs file the weights were fitted on")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    domain: str = Field(min_length=1, description="what kind of preference those pairs express")
    n: int = Field(ge=1)
    folds: int = Field(ge=2)
    cv_accuracy: float = Field(ge=0.0, le=1.0, description="cross-validated accuracy, never in-sample")
    ci_low: float = Field(ge=0.0, le=1.0)
    ci_high: float = Field(ge=0.0, le=1.0)
    best_single: str = Field(description="the best single signal on those pairs, for comparison")
    best_single_accuracy: float = Field(ge=0.0, le=1.0)
    equal_weights_accuracy: float = Field(ge=0.0, le=1.0)


class PairingConfig(_Strict):
    rule: Literal["best_vs_worst", "best_vs_random"] = "best_vs_worst"
    scale: Literal["zscore", "spread"] = Field(
        "zscore",
        description="each signal's within-prompt difference over its within-prompt spread (zscore: a vote "
        "when a prompt has two responses) or over its spread across the whole run (spread: keeps magnitude)",
    )
    length_control: LengthControl | None = None
    weights_fit: WeightsFit | None = Field(None, description="provenance of fitted labeler weights")
    min_margin: float = Field(0.0, ge=0.0, description="chosen must beat rejected by more than this")
    judge: PairJudgeConfig | None = Field(None, description="pairwise verdict on each candidate pair")
    finished_only: bool = Field(
        False,
        description="answers cut at max_tokens are never chosen or rejected (judges would compare "
        "unfinished texts, and DPO would teach the model to stop mid-sentence)",
    )


class LengthGuard(_Strict):
    max_ratio: float = Field(gt=1.0, description="drop pairs whose chosen is this many times longer")
    unless_agreement: float = Field(
        1.0, ge=0.0, le=1.0, description="...unless at least this share of signals prefer chosen"
    )


class ConsistencyConfig(_Strict):
    """Which pairs deserve to be kept (docs/design.md, Aggregation and consistency). Each rule is optional."""

    min_agree: int | None = Field(None, ge=1, description="at least k signals prefer chosen")
    require_swap_agreement: bool = False
    drop_mislabeled: bool = Field(True, description="drop pairs whose mean z-scored difference is <= 0")
    ambiguous_below: float | None = Field(None, ge=0.0, description="drop strength_mean below this")
    ambiguous_quantile: float | None = Field(None, gt=0.0, lt=1.0, description="drop the lowest share")
    rank_signals: tuple[str, str] | None = Field(None, description="two signals for rank consistency C")
    min_rank_consistency: float | None = Field(None, ge=0.0, le=1.0)
    length_guard: LengthGuard | None = None

    @model_validator(mode="after")
    def _rank_rule_has_signals(self) -> ConsistencyConfig:
        if self.min_rank_consistency is not None and self.rank_signals is None:
            raise ValueError("min_rank_consistency needs rank_signals: [signal_a, signal_b]")
        return self


class OutputConfig(_Strict):
    uri: str | None = Field(None, description="default: ./outputs/<recipe name>")
    format: Literal["parquet", "arrow"] = "parquet"
    rows_per_shard: int = Field(10_000, ge=1)
    prompts_per_shard: int = Field(16, ge=1, description="work unit of every stage")


class CardConfig(_Strict):
    license: str = "apache-2.0"
    pretty_name: str | None = None
    language: list[str] = ["en"]
    tags: list[str] = []


class EvalPairs(_Strict):
    """One set of human-labelled pairs: a JSONL/Parquet file (any fsspec URI) or a ``datasets`` dataset.

    Rows need a prompt (a string or a list of messages), ``chosen`` and ``rejected`` (the human
    preferred chosen); ``columns`` maps these names (and optional ``reference``, ``id``) to the
    file's own column names.
    """

    builtin: str | None = Field(None, description="a set shipped in pipelines/eval/ (e.g. hh_harmless_32)")
    uri: str | None = Field(None, description="JSONL or Parquet, local path or fsspec URI")
    hf: str | None = Field(None, description="a datasets.load_dataset path (hub name or local directory)")
    config: str | None = None
    split: str = "train"
    format: Literal["jsonl", "parquet"] | None = Field(None, description="default: from the file suffix")
    columns: dict[Literal["prompt", "chosen", "rejected", "reference", "id"], str] = {}
    name: str | None = Field(None, description="shown on the card (default: the file or dataset name)")
    domain: str = Field("domain not stated", description="what kind of preference the pairs express")
    limit: int | None = Field(None, ge=1, description="only the first N usable pairs")

    @model_validator(mode="after")
    def _one_source(self) -> EvalPairs:
        if sum(x is not None for x in (self.builtin, self.uri, self.hf)) != 1:
            raise ValueError(
                "give exactly one of builtin, uri (a JSONL/Parquet file) or hf (a datasets path)"
            )
        if self.builtin is not None and not (EVAL_DIR / f"{self.builtin}.jsonl").is_file():
            shipped = sorted(p.stem for p in EVAL_DIR.glob("*.jsonl"))
            raise ValueError(f"no built-in eval set {self.builtin!r}; shipped: {shipped}")
        return self

    @property
    def location(self) -> str:
        """Where the pairs are read from: a path or URI, or a datasets path."""
        if self.builtin is not None:
            return str(EVAL_DIR / f"{self.builtin}.jsonl")
        return str(self.uri or self.hf)

    @property
    def label(self) -> str:
        return self.name or self.builtin or Path(self.location).name


class EvalConfig(_Strict):
    """Measure the labels against human pairs in every run; the card and ``stats.json`` carry the table."""

    pairs: list[EvalPairs] = Field(min_length=1)
    min_accuracy: float | None = Field(
        None, gt=0.0, le=1.0, description="publish nothing unless the aggregate reaches this on every set"
    )

    @field_validator("pairs", mode="before")
    @classmethod
    def _uris(cls, value: Any) -> Any:
        """``pairs: FILE`` and ``pairs: [FILE, {uri: ..., domain: ...}]`` both read naturally in YAML."""
        items = value if isinstance(value, list) else [value]
        return [{"uri": item} if isinstance(item, str) else item for item in items]


class LockSettings(_Strict):
    """How a run shares its output and work location with other runs (``steps.lease``).

    Not part of the recipe: it says how runs coexist, not what they make, so it comes from the CLI
    or the flow's ``lock`` parameter and never changes a dataset's fingerprint.
    """

    on_busy: Literal["wait", "fail"] = Field(
        "wait", description="when another live run holds the lease: wait for it, or stop at once"
    )
    expiry_s: float = Field(
        60.0, ge=1.0, description="a lease not renewed for this long is stale and may be taken over"
    )
    renew_s: float = Field(10.0, gt=0.0, description="how often the holder renews its lease")
    max_wait_s: float | None = Field(None, gt=0.0, description="give up waiting after this (default: never)")

    @model_validator(mode="after")
    def _renew_well_within_expiry(self) -> LockSettings:
        if self.renew_s * 3 > self.expiry_s:
            raise ValueError(
                f"renew_s ({self.renew_s:g}) must be at most a third of expiry_s ({self.expiry_s:g}), "
                "so that two late renewals do not cost a live run its lease"
            )
        return self


def lock_settings(**values: Any) -> LockSettings:
    """CLI or flow lock options, validated with the recipe's error format; ``None`` means the default."""
    try:
        return LockSettings.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise RecipeError(f"lock options are invalid:\n{_format_errors(exc)}") from None


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    prompts: PromptsConfig = BuiltinPrompts()
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    policy: PolicyConfig = PolicyConfig()
    sampling: SamplingConfig = SamplingConfig()
    labelers: list[LabelerConfig] = Field(default_factory=lambda: [BleuConfig()], min_length=1)
    pairing: PairingConfig = PairingConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    output: OutputConfig = OutputConfig()
    card: CardConfig = CardConfig()
    eval: EvalConfig | None = Field(None, description="human-labelled pairs every run is measured on")

    @model_validator(mode="after")
    def _unique_labeler_names(self) -> Recipe:
        names = [labeler.name for labeler in self.labelers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"labelers: names must be unique, repeated: {dupes}")
        for name in names:
            # A name becomes columns (score_<name>_chosen) and sits beside the response
            # columns while pairing, so it must be a plain identifier that no column uses.
            if not LABELER_NAME.fullmatch(name):
                raise ValueError(
                    f"labelers: name {name!r} must start with a letter and use only letters, "
                    "digits and _ (at most 48 characters); it becomes a column name"
                )
            if name in _RESERVED_NAMES:
                raise ValueError(f"labelers: name {name!r} is already a column of responses; pick another")
        if not self.voting_signals:
            raise ValueError("labelers: every weight is 0, so nothing would choose between responses")
        rules = self.consistency
        voting = len(self.voting_signals)
        if rules.min_agree is not None and rules.min_agree > voting:
            raise ValueError(
                f"consistency.min_agree: {rules.min_agree} > the {voting} signal(s) with a non-zero weight"
            )
        if rules.require_swap_agreement and self.pairing.judge is None:
            raise ValueError("consistency.require_swap_agreement needs pairing.judge (the verdict per pair)")
        unknown = [s for s in (rules.rank_signals or ()) if s not in names]
        if unknown:
            raise ValueError(f"consistency.rank_signals: unknown signal(s) {unknown}; labelers are {names}")
        return self

    @property
    def signals(self) -> list[str]:
        return [labeler.name for labeler in self.labelers]

    @property
    def voting_signals(self) -> list[str]:
        """The signals that count in the aggregate and in ``agreement`` (weight not 0)."""
        return [labeler.name for labeler in self.labelers if labeler.weight != 0]

    def output_uri(self) -> str:
        return self.output.uri or str(Path("outputs") / self.name)

    def fingerprint(self) -> str:
        """Hash of everything that shapes the data (not where it is written)."""
        data = self.model_dump(mode="json")
        data["output"].pop("uri", None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def with_overrides(self, **updates: Any) -> Recipe:
        """Apply CLI overrides (dotted keys like ``sampling.seed``) and revalidate."""
        data = self.model_dump(mode="python")
        for dotted, value in updates.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return _validate(data, where=f"recipe {self.name!r} with overrides")


def _key(part: str | int) -> str:
    """A key as the message shows it: quoted when it is empty, padded or holds invisible characters
    (a key holding a newline, printed plain, would break the message's one-line-per-key layout)."""
    text = str(part)
    return text if text and text.isprintable() and text == text.strip() else repr(text)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(_key(part) for part in err["loc"]) or "<root>"
        # pydantic quotes the offending value raw: a newline or U+2028 in it would split the line.
        msg = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see pipelines/default.yaml for valid keys)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _validate(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{where} is invalid:\n{_format_errors(exc)}") from None


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe is a YAML path or the name of one shipped in ``pipelines/``."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path!r} does not exist")
        return path
    shipped = PIPELINES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))
    raise RecipeError(f"no recipe named {name_or_path!r}; shipped recipes: {known}, or pass a path")


def load_recipe(name_or_path: str = "default") -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: nested too deeply to read") from None
    except ValueError as exc:  # a value YAML parses but Python refuses: 2024-02-30, a 5,000-digit integer
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: a value cannot be read ({exc})") from None
    return _validate(data, where=f"recipe {str(path)!r}")
