"""Measure what an adapter changed: base vs adapter answers on the eval split, scored against the references.

``evaluate_run`` writes ``RUN_DIR/eval.json`` (corpus scores) and ``RUN_DIR/predictions.jsonl`` (one line per
example); ``GenerationMetricsCallback`` puts the same metrics into ``metrics.jsonl`` during training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from loralab.config import DataConfig, RunConfig
from loralab.data import Example, detect_format, load_all_splits, load_examples, parse_rows, read_rows
from loralab.errors import DataError, LoralabError
from loralab.generation import (
    GenerationSettings,
    LoadedRun,
    check_generative,
    generate_answers,
    load_run_model,
    model_device,
    training_generation_settings,
)
from loralab.metrics import METRIC_NAMES, score_corpus, score_pair
from loralab.models import resolve_task_type
from loralab.fingerprints import verify_data, verify_split
from loralab.formats import SHAREGPT_ROLES
from loralab.readers import SUFFIXES
from loralab.runs import RunPaths, load_run_config, resolve_adapter, write_json_atomic, write_text_atomic
from loralab.turns import each_answer, first_answers


# ---------------------------------------------------------------- which examples


def has_reference(record: Any, cfg: DataConfig, fmt: str) -> bool:
    """Whether a raw row carries a reference answer for its format."""
    if not isinstance(record, dict):
        return True  # let parse_rows report the bad row
    if fmt in ("messages", "sharegpt"):
        field, role = (cfg.conversations_field, "from") if fmt == "sharegpt" else (cfg.messages_field, "role")
        turns = record.get(field)
        return bool(isinstance(turns, list) and turns and isinstance(turns[-1], dict)
                    and SHAREGPT_ROLES.get(turns[-1].get(role)) == "assistant")
    return ("output" if fmt == "alpaca" else cfg.response_field) in record


def _without_reference(record: dict, cfg: DataConfig, fmt: str) -> dict:
    """The row with an empty reference, so that the prompt is parsed and validated exactly as in training."""
    if fmt in ("messages", "sharegpt"):
        field = cfg.conversations_field if fmt == "sharegpt" else cfg.messages_field
        turn = {"from": "gpt", "value": ""} if fmt == "sharegpt" else {"role": "assistant", "content": ""}
        turns = record.get(field)
        return {**record, field: [*turns, turn]} if isinstance(turns, list) else record
    return {**record, ("output" if fmt == "alpaca" else cfg.response_field): ""}


def load_prompts_file(path: str | Path, cfg: DataConfig, task_type: str) -> tuple[list[Example], bool]:
    """All rows of a data file and whether they carry reference answers.

    A file where no row has a reference (e.g. only ``instruction``) gives prompts to answer; a file where some rows
    have one and others not is an error naming the first row without.
    """
    rows = read_rows(path)
    if not rows:
        raise DataError(f"data file {path}: no examples found (the dataset is empty)")
    fmt = detect_format(rows, cfg)
    if any(has_reference(record, cfg, fmt) for _, record in rows):
        return parse_rows(rows, cfg, str(path), task_type), True
    filled = [(row, _without_reference(record, cfg, fmt) if isinstance(record, dict) else record) for row, record in rows]
    return parse_rows(filled, cfg, str(path), task_type), False


DATA_SUFFIXES = SUFFIXES  # data files; anything else is one prompt per line


def read_prompts(path: str | Path, cfg: DataConfig, task_type: str) -> list[Example]:
    """Prompts from a file: a JSON / JSONL / CSV data file (references optional), else one prompt per non-empty line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"prompts file not found: {path}")
    if path.is_dir() or path.suffix.lower() in DATA_SUFFIXES:
        return load_prompts_file(path, cfg, task_type)[0]
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise DataError(f"prompts file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [Example(prompt=line, response="", row=i) for i, line in enumerate(lines, start=1) if line]
    if not prompts:
        raise DataError(f"prompts file {path}: no prompts found (expected one prompt per line)")
    return prompts


SPLITS = ("eval", "test")


def eval_examples(config: RunConfig, task_type: str, run_dir: str | Path, split: str = "eval") -> Sequence[Example]:
    """The eval split training used (``data.eval_path``, or the same seeded split of ``data.path``), or with
    ``split="test"`` the test split it held out (``data.test_path``, or ``data.test_split`` of ``data.path``).

    Refused when the files the split is rebuilt from changed since training, or the rebuilt rows differ from the
    ones recorded in the run's data.json."""
    if split not in SPLITS:
        raise LoralabError(f"--split must be eval or test, got {split!r}")
    cfg = config.data
    own, share = (cfg.eval_path, cfg.eval_split) if split == "eval" else (cfg.test_path, cfg.test_split)
    if not own and share == 0:
        hint = ("train with data.test_split (e.g. 0.1) or data.test_path to hold one out" if split == "test"
                else "pass --data FILE")
        raise LoralabError(f"run {run_dir} has no {split} split (data.{split}_split=0 and no data.{split}_path); {hint}")
    for source in (own, cfg.path if not own else None):  # files only: data.sources and hub: ids say it when read
        if source and not source.startswith("hub:") and not Path(source).exists():
            raise LoralabError(f"run {run_dir}: its data file {source} is not found from here; pass --data FILE")
    record = RunPaths(Path(run_dir)).data_fingerprint
    verify_data(record, cfg, f"rebuild the {split} split of run {run_dir}", split=split)
    if own:
        return load_examples(cfg, task_type, own)
    held_out = getattr(load_all_splits(cfg, task_type), split)
    verify_split(record, held_out, split)
    return held_out


def test_examples(config: RunConfig, task_type: str, run_dir: str | Path) -> Sequence[Example]:
    """The test split a run held out from training, checkpoint choice, early stopping and searches."""
    return eval_examples(config, task_type, run_dir, split="test")


test_examples.__test__ = False  # not a pytest test where a test module imports it


# ---------------------------------------------------------------- scoring


def generation_metrics(model: Any, tokenizer: Any, config: RunConfig, task_type: str, examples: Sequence[Example],
                       settings: GenerationSettings | None = None) -> dict[str, float]:
    """Corpus scores of the model's answers, keyed ``eval_exact_match``, ``eval_rouge_l``, ``eval_chrf``, ``eval_bleu``."""
    answers = generate_answers(model, examples, settings, tokenizer=tokenizer, config=config, task_type=task_type)
    scores = score_corpus(answers, [e.response for e in examples])
    return {f"eval_{name}": scores[name] for name in METRIC_NAMES}


def prediction_rows(examples: Sequence[Example], base: list[str], adapter: list[str], with_references: bool) -> list[dict]:
    """The lines of predictions.jsonl: prompt, reference, both answers and, with references, per-example scores."""
    rows = []
    for example, base_answer, adapter_answer in zip(examples, base, adapter):
        row: dict[str, Any] = {"row": example.row, "prompt": example.prompt,
                               "reference": example.response if with_references else None,
                               "base": base_answer, "adapter": adapter_answer}
        if example.messages:
            row["messages"] = example.messages
        if example.turn is not None:
            row["turn"] = example.turn
        if with_references:
            row["base_scores"] = score_pair(base_answer, example.response)
            row["adapter_scores"] = score_pair(adapter_answer, example.response)
        rows.append(row)
    return rows


def evaluate_run(run_dir: str | Path, data_path: str | Path | None = None, limit: int | None = None,
                 checkpoint: str | int = "best", settings: GenerationSettings | None = None,
                 progress: bool = True, loaded: LoadedRun | None = None, split: str = "eval",
                 general_text: str | Path | bool = True) -> dict[str, Any]:
    """Answer the eval split (``split="test"``: the held-out test split; or every row of ``data_path``) with the
    base model and the adapter, and score both; ``general_text`` adds the perplexity change on a general-text sample
    (True: the bundled one, a path: that file, False: not measured; ``loralab.forgetting``) as ``general_text``.

    Writes ``eval.json`` (``{"base": {exact_match, rouge_l, chrf, bleu, n}, "adapter": {...}, "split", ...}``) and
    ``predictions.jsonl`` (the test split: ``eval_test.json`` and ``predictions_test.jsonl``); a data file without
    reference answers gives answers only (no scores, no eval.json).
    Returns eval.json's content with ``references`` (bool) and ``predictions`` (the rows of predictions.jsonl).
    ``loaded``: a run already in memory (then ``checkpoint`` is not used).
    A SEQ_CLS run is scored by its predicted labels instead (``loralab.classification.evaluate_classifier``).
    """
    from loralab.classification import evaluate_classifier, run_task_type

    check_split_choice(split, data_path)
    task = run_task_type(run_dir, loaded)  # reads the run's config (and perhaps the model's and a data row): once
    if task == "SEQ_CLS":
        return evaluate_classifier(run_dir, data_path, limit, checkpoint, (settings or GenerationSettings()).batch_size,
                                   progress, loaded, split=split)
    if task == "TOKEN_CLS":  # tags per word, entity F1: loralab.tasks.token_eval
        from loralab.tasks.token_eval import evaluate_token_classifier

        return evaluate_token_classifier(run_dir, data_path, limit, checkpoint,
                                         (settings or GenerationSettings()).batch_size, progress, loaded, split=split)
    if task == "QUESTION_ANSWERING":  # spans, SQuAD EM / F1: loralab.tasks.qa_eval
        from loralab.tasks.qa_eval import evaluate_qa

        return evaluate_qa(run_dir, data_path, limit, checkpoint, (settings or GenerationSettings()).batch_size,
                           progress, loaded, split=split)
    if task == "FEATURE_EXTRACTION":  # retrieval: loralab.tasks.retrieval
        from loralab.tasks.retrieval import evaluate_embeddings

        return evaluate_embeddings(run_dir, data_path, limit, checkpoint, progress=progress, loaded=loaded, split=split)
    if limit is not None and limit < 1:
        raise LoralabError(f"--limit must be at least 1, got {limit}")
    settings = settings or GenerationSettings()
    if not isinstance(general_text, bool):  # a bad general-text file fails before any weights load
        from loralab.forgetting import read_general_text

        read_general_text(general_text)
    if loaded is None:  # fail on a bad run, checkpoint or data file before loading any weights
        resolve_adapter(run_dir, str(checkpoint))
        config = load_run_config(run_dir)
        task_type = check_generative(resolve_task_type(config), run_dir)
    else:
        config, task_type = loaded.config, loaded.task_type
    if data_path is not None:
        examples, with_references = load_prompts_file(data_path, config.data, task_type)
    else:
        examples, with_references = eval_examples(config, task_type, run_dir, split), True
    conversations = 0
    if with_references:  # a conversation: each assistant turn scored, given the history before it
        examples, conversations = each_answer(examples)
    examples = examples[:limit] if limit else examples
    run = loaded or load_run_model(run_dir, checkpoint)
    paths = RunPaths(Path(run_dir))

    base = generate_answers(run, examples, settings, use_adapter=False, progress=progress, description="base answers")
    adapter = generate_answers(run, examples, settings, use_adapter=True, progress=progress, description="adapter answers")
    predictions = prediction_rows(examples, base, adapter, with_references)
    references = [e.response for e in examples]
    report: dict[str, Any] = {
        "base": score_corpus(base, references) if with_references else None,
        "adapter": score_corpus(adapter, references) if with_references else None,
        "n": len(examples),
        "checkpoint": _relative(run.adapter_path, paths.root),
        "data": str(data_path) if data_path is not None else f"{split} split",
        "split": None if data_path is not None else split,
        "generation": settings.to_dict(),
    }
    if conversations:
        report["turns"] = (f"each assistant turn scored given the history before it: {conversations} conversations "
                           "with several answers")
    if general_text is not False:  # what the adapter cost elsewhere
        from loralab.forgetting import general_text_change

        report["general_text"] = general_text_change(run, None if general_text is True else general_text)
    return write_evaluation(paths, split, report, predictions, with_references)


def evaluation_config(run_dir: str | Path, checkpoint: str | int, split: str, data_path: str | Path | None,
                      limit: int | None, loaded: Any = None) -> RunConfig:
    """The run config an evaluation of any task type uses, after checking its options and (without a run in
    memory) that the run and checkpoint exist: a bad input fails before any weights load."""
    check_split_choice(split, data_path)
    if limit is not None and limit < 1:
        raise LoralabError(f"--limit must be at least 1, got {limit}")
    if loaded is not None:
        return loaded.config
    resolve_adapter(run_dir, str(checkpoint))
    return load_run_config(run_dir)


def report_source(run: Any, paths: RunPaths, data_path: str | Path | None, split: str, n: int) -> dict[str, Any]:
    """What every eval.json says about what it scored: ``n``, the checkpoint, the data (a file or the split)."""
    return {"n": n, "checkpoint": _relative(run.adapter_path, paths.root),
            "data": str(data_path) if data_path is not None else f"{split} split",
            "split": None if data_path is not None else split}


def write_evaluation(paths: RunPaths, split: str, report: dict[str, Any], predictions: list[dict[str, Any]],
                     with_references: bool = True) -> dict[str, Any]:
    """Write an evaluation of any task type: predictions.jsonl always, eval.json (the scores) only when the data
    had references (the test split: predictions_test.jsonl / eval_test.json); returns what ``evaluate_run`` does."""
    report_file, predictions_file = report_files(paths, split)
    write_text_atomic(predictions_file, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    if with_references:
        write_json_atomic(report_file, report)
    return {**report, "references": with_references, "predictions": predictions}


def check_split_choice(split: str, data_path: str | Path | None) -> None:
    if split not in SPLITS:
        raise LoralabError(f"--split must be eval or test, got {split!r}")
    if split != "eval" and data_path is not None:
        raise LoralabError(f"--split {split} and --data both name what to evaluate; pass one of them")


def report_files(paths: RunPaths, split: str) -> tuple[Path, Path]:
    """Where an evaluation's report and predictions go: eval.json / predictions.jsonl, or for the test split
    eval_test.json / predictions_test.jsonl (kept apart so that nothing choosing between runs reads test scores)."""
    if split == "test":
        return paths.test_eval_report, paths.test_predictions
    return paths.eval_report, paths.predictions


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def compare_prompts(run_dir: str | Path, prompts: Sequence[str | Example], settings: GenerationSettings | None = None,
                    checkpoint: str | int = "best", loaded: LoadedRun | None = None) -> list[dict[str, str]]:
    """Base and adapter answers for each prompt: ``[{"prompt", "base", "adapter"}, ...]`` (``loaded``: a run in memory).

    A SEQ_CLS run gives predicted labels (and their probabilities) instead of answers.
    """
    from loralab.classification import compare_classifier, run_task_type

    task = run_task_type(run_dir, loaded) if prompts else None
    if task == "SEQ_CLS":
        return compare_classifier(run_dir, prompts, checkpoint, loaded, (settings or GenerationSettings()).batch_size)
    if task == "TOKEN_CLS":  # each word's tag, base head vs trained head
        from loralab.tasks.token_eval import compare_token_classifier

        return compare_token_classifier(run_dir, prompts, checkpoint, loaded, (settings or GenerationSettings()).batch_size)
    if task == "QUESTION_ANSWERING":  # prompts: QA examples (with a context)
        from loralab.tasks.qa_eval import compare_qa, load_qa_run

        return compare_qa(loaded or load_qa_run(run_dir, checkpoint), prompts,
                          batch_size=(settings or GenerationSettings()).batch_size)
    if task == "FEATURE_EXTRACTION":  # the closest eval passages
        from loralab.tasks.retrieval import compare_embeddings

        return compare_embeddings(run_dir, prompts, checkpoint, loaded)
    if not prompts:
        raise LoralabError("no prompts given; pass --prompt TEXT or --prompts-file FILE")
    run = loaded or load_run_model(run_dir, checkpoint)
    base = generate_answers(run, prompts, settings, use_adapter=False)
    adapter = generate_answers(run, prompts, settings, use_adapter=True)
    return [{"prompt": p.prompt if isinstance(p, Example) else p, "base": b, "adapter": a}
            for p, b, a in zip(prompts, base, adapter)]


# ---------------------------------------------------------------- during training


class GenerationMetricsCallback(TrainerCallback):
    """On each evaluation, generate answers for up to ``train.eval_generate_limit`` eval answers (a conversation gives
    one per assistant turn, each given the history before it, as ``loralab eval`` scores them) and log the scores.

    The scores are added to the evaluation's metrics, to the Trainer's log history and, as one line, to metrics.jsonl.
    """

    def __init__(self, tokenizer: Any, config: RunConfig, task_type: str, examples: Sequence[Example],
                 metrics_path: Path | None = None, settings: GenerationSettings | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.task_type = task_type
        self.examples = first_answers(examples, config.train.eval_generate_limit)
        self.metrics_path = metrics_path
        self.settings = settings  # None: fitted to the references at the first evaluation

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, metrics: dict | None = None,
                    **kwargs: Any) -> None:
        if model is None or not self.examples:
            return
        from loralab.precision import autocast, model_type_of

        if self.settings is None:
            self.settings = training_generation_settings(self.config, self.tokenizer, [e.response for e in self.examples])
        with autocast(self.config.train.precision, model_device(model), model_type_of(model)):  # as the Trainer computes eval_loss
            scores = generation_metrics(model, self.tokenizer, self.config, self.task_type, self.examples, self.settings)
        if metrics is not None:
            metrics.update(scores)
        state.log_history.append({**scores, "epoch": state.epoch, "step": state.global_step})
        if self.metrics_path is not None:
            from loralab.trainer import MetricsFileCallback

            MetricsFileCallback(self.metrics_path).on_log(args, state, control, logs=dict(scores))


def generation_callback(session: Any, metrics_path: Path | None = None) -> GenerationMetricsCallback:
    """The callback for a training session (``loralab.training.Session``) with ``train.eval_generate``."""
    if session.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        raise LoralabError(f"train.eval_generate needs a text-generation model, not {session.task_type}; set it to false")
    return GenerationMetricsCallback(session.tokenizer, session.config, session.task_type,
                                     session.data.eval_examples, metrics_path)
