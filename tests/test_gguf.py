"""GGUF export: tiny random Llama and Gemma 3 -> merged -> GGUF (f16, q8_0) -> read back by the gguf package and
transformers, and run by llama.cpp itself (skipped where llama-cpp-python is not installed): logits close, greedy
answers equal, the same token ids for English and CJK text; a wrong q/k permutation is caught by llama.cpp."""

import json

import numpy as np
import pytest
import torch

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.export import export_merged
from loralab.export.gguf_export import export_gguf, sidecars
from loralab.training import train
from conftest import _corpus, opposite_records, run_cli, tiny_overrides
from tiny_gemma import build_tiny_gemma

NEEDS_LLAMACPP = pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed (pip install 'loralab[gguf]')")
CJK = ["用一句话解释什么是机器学习。", "Translate 水 猫 東京 こんにちは"]


def _train(model_dir, tmp_path_factory, name, **extra):
    root = tmp_path_factory.mktemp(name)
    data = root / "d.json"
    data.write_text(json.dumps(opposite_records()))
    train(build_config(overrides=tiny_overrides(model_dir, data, root / "runs", name=name,
                                                **{"train.epochs": 2, **extra})), progress=False)
    return root / "runs" / name


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, tmp_path_factory):
    return _train(tiny_llama_dir, tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    model = build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"), _corpus())
    return _train(model, tmp_path_factory, "gemma", **{"data.system_prompt": "Answer briefly."})


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The merged HF model of a run (exported once per run), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def get(run):
        if run not in cache:
            out = export_merged(run, tmp_path_factory.mktemp("merged") / "m")
            cache[run] = (AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out), out)
        return cache[run]

    return get


def _field(reader, key):
    import gguf

    field = reader.fields[key]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def test_llama_gguf_layout_reads_back(llama_run, merged, tmp_path):
    """Without llama.cpp: the file's metadata, the permuted q/k rows, and transformers' GGUF reader."""
    import gguf
    from transformers import AutoModelForCausalLM

    from loralab.export.gguf_writer import permute

    path = export_gguf(llama_run, tmp_path / "tiny.gguf", quant="f16", llamacpp_check=False)
    model, tokenizer, _ = merged(llama_run)
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.tokens")[:3] == tokenizer.convert_ids_to_tokens([0, 1, 2])
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False  # this tokenizer adds no BOS, so neither may llama.cpp
    q = _tensor(reader, "blk.0.attn_q.weight")
    assert q.tensor_type == gguf.GGMLQuantizationType.F16
    expected = permute(model.model.layers[0].self_attn.q_proj.weight.detach(), 4, 4).numpy().astype(np.float16)
    assert np.array_equal(np.asarray(q.data).reshape(expected.shape), expected)
    assert _tensor(reader, "blk.0.attn_norm.weight").tensor_type == gguf.GGMLQuantizationType.F32
    assert not any(t.name == "output.weight" for t in reader.tensors)  # tied embeddings: llama.cpp reuses token_embd
    report = json.loads(sidecars(path)["report"].read_text())
    assert report["llama_cpp"]["checked"] is False and report["files"]["tiny.gguf"] == path.stat().st_size
    reloaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = tokenizer("Give the opposite of hot.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0.05)


def test_gemma3_gguf_layout_reads_back(gemma_run, merged, tmp_path):
    """Gemma 3: SentencePiece-style tokenizer metadata, norms + 1, embedding rows cut, sliding-window layers."""
    import gguf

    path = export_gguf(gemma_run, tmp_path / "gemma.gguf", quant="q8_0", llamacpp_check=False)
    model, tokenizer, _ = merged(gemma_run)
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "gemma3"
    assert _field(reader, "tokenizer.ggml.model") == "llama" and _field(reader, "tokenizer.ggml.add_space_prefix") is False
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(tokenizer) < model.config.vocab_size  # the unused embedding rows are cut
    assert types[tokens.index("<0xE6>")] == gguf.TokenType.BYTE and types[tokens.index("<end_of_turn>")] == gguf.TokenType.CONTROL
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "gemma3.attention.sliding_window") == 8
    assert _field(reader, "gemma3.attention.sliding_window_pattern") == [True, False]
    norm = np.asarray(_tensor(reader, "blk.0.attn_q_norm.weight").data)
    assert np.allclose(norm, model.model.layers[0].self_attn.q_norm.weight.detach().numpy() + 1.0)
    embd = _tensor(reader, "token_embd.weight")
    assert embd.tensor_type == gguf.GGMLQuantizationType.Q8_0 and list(embd.shape) == [32, len(tokenizer)]


def _llamacpp_greedy(llm, ids, stop, n=16):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stop:
            break
        llm.eval([token])
    return out


@NEEDS_LLAMACPP
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_llamacpp_answers_like_the_merged_model(which, quant, llama_run, gemma_run, merged, tmp_path):
    from llama_cpp import Llama

    from loralab.generation import stop_token_ids

    run = llama_run if which == "llama" else gemma_run
    path = export_gguf(run, tmp_path / f"{which}.gguf", quant=quant, llamacpp_check=True)
    report = json.loads(sidecars(path)["report"].read_text())
    check = next(c for c in report["checks"] if c["name"] == "llama.cpp")
    assert check["passed"] and check["n"] == 4  # logits within the type's tolerance
    if quant == "q8_0":  # 8-bit rounding may part greedy answers of a random model; f16 may not
        assert check["max_abs_logit_diff"] > 0
    else:
        assert check["greedy_agree"] == 4
    assert report["llama_cpp"]["tokenization"]["mismatches"] == []
    model, tokenizer, _ = merged(run)  # independently of loralab's check: llama.cpp's own API on the file
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    stop = stop_token_ids(model, tokenizer)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Give the opposite of {word}."}],
                                             tokenize=False, add_generation_prompt=True) for word in ("cold", "wet")]
    for text in CJK + prompts:  # the same ids, special tokens and CJK characters (byte fallback for Gemma) included
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text, add_special_tokens=False)["input_ids"]
    for text in prompts if quant == "f16" else []:  # what the adapter learnt: the same greedy tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stop,
                                pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        assert _llamacpp_greedy(llm, ids, stop, n=12) == hf
    llm.close()


@NEEDS_LLAMACPP
def test_a_wrong_permutation_is_caught_by_llamacpp(llama_run, tmp_path, monkeypatch):
    import loralab.export.gguf_writer as writer

    monkeypatch.setattr(writer, "permute", lambda weights, n_head, n_head_kv=None: weights)  # q/k rows left as in HF
    with pytest.raises(LoralabError, match=r"llama.cpp on the exported f16 file: .* differs .*nothing was written"):
        export_gguf(llama_run, tmp_path / "wrong.gguf", quant="f16", llamacpp_check=True)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_unsupported_quant_architecture_and_output_are_one_clear_message(llama_run, tiny_t5_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    code, out = run_cli("export", llama_run, "--format", "gguf", "--quant", "q3_k", "--output", tmp_path / "x.gguf")
    assert code == 1 and "--quant 'q3_k' is not supported for GGUF export; supported: f16, bf16, q8_0, q5_0, q4_0" in out
    code, out = run_cli("export", llama_run, "--format", "gguf", "--output", tmp_path / "x")
    assert code == 1 and "give --output FILE.gguf" in out
    adapter = tmp_path / "t5-adapter"  # an adapter made with plain peft on a T5
    get_peft_model(T5ForConditionalGeneration.from_pretrained(tiny_t5_dir),
                   LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"])).save_pretrained(adapter)
    code, out = run_cli("export", "--adapter", adapter, "--model", tiny_t5_dir, "--format", "gguf",
                        "--output", tmp_path / "t5.gguf")
    assert code == 1 and "GGUF export does not support 't5' models; supported: Llama" in out and "Gemma 3" in out
    assert not (tmp_path / "t5.gguf").exists()


def test_gguf_overwrite_replaces_only_an_earlier_export(llama_run, tmp_path):
    mine = tmp_path / "model.gguf"
    mine.write_bytes(b"someone's model")
    with pytest.raises(LoralabError, match="exists; choose another --output or pass --overwrite"):
        export_gguf(llama_run, mine, llamacpp_check=False)
    with pytest.raises(LoralabError, match="was not written by loralab export; nothing was changed"):
        export_gguf(llama_run, mine, overwrite=True, llamacpp_check=False)
    assert mine.read_bytes() == b"someone's model"
    code, out = run_cli("export", llama_run, "--format", "gguf", "--output", tmp_path / "ours.gguf",
                        "--no-llamacpp-check")
    assert code == 0 and "ours.Modelfile" in out and "llama.cpp check skipped" in out
    assert (tmp_path / "ours.gguf").stat().st_mode & 0o044 == 0o044  # readable by a serving process of another user
    first = (tmp_path / "ours.gguf").read_bytes()
    export_gguf(llama_run, tmp_path / "ours.gguf", quant="q8_0", overwrite=True, llamacpp_check=False)
    assert (tmp_path / "ours.gguf").read_bytes() != first
    assert json.loads((tmp_path / "ours.export_report.json").read_text())["quant"] == "q8_0"


@NEEDS_LLAMACPP
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_adapters_from_plain_peft_run_in_llamacpp(family, tiny_llama_dir, tmp_path):
    """Qwen2 (q/k/v biases, no permutation) and Mistral (Llama layout, an output layer of its own) as llama.cpp
    reads them, from adapters made with peft alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[family]
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=family == "qwen2", initializer_range=0.2)
    model_class(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    get_peft_model(model_class.from_pretrained(tmp_path / "base"),
                   LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    path = export_gguf(None, tmp_path / f"{family}.gguf", adapter=tmp_path / "adapter", base_model=str(tmp_path / "base"),
                       llamacpp_check=True)
    report = json.loads(sidecars(path)["report"].read_text())
    check = next(c for c in report["checks"] if c["name"] == "llama.cpp")
    assert report["architecture"] == {"qwen2": "qwen2", "mistral": "llama"}[family]
    assert check["passed"] and check["max_abs_logit_diff"] < 0.02 * check["logit_scale"]
    assert check["greedy_agree"] + check["near_ties"] == check["n"]
