"""Text-generation metrics: exact match, ROUGE-L, chrF and BLEU.

Conventions:
- ``exact_match`` and ``rouge_l`` are reported in 0..1.
- ``exact_match`` compares JSON answers by value: when both texts parse as a JSON object or array (bare or in a
  Markdown ```json fence), key order and spacing do not matter; otherwise the texts are compared after collapsing
  whitespace.
- ``chrf`` and ``bleu`` are reported in 0..100, as sacrebleu reports them.

ROUGE-L uses a language-neutral tokenizer (see :class:`MultilingualTokenizer`)
instead of rouge_score's default, which drops every non-ASCII character and
therefore scores 0 on e.g. Chinese text.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType

from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

__all__ = [
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "MultilingualTokenizer",
    "bleu",
    "bleu_tokenizer_for",
    "chrf",
    "contains_cjk",
    "exact_match",
    "normalize_text",
    "same_answer",
    "rouge_l",
    "score_corpus",
    "score_pair",
]

METRIC_NAMES: tuple[str, ...] = ("exact_match", "rouge_l", "chrf", "bleu")

#: Direction of each metric, for picking the best run of a sweep.
HIGHER_IS_BETTER: Mapping[str, bool] = MappingProxyType(
    {
        "exact_match": True,
        "rouge_l": True,
        "chrf": True,
        "bleu": True,
        "eval_loss": False,
    }
)

# --- Unicode ranges -------------------------------------------------------

_HAN = (
    "\u3400-\u4dbf"  # CJK Unified Ideographs Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\U00020000-\U0003134f"  # Extensions B..G and Compatibility Supplement
)
_KANA = (
    "\u3040-\u309f"  # Hiragana
    "\u30a0-\u30ff"  # Katakana
    "\u31f0-\u31ff"  # Katakana Phonetic Extensions
)
_HANGUL = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u3130-\u318f"  # Hangul Compatibility Jamo
    "\uac00-\ud7af"  # Hangul Syllables
)
_FULLWIDTH = "\uff00-\uffef"  # Halfwidth and Fullwidth Forms
_THAI = "\u0e00-\u0e7f"

_CJK_RE = re.compile(f"[{_HAN}{_KANA}{_HANGUL}{_FULLWIDTH}]")
_HAN_RE = re.compile(f"[{_HAN}]")
_KANA_HANGUL_RE = re.compile(f"[{_KANA}{_HANGUL}]")

# Scripts written without spaces between words: one token per character.
_SPLIT = f"{_HAN}{_KANA}{_HANGUL}{_THAI}"
# A split-script character, or a run of other word characters.
_TOKEN_RE = re.compile(f"[{_SPLIT}]|[^\\W{_SPLIT}]+", re.UNICODE)

_WHITESPACE_RE = re.compile(r"\s+")


# --- Helpers --------------------------------------------------------------


def normalize_text(s: str) -> str:
    """Strip and collapse every whitespace run to a single space."""
    return _WHITESPACE_RE.sub(" ", s).strip()


_FENCE_RE = re.compile(r"\A\s*```[ \t]*(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```\s*\Z", re.DOTALL | re.IGNORECASE)
_NOT_JSON = object()


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN / Infinity; JSON has neither


def _json_value(text: str) -> object:
    """The JSON object or array ``text`` holds (bare or inside a ```json fence), else ``_NOT_JSON``."""
    match = _FENCE_RE.match(text)
    body = (match.group(1) if match else text).strip()
    if not body.startswith(("{", "[")):
        return _NOT_JSON
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        return _NOT_JSON
    return value if isinstance(value, (dict, list)) else _NOT_JSON


def _same_json(a: object, b: object) -> bool:
    """JSON values equal as JSON: true is not 1, 1 is 1.0, objects regardless of key order, arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b and math.isfinite(a) and math.isfinite(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b  # strings, null


def same_answer(prediction: str, reference: str) -> bool:
    """Exact match of one pair: equal JSON values when both are JSON objects / arrays, else equal text after
    :func:`normalize_text`."""
    predicted, expected = _json_value(prediction), _json_value(reference)
    if predicted is not _NOT_JSON and expected is not _NOT_JSON:
        return _same_json(predicted, expected)
    return normalize_text(prediction) == normalize_text(reference)


def contains_cjk(text: str) -> bool:
    """True if ``text`` has a CJK ideograph, kana, Hangul or fullwidth form."""
    return bool(_CJK_RE.search(text))


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> int:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got "
            f"{len(predictions)} predictions and {len(references)} references"
        )
    return len(predictions)


def bleu_tokenizer_for(references: Sequence[str]) -> str:
    """Pick the sacrebleu tokenizer for BLEU from the references.

    Kana or Hangul anywhere (Japanese/Korean; MeCab is not available) ->
    ``"char"``; otherwise Han ideographs (Chinese) -> ``"zh"``; other CJK
    (fullwidth forms only) -> ``"char"``; else the default ``"13a"``.
    The choice is made once for the whole corpus.
    """
    if any(_KANA_HANGUL_RE.search(r) for r in references):
        return "char"
    if any(_HAN_RE.search(r) for r in references):
        return "zh"
    if any(contains_cjk(r) for r in references):
        return "char"
    return "13a"


# --- ROUGE-L --------------------------------------------------------------


class MultilingualTokenizer:
    """Language-neutral tokenizer for ``rouge_score``.

    NFKC-normalizes and lowercases, emits each CJK/Thai/kana/Hangul character
    as its own token and keeps other runs of Unicode word characters (so
    accented Latin, Cyrillic, ... survive) as word tokens. No stemming.
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


@lru_cache(maxsize=1)
def _rouge_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=MultilingualTokenizer())


def _rouge_l_pair(prediction: str, reference: str) -> float:
    # Equal texts (including both empty) score 1.0; if only one side has
    # no tokens, rouge_score returns 0.0.
    if normalize_text(prediction) == normalize_text(reference):
        return 1.0
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (0..1) over pairs.

    A pair whose texts are equal after :func:`normalize_text` (including both
    empty) scores 1.0; a pair where only one side is empty scores 0.0.
    Empty input returns 0.0.
    """
    n = _check_lengths(predictions, references)
    if n == 0:
        return 0.0
    return sum(_rouge_l_pair(p, r) for p, r in zip(predictions, references)) / n


# --- Corpus metrics -------------------------------------------------------


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0..1) of pairs that are the same answer (:func:`same_answer`: JSON by value, else text after
    :func:`normalize_text`)."""
    n = _check_lengths(predictions, references)
    if n == 0:
        return 0.0
    hits = sum(same_answer(p, r) for p, r in zip(predictions, references))
    return hits / n


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0..100) via sacrebleu. Empty input returns 0.0."""
    if _check_lengths(predictions, references) == 0:
        return 0.0
    return CHRF().corpus_score(list(predictions), [list(references)]).score


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0..100) via sacrebleu, tokenizer per :func:`bleu_tokenizer_for`.

    Empty input returns 0.0.
    """
    if _check_lengths(predictions, references) == 0:
        return 0.0
    metric = BLEU(tokenize=bleu_tokenizer_for(references))
    return metric.corpus_score(list(predictions), [list(references)]).score


# --- Entry points ---------------------------------------------------------


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """Sentence-level scores for one example, keyed by :data:`METRIC_NAMES`.

    chrF and BLEU use sacrebleu's ``sentence_score`` (BLEU with
    ``effective_order=True``). Note sacrebleu scores an empty pair 0 on both.
    """
    tokenize = bleu_tokenizer_for([reference])
    return {
        "exact_match": float(same_answer(prediction, reference)),
        "rouge_l": _rouge_l_pair(prediction, reference),
        "chrf": CHRF().sentence_score(prediction, [reference]).score,
        "bleu": BLEU(tokenize=tokenize, effective_order=True)
        .sentence_score(prediction, [reference])
        .score,
    }


def score_corpus(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus scores keyed by :data:`METRIC_NAMES`, plus ``n`` (the pair count).

    Raises ValueError if the lengths differ; for no pairs returns zeros, n=0.
    """
    n = _check_lengths(predictions, references)
    if n == 0:
        return {**dict.fromkeys(METRIC_NAMES, 0.0), "n": 0}
    return {
        "exact_match": exact_match(predictions, references),
        "rouge_l": rouge_l(predictions, references),
        "chrf": chrf(predictions, references),
        "bleu": bleu(predictions, references),
        "n": n,
    }
