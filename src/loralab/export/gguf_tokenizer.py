"""The tokenizer in a GGUF file, as llama.cpp's converter writes it, read from the Hugging Face tokenizer.

Two kinds cover the supported models:
- byte-level BPE (SmolLM2, Llama 3, Qwen2/2.5): ``tokenizer.ggml.model = gpt2``, tokens, token types, merges, and
  the pre-tokenizer (``tokenizer.ggml.pre``) named by its regex: gpt-2, smollm, qwen2, llama-bpe;
- SentencePiece-style BPE with byte fallback (Gemma 3, Llama 2, Mistral): ``tokenizer.ggml.model = llama``, tokens
  with ``▁`` for spaces, scores (merge priority: llama.cpp merges the best-scoring pair first, transformers the
  earliest merge, so a token's score is minus the rank of the first merge that makes it), token types
  (byte tokens ``<0xNN>``, control, user-defined), and whether a space is put before the text.
Both carry the special token ids, whether BOS / EOS are added (as the tokenizer really does it), the end-of-turn
token and the chat template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import gguf

from loralab.errors import LoralabError

TokenType = gguf.TokenType
SPACE = "\u2581"  # ▁, SentencePiece's space

# Byte-level pre-tokenizers by what tokenizer.json splits with, and the name llama.cpp knows them by.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}
SUPPORTED = ("byte-level BPE with the GPT-2 (gpt-2), SmolLM (smollm), Qwen2 (qwen2) or Llama 3 (llama-bpe) "
             "pre-tokenizer; SentencePiece-style BPE with byte fallback (Gemma, Llama 2, Mistral)")


@dataclass
class TokenizerInfo:
    """What was written: the kind, the pre-tokenizer, the token count, BOS added or not."""

    model: str
    pre: str
    n_tokens: int
    add_bos: bool
    add_eos: bool


def backend_json(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.json`` content of a fast (Rust ``tokenizers``) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoralabError(f"GGUF export needs a fast tokenizer (a tokenizer.json); {type(tokenizer).__name__} has none")
    return json.loads(backend.to_str())


def _parts(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if not node:
        return []
    return node.get(key, [node]) if node.get("type") == "Sequence" else [node]


def byte_level_pre(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, or an error naming what the tokenizer uses."""
    parts = _parts(pre_tokenizer, "pretokenizers")
    kinds = [p.get("type") for p in parts]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if kinds == ["ByteLevel"] and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level[0].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level[0].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex in SPLIT_REGEXES:
            return SPLIT_REGEXES[regex]
    raise LoralabError(f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre_tokenizer)[:200]}) is not one "
                       f"llama.cpp knows; supported: {SUPPORTED}")


def tokenizer_kind(data: dict[str, Any]) -> str:
    """``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece-style BPE), else an error listing what is supported."""
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise LoralabError(f"GGUF export: {model.get('type')} tokenizers are not supported; supported: {SUPPORTED}")
    uses = json.dumps([data.get("pre_tokenizer"), data.get("decoder"), data.get("normalizer")], ensure_ascii=False)
    if '"ByteLevel"' in uses:
        return "gpt2"
    if model.get("byte_fallback") and SPACE in uses:
        return "llama"
    raise LoralabError(f"GGUF export: this BPE tokenizer is neither byte-level nor SentencePiece-style; "
                       f"supported: {SUPPORTED}")


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    merges = model.get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]  # type: ignore[misc]


def _added(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in data.get("added_tokens", [])}


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp's converter treats as control tokens even when not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def gpt2_vocab(tokenizer: Any, data: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and types as llama.cpp's ``get_vocab_base``: every id below ``n_vocab``, ``[PADi]`` for unused ids."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = _added(data)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if added[i].get("special") or looks_special(token):
                types.append(TokenType.CONTROL)
            else:
                types.append(TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def spm_vocab(tokenizer: Any, data: dict[str, Any], n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a SentencePiece-style vocabulary (see the module docstring for the scores)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = _added(data)
    first_merge: dict[str, int] = {}
    for rank, (a, b) in enumerate(_merges(data["model"])):
        first_merge.setdefault(a + b, rank)
    unk = data["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)
            types.append(TokenType.UNUSED)
            continue
        if i in added and not BYTE_TOKEN.fullmatch(token):
            special = added[i].get("special") or looks_special(token)
            types.append(TokenType.CONTROL if special and token != unk else
                         TokenType.UNKNOWN if token == unk else TokenType.USER_DEFINED)
            token = token if special else token.replace(SPACE, " ")  # user-defined tokens are matched pre-normalized
            scores.append(-1000.0)
        else:
            types.append(TokenType.BYTE if BYTE_TOKEN.fullmatch(token) else
                         TokenType.UNKNOWN if token == unk else TokenType.NORMAL)
            scores.append(-float(first_merge[token]) if token in first_merge else 0.0)
        tokens.append(token)
    return tokens, scores, types


def adds_space_prefix(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (Llama 2 style), as Gemma does not."""
    for node in _parts(data.get("normalizer"), "normalizers"):
        if node.get("type") == "Prepend" and node.get("prepend") == SPACE:
            return True
    for node in _parts(data.get("pre_tokenizer"), "pretokenizers"):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") in ("always", "first"):
            return True
    return False


def added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS at the start / EOS at the end, as the tokenizer really does."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids and bos is not None and ids[0] == bos), bool(len(ids) > 1 and eos is not None and ids[-1] == eos)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, n_vocab: int, chat_template: str | None,
                  end_of_turn: int | None = None) -> TokenizerInfo:
    """Write the tokenizer metadata; ``n_vocab`` is the model's vocabulary (embedding rows)."""
    data = backend_json(tokenizer)
    kind = tokenizer_kind(data)
    if len(tokenizer) > n_vocab:
        raise LoralabError(f"GGUF export: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                           f"{n_vocab} embedding rows")
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        pre = byte_level_pre(data.get("pre_tokenizer"))
        tokens, types = gpt2_vocab(tokenizer, data, n_vocab)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                                 for pair in _merges(data["model"])])
    else:
        pre = "default"
        tokens, scores, types = spm_vocab(tokenizer, data, n_vocab)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(adds_space_prefix(data))
    for kind_name, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                                ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind_name}_token_id")(token_id)
    if end_of_turn is not None and end_of_turn != tokenizer.eos_token_id:
        writer.add_eot_token_id(end_of_turn)
    add_bos, add_eos = added_specials(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if chat_template:
        writer.add_chat_template(chat_template)
    return TokenizerInfo(kind, pre, len(tokens), add_bos, add_eos)
