"""``vllm.PoolingParams`` with the one field prefsmith sets, its real default and meaning.

``use_activation=None`` lets the pooler apply its default activation (for a classifier: a sigmoid
over one output, a softmax over several); ``False`` returns the head's raw outputs. The real class
is a msgspec Struct with more fields (and, before vLLM 0.11.1, no ``use_activation``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    use_activation: bool | None = None
