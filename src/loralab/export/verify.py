"""Does the exported model answer like the adapter? A few prompts through both: max |logit difference| and greedy answers.

The reference is measured once (the adapter model, before merging): its greedy continuation of each prompt and the
logits over prompt + continuation. Every candidate (the merged model, the adapter on a 4-bit base, a GGUF file run by
llama.cpp) is teacher-forced on the same tokens, so the logits compare position by position, and answers greedily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

# Fallback prompts when the run's eval split cannot be rebuilt (data file moved) or the adapter has no run.
PROBE_PROMPTS = ("What is the capital of France?", "Give the opposite of hot.",
                 "Write one sentence about the sea.", "用一句话解释什么是机器学习。")
N_PROMPTS = 4
MAX_NEW_TOKENS = 16

# Largest allowed max |logit difference|, relative to the largest |logit| of the reference (at least 1). float32:
# merging reorders sums only; 16-bit weights round every weight (fp16 to 11 bits, bf16 to 8); q8_0 rounds to 8 bits
# per 32-value block. Measured on the built-in model (README, Merge and export): f16 0.002, bf16 0.017, q8_0 0.07 of
# the largest |logit|; a wrong q/k permutation gives 1.0. q5_0 (0.36) and q4_0 (0.58) come too close to that to
# tell a broken file from rounding: their difference is measured and reported, never refused.
TOLERANCE: dict[str, float | None] = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 6e-2,
                                      "f16": 2e-2, "bf16": 6e-2, "q8_0": 0.2, "q5_0": None, "q4_0": None}


@dataclass
class Probe:
    """One verification prompt: its text and its token ids as training formats them."""

    prompt: str
    ids: list[int]


@dataclass
class Outputs:
    """What a model gave on the probes: the greedy continuation of each and the logits over prompt + reference
    continuation (float32, CPU, one ``[positions, vocab]`` tensor per probe)."""

    tokens: list[list[int]]
    logits: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Comparison:
    """A candidate measured against the reference."""

    name: str
    reference: str
    candidate: str
    max_abs_logit_diff: float
    logit_scale: float
    greedy_agree: int
    n: int
    tolerance: float | None = None  # relative; None: reported, never fails (the QLoRA drift, the adapter's effect)
    answers: list[dict[str, str]] = field(default_factory=list)
    near_ties: int = 0  # answers that part where the reference's two best tokens are closer than the difference

    @property
    def limit(self) -> float | None:
        return None if self.tolerance is None else self.tolerance * self.logit_scale

    @property
    def passed(self) -> bool | None:
        return None if self.limit is None else self.max_abs_logit_diff <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reference": self.reference, "candidate": self.candidate,
                "max_abs_logit_diff": self.max_abs_logit_diff, "logit_scale": self.logit_scale,
                "tolerance_relative": self.tolerance, "tolerance": self.limit, "passed": self.passed,
                "greedy_agree": self.greedy_agree, "n": self.n, "near_ties": self.near_ties, "answers": self.answers}


def probe_prompts(run: Any, limit: int = N_PROMPTS) -> tuple[list[Probe], str]:
    """The first prompts of the run's eval split, formatted as in training; the built-in probes when there is no
    eval split to rebuild. Returns the probes and where they came from."""
    from loralab.generation import prompt_token_ids

    examples: list[Any] = []
    source = "built-in probe prompts"
    if run.run_dir is not None:
        from loralab.evaluation import eval_examples

        try:
            examples = eval_examples(run.config, run.task_type, run.run_dir)[:limit]
            source = f"eval split of {run.run_dir}"
        except LoralabError as exc:
            log.warning("export check: %s; using built-in probe prompts instead", exc)
    if not examples:
        examples = list(PROBE_PROMPTS[:limit])
    probes = [Probe(getattr(e, "prompt", e), prompt_token_ids(run, e)) for e in examples]
    return probes, source


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def greedy(model: Any, ids: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int, seq2seq: bool,
           pad_id: int | None) -> list[int]:
    """The greedy continuation of ``ids``, up to and including the first stop token."""
    device = _device(model)
    input_ids = torch.tensor([list(ids)], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                             pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    new = out[0, 1:] if seq2seq else out[0, input_ids.shape[1]:]
    tokens: list[int] = []
    for token in new.tolist():
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens


def sequence_logits(model: Any, ids: Sequence[int], continuation: Sequence[int], seq2seq: bool,
                    decoder_start: int | None = None) -> torch.Tensor:
    """Logits (float32, CPU) over prompt + continuation (causal), or over the decoder positions (seq2seq)."""
    device = _device(model)
    with torch.no_grad():
        if seq2seq:
            decoder = torch.tensor([[decoder_start, *continuation]], device=device)
            out = model(input_ids=torch.tensor([list(ids)], device=device), decoder_input_ids=decoder)
        else:
            out = model(input_ids=torch.tensor([[*ids, *continuation]], device=device))
    return out.logits[0].float().cpu()


class HFModel:
    """A transformers model (PEFT or merged) as a verification candidate."""

    def __init__(self, model: Any, tokenizer: Any, task_type: str = "CAUSAL_LM"):
        from loralab.generation import stop_token_ids

        self.model, self.seq2seq = model, task_type == "SEQ_2_SEQ_LM"
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.decoder_start = getattr(model.config, "decoder_start_token_id", None)

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return greedy(self.model, ids, self.stop_ids, max_new_tokens, self.seq2seq, self.pad_id)

    def logits(self, ids: Sequence[int], continuation: Sequence[int]) -> torch.Tensor:
        return sequence_logits(self.model, ids, continuation, self.seq2seq, self.decoder_start)


def measure(candidate: Any, probes: Sequence[Probe], teacher: Outputs | None = None,
            max_new_tokens: int = MAX_NEW_TOKENS) -> Outputs:
    """Greedy continuations and teacher-forced logits (on ``teacher``'s continuations, else on its own)."""
    tokens = [candidate.greedy(p.ids, max_new_tokens) for p in probes]
    forced = teacher.tokens if teacher is not None else tokens
    return Outputs(tokens, [candidate.logits(p.ids, c) for p, c in zip(probes, forced)])


def compare(name: str, reference: Outputs, candidate: Outputs, *, reference_label: str, candidate_label: str,
            tolerance: float | None, decode: Callable[[list[int]], str] | None = None,
            probes: Sequence[Probe] = ()) -> Comparison:
    """Max |logit difference| over every probe position, and how many greedy answers are token for token equal.

    Logits compare over the vocabulary both have (a GGUF export cuts Gemma's unused embedding rows)."""
    def common(a: torch.Tensor, b: torch.Tensor) -> float:
        width = min(a.shape[-1], b.shape[-1])
        return float((a[..., :width] - b[..., :width]).abs().max())

    diff = max(common(a, b) for a, b in zip(reference.logits, candidate.logits))
    scale = max(1.0, max(float(a.abs().max()) for a in reference.logits))
    agree = sum(a == b for a, b in zip(reference.tokens, candidate.tokens))
    answers, ties = [], 0
    for i, (a, b) in enumerate(zip(reference.tokens, candidate.tokens)):
        if a == b:
            continue
        margin = None
        if probes and i < len(probes):
            margin = parting_margin(reference.logits[i], len(probes[i].ids), a, b)
            ties += margin is not None and margin <= 2 * diff
        if decode is not None:
            answers.append({"prompt": probes[i].prompt if probes and i < len(probes) else "",
                            reference_label: decode(a), candidate_label: decode(b), "top2_margin_where_they_part": margin})
    return Comparison(name, reference_label, candidate_label, diff, scale, agree, len(reference.tokens), tolerance,
                      answers, ties)


def parting_margin(logits: torch.Tensor, prompt_len: int, a: list[int], b: list[int]) -> float | None:
    """How far apart the reference's two best tokens are where two greedy answers first differ (a causal model's
    logits row ``prompt_len - 1 + k`` predicts answer token ``k``; a seq2seq decoder's row ``k``)."""
    k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    row = prompt_len - 1 + k if logits.shape[0] >= prompt_len + len(a) - 1 else k
    if row >= logits.shape[0]:
        return None
    top = torch.topk(logits[row], 2).values
    return float(top[0] - top[1])


def check_passed(comparisons: Sequence[Comparison], where: str, hint: str) -> None:
    """Fail with one clear message when a checked comparison is above its tolerance."""
    for c in comparisons:
        if c.passed is False:
            raise LoralabError(
                f"{where}: {c.candidate} differs from {c.reference} by up to {c.max_abs_logit_diff:.4g} in the logits "
                f"(tolerance {c.limit:.4g} = {c.tolerance:g} x the largest |logit| {c.logit_scale:.3g}; greedy answers "
                f"agree on {c.greedy_agree}/{c.n} prompts); nothing was written. {hint}")
