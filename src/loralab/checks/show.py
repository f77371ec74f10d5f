"""``loralab check --show N``: tokenized examples as the model sees them, supervised tokens marked.

Examples go through the session's real collator, so what is shown is what training computes the loss on:
supervised tokens (labels != -100) are wrapped in ``[[...]]`` (bold green in a terminal), masked ones are plain (dim),
special tokens appear literally (magenta), and padding is summarised as ``<pad ×k>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from rich.text import Text

from loralab.data import IGNORE_INDEX

LEGEND = "[[...]] = supervised tokens (the loss is computed on them); everything else is masked (-100)"
STYLES = {"supervised": "bold green underline", "masked": "dim", "special": "magenta",
          "special_supervised": "bold magenta underline", "pad": "dim italic"}
COLOR_LEGEND = "supervised tokens bold, green and underlined (the loss is computed on them); masked ones dim; special tokens magenta"


@dataclass
class Shown:
    """One example ready to print: a title and (text, supervised, kind) pieces per section."""

    title: str
    sections: list[tuple[str, list[tuple[str, bool, str]]]] = field(default_factory=list)


def _pieces(tokenizer: Any, ids: list[int], labels: list[int] | None, pads: list[bool]) -> list[tuple[str, bool, str]]:
    """Consecutive tokens with the same (supervised, kind) decoded together; padding runs summarised."""
    special = set(tokenizer.all_special_ids)
    groups: list[tuple[bool, str, list[int]]] = []
    for i, token in enumerate(ids):
        on = labels is None or labels[i] != IGNORE_INDEX
        kind = "pad" if pads[i] else ("special" if token in special else "text")
        if groups and groups[-1][0] == on and groups[-1][1] == kind:
            groups[-1][2].append(token)
        else:
            groups.append((on, kind, [token]))
    pieces = []
    for on, kind, tokens in groups:
        if kind == "pad":
            text = f"<pad {tokenizer.convert_ids_to_tokens(tokens[0])} ×{len(tokens)}>"
        else:
            text = tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append((text, on, kind))
    return pieces


def _split_packed(row_ids: torch.Tensor, row_labels: torch.Tensor, positions: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """The sequences of a packed row (each starts where position_ids restart at 0)."""
    starts = [i for i, p in enumerate(positions.tolist()) if p == 0] + [len(row_ids)]
    return [(row_ids[a:b].tolist(), row_labels[a:b].tolist()) for a, b in zip(starts, starts[1:])]


def _turns(session: Any, index: int) -> str:
    """`` in 3 assistant turns`` for a conversation with several supervised answers (each one shows as its own
    ``[[...]]``), and why only the last one is when that is so."""
    item = session.data.train.tokenized[index]
    if item.last_turn_only and session.config.data.train_on == "all_turns":
        return f" (last assistant turn only: {item.last_turn_only})"
    return f" in {len(item.turns)} assistant turns" if len(item.turns) > 1 else ""


def shown_examples(session: Any, n: int) -> list[Shown]:
    """The first ``n`` train examples through the real collator, split back into examples."""
    dataset, tokenizer, task = session.data.train, session.tokenizer, session.task_type
    n = min(n, len(dataset))
    if n <= 0:
        return []
    features = [dataset[i] for i in range(n)]
    rows = [e.row for e in session.data.train_examples[:n]]
    batch = session.collator(features)
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    shown: list[Shown] = []
    if task == "CAUSAL_LM" and "position_ids" in batch and mask is None:
        by_ids: dict[tuple, list[int]] = {}  # identical examples (duplicate rows) are matched in order
        for i, f in enumerate(features):
            by_ids.setdefault(tuple(f["input_ids"]), []).append(i)
        for r in range(ids.shape[0]):
            for seq_ids, seq_labels in _split_packed(ids[r], labels[r], batch["position_ids"][r]):
                same = by_ids.get(tuple(seq_ids))
                index = same.pop(0) if same else None
                if index is None:  # the row's trailing padding: its own fully masked sequence
                    if shown and all(x == IGNORE_INDEX for x in seq_labels):
                        shown[-1].title += f" (+{len(seq_ids)} padding)"
                        continue
                    title = f"packed row {r + 1}: {len(seq_ids)} unmatched tokens"
                else:
                    title = (f"train row {rows[index]}: {len(seq_ids)} tokens, {sum(x != IGNORE_INDEX for x in seq_labels)} "
                             f"supervised{_turns(session, index)}")
                shown.append(Shown(title, [("", _pieces(tokenizer, seq_ids, seq_labels, [False] * len(seq_ids)))]))
        return shown
    for j in range(ids.shape[0]):
        real = mask[j].bool().tolist() if mask is not None else [True] * ids.shape[1]
        row_ids = ids[j].tolist()
        if task == "CAUSAL_LM":
            row_labels = labels[j].tolist()
            title = (f"train row {rows[j]}: {sum(real)} tokens, {sum(x != IGNORE_INDEX for x in row_labels)} "
                     f"supervised{_turns(session, j)}")
            shown.append(Shown(title, [("", _pieces(tokenizer, row_ids, row_labels, [not r for r in real]))]))
            continue
        section = ("input: ", _pieces(tokenizer, row_ids, [IGNORE_INDEX] * len(row_ids), [not r for r in real]))
        if task == "SEQ_CLS":
            names = {i: name for name, i in (session.data.label_ids or {}).items()}
            label = int(labels[j])
            shown.append(Shown(f"train row {rows[j]}", [section, ("label: ", [(f"{names.get(label, label)} (id {label})", True, "text")])]))
            continue
        target = labels[j].tolist()
        pads = [x == IGNORE_INDEX for x in target]
        target_ids = [tokenizer.pad_token_id if x == IGNORE_INDEX else x for x in target]
        title = f"train row {rows[j]}: {sum(real)} input tokens, {sum(not p for p in pads)} supervised target tokens"
        shown.append(Shown(title, [section, ("target: ", _pieces(tokenizer, target_ids, target, pads))]))
    return shown


def _plain(example: Shown) -> str:
    lines = [f"--- {example.title}"]
    for label, pieces in example.sections:
        text, inside = label, False
        for piece, on, _ in pieces:
            if on != inside:
                text += "[[" if on else "]]"
                inside = on
            text += piece
        lines.append(text + ("]]" if inside else ""))
    return "\n".join(lines)


def _rich(example: Shown) -> Text:
    text = Text()
    text.append(f"--- {example.title}\n", style="bold")
    for label, pieces in example.sections:
        text.append(label, style="bold")
        for piece, on, kind in pieces:
            style = STYLES["pad"] if kind == "pad" else STYLES[("special_supervised" if on else "special") if kind == "special"
                                                             else ("supervised" if on else "masked")]
            text.append(piece, style=style + (" reverse" if on and kind == "pad" else ""))
        text.append("\n")
    return text


def render_examples(session: Any, n: int, color: bool = False) -> list[Any]:
    """``n`` tokenized train examples: plain strings with ``[[supervised]]`` markers, or rich Text in colour."""
    examples = shown_examples(session, n)
    return [_rich(e) for e in examples] if color else [_plain(e) for e in examples]
