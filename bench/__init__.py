"""Benchmarks: our pipeline stages against the baseline a user would otherwise run, side by side.

The machines these run on are shared and noisy, so no number is compared with one taken
earlier: every benchmark runs its own baseline in the same process, interleaved with ours
(A B B A), and reports the ratio. Nothing here asserts anything about time; ``python -m
bench`` runs them all and prints one table, ``python -m bench.<name>`` runs one.
"""
