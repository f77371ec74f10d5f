"""Conversations: every assistant turn supervised (or only the last), ShareGPT and format detection, named templates for
base models, raw text; golden masks on real fast tokenizers with each family's special tokens and Jinja template."""

import json
import logging

import pytest

from loralab.config import DataConfig, RunConfig, build_config
from loralab.data import (IGNORE_INDEX, Example, encode_prompt, format_prompt, load_examples, prepare_data, target_end_ids,
                          tokenize_causal)
from loralab.errors import ConfigError, DataError, LoralabError
from loralab.templates import TEMPLATES
from conftest import CHAT_TEMPLATE, _fast, tiny_overrides, train_tokenizer
from test_chat_templates import GEMMA_TEMPLATE, LLAMA3_TEMPLATE, _with_bos, marked

HOT, COLD = "Give the opposite of hot.", "The opposite of hot is cold."
BIG, SMALL = "And of big?", "small"
CHAT = [{"role": "user", "content": HOT}, {"role": "assistant", "content": COLD}, {"role": "user", "content": BIG}]
TWO_TURNS = Example(prompt=BIG, response=SMALL, row=1, messages=CHAT)
ALL, LAST = DataConfig(), DataConfig(train_on="last_turn")
COLD_MARKED = "[The][ opposite][ of][ hot][ is][ c][old][.]"


def chatml_tokenizer(template: str | None = CHAT_TEMPLATE):
    """SmolLM2-like: ChatML, bos <|im_start|>, pad == eos == <|im_end|> (as the tiny_llama_dir fixture's)."""
    tok = _fast(train_tokenizer(["<|im_start|>", "<|im_end|>", "<unk>"]), bos_token="<|im_start|>",
                eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def gemma_tokenizer(template: str | None = GEMMA_TEMPLATE):
    raw = _with_bos(train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]), "<bos>")
    tok = _fast(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def llama3_tokenizer(template: str | None = LLAMA3_TEMPLATE):
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _fast(_with_bos(train_tokenizer(special), "<|begin_of_text|>"), bos_token="<|begin_of_text|>",
                eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")
    tok.chat_template = template
    return tok


def base_tokenizer():
    """A base model's: EOS only, no chat template, no chat tokens."""
    return _fast(train_tokenizer(["<|endoftext|>"]), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def smollm(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def gemma():
    return gemma_tokenizer()


@pytest.fixture(scope="module")
def llama3():
    return llama3_tokenizer()


def supervised(item) -> list[int]:
    return [label for label in item.labels if label != IGNORE_INDEX]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_turns_as_at_inference(tok, example: Example, item, cfg: DataConfig = ALL):
    """Each supervised turn follows exactly the prompt inference builds for the history before it, and the sequence is
    exactly the last-turn sequence (same tokens, more of them supervised)."""
    history = example.messages
    answers = [i for i, m in enumerate(history) if m["role"] == "assistant"]
    for (start, _), a in zip(item.turns, answers):
        before = Example(prompt="", response="", row=0, messages=history[:a])
        assert item.input_ids[:start] == encode_prompt(tok, format_prompt(tok, before, cfg), cfg)
    assert item.input_ids[: item.turns[-1][0]] == encode_prompt(tok, format_prompt(tok, example, cfg), cfg)
    last = tokenize_causal(tok, example, cfg.model_copy(update={"train_on": "last_turn"}))
    assert last.input_ids == item.input_ids and supervised(last) == item.labels[item.turns[-1][0]:]


# ---------------------------------------------------------------- golden masks, three template families


GOLDEN = {
    "smollm": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive the opposite of hot.<|im_end|>\n"
              "<|im_start|>assistant\n" + COLD_MARKED + "[<|im_end|>]\n<|im_start|>user\nAnd of big?<|im_end|>\n"
              "<|im_start|>assistant\n[s][mall][<|im_end|>]",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nGive the opposite of hot.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n" + COLD_MARKED + "[<|eot_id|>]"
              "<|start_header_id|>user<|end_header_id|>\n\nAnd of big?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n[s][mall][<|eot_id|>]",
    "gemma": "<bos><start_of_turn>user\nGive the opposite of hot.<end_of_turn>\n<start_of_turn>model\n" + COLD_MARKED
             + "[<end_of_turn>]\n<start_of_turn>user\nAnd of big?<end_of_turn>\n<start_of_turn>model\n[s][mall][<end_of_turn>]",
}
END = {"smollm": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


@pytest.mark.parametrize("family", ["smollm", "llama3", "gemma"])
def test_golden_mask_every_assistant_turn_ends_with_the_end_of_turn_token(family, request):
    tok = request.getfixturevalue(family)
    cfg = DataConfig(system_prompt=None if family == "gemma" else "Be brief.")  # Gemma 2's template refuses a system turn
    item = tokenize_causal(tok, TWO_TURNS, cfg)
    assert marked(tok, item) == GOLDEN[family]
    end = tok.convert_tokens_to_ids(END[family])
    assert supervised(item) == ids(tok, COLD) + [end] + ids(tok, SMALL) + [end]
    assert len(item.turns) == 2 and item.prompt_length == item.turns[-1][0] and not item.truncated
    assert item.response_length == len(ids(tok, SMALL)) + 1 and not item.last_turn_only
    assert_turns_as_at_inference(tok, TWO_TURNS, item, cfg)
    # data.train_on: last_turn supervises only the last answer, on the very same tokens
    last = tokenize_causal(tok, TWO_TURNS, cfg.model_copy(update={"train_on": "last_turn"}))
    assert last.input_ids == item.input_ids and supervised(last) == ids(tok, SMALL) + [end]


def test_system_and_tool_turns_are_never_supervised(smollm):
    chat = [{"role": "system", "content": "Use the tool."}, {"role": "user", "content": HOT},
            {"role": "assistant", "content": "lookup(hot)"}, {"role": "tool", "content": "cold"},
            {"role": "assistant", "content": COLD}, {"role": "user", "content": BIG}]
    example = Example(prompt=BIG, response=SMALL, row=1, messages=chat)
    item = tokenize_causal(smollm, example, ALL)
    text = marked(smollm, item)
    assert "<|im_start|>system\nUse the tool.<|im_end|>" in text and "<|im_start|>tool\ncold<|im_end|>" in text
    assert smollm.decode(supervised(item)) == "lookup(hot)<|im_end|>" + COLD + "<|im_end|>" + SMALL + "<|im_end|>"
    assert len(item.turns) == 3
    assert_turns_as_at_inference(smollm, example, item)


# ---------------------------------------------------------------- templates that rewrite or insert text


QWEN3_TEMPLATE = (  # Qwen3's handling of reasoning: <think> blocks of answers before the last user turn are dropped
    "{%- set ns = namespace(last_query=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}GENERATION{%- endif %}"
)


def test_qwen3_style_template_that_drops_earlier_think_blocks():
    tok = chatml_tokenizer(QWEN3_TEMPLATE.replace("GENERATION", ""))
    chat = [{"role": "user", "content": HOT}, {"role": "assistant", "content": "<think>Reverse it.</think>" + COLD},
            {"role": "user", "content": BIG}]
    example = Example(prompt=BIG, response="<think>Reverse it.</think>small", row=1, messages=chat)
    item = tokenize_causal(tok, example, ALL)
    # the earlier answer is supervised as the history renders it (its reasoning dropped): the sequence trained on
    assert marked(tok, item) == ("<|im_start|>user\nGive the opposite of hot.<|im_end|>\n<|im_start|>assistant\n"
                                 + COLD_MARKED + "[<|im_end|>]\n<|im_start|>user\nAnd of big?<|im_end|>\n"
                                 "<|im_start|>assistant\n" + marked(tok, _all_supervised(tok, example.response)) + "[<|im_end|>]")
    assert_turns_as_at_inference(tok, example, item)


def _all_supervised(tok, text):
    from loralab.data import TokenizedExample

    token_ids = ids(tok, text)
    return TokenizedExample(token_ids, list(token_ids), 0, len(token_ids), False, False)


def test_generation_prompt_unlike_the_history_falls_back_to_marker_spans():
    # Qwen3 without thinking: the generation prompt writes an empty <think> block that the history never shows, so the
    # history before turn 2 does not extend the prompt of turn 1; the answers are located by markers instead
    tok = chatml_tokenizer(QWEN3_TEMPLATE.replace("GENERATION", "{{- '<think>\\n\\n</think>\\n\\n' }}"))
    from loralab.turns import incremental_turns, marker_turns

    assert incremental_turns(tok, TWO_TURNS, ALL) is None and marker_turns(tok, TWO_TURNS, ALL) is not None
    item = tokenize_causal(tok, TWO_TURNS, ALL)
    assert marked(tok, item) == ("<|im_start|>user\nGive the opposite of hot.<|im_end|>\n<|im_start|>assistant\n"
                                 + COLD_MARKED + "[<|im_end|>]\n<|im_start|>user\nAnd of big?<|im_end|>\n"
                                 "<|im_start|>assistant\n<think>\n\n</think>\n\n[s][mall][<|im_end|>]")
    last = tokenize_causal(tok, TWO_TURNS, LAST)  # the last answer follows exactly the inference prompt
    assert last.input_ids == item.input_ids and not item.last_turn_only


def test_template_that_renders_each_turn_differently_falls_back_to_the_last_turn_with_a_warning(tmp_path, caplog):
    # a header that counts the messages: no rendering is a prefix of another, no marker span gives the inference prompt
    tok = chatml_tokenizer("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + loop.index|string + '/' + "
                           "messages|length|string + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    item = tokenize_causal(tok, TWO_TURNS, ALL)
    last = tokenize_causal(tok, TWO_TURNS, LAST)
    assert (item.input_ids, item.labels) == (last.input_ids, last.labels) and "could not be split" in item.last_turn_only
    assert tok.decode(supervised(item)) == SMALL + "<|im_end|>"
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [*CHAT, {"role": "assistant", "content": SMALL}]}) for _ in range(3)))
    with caplog.at_level(logging.WARNING, logger="loralab"):
        prepare_data(DataConfig(path=str(path), eval_split=0), tok, "CAUSAL_LM")
    assert "only the last answer is supervised in 3 conversations (rows 1, 2, 3)" in caplog.text


def test_plain_template_supervises_the_last_turn_and_says_why(smollm):
    item = tokenize_causal(smollm, TWO_TURNS, DataConfig(template="plain"))
    assert "without a chat template" in item.last_turn_only and len(item.turns) == 1
    assert smollm.decode(supervised(item)) == SMALL + smollm.eos_token


# ---------------------------------------------------------------- truncation


def test_long_conversation_keeps_the_system_prompt_and_the_latest_turns_that_fit(smollm, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}]
    for a, b in [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down")]:
        chat += [{"role": "user", "content": f"Give the opposite of {a}."},
                 {"role": "assistant", "content": f"The opposite of {a} is {b}."}]
    example = Example(prompt=chat[-2]["content"], response=chat[-1]["content"], row=1, messages=chat[:-1])
    full = tokenize_causal(smollm, example, DataConfig(max_length=1000))
    assert len(full.turns) == 4 and not full.truncated
    item = tokenize_causal(smollm, example, DataConfig(max_length=len(full.input_ids) - 5))
    text = smollm.decode(item.input_ids)
    assert item.truncated and not item.response_truncated and len(item.turns) == 3
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive the opposite of big.")
    assert "hot" not in text and smollm.decode(supervised(item)).count("<|im_end|>") == 3
    # the shortened conversation is tokenized exactly as if it had started there
    shorter = Example(prompt=example.prompt, response=example.response, row=1, messages=[chat[0], *chat[3:-1]])
    assert (item.input_ids, item.labels) == (lambda t: (t.input_ids, t.labels))(tokenize_causal(smollm, shorter, ALL))
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat[:3]}) + "\n")
    prepared = prepare_data(DataConfig(path=str(path), eval_split=0, max_length=len(full.input_ids) - 5), smollm, "CAUSAL_LM")
    assert prepared.truncation_counts() == {"truncated_examples": 1, "truncated_responses": 0}


# ---------------------------------------------------------------- ShareGPT and format detection


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


SHAREGPT = {"system": "Be brief.", "conversations": [{"from": "human", "value": HOT}, {"from": "gpt", "value": COLD},
                                                    {"from": "user", "value": BIG}, {"from": "assistant", "value": SMALL}]}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, *CHAT, {"role": "assistant", "content": SMALL}]}


def test_sharegpt_is_detected_and_parsed_like_messages(tmp_path):
    share = load_examples(DataConfig(path=str(write_jsonl(tmp_path / "share.jsonl", [SHAREGPT]))), "CAUSAL_LM")
    plain = load_examples(DataConfig(path=str(write_jsonl(tmp_path / "msgs.jsonl", [MESSAGES]))), "CAUSAL_LM")
    assert share == plain and share[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert (share[0].prompt, share[0].response) == (BIG, SMALL)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"dialog": SHAREGPT["conversations"]}])
    (example,) = load_examples(DataConfig(path=str(renamed), format="sharegpt", conversations_field="dialog"), "CAUSAL_LM")
    assert example.messages == CHAT
    observation = [{"from": "human", "value": HOT}, {"from": "gpt", "value": "lookup(hot)"},
                   {"from": "observation", "value": "cold"}, {"from": "gpt", "value": COLD}]
    (example,) = load_examples(DataConfig(path=str(write_jsonl(tmp_path / "tool.jsonl", [{"conversations": observation}]))),
                               "CAUSAL_LM")
    assert [m["role"] for m in example.messages] == ["user", "assistant", "tool"]


def test_ambiguous_and_mixed_formats_name_the_file_and_row(tmp_path):
    both = write_jsonl(tmp_path / "both.jsonl", [MESSAGES, {**MESSAGES, **SHAREGPT}])
    with pytest.raises(DataError, match=r"both.jsonl, row 2: ambiguous format.*'messages'.*'conversations'"):
        load_examples(DataConfig(path=str(both)), "CAUSAL_LM")
    (example, _) = load_examples(DataConfig(path=str(both), format="messages"), "CAUSAL_LM")  # an explicit format decides
    assert example.response == SMALL
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [MESSAGES, MESSAGES, SHAREGPT])
    with pytest.raises(DataError, match=r"mixed.jsonl, row 3: mixed formats: this row is sharegpt but row 1 is messages"):
        load_examples(DataConfig(path=str(mixed)), "CAUSAL_LM")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": HOT, "response": COLD}, MESSAGES])
    with pytest.raises(DataError, match=r"pairs.jsonl, row 2: mixed formats: this row is messages but row 1 is pairs"):
        load_examples(DataConfig(path=str(pairs)), "CAUSAL_LM")


BAD = [  # conversation, expected words
    ({"messages": [{"role": "user", "content": HOT}]}, "the last message should be the assistant's answer, got role 'user' "
                                                       "in field 'messages' (the conversation has no assistant turn)"),
    ({"conversations": [{"from": "human", "value": HOT}, {"from": "gpt", "value": COLD}, {"from": "human", "value": BIG}]},
     "the last message should be the assistant's answer, got role 'human' in field 'conversations'"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": COLD}]},
     "field 'messages', message 1 (user) is empty"),
    ({"conversations": [{"from": "human", "value": HOT}, {"from": "gpt", "value": ""}, {"from": "human", "value": BIG},
                        {"from": "gpt", "value": SMALL}]}, "field 'conversations', turn 2 (assistant) is empty"),
    ({"messages": [{"role": "user", "content": HOT}, {"role": "assistant", "content": "  "}]},
     "field 'messages': the last message (the assistant's answer) is empty"),
    ({"messages": [{"role": "user", "content": HOT}, {"role": "bot", "content": COLD}]},
     "field 'messages', message 2: unknown role 'bot'; expected one of user, assistant, system, tool"),
    ({"conversations": [{"from": "human", "value": HOT}, {"from": "chatgpt", "value": COLD}]},
     "field 'conversations', turn 2: unknown role 'chatgpt'; expected one of human, user, gpt, assistant, system"),
    ({"conversations": [{"from": "human", "text": HOT}, {"from": "gpt", "value": COLD}]},
     "turn 1 should have 'from' and 'value'"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": COLD}]},
     "no user message before the assistant's answer in field 'messages'"),
]


@pytest.mark.parametrize("record, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_conversations_are_one_data_error_naming_file_row_and_field(tmp_path, record, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [MESSAGES if "messages" in record else SHAREGPT, record])
    with pytest.raises(DataError) as info:
        load_examples(DataConfig(path=str(path)), "CAUSAL_LM")
    assert f"bad.jsonl, row 2: {words}" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- named templates for base models


def test_named_chatml_on_a_base_tokenizer_formats_like_the_model_family_and_is_kept_for_generation(smollm):
    from loralab.generation import LoadedRun, prompt_token_ids

    tok = chatml_tokenizer(template=None)  # a base model: ChatML tokens, no template of its own
    assert format_prompt(tok, TWO_TURNS, ALL).startswith("### Instruction:")  # auto: plain, as before
    cfg = DataConfig(template="chatml")
    config = RunConfig(data=cfg)
    assert format_prompt(tok, TWO_TURNS, cfg) == format_prompt(smollm, TWO_TURNS, ALL)
    assert tok.chat_template == TEMPLATES["chatml"]  # set on the tokenizer, so generation formats the same
    item = tokenize_causal(tok, TWO_TURNS, cfg)
    assert marked(tok, item) == marked(smollm, tokenize_causal(smollm, TWO_TURNS, ALL))
    assert prompt_token_ids(LoadedRun(config, "CAUSAL_LM", chatml_tokenizer(None), None), TWO_TURNS) == item.input_ids[: item.prompt_length]


@pytest.mark.parametrize("name, make, own", [("llama3", llama3_tokenizer, LLAMA3_TEMPLATE), ("gemma", gemma_tokenizer, GEMMA_TEMPLATE)])
def test_named_llama3_and_gemma_render_as_the_families_templates(name, make, own):
    tok, reference = make(None), make()
    cfg = DataConfig(template=name)
    assert format_prompt(tok, TWO_TURNS, cfg) == format_prompt(reference, TWO_TURNS, ALL)
    item = tokenize_causal(tok, TWO_TURNS, cfg)
    assert marked(tok, item) == marked(reference, tokenize_causal(reference, TWO_TURNS, ALL)) and len(item.turns) == 2
    if name == "gemma":  # no system turn in Gemma: the system text opens the first user turn
        system = Example(prompt=HOT, response=COLD, row=1, messages=[{"role": "system", "content": "Be brief."},
                                                                    {"role": "user", "content": HOT}])
        assert format_prompt(tok, system, cfg) == ("<bos><start_of_turn>user\nBe brief.\n\nGive the opposite of hot."
                                                   "<end_of_turn>\n<start_of_turn>model\n")


def test_named_alpaca_template_on_a_base_model_supervises_every_turn_ending_with_eos():
    tok = base_tokenizer()
    cfg = DataConfig(template="alpaca")
    assert target_end_ids(tok, cfg) == [tok.eos_token_id]
    item = tokenize_causal(tok, TWO_TURNS, cfg)
    assert marked(tok, item).startswith("Below is an instruction that describes a task. Write a response that "
                                        "appropriately completes the request.\n\n### Instruction:\nGive the opposite of hot."
                                        "\n\n### Response:\n[The]")
    assert tok.decode(supervised(item)) == COLD + "<|endoftext|>" + SMALL + "<|endoftext|>"
    assert_turns_as_at_inference(tok, TWO_TURNS, item, cfg)


def test_named_template_needs_its_special_tokens():
    with pytest.raises(ConfigError, match=r"data.template 'chatml' needs '<\|im_start\|>', '<\|im_end\|>' as single tokens"):
        format_prompt(base_tokenizer(), TWO_TURNS, DataConfig(template="chatml"))
    with pytest.raises(ConfigError, match=r"'<start_of_turn>', '<end_of_turn>'"):
        tokenize_causal(llama3_tokenizer(None), TWO_TURNS, DataConfig(template="gemma"))
    with pytest.raises(LoralabError, match="data.chat_template is false but data.template is 'llama3'"):
        build_config(overrides=["data.chat_template=false", "data.template=llama3"])


def test_plain_template_ignores_the_tokenizer_template(smollm):
    cfg = DataConfig(template="plain")
    assert format_prompt(smollm, TWO_TURNS, cfg) == format_prompt(smollm, TWO_TURNS, DataConfig(chat_template=False))
    assert smollm.chat_template == CHAT_TEMPLATE


# ---------------------------------------------------------------- raw text


def test_raw_text_supervises_every_token_and_appends_eos(gemma, tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "The opposite of hot is cold. " * 3}, {"text": "Up and down."}])
    examples = load_examples(DataConfig(path=str(path)), "CAUSAL_LM")
    assert all(e.raw_text for e in examples)
    item = tokenize_causal(gemma, examples[1], ALL)
    assert item.input_ids == [gemma.bos_token_id] + ids(gemma, "Up and down.") + [gemma.eos_token_id]
    assert item.labels == item.input_ids and item.prompt_length == 0 and not item.truncated
    cut = tokenize_causal(gemma, examples[0], DataConfig(max_length=10))
    assert len(cut.input_ids) == 10 and cut.truncated and cut.response_truncated and cut.labels == cut.input_ids
    with pytest.raises(DataError, match="docs.jsonl: raw text"):
        load_examples(DataConfig(path=str(path)), "SEQ_2_SEQ_LM")
    with pytest.raises(DataError, match="e.jsonl, row 1: field 'text' is empty"):
        load_examples(DataConfig(path=str(write_jsonl(tmp_path / "e.jsonl", [{"text": " "}]))), "CAUSAL_LM")


# ---------------------------------------------------------------- checks and --show


def test_label_masking_check_and_show_see_every_supervised_turn(tiny_llama_dir, tmp_path):
    from loralab.checks import check_label_masking, render_examples
    from loralab.data import FeatureDataset
    from loralab.training import setup

    rows = [{"messages": [{"role": "user", "content": f"Give the opposite of {a}."}, {"role": "assistant", "content": f"{b}."},
                          {"role": "user", "content": "And again?"}, {"role": "assistant", "content": f"Still {b}."}]}
            for a, b in [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("wet", "dry")]]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    session = setup(build_config(overrides=tiny_overrides(tiny_llama_dir, path, tmp_path, **{"data.eval_split": 0.2})))
    result = check_label_masking(session)
    assert result.status == "pass", result.reason
    assert "every assistant turn: 5 conversations supervise 10 answers" in result.reason
    shown = render_examples(session, 1)[0]
    answer = session.data.train_examples[0].messages[1]["content"]  # each supervised turn is its own [[...]]
    assert shown.count("[[") == 2 and "in 2 assistant turns" in shown.splitlines()[0]
    assert f"<|im_start|>assistant\n[[{answer}<|im_end|>]]\n<|im_start|>user\nAnd again?<|im_end|>\n" \
           f"<|im_start|>assistant\n[[Still {answer}<|im_end|>]]" in shown, shown
    session.data.train = FeatureDataset(list(session.data.train.tokenized), "CAUSAL_LM")  # in memory: masks to break
    first = session.data.train.tokenized[0]
    start, end = first.turns[0]
    labels = list(first.labels)
    labels[end - 1] = IGNORE_INDEX  # the first answer's end of turn masked: the check must catch it
    session.data.train.tokenized[0] = type(first)(**{**first.__dict__, "labels": labels})
    result = check_label_masking(session)
    assert result.status == "fail" and "is masked or missing in 1 examples" in result.reason
    labels[end - 1], labels[start - 1] = first.labels[end - 1], first.input_ids[start - 1]  # a prompt token supervised
    session.data.train.tokenized[0] = type(first)(**{**first.__dict__, "labels": labels})
    assert "prompt tokens supervised in 1 examples" in check_label_masking(session).reason


def test_eval_scores_each_assistant_turn_given_the_history_before_it(tiny_llama_dir, tmp_path):
    from loralab.evaluation import eval_examples, evaluate_run
    from loralab.generation import GenerationSettings
    from loralab.training import train
    from loralab.turns import answer_turns
    from conftest import run_cli

    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Give the opposite of {a}."}, {"role": "assistant", "content": f"{b}."},
                          {"role": "user", "content": "And again?"}, {"role": "assistant", "content": f"Still {b}."}]}
            for a, b in [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("wet", "dry")]]
    rows.append({"messages": [{"role": "user", "content": "Opposite of early?"}, {"role": "assistant", "content": "late"}]})
    path = write_jsonl(tmp_path / "chats.jsonl", rows * 2)
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, path, tmp_path / "runs", name="c", **{
        "data.eval_split": 0.5, "train.max_steps": 1}))
    train(config, progress=False)
    run_dir = tmp_path / "runs" / "c"
    held = eval_examples(config, "CAUSAL_LM", run_dir)
    report = evaluate_run(run_dir, settings=GenerationSettings(max_new_tokens=4), progress=False)
    expected = [turn for example in held for turn in answer_turns(example)]
    several = sum(len(answer_turns(e)) > 1 for e in held)
    assert report["n"] == report["base"]["n"] == len(expected) == len(held) + several and several > 0
    assert f"{several} conversations with several answers" in report["turns"]
    predicted = report["predictions"]
    assert [(p["row"], p.get("turn"), p["reference"]) for p in predicted] == \
        [(e.row, e.turn, e.response) for e in expected]
    first = next(p for p in predicted if p.get("turn") == 1)  # the first answer: only the history before it
    assert [m["role"] for m in first["messages"]] == ["system", "user"] and first["reference"].endswith(".")
    second = next(p for p in predicted if p.get("turn") == 2)
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["prompt"] == "And again?" and second["reference"].startswith("Still ")
    code, out = run_cli("eval", run_dir, "--max-new-tokens", "4")
    assert code == 0 and "each assistant turn scored given the history before it" in " ".join(out.split()), out
    # train.eval_generate scores the same answers during training (up to its limit)
    from loralab.evaluation import GenerationMetricsCallback

    during = GenerationMetricsCallback(None, config, "CAUSAL_LM", held).examples
    assert [(e.row, e.turn, e.response) for e in during] == [(e.row, e.turn, e.response) for e in expected]
