"""The prompts stage: read a source, normalise each row, drop what must not be sampled.

``sources`` yields raw rows (built-in set, JSONL/Parquet, a Hub split); ``normalise`` turns them
into the prompts table with stable ids; ``decontaminate`` and ``near_duplicates`` are the
prompt filters, each a keep-or-drop-with-a-reason rule.
"""
