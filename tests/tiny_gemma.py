"""A tiny random Gemma 3 text model with a Gemma-style tokenizer: SentencePiece-like BPE (``▁`` for spaces, byte
fallback tokens ``<0x00>``..``<0xFF>``, BOS added, merges for every pair whose concatenation is a token, as
transformers converts a SentencePiece model), Gemma's chat template; two layers, one sliding-window, one global."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def gemma_tokenizer(corpus: list[str], vocab_size: int = 420):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from loralab.templates import TEMPLATES

    trainer_model = Tokenizer(models.BPE())
    trainer_model.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, max_token_length=8)
    trainer_model.train_from_iterator(corpus, trainer)
    learned = sorted(trainer_model.get_vocab().items(), key=lambda item: item[1])
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *(t for t, _ in learned)]:
        vocab.setdefault(token, len(vocab))
    merges = sorted(((a, b) for a in vocab for b in vocab if a + b in vocab and len(a + b) > 1
                     and not a.startswith("<") and not b.startswith("<")),
                    key=lambda pair: (vocab[pair[0] + pair[1]], vocab[pair[0]], vocab[pair[1]]))
    raw = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Replace(" ", "\u2581")
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    raw.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.chat_template = TEMPLATES["gemma"]
    return tokenizer


def build_tiny_gemma(folder: Path, corpus: list[str]) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = gemma_tokenizer(corpus)
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer) + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
                              pad_token_id=tokenizer.pad_token_id, initializer_range=0.3)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # norms away from zero, as trained Gemma norms are (zero: the +1 shift would hide mistakes)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
