"""Near-duplicate prompts (``prompts.near_duplicates``): MinHash signatures and an LSH index (datasketch).

datasketch is the maintained MinHash/LSH library (the one distilabel's MinHash dedup uses); it
needs only numpy and scipy, which we already depend on. It is imported only when the filter is
on: scipy's import alone costs about half a second.

Prompts are checked in source order against the prompts kept so far: a prompt whose estimated
Jaccard similarity to a kept one reaches the threshold is dropped, so the first of each cluster
is kept, and every dropped prompt has a kept prompt close to it (candidates come from LSH bands,
then each is confirmed on the full signatures, which keeps LSH's false positives out). Kept
prompts are the only ones indexed: a chain A~B~C where A and C differ keeps C. The permutations
come from ``seed``, so a fixed seed and source order give the same drops every run.
"""

from __future__ import annotations

import re
import time
import zlib
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import columns, reasons
from schemas.recipe import NearDuplicatesConfig
from steps.base import StageStats
from steps.prompts.decontaminate import clip, match_text

TIMING = "near_duplicates"  # the prompt stage's timings key: seconds this filter added
# LSH only proposes candidates (each is confirmed on the full signature): above this it would need a
# single band, which datasketch refuses, so a threshold of 1.0 bands at this and confirms at 1.0.
LSH_CEILING = 0.95
_WORD = re.compile(r"\w+")


def normalised(text: str) -> str:
    """Lower-cased words joined by one space: case, punctuation and spacing do not make prompts differ."""
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str, size: int) -> list[bytes]:
    """The character n-grams of a normalised text (the whole text when it is shorter), UTF-8 encoded.

    Cut on characters, not bytes: a byte n-gram covers under two characters of Chinese text, which
    made unrelated questions in such scripts look alike and the threshold mean less there.
    """
    if len(text) <= size:
        return [text.encode("utf-8")]
    return [text[i : i + size].encode("utf-8") for i in range(len(text) - size + 1)]


def _crc32(value: bytes) -> int:
    # A C-speed, process-independent 32-bit hash: datasketch's default SHA-1 costs ~5x more per shingle.
    return zlib.crc32(value)


class NearDuplicates:
    """Streaming near-duplicate filter: state (the LSH index of kept prompts) lives for one run."""

    def __init__(self, config: NearDuplicatesConfig) -> None:
        from datasketch import MinHash, MinHashLSH

        self.config = config
        self._minhash = MinHash
        self._template = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=_crc32)
        self.lsh = MinHashLSH(threshold=min(config.threshold, LSH_CEILING), num_perm=config.num_perm)
        self.signatures: list[np.ndarray] = []  # hash values of the kept prompts, by kept ordinal
        self.kept_rows: list[int] = []  # their source rows, for the example
        # Kept prompts' texts, only until the first drop has its example (then never needed again).
        self.kept_texts: list[str] | None = []
        self.checked = 0

    def signature(self, text: str) -> Any:
        m = self._minhash(
            num_perm=self.config.num_perm,
            hashfunc=_crc32,
            permutations=self._template.permutations,
            scheme=self._template.scheme,
        )
        m.update_batch(shingles(text, self.config.shingle))
        return m

    def _closest(self, m: Any) -> tuple[int, float] | None:
        """The most similar kept prompt at or above the threshold (the earliest on a tie), or None."""
        best: tuple[int, float] | None = None
        for ordinal in sorted(self.lsh.query(m)):
            similarity = float(np.count_nonzero(self.signatures[ordinal] == m.hashvalues)) / len(m.hashvalues)
            if similarity >= self.config.threshold and (best is None or similarity > best[1]):
                best = (ordinal, similarity)
        return best

    def apply(self, shard: pa.Table, stats: StageStats) -> pa.Table:
        """The shard without prompts that nearly duplicate an earlier kept one (reason ``near_duplicate``)."""
        start = time.perf_counter()
        texts = [match_text(m) for m in shard.column(columns.MESSAGES).to_pylist()]
        rows = shard.column(columns.SOURCE_ROW).to_pylist()
        keep = np.ones(shard.num_rows, dtype=bool)
        for i, (text, row) in enumerate(zip(texts, rows, strict=True)):
            self.checked += 1
            words = normalised(text)
            if not words:  # nothing to compare (no word characters): never a near-duplicate
                continue
            m = self.signature(words)
            closest = self._closest(m)
            if closest is None:
                ordinal = len(self.signatures)
                self.lsh.insert(ordinal, m, check_duplication=False)
                self.signatures.append(m.hashvalues.copy())
                self.kept_rows.append(row)
                if self.kept_texts is not None:  # clipped: an example needs no more, and pools can be long
                    self.kept_texts.append(clip(text))
                continue
            ordinal, similarity = closest
            keep[i] = False
            example = None
            if self.kept_texts is not None:
                example = (
                    f"row {row}: {clip(text)!r} is a near-duplicate (estimated Jaccard {similarity:.2f}) "
                    f"of row {self.kept_rows[ordinal]}: {self.kept_texts[ordinal]!r}"
                )
            stats.drop(reasons.NEAR_DUPLICATE, example=example)
            self.kept_texts = None  # the first drop has its example: later ones keep theirs as counts
            stats.rows_out -= 1
        stats.timings[TIMING] = stats.timings.get(TIMING, 0.0) + time.perf_counter() - start
        return shard.filter(pa.array(keep))

    def report(self) -> dict[str, Any]:
        return {
            "threshold": self.config.threshold,
            "num_perm": self.config.num_perm,
            "shingle": self.config.shingle,
            "seed": self.config.seed,
            "library": "datasketch",
            "checked": self.checked,
            "kept": len(self.signatures),
        }
