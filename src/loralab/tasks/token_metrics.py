"""Token-classification scores: token accuracy and entity-level precision / recall / F1.

Entity spans follow seqeval's default mode (``seqeval.metrics.f1_score`` without ``mode="strict"``; IOB2 and IOBES
tags, non-strict): an ``I-`` tag that does not continue an entity of its type starts one, a change of type ends one,
and the scores are micro-averaged over the (sentence, type, start, end) spans of every sentence. seqeval itself needs
scikit-learn, which loralab does not depend on; :func:`entity_spans` is its ``get_entities`` rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _split(tag: str) -> tuple[str, str]:
    """seqeval's reading of a tag: its first character (B, I, E, S, O) and its type (``_`` when it has none)."""
    return tag[:1] or "O", tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev in ("E", "S") or (prev in ("B", "I") and tag in ("B", "S", "O"))
            or (prev not in ("O", ".") and prev_type != type_))


def _starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    return tag in ("B", "S") or (prev in ("E", "S", "O") and tag in ("E", "I")) or (tag not in ("O", ".") and prev_type != type_)


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one sentence's tags as ``(type, first word, last word)`` (inclusive), in order.

    >>> entity_spans(["B-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-LOC"])
    [('PER', 0, 1), ('LOC', 3, 3), ('ORG', 4, 4), ('LOC', 5, 5)]
    """
    spans: list[tuple[str, int, int]] = []
    prev, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(list(tags) + ["O"]):
        tag, type_ = _split(str(chunk))
        if _ends(prev, tag, prev_type, type_):
            spans.append((prev_type, begin, i - 1))
        if _starts(prev, tag, prev_type, type_):
            begin = i
        prev, prev_type = tag, type_
    return spans


def _prf(correct: int, predicted: int, true: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def token_scores(predicted: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``token_accuracy`` (share of the reference words tagged right), entity ``precision`` / ``recall`` / ``f1``
    (micro, seqeval's default), ``per_type`` ({type: {precision, recall, f1, support}}), ``entities`` (in the
    references), ``words`` and ``n`` (sentences). A predicted sentence shorter than its reference counts its missing
    words as ``O``."""
    words = right = 0
    true_spans: set[tuple[int, str, int, int]] = set()
    found_spans: set[tuple[int, str, int, int]] = set()
    for s, (pred, ref) in enumerate(zip(predicted, references)):
        pred = list(pred) + ["O"] * (len(ref) - len(pred))
        words += len(ref)
        right += sum(p == r for p, r in zip(pred, ref))
        true_spans |= {(s, *span) for span in entity_spans(ref)}
        found_spans |= {(s, *span) for span in entity_spans(pred[: len(ref)])}
    correct = true_spans & found_spans
    per_type = {}
    for type_ in sorted({span[1] for span in true_spans | found_spans}):
        of = lambda spans: sum(1 for span in spans if span[1] == type_)  # noqa: E731
        per_type[type_] = {**_prf(of(correct), of(found_spans), of(true_spans)), "support": of(true_spans)}
    return {"token_accuracy": right / words if words else 0.0, **_prf(len(correct), len(found_spans), len(true_spans)),
            "per_type": per_type, "entities": len(true_spans), "words": words, "n": len(references)}
