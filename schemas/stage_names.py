"""The stages of the data path, by the names the work location, ``stats.json``, the logs and the card use.

A stage's name is part of every shard key it makes (``steps.run.resume``), so it is spelled once,
here; ``tests/test_imports.py`` checks that no stage is named by a string literal elsewhere.
"""

PROMPTS = "prompts"
SAMPLING = "sampling"
LABELING = "labeling"
PAIRING = "pairing"
CONSISTENCY = "consistency"

ORDER = (PROMPTS, SAMPLING, LABELING, PAIRING, CONSISTENCY)
# The stages that read a model, and so can run on a model pool (flows.model_stage).
MODEL_BOUND = (SAMPLING, LABELING)
