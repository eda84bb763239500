"""A CPU stand-in for the parts of vLLM that prefsmith uses, backed by a real transformers model.

vLLM needs a GPU and cannot be installed here, so contract tests put
``tests/fakes`` first on ``sys.path`` and import this package as ``vllm``.
Module paths, names, parameters and defaults mirror vLLM 0.33 and are checked
against ``tests/fakes/vllm_api.json`` (read from the released wheels); the
numbers come from a real causal LM (or, on the pooling runner, a real sequence
classifier), so scores can be compared with the transformers engine and a wrong
token boundary shows up as a wrong number.
"""

from vllm.entrypoints.llm import LLM
from vllm.inputs import TokensPrompt
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import SamplingParams

__version__ = "0.33.0"  # the release whose API this fake mirrors

__all__ = [
    "LLM",
    "CompletionOutput",
    "Logprob",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
    "TokensPrompt",
]
