"""Export of runs whose model is not a text generator: SEQ_CLS, TOKEN_CLS, QUESTION_ANSWERING, FEATURE_EXTRACTION.

The adapter (LoRA weights and the trained head) is merged into the base loaded in full precision, the merged model's
outputs on a few probe inputs are checked against base + adapter, and the folder is saved so that plain transformers
loads it: ``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` (with the run's label or tag
names), ``AutoModelForQuestionAnswering``, or ``AutoModel`` for an embedding model, which also gets the
sentence-transformers files describing the pooling it was trained with (``modules.json``, ``1_Pooling/config.json``),
so ``SentenceTransformer(folder)`` embeds as ``loralab eval`` did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from loralab.errors import LoralabError

HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANSWERING", "FEATURE_EXTRACTION")
TEXTS = ["loralab export check", "a second , longer text to check the merged model with padding"]
QUESTIONS = [("Where does the check run?", "The check of the merged model runs in the export folder."),
             ("Who wrote it?", "It was written by loralab, a workbench for LoRA fine-tuning, after training.")]


def _classifier(run: Any) -> torch.Tensor:
    from loralab.classification import classifier_logits

    return classifier_logits(run, TEXTS)


def _tagger(run: Any) -> torch.Tensor:
    from loralab.tasks.token_eval import word_logits

    return torch.cat(word_logits(run, [text.split() for text in TEXTS]))


def _reader(run: Any) -> torch.Tensor:
    from loralab.generation import inference, model_device

    batch = run.tokenizer([q for q, _ in QUESTIONS], [c for _, c in QUESTIONS], padding=True, return_tensors="pt")
    with inference(run.model, True):
        out = run.model(**{k: v.to(model_device(run.model)) for k, v in batch.items()})
    keep = batch["attention_mask"].bool()
    return torch.cat([out.start_logits.float().cpu()[keep], out.end_logits.float().cpu()[keep]])


def _encoder(run: Any) -> torch.Tensor:
    from loralab.tasks.embeddings import model_pooling
    from loralab.tasks.retrieval import encode

    return encode(run, TEXTS, model_pooling(run.config.model), use_adapter=True)


LOADS_WITH = {"SEQ_CLS": "AutoModelForSequenceClassification.from_pretrained",
              "TOKEN_CLS": "AutoModelForTokenClassification.from_pretrained",
              "QUESTION_ANSWERING": "AutoModelForQuestionAnswering.from_pretrained",
              "FEATURE_EXTRACTION": "AutoModel.from_pretrained or sentence_transformers.SentenceTransformer(folder)"}
PROBES: dict[str, Callable[[Any], torch.Tensor]] = {"SEQ_CLS": _classifier, "TOKEN_CLS": _tagger,
                                                     "QUESTION_ANSWERING": _reader, "FEATURE_EXTRACTION": _encoder}


def sentence_transformers_files(run: Any, folder: Path) -> None:
    """``modules.json`` + ``1_Pooling/config.json`` (+ Normalize) for the pooling the run trained and scored with."""
    from loralab.runs import write_json_atomic
    from loralab.tasks.embeddings import model_pooling

    pooling = model_pooling(run.config.model)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    write_json_atomic(folder / "modules.json", modules)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    write_json_atomic(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": int(run.model.config.hidden_size), "pooling_mode_cls_token": pooling.mode == "cls",
        "pooling_mode_mean_tokens": pooling.mode == "mean", "pooling_mode_max_tokens": pooling.mode == "max",
        "pooling_mode_mean_sqrt_len_tokens": False})
    write_json_atomic(folder / "sentence_bert_config.json",
                      {"max_seq_length": int(run.config.data.max_length), "do_lower_case": False})


def export_head_model(run_dir: str | Path, output: str | Path, checkpoint: str = "best", dtype: str = "float32",
                      overwrite: bool = False) -> Path:
    """Merge the run's adapter and trained head into its full-precision base, check the merged outputs on probe
    inputs against base + adapter (within 1e-3 of their scale), and save the model folder."""
    from loralab.export.merge import DTYPES, check_export_target, write_export
    from loralab.generation import load_run_model

    if dtype not in DTYPES:
        raise LoralabError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    output = Path(output)
    check_export_target(output, overwrite)
    run = load_run_model(run_dir, checkpoint, full_precision=True, allow_classifier=True)
    if run.task_type not in PROBES:
        raise LoralabError(f"run {run_dir} is a {run.task_type} run; export_head_model takes {', '.join(HEAD_TASKS)}")
    probe = PROBES[run.task_type]
    expected = probe(run)
    merged = run.model.merge_and_unload()
    merged.eval()
    run.model = merged
    got = probe(run)
    difference = float((got - expected).abs().max())
    if difference > 1e-3 * max(1.0, float(expected.abs().max())):
        raise LoralabError(f"merging the adapter of {run_dir} changed the outputs by up to {difference:.3g}; not exported")
    merged.to(DTYPES[dtype])
    report = {"loralab_export": 1, "source": str(run_dir), "task_type": run.task_type, "format": "hf", "dtype": dtype,
              "output": str(output), "loads_with": LOADS_WITH[run.task_type], "probes": len(TEXTS),
              "max_abs_diff_merged_vs_adapter": difference}
    extra = (lambda folder: sentence_transformers_files(run, folder)) if run.task_type == "FEATURE_EXTRACTION" else None
    return write_export(merged, run.tokenizer, output, run_dir=run_dir, checkpoint=checkpoint, dtype=dtype,
                        report=report, extra=extra)

