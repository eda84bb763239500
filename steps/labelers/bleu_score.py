"""Sentence-level BLEU against a prompt's references, in the two flavours the pipeline needs.

``bleuberi`` is the reward used by BLEUBERI (Chang et al., 2025): the TensorFlow NMT
``compute_bleu`` with ``smooth=True``, fed mteval-v13a tokens, as Hugging Face ``evaluate``
computes it. ``sacrebleu`` reproduces ``sacrebleu.sentence_bleu`` with its defaults, so a score
can be compared with numbers that other people report. Both return values on sacrebleu's 0-100
scale so that thresholds and plots do not depend on which flavour produced them.

The pipeline scores every sampled response of a prompt against the same references, so the
work is split: :class:`BleuScorer` tokenises the references and counts their n-grams once, and
each hypothesis then costs one tokenisation and one n-gram count. No third-party code is
imported; sacrebleu is only used by the tests to prove the numbers match.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

__all__ = [
    "MAX_ORDER",
    "BleuScorer",
    "BleuVariant",
    "bleuberi_bleu",
    "sacrebleu_bleu",
    "tokenize_13a",
]

BleuVariant = Literal["bleuberi", "sacrebleu"]

# Both BLEUBERI and sacrebleu's defaults stop at 4-grams.
MAX_ORDER = 4

# mteval-v13a isolates every ASCII punctuation mark except the apostrophe (kept inside words
# such as "don't") and the period, comma and dash, which have their own digit-aware rules
# below. sacrebleu's class also lists the space; padding a space with spaces cannot change
# the tokens, so it is left out here.
_ISOLATED_PUNCTUATION = "".join(sorted(set(string.punctuation) - set("'.,-")))
_ISOLATE_PUNCTUATION = re.compile(f"([{re.escape(_ISOLATED_PUNCTUATION)}])")
# The next three rules must consume the neighbouring character rather than peek at it with a
# look-around: mteval's substitutions are non-overlapping, so in "a.." only the first period is
# split by the "not after a digit" rule, and look-arounds would give different tokens.
# ``[0-9]`` rather than ``\d`` because only ASCII digits protect a separator ("1.5" stays whole,
# "١.٥" does not).
_SEPARATOR_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
_SEPARATOR_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])-")

# The order matters and is mteval's: "&amp;lt;" decodes all the way to "<", while "&amp;quot;"
# stops at "&quot;" because quotes were decoded before ampersands.
_HTML_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))

_NGram = tuple[str, ...]
_NGramCounts = list[Counter[_NGram]]


def tokenize_13a(text: str) -> list[str]:
    """Split ``text`` into mteval-v13a tokens, exactly as sacrebleu's "13a" tokenizer does.

    Both BLEU flavours are defined on these tokens, and any deviation (one more split on a
    period, one entity left undecoded) changes the n-gram counts and therefore the score, so
    the rules are reproduced to the character rather than approximated. Case is kept because
    neither flavour lowercases.
    """
    # mteval drops its "<skipped>" marker and joins words hyphenated across a line break.
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        for entity, char in _HTML_ENTITIES:
            text = text.replace(entity, char)
    # The padding lets a period or comma at either end see a non-digit neighbour, which is
    # what splits a leading ".5" or a trailing "end." the way mteval does.
    text = _ISOLATE_PUNCTUATION.sub(r" \1 ", f" {text} ")
    text = _SEPARATOR_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _SEPARATOR_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 - ", text)
    return text.split()


def _count_ngrams(tokens: list[str], max_order: int) -> _NGramCounts:
    """Count n-grams per order; orders longer than the sentence get an empty Counter.

    One Counter per order (instead of one keyed by n-grams of every length) lets the scorer
    add up matches per order without measuring each n-gram, and zipping shifted slices builds
    the tuples in C instead of slicing the token list once per position.
    """
    return [
        Counter(zip(*(tokens[shift:] for shift in range(order)), strict=False))
        for order in range(1, max_order + 1)
    ]


def _clipped_matches(hyp_counts: Counter[_NGram], caps: dict[_NGram, int]) -> int:
    """Count hypothesis n-grams found in the references, each capped at its reference count.

    The cap is what stops a response from earning credit by repeating one common n-gram.
    """
    matches = 0
    for gram, count in hyp_counts.items():
        cap = caps.get(gram)
        if cap:
            matches += count if count < cap else cap
    return matches


def _keep(text: str) -> str:
    """Leave text untouched; BLEUBERI (through ``evaluate``) tokenises the raw string."""
    return text


class BleuScorer:
    """Score many hypotheses against one fixed set of references.

    A prompt has a handful of references and many sampled responses; tokenising and counting
    the references once per prompt instead of once per response is where the time goes in a
    plain ``sacrebleu.sentence_bleu`` loop, so that work happens here in the constructor.
    """

    def __init__(self, references: Sequence[str], variant: BleuVariant = "bleuberi") -> None:
        if isinstance(references, str):
            # A bare string is a Sequence[str] too, and would silently score against each of
            # its characters as a separate reference.
            raise TypeError("references must be a sequence of strings, not a single string")
        if not references:
            raise ValueError(
                "BLEU needs at least one reference; handle prompts without references before scoring"
            )
        if variant not in ("bleuberi", "sacrebleu"):
            raise ValueError(f"unknown BLEU variant {variant!r}; use 'bleuberi' or 'sacrebleu'")
        self.variant: BleuVariant = variant
        # sacrebleu strips trailing whitespace before tokenising, which matters for a text
        # ending in "-\n" (the hyphen then survives); BLEUBERI tokenises the raw text.
        self._prepare: Callable[[str], str] = str.rstrip if variant == "sacrebleu" else _keep

        caps: list[dict[_NGram, int]] = [{} for _ in range(MAX_ORDER)]
        lengths: list[int] = []
        for reference in references:
            tokens = tokenize_13a(self._prepare(reference))
            lengths.append(len(tokens))
            for order_caps, counts in zip(caps, _count_ngrams(tokens, MAX_ORDER), strict=True):
                # Multi-reference clipping allows an n-gram as often as the single reference
                # that uses it most, never the sum over references.
                for gram, count in counts.items():
                    if count > order_caps.get(gram, 0):
                        order_caps[gram] = count
        self._caps = caps
        # Ascending and de-duplicated: the shortest length is the first one, and a scan for
        # the closest length meets the shorter of two equally close lengths first.
        self._ref_lengths = sorted(set(lengths))

    def score(self, hypothesis: str) -> float:
        """Return the BLEU of ``hypothesis`` on the 0-100 scale for this scorer's variant.

        An empty hypothesis scores 0.0 in both variants: sacrebleu gives it 0.0 itself, and
        the TF-NMT formula would divide by zero, so 0.0 is the natural extension.
        """
        tokens = tokenize_13a(self._prepare(hypothesis))
        length = len(tokens)
        if length == 0:
            return 0.0
        orders = min(length, MAX_ORDER)
        hyp_counts = _count_ngrams(tokens, orders)
        matches = [
            _clipped_matches(counts, caps) for counts, caps in zip(hyp_counts, self._caps, strict=False)
        ]
        if self.variant == "sacrebleu":
            return self._sacrebleu(length, matches)
        return self._bleuberi(length, matches)

    def _bleuberi(self, length: int, matches: list[int]) -> float:
        """TF-NMT smoothed BLEU: add-one on every order, brevity against the shortest reference.

        Orders longer than the hypothesis still take part, with precision (0 + 1) / (0 + 1) = 1,
        exactly as TF-NMT does; the arithmetic mirrors it step for step so the scores agree to
        the last bit with what BLEUBERI trained on.
        """
        log_precisions: list[float] = []
        for order in range(1, MAX_ORDER + 1):
            matched = matches[order - 1] if order <= len(matches) else 0
            possible = max(0, length - order + 1)
            precision = (matched + 1.0) / (possible + 1.0)
            log_precisions.append((1.0 / MAX_ORDER) * math.log(precision))
        geo_mean = math.exp(sum(log_precisions))
        shortest = self._ref_lengths[0]
        # With only empty references the ratio is infinite: no brevity penalty, not a crash.
        ratio = length / shortest if shortest else math.inf
        brevity = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
        return geo_mean * brevity * 100.0

    def _sacrebleu(self, length: int, matches: list[int]) -> float:
        """sacrebleu's sentence BLEU: "exp" smoothing, effective order, closest reference length.

        The operations follow sacrebleu's ``compute_bleu`` in the same order (precisions in
        percent, logs summed by ``sum``, the mean taken over the effective order) because the
        tests demand agreement to 1e-9 and a reordered float computation can drift further.
        """
        # No matching unigram means no matching n-gram of any order, and sacrebleu returns 0
        # outright in that case, before any smoothing could make the score positive.
        if not matches[0]:
            return 0.0
        ref_length = min(self._ref_lengths, key=lambda ref: abs(length - ref))
        brevity = 1.0 if length >= ref_length else math.exp(1 - ref_length / length)
        log_precisions: list[float] = []
        halvings = 1.0
        # Effective order: only the orders the hypothesis is long enough to have take part,
        # which ``matches`` already reflects.
        for order, matched in enumerate(matches, start=1):
            possible = length - order + 1
            if matched:
                precision = 100.0 * matched / possible
            else:
                # mteval's smoothing: each further order without a match counts as half the
                # credit of the previous one.
                halvings *= 2
                precision = 100.0 / (halvings * possible)
            log_precisions.append(math.log(precision))
        return brevity * math.exp(sum(log_precisions) / len(log_precisions))


def bleuberi_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """BLEUBERI's reward for one response, on the 0-100 scale.

    A convenience for one-off scoring; when a prompt has several responses, build one
    :class:`BleuScorer` and reuse it, since this rebuilds the reference counts on every call.
    """
    return BleuScorer(references, "bleuberi").score(hypothesis)


def sacrebleu_bleu(hypothesis: str, references: Sequence[str]) -> float:
    """``sacrebleu.sentence_bleu(hypothesis, references).score`` without importing sacrebleu.

    As with :func:`bleuberi_bleu`, prefer a reused :class:`BleuScorer` for many responses.
    """
    return BleuScorer(references, "sacrebleu").score(hypothesis)
