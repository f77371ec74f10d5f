"""Datasets: read sources (files, folders, Hub datasets, mixtures), validate rows, split train / eval / test,
tokenize with -100 label masks (every assistant turn of a conversation supervised, or only the last:
``data.train_on``), cache the result on disk, collate.

- ``sources``: where rows come from (``data.path``, ``hub:ID``, ``data.sources`` mixtures) and file fingerprints
- ``tables``: examples and token ids as memory-mapped Arrow tables, with list-like views
- ``splits``: the train / eval / test examples (``load_all_splits``)
- ``prompts`` / ``tokenize``: one example's token ids and label mask
- ``cache``: the on-disk cache of examples and tokenized splits
- ``prepare``: whole splits tokenized for the Trainer (``prepare_data``), raw text packing, the collator

Row formats live in ``loralab.formats``, prompt templates in ``loralab.templates``, file readers in
``loralab.readers``; their names are importable from here. Every error names the file and the row (1-based; a line
number for JSONL and CSV files).
"""

from loralab.data.prepare import (FeatureDataset, PackedTextDataset, PreparedData, TokenizedView, make_collator,
                                  prepare_data)
from loralab.data.prompts import _cut_middle, _first_fitting, _marked, _user_text_span, fit_prompt, later_starts  # noqa: F401
from loralab.data.sources import Source, demo_dataset_path, file_fingerprint, main_sources, parse_source
from loralab.data.splits import Splits, hold_out, load_all_splits, load_examples, load_splits, split_examples
from loralab.data.tables import ExampleView, row_ids
from loralab.data.tokenize import (IGNORE_INDEX, TokenizedExample, label_vocabulary, tokenize, tokenize_causal,
                                   tokenize_classification, tokenize_seq2seq, tokenize_text, vocabulary_of)
from loralab.formats import (FORMATS, ROLES, Example, _is_missing, _row_error, _text_field, detect_format,  # noqa: F401
                             empty_answer_error, parse_rows)
from loralab.readers import SUFFIXES, iter_rows, read_rows
from loralab.templates import (_MARK, PLAIN_PROMPT_TEMPLATE, TEMPLATES, _special_ids, apply_template,  # noqa: F401
                               chat_end_ids, encode_prompt, format_prompt, prompt_messages, target_end_id, target_end_ids,
                               uses_chat_template)

__all__ = [
    "IGNORE_INDEX", "Example", "ExampleView", "FeatureDataset", "PackedTextDataset", "PreparedData", "Source", "Splits",
    "SUFFIXES", "TokenizedExample", "TokenizedView", "chat_end_ids", "demo_dataset_path", "detect_format",
    "encode_prompt", "file_fingerprint", "fit_prompt", "format_prompt", "hold_out", "iter_rows", "label_vocabulary",
    "later_starts", "load_all_splits", "load_examples", "load_splits", "main_sources", "make_collator", "parse_rows",
    "parse_source", "prepare_data", "read_rows", "row_ids", "split_examples", "target_end_id", "target_end_ids",
    "tokenize", "tokenize_causal", "tokenize_classification", "tokenize_seq2seq", "tokenize_text",
    "uses_chat_template", "vocabulary_of",
]
