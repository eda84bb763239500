"""Labelers: one score per response and signal, or None with a reason.

``base`` holds the loop every labeler shares (``Labeler``, ``Score``, ``PromptGroup``); one module per
kind (``bleu``, ``density_ratio``, ``follow_up``, ``judge_pointwise``, ``judge_pairwise``,
``reward_model``);
``registry`` maps a config's kind to its labeler; ``checks`` validates a recipe's labelers before any
model loads; ``settings`` is what the data card prints about each.
"""
