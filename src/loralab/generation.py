"""Answer prompts with a run's adapter or with its base model: batched, greedy by default, formatted as in training.

One base model stays in memory: base answers come from the same PEFT model with its adapter switched off.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loralab.config import RunConfig, check_remote_code, remote_code_allowed
from loralab.data import Example, chat_end_ids, encode_prompt, fit_prompt, format_prompt
from loralab.errors import LoralabError
from loralab.models import load_model, load_tokenizer, resolve_task_type
from loralab.runs import load_run_config, resolve_adapter

log = logging.getLogger(__name__)

GENERATIVE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
SAMPLING_ONLY = ("temperature", "top_k", "top_p")


@dataclass
class GenerationSettings:
    """How answers are decoded: greedy by default; sampling parameters only apply with ``do_sample``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int = 1
    batch_size: int = 8
    seed: int | None = None  # makes sampling reproducible

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be at least 1, got {self.num_beams}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.temperature is not None and self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature} (for deterministic answers leave --do-sample off)")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise LoralabError("invalid generation settings: " + "; ".join(problems))
        for message in self.warnings():
            log.warning(message)

    def warnings(self) -> list[str]:
        """Settings that would be silently ignored: sampling parameters without ``do_sample``."""
        if self.do_sample:
            return []
        ignored = [f"{name}={getattr(self, name)}" for name in SAMPLING_ONLY if getattr(self, name) is not None]
        if not ignored:
            return []
        decoding = "beam search" if self.num_beams > 1 else "greedy"
        return [f"{', '.join(ignored)} ignored: decoding is {decoding}; add --do-sample (do_sample=True) to sample"]

    def generate_kwargs(self) -> tuple[dict[str, Any], list[str]]:
        """Keyword arguments for ``model.generate`` / ``GenerationConfig.update``, and the warnings above.

        Greedy decoding clears the sampling parameters a model's own generation config may carry.
        """
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "num_beams": self.num_beams, "use_cache": True}
        for name in SAMPLING_ONLY:
            value = getattr(self, name)
            if not self.do_sample:
                kwargs[name] = None
            elif value is not None:
                kwargs[name] = value
        return kwargs, self.warnings()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# answers to the eval split during training and tuning: generation costs per decoding step more than per row, so
# batches of 32 answered 24 eval sentences 4x faster than batches of 4 (README "Tune"); a batch that runs out of
# memory is split
TRAINING_GENERATE_BATCH = 32
ANSWER_TOKENS_MAX = 256


def answer_token_budget(tokenizer: Any, references: Sequence[str]) -> int:
    """New tokens enough for the longest reference answer and half as many again (at least 16, at most 256): an answer
    much longer than every reference scores no better for running on, and a babbling model costs no more than that."""
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references if text]
    longest = max(lengths, default=0)
    return max(16, min(ANSWER_TOKENS_MAX, longest + longest // 2 + 8))


def training_generation_settings(config: RunConfig, tokenizer: Any, references: Sequence[str]) -> GenerationSettings:
    """Greedy decoding for generation metrics during training (and the tune's range test): ``train.eval_batch_size``
    prompts at a time if set, else at least ``TRAINING_GENERATE_BATCH``; new tokens fitted to the references."""
    batch = config.train.eval_batch_size or max(config.train.batch_size, TRAINING_GENERATE_BATCH)
    return GenerationSettings(batch_size=batch, max_new_tokens=answer_token_budget(tokenizer, references))


@dataclass
class LoadedRun:
    """A run's base model with its adapter attached (a PeftModel in eval mode), tokenizer and config."""

    config: RunConfig
    task_type: str
    tokenizer: Any
    model: Any
    adapter_path: Path | None = None
    run_dir: Path | None = None


def check_generative(task_type: str, run_dir: str | Path) -> str:
    """The task type, if it generates text; else a clear error."""
    if task_type not in GENERATIVE_TASKS:
        hint = ("; a classifier predicts labels: `loralab eval` and `loralab compare` show them (base head vs trained head)"
                if task_type in ("SEQ_CLS", "TOKEN_CLS") else "; an embedding run (FEATURE_EXTRACTION) is scored by retrieval: "
                "`loralab eval` and `loralab compare` rank its eval passages" if task_type == "FEATURE_EXTRACTION" else "")
        raise LoralabError(f"run {run_dir} is a {task_type} run; eval, compare and generate need a text-generation run "
                           f"({' or '.join(GENERATIVE_TASKS)}) to generate text{hint}")
    return task_type


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def load_run_model(run_dir: str | Path, checkpoint: str | int = "best", full_precision: bool = False,
                   allow_classifier: bool = False, trust_remote_code: bool = False) -> LoadedRun:
    """Load a run's base model once and attach its adapter (``best``, ``latest`` or a checkpoint step).

    ``full_precision`` loads a QLoRA run's base without 4-bit quantization (for merging). ``allow_classifier``
    also loads SEQ_CLS runs (their head sized and named by the run's labels); otherwise they are an error.
    A run whose config sets ``model.trust_remote_code`` loads only with ``trust_remote_code=True`` (or inside
    ``loralab.config.remote_code_allowed()``): the run folder alone cannot switch remote code on.
    """
    from loralab.new_tokens import with_new_tokens

    adapter_path = resolve_adapter(run_dir, str(checkpoint))
    if not (adapter_path / "adapter_config.json").is_file():
        raise LoralabError(f"{adapter_path} holds no adapter (no adapter_config.json)")
    config = load_run_config(run_dir)
    with remote_code_allowed(True) if trust_remote_code else contextlib.nullcontext():
        check_remote_code(config, f"run {run_dir}: its config.yaml")
    task_type = resolve_task_type(config)
    if not (allow_classifier and task_type in ("SEQ_CLS", "FEATURE_EXTRACTION", "QUESTION_ANSWERING", "TOKEN_CLS")):
        check_generative(task_type, run_dir)
    tokenizer = load_tokenizer(config.model, task_type)
    # LoftQ's adapter makes up for the 4-bit quantization error: its full-precision base is the dequantized 4-bit one
    loftq = full_precision and config.lora.init_lora_weights == "loftq"
    model_cfg = config.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False}) \
        if full_precision and not loftq else config.model
    if task_type == "SEQ_CLS":
        from loralab.classification import load_classifier_base

        base = load_classifier_base(run_dir, adapter_path, config, model_cfg, tokenizer)
    elif task_type == "QUESTION_ANSWERING":  # a new qa_outputs head seeded as training initialised it
        from loralab.tasks.qa import load_qa_base

        base = load_qa_base(model_cfg, config.train.seed)
    elif task_type == "TOKEN_CLS":  # a head per tag, named by them, seeded as training initialised it
        from loralab.tasks.token_cls import load_token_base

        base = load_token_base(run_dir, adapter_path, config, model_cfg)
    else:
        base = load_model(model_cfg, task_type)
    if loftq:
        base = base.dequantize()
    with_new_tokens(tokenizer, base, config.data.add_special_tokens)  # the run's new tokens, same ids, rows grown
    return attach_adapter(base, tokenizer, config, task_type, adapter_path, Path(run_dir))


def attach_adapter(base: Any, tokenizer: Any, config: RunConfig, task_type: str, adapter_path: Path,
                   run_dir: Path | None) -> "LoadedRun":
    """The base model with the adapter folder on it, in eval mode (on the GPU when there is one). A PiSSA / OLoRA
    checkpoint of a run is converted first; an unconverted one from elsewhere is refused."""
    from peft import PeftModel

    from loralab.lora_init import loadable_adapter

    if task_type == "CAUSAL_LM" and base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    try:
        with loadable_adapter(adapter_path, run_dir) as loadable:
            model = PeftModel.from_pretrained(base, str(loadable))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise LoralabError(f"cannot load the adapter {adapter_path} onto {config.model.name_or_path!r}: {exc}") from None
    if torch.cuda.is_available() and not config.model.quantized:
        model.to("cuda")
    model.eval()
    return LoadedRun(config, task_type, tokenizer, model, adapter_path, run_dir)


# ---------------------------------------------------------------- prompts


def as_example(item: Example | str) -> Example:
    return item if isinstance(item, Example) else Example(prompt=str(item), response="", row=0)


def prompt_token_ids(run: LoadedRun, item: Example | str) -> list[int]:
    """The prompt's token ids exactly as training built them (chat template or plain template; seq2seq: the prompt)."""
    example, cfg = as_example(item), run.config.data
    if run.task_type == "SEQ_2_SEQ_LM":
        ids = run.tokenizer(example.prompt)["input_ids"]
        return ids if len(ids) <= cfg.max_length else ids[: cfg.max_length - 1] + [ids[-1]]
    text = format_prompt(run.tokenizer, example, cfg, run.task_type)
    ids = encode_prompt(run.tokenizer, text, cfg)
    # as training: a long prompt keeps its special prefix and its end, and loses the middle of the user text
    return fit_prompt(run.tokenizer, example, cfg, ids, cfg.max_length, prompt_text=text)


# ---------------------------------------------------------------- generation


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids that end an answer: the tokenizer's EOS, the model's own EOS ids, and the token that ends an assistant turn
    in the tokenizer's chat template (what training supervises with the template: Gemma's ``<end_of_turn>``, Qwen's
    ``<|im_end|>`` whose EOS is ``<|endoftext|>``, Llama 3's ``<|eot_id|>``). That token also stops answers to plain
    prompts: it never belongs in an answer's text."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    ids.update(chat_end_ids(tokenizer)[-1:])
    return sorted(ids)


def generation_config(model: Any, tokenizer: Any, settings: GenerationSettings) -> Any:
    """The model's generation config with loralab's settings, padding and stop tokens applied (``eos_token_id`` is the
    list of ``stop_token_ids``: in a batch, each row stops at the first of them and is padded after it)."""
    config = copy.deepcopy(model.generation_config)
    kwargs, _ = settings.generate_kwargs()
    config.update(**kwargs, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(model, tokenizer))
    config.max_length = None  # max_new_tokens decides
    return config


def _pad(batch: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention[row, span] = 1
    return input_ids, attention


def decode_answer(tokenizer: Any, new_tokens: list[int], stop_ids: Sequence[int]) -> str:
    """The text of generated tokens up to the first EOS, without special tokens, stripped."""
    cut = next((i for i, token in enumerate(new_tokens) if token in stop_ids), len(new_tokens))
    return tokenizer.decode(new_tokens[:cut], skip_special_tokens=True).strip()


@contextlib.contextmanager
def inference(model: Any, use_adapter: bool = True) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients, the adapter switched off for base answers; the mode is restored after."""
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if not use_adapter and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with adapter_off, torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def progress_bar(enabled: bool, total: int, description: str) -> Any:
    """A rich progress bar on stderr (a no-op when disabled)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True, disable=not enabled)
    task = progress.add_task(description, total=total)
    return progress, task


ADAPTER_PARTS = ("lora_", "modules_to_save", "trainable_tokens")  # PEFT's names of an adapter's own weights


def base_model_key(run: LoadedRun) -> str:
    """What the base model's outputs depend on: how it is loaded, its task type and a sample of every base weight
    (so a base whose weights an adapter's init rewrote, e.g. PiSSA's residual, is another base)."""
    base = [p for name, p in run.model.named_parameters() if not any(part in name for part in ADAPTER_PARTS)]
    with torch.no_grad():
        sample = [round(float(p.detach().flatten()[:64].double().sum()), 6) for p in base]
    settings = [run.config.model.model_dump(mode="json"), run.task_type, sample]
    return hashlib.sha256(repr(settings).encode()).hexdigest()


# a sweep's runs share one base model, eval split and prompts: its greedy answers are made once per process
_BASE_ANSWERS: dict[str, list[str]] = {}
_BASE_ANSWERS_KEPT = 64


def _base_answers_key(run: LoadedRun, encoded: list[list[int]], settings: GenerationSettings) -> str | None:
    if settings.do_sample:  # sampled answers are not reproducible across calls: never reused
        return None
    key = [base_model_key(run), settings.to_dict(), encoded, sorted(stop_token_ids(run.model, run.tokenizer))]
    return hashlib.sha256(repr(key).encode()).hexdigest()


def generate_answers(source: LoadedRun | Any, items: Sequence[Example | str], settings: GenerationSettings | None = None, *,
                     tokenizer: Any = None, config: RunConfig | None = None, task_type: str | None = None,
                     use_adapter: bool = True, progress: bool = False, description: str | None = None) -> list[str]:
    """Answer each prompt (a string or an Example, formatted as in training), in the input order.

    ``source`` is a :class:`LoadedRun`, or a model with ``tokenizer``, ``config`` and ``task_type`` given.
    ``use_adapter=False`` answers with the base model (the PEFT adapter switched off).
    Prompts are sorted by length and batched (left padding for decoder-only models, KV cache on); a batch that runs
    out of memory is answered in halves.
    """
    if isinstance(source, LoadedRun):
        run = source
    else:
        if tokenizer is None or config is None:
            raise TypeError("generate_answers(model, ...) needs tokenizer= and config=")
        run = LoadedRun(config, task_type or "CAUSAL_LM", tokenizer, source)
    if run.task_type not in GENERATIVE_TASKS:
        raise LoralabError(f"cannot generate with a {run.task_type} model; need {' or '.join(GENERATIVE_TASKS)}")
    settings = settings or GenerationSettings()
    encoded = [prompt_token_ids(run, item) for item in items]
    reuse_key = None if use_adapter or not encoded else _base_answers_key(run, encoded, settings)
    if reuse_key in _BASE_ANSWERS:
        return list(_BASE_ANSWERS[reuse_key])
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    answers = [""] * len(encoded)
    model, tok = run.model, run.tokenizer
    encoder_decoder = run.task_type == "SEQ_2_SEQ_LM"
    gen_config = generation_config(model, tok, settings)
    stop_ids = stop_token_ids(model, tok)
    device = model_device(model)
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    bar, task = progress_bar(progress and bool(items), len(encoded), description or ("adapter" if use_adapter else "base"))

    def answer(batch: list[int]) -> None:
        input_ids, attention = _pad([encoded[i] for i in batch], tok.pad_token_id, left=not encoder_decoder)
        try:
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                    generation_config=gen_config)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = (len(batch) + 1) // 2
            log.warning("generating %d prompts at once ran out of memory; trying %d at a time", len(batch), half)
            answer(batch[:half])
            answer(batch[half:])
            return
        new_tokens = output[:, 1:] if encoder_decoder else output[:, input_ids.shape[1] :]  # drop decoder start / prompt
        for index, tokens in zip(batch, new_tokens.tolist()):
            answers[index] = decode_answer(tok, tokens, stop_ids)
        bar.update(task, advance=len(batch))

    with bar, inference(model, use_adapter):
        for start in range(0, len(order), settings.batch_size):
            answer(order[start : start + settings.batch_size])
    if reuse_key is not None:
        if len(_BASE_ANSWERS) >= _BASE_ANSWERS_KEPT:
            _BASE_ANSWERS.pop(next(iter(_BASE_ANSWERS)))
        _BASE_ANSWERS[reuse_key] = list(answers)
    return answers


def chat_reply(run: LoadedRun, history: list[dict[str, str]], text: str, settings: GenerationSettings | None = None,
               use_adapter: bool = True) -> str:
    """Answer one chat turn and append it to ``history``; the oldest turns are dropped when the prompt gets too long.

    Decoder-only models see the whole conversation (through the chat template, as in training); seq2seq models
    see only the last message.
    """
    tok, cfg = run.tokenizer, run.config.data

    def example() -> Example:
        return Example(prompt=text, response="", row=0, messages=[*history, {"role": "user", "content": text}])

    if run.task_type == "CAUSAL_LM":
        while history and len(encode_prompt(tok, format_prompt(tok, example(), cfg, run.task_type), cfg)) > cfg.max_length:
            del history[:2]  # one user turn and its answer
    answer = generate_answers(run, [example()], settings, use_adapter=use_adapter)[0]
    history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
    return answer
