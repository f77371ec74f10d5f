"""Answers end where the chat template ends an assistant turn, and long prompts keep their special prefix and end.

Real fast tokenizers with each family's special tokens and real Jinja chat template, built here (no network).
"""

import pytest
import torch

from loralab.config import DataConfig, RunConfig
from loralab.data import (IGNORE_INDEX, Example, _user_text_span, chat_end_ids, encode_prompt, format_prompt,
                          make_collator, prepare_data, target_end_ids, tokenize_causal)
from loralab.generation import generate_answers, generation_config, stop_token_ids, GenerationSettings
from conftest import CHAT_TEMPLATE, _fast, opposite_records, train_tokenizer

GEMMA_TEMPLATE = (  # google/gemma-2-2b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

HOT = Example(prompt="Give the opposite of hot.", response="The opposite of hot is cold.", row=1)
LONG = Example(prompt="Give the opposite of hot. " * 12 + "Now the opposite of big?", response="The opposite of big is small.", row=2)


def _with_bos(raw, bos: str):
    """The tokenizer adds BOS to plain text, as Gemma's and Llama 3's do."""
    from tokenizers import processors

    raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, raw.token_to_id(bos))])
    return raw


@pytest.fixture(scope="module")
def smollm(tiny_llama_dir):
    """SmolLM2-like (the shared fixture): ChatML, bos <|im_start|>, pad == eos == <|im_end|>."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def gemma():
    raw = _with_bos(train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]), "<bos>")
    tok = _fast(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = GEMMA_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def llama3():
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raw = _with_bos(train_tokenizer(special), "<|begin_of_text|>")
    tok = _fast(raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5 base: no BOS, eos == pad == <|endoftext|>, turns end with <|im_end|>."""
    tok = _fast(train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), eos_token="<|endoftext|>",
                pad_token="<|endoftext|>")
    tok.chat_template = QWEN_TEMPLATE
    return tok


def marked(tok, item) -> str:
    """The example token by token, supervised tokens in [brackets]."""
    return "".join(f"[{tok.decode([i])}]" if label != IGNORE_INDEX else tok.decode([i])
                   for i, label in zip(item.input_ids, item.labels))


def supervised(item) -> list[int]:
    return [label for label in item.labels if label != IGNORE_INDEX]


def assert_golden(tok, end_token: str, expected: str, example: Example = HOT, cfg: DataConfig | None = None):
    cfg = cfg or DataConfig()
    item = tokenize_causal(tok, example, cfg)
    end = tok.convert_tokens_to_ids(end_token)
    answer = tok(example.response, add_special_tokens=False)["input_ids"]
    assert marked(tok, item) == expected
    # exactly the answer tokens + the end of turn are supervised, aligned with the inputs, nothing of the prompt
    assert supervised(item) == answer + [end] == item.input_ids[item.prompt_length :]
    assert item.labels[: item.prompt_length] == [IGNORE_INDEX] * item.prompt_length
    assert item.input_ids[: item.prompt_length] == encode_prompt(tok, format_prompt(tok, example, cfg), cfg)
    assert item.response_length == len(answer) + 1 and not item.truncated
    return item


ANSWER = "[The][ opposite][ of][ hot][ is][ c][old][.]"


def test_chatml_smollm2_golden_mask_end_token_is_eos_and_stays_supervised_when_pad(smollm):
    tok = smollm
    assert chat_end_ids(tok) == [tok.eos_token_id] == [tok.pad_token_id]  # <|im_end|>: nothing changes for SmolLM2
    item = assert_golden(tok, "<|im_end|>", "<|im_start|>user\nGive the opposite of hot.<|im_end|>\n<|im_start|>assistant\n"
                                            + ANSWER + "[<|im_end|>]")
    short = tokenize_causal(tok, Example(prompt="Hi", response="cold", row=3), DataConfig())
    batch = make_collator(tok, "CAUSAL_LM")([{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids),
                                              "labels": t.labels} for t in (item, short)])
    assert batch["labels"][1, len(short.labels) - 1].item() == tok.pad_token_id  # pad == end token, still supervised


def test_gemma_golden_mask_supervises_end_of_turn_not_eos(gemma):
    tok = gemma
    assert tok.convert_ids_to_tokens(chat_end_ids(tok)) == ["<end_of_turn>"]  # the "\n" after it is not supervised
    item = assert_golden(tok, "<end_of_turn>", "<bos><start_of_turn>user\nGive the opposite of hot.<end_of_turn>\n"
                                               "<start_of_turn>model\n" + ANSWER + "[<end_of_turn>]")
    assert tok.eos_token_id not in item.input_ids
    # the template renders exactly these tokens for the whole conversation, up to its end-of-turn token
    full = tok.apply_chat_template([{"role": "user", "content": HOT.prompt}, {"role": "assistant", "content": HOT.response}],
                                   tokenize=False)
    assert tok.decode(item.input_ids) + "\n" == full


def test_llama3_golden_mask_supervises_eot_id_not_end_of_text(llama3):
    tok = llama3
    assert tok.convert_ids_to_tokens(chat_end_ids(tok)) == ["<|eot_id|>"]
    assert_golden(tok, "<|eot_id|>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nGive the opposite of hot."
                                     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "[<|eot_id|>]")


def test_qwen_golden_mask_supervises_im_end_while_eos_and_pad_are_endoftext(qwen):
    tok = qwen
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.convert_ids_to_tokens(target_end_ids(tok, DataConfig())) == ["<|im_end|>"]
    item = assert_golden(tok, "<|im_end|>", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                            "assistant.<|im_end|>\n<|im_start|>user\nGive the opposite of hot.<|im_end|>\n"
                                            "<|im_start|>assistant\n" + ANSWER + "[<|im_end|>]")
    # a multi-turn conversation with data.train_on last_turn: earlier turns (and their end tokens) are prompt
    chat = Example(prompt="And of big?", response="small", row=4, messages=[
        {"role": "user", "content": HOT.prompt}, {"role": "assistant", "content": HOT.response},
        {"role": "user", "content": "And of big?"}])
    item = tokenize_causal(tok, chat, DataConfig(train_on="last_turn"))
    assert tok.decode(supervised(item)) == "small<|im_end|>" and item.input_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 5
    every = tokenize_causal(tok, chat, DataConfig())  # the default, all_turns: the same tokens, both answers supervised
    assert every.input_ids == item.input_ids and tok.decode(supervised(every)) == HOT.response + "<|im_end|>small<|im_end|>"


def test_without_the_template_targets_end_with_eos(gemma, qwen):
    for tok in (gemma, qwen):
        cfg = DataConfig(chat_template=False)
        item = tokenize_causal(tok, HOT, cfg)
        assert supervised(item)[-1] == tok.eos_token_id and target_end_ids(tok, cfg) == [tok.eos_token_id]
        assert format_prompt(tok, HOT, cfg).startswith("### Instruction:")


def test_end_of_turn_falls_back_to_eos_when_the_template_writes_no_special_token():
    tok = _fast(train_tokenizer(["<|endoftext|>"]), eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}" \
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    assert chat_end_ids(tok) == [] and target_end_ids(tok, DataConfig()) == [tok.eos_token_id]
    tok.chat_template = "{{ raise_exception('nope') }}"
    assert chat_end_ids(tok) == []


# ---------------------------------------------------------------- long prompts


@pytest.mark.parametrize("family", ["smollm", "gemma", "llama3", "qwen"])
def test_long_prompt_keeps_bos_system_header_and_generation_prompt(family, request):
    tok = request.getfixturevalue(family)
    cfg = DataConfig(max_length=56, system_prompt=None if family == "gemma" else "Be brief.")
    full_ids = encode_prompt(tok, format_prompt(tok, LONG, cfg), cfg)
    item = tokenize_causal(tok, LONG, cfg)
    answer = tok(LONG.response, add_special_tokens=False)["input_ids"]
    assert len(full_ids) + len(answer) + 1 > 56 and len(item.input_ids) == 56
    assert item.truncated and not item.response_truncated and item.response_length == len(answer) + 1
    prompt = tok.decode(item.input_ids[: item.prompt_length])
    head, tail = {
        "smollm": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive", "of big?<|im_end|>\n<|im_start|>assistant\n"),
        "gemma": ("<bos><start_of_turn>user\nGive", "of big?<end_of_turn>\n<start_of_turn>model\n"),
        "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nGive",
                   "of big?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
        "qwen": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive", "of big?<|im_end|>\n<|im_start|>assistant\n"),
    }[family]
    assert prompt.startswith(head) and prompt.endswith(tail), prompt
    # the kept tokens are the full prompt's first and last ones: only the middle of the user text is gone
    kept = item.input_ids[: item.prompt_length]
    cut = next(i for i, (a, b) in enumerate(zip(kept, full_ids)) if a != b)
    assert kept[:cut] == full_ids[:cut] and kept[cut:] == full_ids[len(full_ids) - (len(kept) - cut):]
    assert supervised(item) == answer + target_end_ids(tok, cfg)


def test_long_plain_prompt_keeps_bos_instruction_header_and_response_suffix(gemma):
    cfg = DataConfig(max_length=40, chat_template=False)
    item = tokenize_causal(gemma, LONG, cfg)
    prompt = gemma.decode(item.input_ids[: item.prompt_length])
    assert prompt.startswith("<bos>### Instruction:\nGive the") and prompt.endswith("of big?\n\n### Response:\n"), prompt
    assert item.truncated and not item.response_truncated and len(item.input_ids) == 40
    assert gemma.decode(supervised(item)) == LONG.response + "<eos>"


def test_multi_turn_prompt_drops_the_oldest_exchange_whole_keeping_the_system_prompt(qwen):
    chat = Example(prompt="Now the opposite of big?", response="small", row=5, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Give the opposite of hot. " * 6},
        {"role": "assistant", "content": "The opposite of hot is cold. " * 6}, {"role": "user", "content": "Now the opposite of big?"}])
    for train_on in ("all_turns", "last_turn"):
        item = tokenize_causal(qwen, chat, DataConfig(max_length=56, train_on=train_on))
        assert item.truncated and not item.response_truncated and len(item.input_ids) <= 56
        prompt = qwen.decode(item.input_ids[: item.prompt_length])
        assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nNow the opposite of big?<|im_end|>\n"
                          "<|im_start|>assistant\n"), prompt
        assert qwen.decode(supervised(item)) == "small<|im_end|>"
    # when the last exchange alone is too long, the middle of its user text goes (BOS, system, header and end stay)
    long_last = Example(prompt=LONG.prompt, response="small", row=6, messages=[*chat.messages[:3], {"role": "user", "content": LONG.prompt}])
    item = tokenize_causal(qwen, long_last, DataConfig(max_length=56))
    prompt = qwen.decode(item.input_ids[: item.prompt_length])
    assert item.truncated and len(item.input_ids) == 56 and "cold" not in prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive")
    assert prompt.endswith("of big?<|im_end|>\n<|im_start|>assistant\n"), prompt


def test_response_truncation_counts(gemma):
    cfg = DataConfig(max_length=24)
    both = Example(prompt=LONG.prompt, response="The opposite of hot is cold. " * 6, row=6)
    item = tokenize_causal(gemma, both, cfg)
    answer = gemma(both.response, add_special_tokens=False)["input_ids"]
    assert item.truncated and item.response_truncated and item.response_length == len(answer) + 1
    assert len(item.input_ids) == 24 and len(supervised(item)) == 12  # half the budget
    assert gemma.decode(item.input_ids[: item.prompt_length]).startswith("<bos><start_of_turn>user\n")
    assert gemma.decode(item.input_ids[: item.prompt_length]).endswith("<start_of_turn>model\n")


class _NoOffsets:
    """A tokenizer without character offsets (like a slow one)."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("no offsets")
        return self._tok(*args, **kwargs)


@pytest.mark.parametrize("family", ["smollm", "gemma", "qwen"])
def test_user_text_span_from_offsets_or_from_pieces(family, request):
    tok = request.getfixturevalue(family)
    cfg = DataConfig()
    text = format_prompt(tok, LONG, cfg)
    ids = encode_prompt(tok, text, cfg)
    span = _user_text_span(tok, LONG, cfg, text, ids)
    assert span is not None and tok.decode(ids[span[0] : span[1]]) == LONG.prompt
    assert _user_text_span(_NoOffsets(tok), LONG, cfg, text, ids) == span


def test_prompt_without_a_findable_user_text_keeps_head_and_tail():
    tok = _fast(train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), eos_token="<|endoftext|>",
                pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE.replace("message['content']", "message['content'] | upper")
    cfg = DataConfig(max_length=30)
    full = encode_prompt(tok, format_prompt(tok, LONG, cfg), cfg)
    assert _user_text_span(tok, LONG, cfg, format_prompt(tok, LONG, cfg), full) is None
    item = tokenize_causal(tok, LONG, cfg)
    keep = item.prompt_length
    assert item.input_ids[:keep] == full[: keep // 2] + full[len(full) - (keep - keep // 2) :]
    assert item.truncated and not item.response_truncated and len(item.input_ids) == 30


# ---------------------------------------------------------------- checks and generation


def test_label_masking_check_knows_the_end_of_turn_token(gemma, qwen, tmp_path):
    import json

    from loralab.checks import check_label_masking
    from loralab.data import FeatureDataset
    from loralab.training import Session

    path = tmp_path / "opposites.json"
    path.write_text(json.dumps(opposite_records()))
    for tok, name in ((gemma, "'<end_of_turn>'"), (qwen, "'<|im_end|>'")):
        config = RunConfig(data=DataConfig(path=str(path), max_length=64))
        data = prepare_data(config.data, tok, "CAUSAL_LM")
        session = Session(config, "CAUSAL_LM", tok, data, model=None, targets=None, collator=make_collator(tok, "CAUSAL_LM"))
        result = check_label_masking(session)
        assert result.status == "pass" and f"response + {name} supervised" in result.reason, result.reason
        assert result.details["batches"]["eos_expected"] == len(data.train) > 0
        data.train = FeatureDataset(list(data.train.tokenized), "CAUSAL_LM")  # in memory, so one mask can be broken
        session.data = data
        item = data.train.tokenized[0]
        item.labels[-1] = IGNORE_INDEX  # the end of turn masked: the check must catch it
        result = check_label_masking(session)
        assert result.status == "fail" and f"the target's {name} is masked or missing in 1 examples" in result.reason


def _scripted_model(tok, chain: list[int]):
    """A tiny Llama that greedily continues ``chain[i]`` with ``chain[i + 1]``: each position sees only its own token
    (attention and MLP outputs zeroed) and the output head maps it to the next one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, k] = 1.0
            model.lm_head.weight[following, k] = 10.0
    return model


@pytest.mark.parametrize("family,end_token", [("gemma", "<end_of_turn>"), ("llama3", "<|eot_id|>"), ("qwen", "<|im_end|>")])
def test_generation_stops_at_the_end_of_turn_token(family, end_token, request):
    tok = request.getfixturevalue(family)
    end = tok.convert_tokens_to_ids(end_token)
    config = RunConfig(data=DataConfig())
    prompt_ids = encode_prompt(tok, format_prompt(tok, HOT, config.data), config.data)
    answer = tok("The opposite", add_special_tokens=False)["input_ids"]
    model = _scripted_model(tok, [prompt_ids[-1], *answer, end, answer[0]])  # after the end token it would go on
    stops = stop_token_ids(model, tok)
    assert end in stops and tok.eos_token_id in stops and end != tok.eos_token_id
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    assert generation_config(model, tok, settings).eos_token_id == stops
    # batched (left padding): both rows stop at the end token; without it as a stop token the model runs on
    answers = generate_answers(model, [HOT, Example(prompt="Give the opposite of big, please.", response="", row=2)],
                               settings, tokenizer=tok, config=config)
    assert answers == ["The opposite", "The opposite"]
    out = model.generate(input_ids=torch.tensor([prompt_ids]), generation_config=generation_config(model, tok, settings))
    assert out[0, len(prompt_ids) :].tolist() == answer + [end]
    plain = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert plain.shape[1] == len(prompt_ids) + 8
