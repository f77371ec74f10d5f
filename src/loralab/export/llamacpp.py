"""Run a GGUF file with llama.cpp itself (the ``llama-cpp-python`` package builds it from source) to check an export.

A round trip through transformers' GGUF reader would undo the same permutation a writer applies; llama.cpp reads the
file as the runtimes people deploy with (llama.cpp, Ollama, LM Studio) do. Optional: ``pip install 'loralab[gguf]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from loralab.errors import LoralabError

INSTALL_HINT = "pip install 'loralab[gguf]' (llama-cpp-python, which builds llama.cpp with this machine's compiler)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp prints its load log on the C stderr even with ``verbose=False``; keep it out of loralab's output."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp: tokenizer, teacher-forced logits, greedy continuation (the same interface as
    :class:`loralab.export.verify.HFModel`)."""

    def __init__(self, path: str | Path, stop_ids: Sequence[int], n_ctx: int = 1024, threads: int | None = None):
        if not available():
            raise LoralabError(f"checking a GGUF file with llama.cpp needs llama-cpp-python: {INSTALL_HINT}")
        from llama_cpp import Llama

        try:
            with _quiet_stderr():
                self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                                 n_threads=threads or min(4, os.cpu_count() or 1), n_batch=n_ctx)
        except (ValueError, RuntimeError) as exc:
            raise LoralabError(f"llama.cpp cannot load {path}: {exc}") from None
        self.stop_ids = list(stop_ids)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special tokens in it parsed, as chat runtimes do)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def _eval(self, ids: Sequence[int]) -> np.ndarray:
        self.llm.reset()
        with _quiet_stderr():
            self.llm.eval(list(ids))
        return np.array(self.llm.scores[: self.llm.n_tokens], dtype=np.float32)

    def logits(self, ids: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self._eval([*ids, *continuation]).copy())

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Argmax decoding, token by token (no sampler involved)."""
        self.llm.reset()
        tokens: list[int] = []
        with _quiet_stderr():
            self.llm.eval(list(ids))
            for _ in range(max_new_tokens):
                token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
                tokens.append(token)
                if token in self.stop_ids:
                    break
                self.llm.eval([token])
        return tokens

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()
        self.llm = None


def tokenization_mismatches(tokenizer: Any, model: LlamaCppModel, texts: Sequence[str]) -> list[dict[str, Any]]:
    """The texts that llama.cpp tokenizes differently from the Hugging Face tokenizer (no BOS either side)."""
    found = []
    for text in texts:
        hf = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        cpp = model.tokenize(text)
        if hf != cpp:
            found.append({"text": text, "transformers": hf, "llama.cpp": cpp})
    return found
