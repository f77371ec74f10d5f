"""Tiny random models with locally trained tokenizers: no network, seconds to build."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Tiny models: one thread is faster than two that wait on each other, and keeps parallel test runs sane.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """The session's prepared-data cache lives in its temporary folder, not in the user's ~/.cache/loralab/data."""
    before = os.environ.get("LORALAB_DATA_CACHE")
    os.environ["LORALAB_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if before is None:
        os.environ.pop("LORALAB_DATA_CACHE", None)
    else:
        os.environ["LORALAB_DATA_CACHE"] = before

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("open", "closed"),
         ("happy", "sad"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("young", "old"), ("wet", "dry"),
         ("high", "low"), ("near", "far"), ("rich", "poor"), ("strong", "weak"), ("loud", "quiet"), ("thick", "thin"),
         ("clean", "dirty"), ("long", "short"), ("first", "last"), ("left", "right"), ("inside", "outside"), ("day", "night")]


def opposite_records() -> list[dict[str, str]]:
    """24 instruction/response pairs with one learnable pattern."""
    return [{"instruction": f"Give the opposite of {a}.", "response": f"The opposite of {a} is {b}."} for a, b in WORDS]


def _corpus() -> list[str]:
    lines = [f"{r['instruction']} {r['response']}" for r in opposite_records()]
    lines += ["### Instruction:\n### Response:\n", "user assistant system", "Translate 水 猫 東京 こんにちは", "the a of is to and"]
    return lines * 4


def train_tokenizer(special: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _fast(tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama whose tokenizer is like SmolLM2's: chat template, pad token == EOS token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    raw = train_tokenizer(["<|im_start|>", "<|im_end|>", "<unk>"])
    tokenizer = _fast(raw, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_t5(folder: Path, gated: bool) -> Path:
    import torch
    from tokenizers import processors
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    raw = train_tokenizer(["<pad>", "</s>", "<unk>"])
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", raw.token_to_id("</s>"))])
    tokenizer = _fast(raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_factor=8.0)
    if gated:
        MT5ForConditionalGeneration(MT5Config(feed_forward_proj="gated-gelu", **common)).save_pretrained(folder)
    else:
        T5ForConditionalGeneration(T5Config(feed_forward_proj="relu", **common)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return _tiny_t5(tmp_path_factory.mktemp("tiny-t5"), gated=False)


@pytest.fixture(scope="session")
def tiny_mt5_dir(tmp_path_factory) -> Path:
    """A gated-GELU MT5 (like mt0): its feed-forward layers are wi_0 / wi_1, not wi."""
    return _tiny_t5(tmp_path_factory.mktemp("tiny-mt5"), gated=True)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import processors
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    raw = train_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]"])
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))])
    tokenizer = _fast(raw, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def opposites_file(tmp_path) -> Path:
    path = tmp_path / "opposites.json"
    path.write_text(json.dumps(opposite_records(), indent=1), encoding="utf-8")
    return path


@pytest.fixture()
def sentiment_file(tmp_path) -> Path:
    rows = [{"text": f"I feel {a} today", "label": "positive" if i % 2 else "negative"} for i, (a, _) in enumerate(WORDS)]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def tiny_overrides(model_dir: Path, data_file: Path, out: Path, **extra: object) -> list[str]:
    """Overrides for a fast run on a tiny model."""
    values = {"model.name_or_path": str(model_dir), "data.path": str(data_file), "output_dir": str(out),
              "train.learning_rate": 3e-2, "train.epochs": 4, "train.batch_size": 4, "train.logging_steps": 2,
              "train.precision": "fp32", "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "data.max_length": 64, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(*args: object) -> tuple[int, str]:
    """``loralab ARGS`` in-process: the exit code and everything printed (stdout and stderr)."""
    from typer.testing import CliRunner

    from loralab.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout + result.stderr


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
