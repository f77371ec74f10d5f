"""Checks that need no model weights: tokenizer, data hygiene, lengths, label masks, hyperparameters."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Iterator

import torch

from loralab.checks.report import CheckResult, Status, verdict
from loralab.data import (IGNORE_INDEX, Example, TokenizedExample, chat_end_ids, format_prompt, target_end_id, tokenize,
                          uses_chat_template)

LR_RANGE = (1e-5, 1e-3)
SCALING_RANGE = (0.5, 32.0)  # LoRA scaling (alpha/r, rsLoRA alpha/sqrt(r)) that users' guidance allows: alpha from
# r/2 up to 32·r (r 4 with alpha 32 is 8; alpha 2r is 2); rsLoRA's alpha/sqrt(r) in the same range (alpha 16..64 at r 4..256)
MAX_BATCHES = 256  # label masks are checked on at most this many collated batches


# ---------------------------------------------------------------- helpers


def rows_text(rows: list[Any], limit: int = 5) -> str:
    """``12, 40, 41`` or ``12, 40, 41, ... (+7 more)``."""
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... (+{len(rows) - limit} more)" if len(rows) > limit else "")


def stats(values: list[int]) -> dict[str, float]:
    """min / median / p95 / max (nearest rank)."""
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"min": ordered[0], "median": rank(0.5), "p95": rank(0.95), "max": ordered[-1]}


def stats_text(s: dict[str, float]) -> str:
    return f"{s['min']}/{s['median']}/{s['p95']}/{s['max']}"


def splits(session: Any) -> Iterator[tuple[str, list[Example], list[TokenizedExample]]]:
    """("train" | "eval", examples, tokenized) for each split present."""
    data = session.data
    yield "train", data.train_examples, data.train.tokenized
    if data.eval is not None:
        yield "eval", data.eval_examples, data.eval.tokenized


def where(split: str, example: Example) -> str:
    """An example's row number in its file, ``eval N`` for the eval split."""
    return str(example.row) if split == "train" else f"eval {example.row}"


def row_list(rows: list[str], limit: int = 5) -> str:
    """Row numbers in file order (train first, then eval), shortened."""
    return rows_text(sorted(rows, key=lambda r: (r.startswith("eval"), int(r.split()[-1]))), limit)


def supervised(labels: list[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)


# ---------------------------------------------------------------- tokenizer


def _left_padding_problem(session: Any) -> str | None:
    """None when a left-padded batch of two prompts ends with real tokens in every row (what generation needs)."""
    tokenizer, cfg = session.tokenizer, session.config.data
    example = session.data.train_examples[0]
    prompt = format_prompt(tokenizer, example, cfg, session.task_type)
    chat = uses_chat_template(tokenizer, cfg)
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "left"
        batch = tokenizer([prompt, prompt + prompt], padding=True, add_special_tokens=not chat, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    mask = batch["attention_mask"]
    if int(mask[:, -1].min()) == 1 and int(mask[0, 0]) == 0:
        return None
    return "with padding_side='left' this tokenizer still pads on the right: batched generation would continue from padding"


def check_tokenizer(session: Any) -> CheckResult:
    """Pad and EOS tokens exist; training pads right, generation can pad left; BOS not doubled; few unknown tokens."""
    tok, task = session.tokenizer, session.task_type
    problems: list[tuple[Status, str]] = []
    chat = uses_chat_template(tok, session.config.data)
    details: dict[str, Any] = {"pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id, "eos_token": tok.eos_token,
                               "eos_token_id": tok.eos_token_id, "bos_token": tok.bos_token,
                               "padding_side_training": tok.padding_side, "chat_template": chat}
    if tok.pad_token_id is None:
        problems.append(("fail", "the tokenizer has no pad token: batches cannot be padded"))
    if task != "SEQ_CLS" and tok.eos_token_id is None:
        problems.append(("fail", "the tokenizer has no EOS token: the model cannot learn where an answer ends"))
    if task == "CAUSAL_LM" and tok.pad_token_id is not None:
        if tok.padding_side != "right":
            problems.append(("warn", f"training pads on the {tok.padding_side}; right padding keeps positions 0.. for every example"))
        generation = _left_padding_problem(session)
        details["padding_side_generation"] = "left" if generation is None else "broken"
        if generation:
            problems.append(("fail", generation))
    inputs = [t.input_ids for _, _, tokenized in splits(session) for t in tokenized]
    n_tokens = sum(len(ids) for ids in inputs) or 1
    if tok.unk_token_id is not None and tok.unk_token_id != tok.pad_token_id:
        unknown = sum(ids.count(tok.unk_token_id) for ids in inputs)
        details["unknown_tokens"] = unknown
        if unknown / n_tokens > 0.001:
            problems.append(("warn", f"{unknown} unknown tokens ({100 * unknown / n_tokens:.1f}% of all): "
                                     "the tokenizer cannot represent some of the text"))
    if tok.bos_token_id is not None:
        doubled = sum(1 for ids in inputs if ids[:2] == [tok.bos_token_id] * 2)
        details["doubled_bos"] = doubled
        if doubled:
            problems.append(("warn", f"{doubled} examples start with BOS twice (template + tokenizer both add it)"))
    pad = f"pad {tok.pad_token!r}" + (" (= EOS; its supervision is checked in label_masking)"
                                       if task == "CAUSAL_LM" and tok.pad_token_id == tok.eos_token_id else "")
    sides = f"training pads {tok.padding_side}" + (", generation pads left" if task == "CAUSAL_LM" else "")
    template = "chat template applied" if chat else ("plain prompt template" if task == "CAUSAL_LM" else "")
    ok = ", ".join(p for p in (pad, sides, template) if p)
    return verdict("tokenizer", problems, ok, details)


# ---------------------------------------------------------------- data hygiene


def _key(example: Example) -> tuple:
    return (tuple((m["role"], m["content"]) for m in example.messages), example.prompt, example.response)


def check_hygiene(session: Any) -> CheckResult:
    """Empty or whitespace-only fields, exact duplicates, examples shared between train and eval."""
    problems: list[tuple[Status, str]] = []
    empty_response, empty_prompt = [], []
    answer = "label" if session.task_type == "SEQ_CLS" else "response"
    for split, examples, _ in splits(session):
        for example in examples:
            if not example.response.strip():
                empty_response.append(where(split, example))
            if getattr(example, "raw_text", False):
                continue  # raw text: the whole document is the "response", there is no prompt
            if not example.prompt.strip() or any(not str(m["content"]).strip() for m in example.messages):
                empty_prompt.append(where(split, example))
    if empty_response:
        problems.append(("fail", f"empty or whitespace-only {answer} in {len(empty_response)} examples "
                                 f"(rows {row_list(empty_response)}): nothing to learn there"))
    if empty_prompt:
        problems.append(("warn", f"empty or whitespace-only prompt/message in {len(empty_prompt)} examples (rows {row_list(empty_prompt)})"))
    seen: dict[tuple, list[int]] = defaultdict(list)
    for example in session.data.train_examples:
        seen[_key(example)].append(example.row)
    duplicates = [rows for rows in seen.values() if len(rows) > 1]
    n_duplicates = sum(len(rows) - 1 for rows in duplicates)
    if duplicates:
        problems.append(("warn", f"{n_duplicates} exact duplicates in train (rows {rows_text(['='.join(map(str, r)) for r in duplicates], 3)})"))
    shared = [e.row for e in session.data.eval_examples if _key(e) in seen]
    if shared:
        problems.append(("warn", f"{len(shared)} eval examples also in train (eval rows {rows_text(shared)}): "
                                 "eval loss will look better than it is"))
    held = seen.keys() | {_key(e) for e in session.data.eval_examples}
    test_shared = [e.row for e in getattr(session.data, "test_examples", ()) if _key(e) in held]
    if test_shared:
        problems.append(("warn", f"{len(test_shared)} test examples also in train or eval (test rows "
                                 f"{rows_text(test_shared)}): the test split no longer measures unseen data"))
    details = {"empty_response": empty_response, "empty_prompt": empty_prompt, "duplicates": duplicates,
               "train_eval_shared": shared, "test_shared": test_shared}
    n = len(session.data.train_examples) + len(session.data.eval_examples)
    return verdict("data_hygiene", problems, f"{n} examples: no empty fields, no duplicates, no overlap between the splits", details)


# ---------------------------------------------------------------- lengths


def _full_prompt_length(session: Any, example: Example, tokenized: TokenizedExample) -> int:
    """The prompt's length before truncation (re-tokenized, only for truncated examples)."""
    if not tokenized.truncated:
        return tokenized.prompt_length
    unlimited = session.config.data.model_copy(update={"max_length": 10**9})
    return tokenize(session.tokenizer, example, unlimited, session.task_type, session.data.label_ids).prompt_length


def check_lengths(session: Any) -> CheckResult:
    """Prompt and response token lengths, truncation, and whether truncation cut the responses."""
    max_length = session.config.data.max_length
    prompts, responses, totals, cut_rows, truncated_rows = [], [], [], [], []
    for split, examples, tokenized in splits(session):
        for example, t in zip(examples, tokenized):
            prompt = _full_prompt_length(session, example, t)
            prompts.append(prompt)
            responses.append(t.response_length)
            totals.append(prompt + t.response_length if session.task_type == "CAUSAL_LM" else max(prompt, t.response_length))
            if t.truncated:
                truncated_rows.append(where(split, example))
            if t.response_truncated:
                cut_rows.append(where(split, example))
    n = len(prompts)
    details: dict[str, Any] = {"max_length": max_length, "prompt_tokens": stats(prompts), "response_tokens": stats(responses),
                               "total_tokens": stats(totals), "examples": n, "truncated_examples": len(truncated_rows),
                               "truncated_responses": len(cut_rows), "rows_with_cut_responses": cut_rows[:20]}
    need = stats(totals)["max"]
    details["max_length_needed"] = need
    problems: list[tuple[Status, str]] = []
    if cut_rows:
        status: Status = "fail" if len(cut_rows) > n / 2 else "warn"
        problems.append((status, f"{len(cut_rows)} of {n} responses cut by data.max_length={max_length} "
                                 f"(rows {row_list(cut_rows)}); the longest example needs {need} tokens"))
    elif truncated_rows:
        problems.append(("warn", f"{len(truncated_rows)} of {n} prompts cut by data.max_length={max_length} "
                                 f"(the middle of the user text is cut; BOS, system turn and the end stay); the longest example needs {need} tokens"))
    if session.task_type == "SEQ_CLS":
        ok = f"input tokens min/median/p95/max {stats_text(stats(prompts))}; none truncated (max_length {max_length})"
    else:
        ok = (f"prompt {stats_text(stats(prompts))}, response {stats_text(stats(responses))} tokens (min/median/p95/max); "
              f"none truncated (max_length {max_length})")
    return verdict("lengths", problems, ok, details)


# ---------------------------------------------------------------- label masking


def _end_token(session: Any) -> tuple[int | None, str]:
    """The token a complete target ends with and its name: for causal LMs the chat template's end of an assistant turn
    when the data uses the template (``'<end_of_turn>'``), else EOS."""
    tok = session.tokenizer
    end = target_end_id(tok, session.config.data) if session.task_type == "CAUSAL_LM" else tok.eos_token_id
    return end, ("EOS" if end == tok.eos_token_id else repr(tok.convert_ids_to_tokens(end)))


def _tokenized_label_problems(session: Any) -> tuple[list[tuple[Status, str]], dict[str, list[str]]]:
    """Label masks of every tokenized example, compared token by token with its input ids."""
    task, (eos, eos_name) = session.task_type, _end_token(session)
    train_on_prompt = session.config.data.train_on_prompt
    # earlier answers of a conversation end with the template's end-of-turn token too (a template without one: nothing)
    turn_end = eos if task == "CAUSAL_LM" and uses_chat_template(session.tokenizer, session.config.data) \
        and chat_end_ids(session.tokenizer) else None
    found: dict[str, list[str]] = defaultdict(list)
    for split, examples, tokenized in splits(session):
        for example, t in zip(examples, tokenized):
            here = where(split, example)
            labels, ids = t.labels, t.input_ids
            if task == "SEQ_CLS":
                if not labels or labels[0] == IGNORE_INDEX:
                    found["no_supervised"].append(here)
                continue
            if supervised(labels) == 0:
                found["no_supervised"].append(here)
            if task == "CAUSAL_LM":
                if len(labels) != len(ids):
                    found["misaligned"].append(here)
                    continue
                turns = t.turns or [(t.prompt_length, len(labels))]  # each supervised answer: [start, end)
                answer = [False] * len(labels)
                for start, end in turns:
                    answer[start:end] = [True] * (end - start)
                if not train_on_prompt and any(l != IGNORE_INDEX and not a for l, a in zip(labels, answer)):
                    found["prompt_supervised"].append(here)
                if any(l != IGNORE_INDEX and l != i for l, i in zip(labels, ids)):
                    found["misaligned"].append(here)
                if any(l == IGNORE_INDEX for start, end in turns for l in labels[start : end - 1]) or \
                        any(labels[end - 1] == IGNORE_INDEX for _, end in turns[:-1]):
                    found["response_masked"].append(here)
                if turn_end is not None and any(labels[end - 1] != turn_end for _, end in turns[:-1]):
                    found["eos"].append(here)
                if t.last_turn_only and session.config.data.train_on == "all_turns":
                    found["last_turn_only"].append(here)
            elif any(l == IGNORE_INDEX for l in labels):
                found["response_masked"].append(here)
            end_id = session.tokenizer.eos_token_id if example.raw_text else eos  # raw text ends with EOS
            if end_id is not None and not t.response_truncated and (not labels or labels[-1] != end_id):
                found["eos"].append(here)
    messages = {
        "no_supervised": ("fail", "no supervised token in {n} examples (rows {rows}): they teach nothing"),
        "prompt_supervised": ("fail", "prompt tokens supervised in {n} examples (rows {rows}) although data.train_on_prompt is false"),
        "misaligned": ("fail", "labels differ from the input tokens at supervised positions in {n} examples (rows {rows}): "
                               "labels must not be shifted (the model shifts them)"),
        "response_masked": ("fail", "response tokens masked (-100) in {n} examples (rows {rows})"),
        "eos": ("fail", f"the target's {eos_name} is masked or missing in {{n}} examples (rows {{rows}}): "
                        "the model will not learn to stop"),
        "last_turn_only": ("warn", "only the last answer is supervised in {n} conversations with earlier answers (rows "
                                   "{rows}) although data.train_on is all_turns: the chat template's turns could not be "
                                   "located token by token, or there is no chat template (set data.template)"),
    }
    problems = [(status, text.format(n=len(found[key]), rows=row_list(found[key])))
                for key, (status, text) in messages.items() if found.get(key)]
    return problems, dict(found)


def _batches(session: Any) -> Iterator[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """(features, collated batch) in DataLoader order (sequential sampler), through the session's real collator."""
    dataset, size = session.data.train, session.config.train.batch_size
    for n, start in enumerate(range(0, len(dataset), size)):
        if n >= MAX_BATCHES:
            return
        features = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
        yield features, session.collator(features)


def _batch_label_problems(session: Any) -> tuple[list[tuple[Status, str]], dict[str, int]]:
    """Collated labels against the features the collator got: padding -100, EOS kept, no cross-example targets."""
    eos, eos_name = _end_token(session)
    counts = Counter()
    for features, batch in _batches(session):
        labels = batch["labels"]
        counts["batches"] += 1
        if session.task_type == "SEQ_CLS":
            counts["class_mismatch"] += int(labels.tolist() != [f["labels"] for f in features])
            continue
        on = labels != IGNORE_INDEX
        expected = sum(supervised(f["labels"]) for f in features)
        expected_eos = sum(f["labels"].count(eos) for f in features) if eos is not None else 0
        got_eos = int((on & (labels == eos)).sum()) if eos is not None else 0
        counts["supervised"] += int(on.sum())
        counts["extra"] += max(0, int(on.sum()) - expected)
        counts["eos_expected"] += expected_eos
        counts["eos_lost"] += max(0, expected_eos - got_eos)
        mask = batch.get("attention_mask")
        if mask is not None and mask.shape == labels.shape:
            counts["padding_supervised"] += int((on & (mask == 0)).sum())
        positions = batch.get("position_ids")
        if positions is not None and positions.shape == labels.shape:
            starts = positions[:, 1:] == 0
            counts["packed_rows"] += int(starts.any(dim=1).sum())
            counts["boundary_supervised"] += int((on[:, 1:] & starts).sum())
    problems: list[tuple[Status, str]] = []
    if counts["padding_supervised"]:
        problems.append(("fail", f"{counts['padding_supervised']} padding positions are supervised (labels should be -100 "
                                 "where attention_mask is 0): the loss trains the model to emit padding"))
    elif counts["extra"]:
        problems.append(("fail", f"the collator supervises {counts['extra']} positions that tokenization masked "
                                 "(padding labels not -100?)"))
    if counts["eos_lost"]:
        problems.append(("fail", f"the collator masked {counts['eos_lost']} of {counts['eos_expected']} target {eos_name} tokens "
                                 f"(pad token == {eos_name}?): the model will not learn to stop"))
    if counts["boundary_supervised"]:
        problems.append(("fail", f"{counts['boundary_supervised']} packed examples have their first token supervised: "
                                 "the loss predicts across example boundaries"))
    if counts["class_mismatch"]:
        problems.append(("fail", f"collated class labels differ from the dataset's in {counts['class_mismatch']} batches"))
    return problems, dict(counts)


def check_label_masking(session: Any) -> CheckResult:
    """Prompt and padding positions are -100, every example supervises something, the target's EOS stays supervised."""
    problems, rows = _tokenized_label_problems(session)
    details: dict[str, Any] = {"rows": rows, "train_on_prompt": session.config.data.train_on_prompt,
                               "supervised_tokens_train": session.data.supervised_tokens()}
    if session.collator is not None:
        batch_problems, counts = _batch_label_problems(session)
        problems += batch_problems
        details["batches"] = counts
    n = len(session.data.train) + len(session.data.eval or [])
    if session.task_type == "SEQ_CLS":
        classes = Counter(t.labels[0] for t in session.data.train.tokenized)
        details["classes"] = dict(classes)
        if len(classes) < 2:
            problems.append(("fail", f"the train split has a single class ({next(iter(classes), None)}): nothing to tell apart"))
        ok = f"one label per example, {len(classes)} classes in train ({', '.join(f'{k}: {v}' for k, v in sorted(classes.items()))})"
        return verdict("label_masking", problems, ok, details)
    masked = "prompt masked (-100), " if session.task_type == "CAUSAL_LM" and not session.config.data.train_on_prompt else ""
    checked = f", padding -100 in {details['batches']['batches']} collated batches" if "batches" in details else ""
    tokenized = [t for _, _, part in splits(session) for t in part]
    several = sum(len(t.turns) > 1 for t in tokenized)
    details["conversations_with_several_supervised_turns"] = several
    turns = f" (every assistant turn: {several} conversations supervise {sum(len(t.turns) for t in tokenized if len(t.turns) > 1)} answers)" if several else ""
    ok = (f"{n} examples: {masked}response + {_end_token(session)[1]} supervised{turns}{checked}; "
          f"{details['supervised_tokens_train']:,} supervised train tokens")
    return verdict("label_masking", problems, ok, details)


# ---------------------------------------------------------------- hyperparameters


def optimizer_steps(session: Any) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) as the Trainer counts them."""
    train = session.config.train
    per_epoch = max(1, math.ceil(len(session.data.train) / (train.batch_size * train.gradient_accumulation)))
    total = train.max_steps or max(1, math.ceil(per_epoch * train.epochs))
    return per_epoch, total


def check_hyperparameters(session: Any) -> CheckResult:
    """Learning rate, alpha/r scaling, dropout for the dataset size, step counts, precision for the hardware."""
    from loralab.precision import FP16_OVERFLOW_TYPES, cpu_supports_bf16, model_type_of, resolve_precision

    cfg = session.config
    lora, train = cfg.lora, cfg.train
    per_epoch, total = optimizer_steps(session)
    scaling = lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    n_train = len(session.data.train)
    model_type = model_type_of(session.model)
    precision = resolve_precision(train.precision, model_type)
    details = {"learning_rate": train.learning_rate, "r": lora.r, "alpha": lora.alpha, "scaling": round(scaling, 4),
               "dropout": lora.dropout, "n_train": n_train, "steps_per_epoch": per_epoch, "total_steps": total,
               "effective_batch": train.batch_size * train.gradient_accumulation, "precision": precision}
    problems: list[tuple[Status, str]] = []
    low, high = LR_RANGE
    if not low <= train.learning_rate <= high:
        problems.append(("warn", f"train.learning_rate {train.learning_rate:g} is outside the usual LoRA range {low:g} .. {high:g}"))
    if not SCALING_RANGE[0] <= scaling <= SCALING_RANGE[1]:
        low_s, high_s = SCALING_RANGE
        rule = (f"rsLoRA rule: the effective scale alpha/sqrt(r) within {low_s:g} .. {high_s:g} (e.g. alpha 16..64 at "
                "r 4..256)" if lora.use_rslora else
                f"rule: alpha from r/2 to 32·r, i.e. alpha/r within {low_s:g} .. {high_s:g} (e.g. alpha 2r, or r 4 with alpha 32)")
        formula = "alpha/sqrt(r)" if lora.use_rslora else "alpha/r"
        problems.append(("warn", f"LoRA scaling {formula} = {scaling:g} (alpha {lora.alpha:g}, r {lora.r}) is outside "
                                 f"the usual guidance ({rule})"))
    if lora.dropout > 0.2:
        problems.append(("warn", f"lora.dropout {lora.dropout:g} is high (usual 0 .. 0.1): learning slows down"))
    elif lora.dropout == 0 and n_train < 200 and train.epochs > 3 and not train.max_steps:
        problems.append(("warn", f"{n_train} train examples for {train.epochs:g} epochs with lora.dropout 0: "
                                 "likely to overfit; try lora.dropout=0.05 or fewer epochs"))
    if total < 10:
        problems.append(("warn", f"only {total} optimizer steps in the whole run"))
    warmup = train.warmup * total if train.warmup < 1 else train.warmup
    if warmup >= total:
        problems.append(("warn", f"warmup ({warmup:g} steps) covers the whole run ({total} steps): the learning rate never peaks"))
    if train.batch_size * train.gradient_accumulation > n_train:
        problems.append(("warn", f"effective batch {train.batch_size * train.gradient_accumulation} exceeds the {n_train} train examples"))
    if precision == "fp16" and model_type in FP16_OVERFLOW_TYPES:
        problems.append(("warn", f"train.precision fp16 on a {model_type} model: the T5 family overflows in fp16 "
                                 "(NaN losses); use bf16 where the GPU has it, else fp32 (auto picks that)"))
    if precision == "fp16" and not torch.cuda.is_available():
        problems.append(("fail", "train.precision fp16 needs a CUDA GPU; use bf16 or fp32 (or auto) on CPU"))
    if precision == "bf16" and not torch.cuda.is_available() and not cpu_supports_bf16():
        problems.append(("warn", "train.precision bf16 on a CPU without native bf16: emulated and slow; fp32 is faster here"))
    ok = (f"learning rate {train.learning_rate:g}, r {lora.r}, alpha {lora.alpha:g} (scaling {scaling:g}), dropout {lora.dropout:g}, "
          f"{total} steps ({per_epoch}/epoch), {precision}")
    return verdict("hyperparameters", problems, ok, details)
