"""Tests for steps.labelers.bleu_score: the tokenizer and the sacrebleu flavour against sacrebleu itself,
the BLEUBERI flavour against hand-worked arithmetic."""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence

import pytest
import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from steps.labelers.bleu_score import BleuScorer, bleuberi_bleu, sacrebleu_bleu, tokenize_13a

ScoreFn = Callable[[str, Sequence[str]], float]

# Pieces that exercise every rule of the 13a tokenizer: digit-aware period/comma/dash rules,
# entities (including the double-encoded one), "<skipped>", hyphenation across lines, unicode
# that must pass through untouched, and whitespace that str.split treats as a separator.
_WORDS = ["the", "Cat", "don't", "e.g", "U.S.A", "naïve", "Ünïcödé", "中文", "日本語", "😀", "👍🏽"]
_NUMBERS = ["3", "42", "3.14", "1,000", "1,000.5", "5-6", "2020-01-01", "١٢", "٣.٥", "７"]
_MARKS = [*string.punctuation, "-", "-", ".", ".", ",", ",", "...", "--", "—", "«", "»", "¿"]
_SPECIAL = [
    *["&quot;", "&amp;", "&lt;", "&gt;", "&amp;lt;", "&amp;quot;", "&amp;amp;", "&", "&nbsp;"],
    *["<skipped>", "<skip<skipped>ped>", "-\n", "\n"],
]
_SPACES = [" ", " ", " ", "", "", "\t", "\r", "\u00a0", "\u2003", "\x0b", "  "]


def _random_text(rng: random.Random) -> str:
    """Glue random pieces, often with no space between them so the rules meet each other."""
    pools = (_WORDS, _NUMBERS, _MARKS, _SPECIAL)
    parts = []
    for _ in range(rng.randint(0, 14)):
        parts.append(rng.choice(rng.choice(pools)))
        parts.append(rng.choice(_SPACES))
    return "".join(parts)


def test_tokenizer_matches_sacrebleu_13a() -> None:
    reference = Tokenizer13a()
    rng = random.Random(13)
    fixed = ["", " ", "a.", ".5", "5.", "a..", "1.a", "a,b", "1-2", "a-b", "x-\ny", "tail-\n"]
    # Every ASCII mark squeezed between letters and between digits, where splitting shows.
    squeezed = [f"{left}{mark}{right}" for mark in string.punctuation for left, right in ("ab", "12")]
    texts = fixed + squeezed + [_random_text(rng) for _ in range(800)]
    for text in texts:
        assert tokenize_13a(text) == reference(text).split(), repr(text)


# A small vocabulary makes shared n-grams (and so every smoothing branch) common.
_VOCAB = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "big", ".", ",", "3.5", "it's"]
_EXTRA = ["café", "中文", "😀", "&amp;", "(", ")", "-\n", "\n", "<skipped>"]


def _random_sentence(rng: random.Random, max_len: int) -> str:
    words = [
        rng.choice(_EXTRA) if rng.random() < 0.1 else rng.choice(_VOCAB)
        for _ in range(rng.randint(0, max_len))
    ]
    return " ".join(words) + rng.choice(["", "", " ", "\n", "-\n"])


def _perturb(rng: random.Random, text: str) -> str:
    """A near-copy of a reference, so that 3- and 4-gram matches happen too."""
    words = text.split()
    if words and rng.random() < 0.7:
        words[rng.randrange(len(words))] = rng.choice(_VOCAB)
    if words and rng.random() < 0.3:
        del words[rng.randrange(len(words))]
    return " ".join(words)


def _sacrebleu_cases() -> list[tuple[str, list[str]]]:
    rng = random.Random(2024)
    cases: list[tuple[str, list[str]]] = [
        ("", ["the cat"]),
        ("", [""]),
        ("the cat", [""]),
        ("the cat", ["", ""]),
        ("   ", ["the cat"]),
        ("<skipped>", ["the cat"]),
        ("cat", ["cat"]),
        ("cat", ["dog"]),
        ("the cat", ["the cat sat", "cat"]),
        ("the cat sat", ["the cat", "the cat sat on"]),
        ("the cat-\n", ["the cat-"]),
        ("中文 😀 café", ["中文 😀 café ."]),
    ]
    while len(cases) < 700:
        refs = [_random_sentence(rng, rng.choice([3, 8, 16])) for _ in range(rng.randint(1, 4))]
        roll = rng.random()
        if roll < 0.4:
            hyp = _perturb(rng, rng.choice(refs))
        elif roll < 0.6:
            hyp = _random_sentence(rng, 3)
        elif roll < 0.65:
            hyp = ""
        else:
            hyp = _random_sentence(rng, 16)
        cases.append((hyp, refs))
    return cases


def test_sacrebleu_variant_matches_sacrebleu() -> None:
    for hyp, refs in _sacrebleu_cases():
        ours = sacrebleu_bleu(hyp, refs)
        theirs = sacrebleu.sentence_bleu(hyp, refs).score
        assert abs(ours - theirs) <= 1e-9, f"hyp={hyp!r} refs={refs!r}: {ours} != {theirs}"


def test_sacrebleu_cases_cover_the_interesting_regimes() -> None:
    """Guard the generator: equality means little if every case were 0 or 100."""
    scores = [sacrebleu_bleu(h, r) for h, r in _sacrebleu_cases()]
    assert sum(s == 0.0 for s in scores) >= 20
    assert sum(0.0 < s < 100.0 for s in scores) >= 300
    assert sum(math.isclose(s, 100.0) for s in scores) >= 5


@pytest.mark.parametrize("text", ["the cat sat on the mat", "a b", "word"])
def test_bleuberi_exact_match_is_100(text: str) -> None:
    # Every order has p_n = (k + 1) / (k + 1) = 1, orders longer than the text included
    # ((0 + 1) / (0 + 1)); c = r so ratio = 1, not > 1, and bp = exp(1 - 1/1) = 1.
    assert bleuberi_bleu(text, [text]) == pytest.approx(100.0, abs=1e-12)


def test_bleuberi_hand_computed() -> None:
    # hyp: the cat sat on the mat / ref: the cat is on the mat (6 tokens each)
    # 1-grams: the x2, cat, on, mat match -> 5 of 6     -> p1 = 6/7
    # 2-grams: the cat, on the, the mat   -> 3 of 5     -> p2 = 4/6
    # 3-grams: on the mat                 -> 1 of 4     -> p3 = 2/5
    # 4-grams: none                       -> 0 of 3     -> p4 = 1/4
    # product = 6*4*2*1 / (7*6*5*4) = 2/35; ratio = 6/6 = 1 -> bp = 1
    expected = 100.0 * (2 / 35) ** 0.25
    got = bleuberi_bleu("the cat sat on the mat", ["the cat is on the mat"])
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(48.8923, abs=1e-4)


def test_bleuberi_brevity_penalty() -> None:
    # hyp "a b" against "a b c d": p1 = 3/3, p2 = 2/2, p3 = p4 = 1/1; ratio = 2/4 -> bp = e^-1
    assert bleuberi_bleu("a b", ["a b c d"]) == pytest.approx(100.0 / math.e, rel=1e-12)


def test_bleuberi_brevity_uses_shortest_reference() -> None:
    hyp = "a b c d"
    refs = ["a b", "a b c d e"]  # lengths 2 and 5: the closest to 4 is 5, the shortest is 2
    # All hypothesis n-grams occur in the long reference, so every p_n = 1 either way.
    # Shortest: ratio = 4/2 > 1 -> bp = 1.
    assert bleuberi_bleu(hyp, refs) == pytest.approx(100.0, rel=1e-12)
    # Closest (sacrebleu): r = 5 -> bp = exp(1 - 5/4); precisions are all 100%.
    assert sacrebleu_bleu(hyp, refs) == pytest.approx(100.0 * math.exp(1 - 5 / 4), rel=1e-12)
    # Only the long reference: bleuberi now penalises too, ratio = 4/5 -> bp = exp(1 - 5/4).
    assert bleuberi_bleu(hyp, [refs[1]]) == pytest.approx(100.0 * math.exp(-0.25), rel=1e-12)


def test_bleuberi_clips_by_max_count_over_references() -> None:
    # "the" appears once in the first reference and twice in the second: the cap is 2, not 3.
    # 1-grams: 2 of 4 -> 3/5; 2-grams "the the" x3, ref has 1 -> 2/4;
    # 3-grams 0 of 2 -> 1/3; 4-grams 0 of 1 -> 1/2; shortest ref = 2 tokens, ratio 2 -> bp = 1
    # product = 3*2*1*1 / (5*4*3*2) = 1/20
    got = bleuberi_bleu("the the the the", ["the cat", "the the cat"])
    assert got == pytest.approx(100.0 * (1 / 20) ** 0.25, rel=1e-12)
    summed_cap = 100.0 * (4 / 5 * 2 / 4 * 1 / 3 * 1 / 2) ** 0.25
    assert not math.isclose(got, summed_cap)


def test_bleuberi_only_empty_references_has_no_brevity_penalty() -> None:
    # r = 0 -> ratio is treated as > 1 -> bp = 1; no matches: p = 1/3, 1/2, 1/1, 1/1
    assert bleuberi_bleu("a b", ["", ""]) == pytest.approx(100.0 * (1 / 6) ** 0.25, rel=1e-12)


@pytest.mark.parametrize("hyp", ["", "   \n", "<skipped>"])
@pytest.mark.parametrize("score", [bleuberi_bleu, sacrebleu_bleu])
def test_empty_hypothesis_scores_zero(hyp: str, score: ScoreFn) -> None:
    assert score(hyp, ["the cat sat"]) == 0.0
    assert score(hyp, [""]) == 0.0


@pytest.mark.parametrize("score", [bleuberi_bleu, sacrebleu_bleu])
def test_no_references_is_an_error(score: ScoreFn) -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        score("the cat", [])
    with pytest.raises(TypeError, match="single string"):
        score("the cat", "the cat")


def test_unknown_variant_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown BLEU variant"):
        BleuScorer(["the cat"], "nist")  # type: ignore[arg-type]


def test_scorer_matches_module_functions() -> None:
    rng = random.Random(7)
    for _ in range(40):
        refs = [_random_sentence(rng, 12) for _ in range(rng.randint(1, 4))]
        bleuberi = BleuScorer(refs)
        sacre = BleuScorer(refs, "sacrebleu")
        for _ in range(8):
            hyp = _perturb(rng, rng.choice(refs)) if rng.random() < 0.5 else _random_sentence(rng, 12)
            assert bleuberi.score(hyp) == bleuberi_bleu(hyp, refs)
            assert sacre.score(hyp) == sacrebleu_bleu(hyp, refs)
