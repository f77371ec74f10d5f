"""Prompt formats: the tokenizer's chat template, a named template loralab ships (``data.template``), or the plain
``### Instruction:`` template; and the token that ends an assistant turn.

A named template is a Jinja chat template set as the tokenizer's ``chat_template`` whenever data is formatted
(``uses_chat_template``), so training, ``loralab check``, generation and eval format identically; the special tokens it
writes must exist in the tokenizer (else a ``ConfigError`` naming them).
"""

from __future__ import annotations

import weakref
from typing import Any

from loralab.config import DataConfig
from loralab.errors import ConfigError
from loralab.formats import Example

PLAIN_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

TEMPLATES = {  # data.template: Jinja chat templates, as the model families' own (system and tool roles included)
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "llama3": "{{ bos_token or '' }}{% for message in messages %}"
              "{% set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
              "{{ '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    # Gemma has no system turn: the system text opens the first user turn that follows it (as Gemma 3's template does)
    "gemma": "{{ bos_token or '' }}{% set ns = namespace(system='') %}{% for message in messages %}"
             "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] | trim + '\n\n' %}"
             "{% else %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
             "{{ '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') + message['content'] | trim"
             " + '<end_of_turn>\n' }}{% if role == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    "alpaca": "{{ bos_token or '' }}{% if messages[0]['role'] != 'system' %}{{ '" + ALPACA_SYSTEM + "\n\n' }}{% endif %}"
              "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
              "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
              "{% elif message['role'] == 'tool' %}{{ '### Input:\n' + message['content'] + '\n\n' }}"
              "{% else %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
}
TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>"),
                   "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                   "gemma": ("<start_of_turn>", "<end_of_turn>"), "alpaca": ()}


def _is_one_token(tokenizer: Any, token: str) -> bool:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        return False
    return list(tokenizer(token, add_special_tokens=False)["input_ids"]) == [token_id]


def apply_template(tokenizer: Any, name: str) -> None:
    """Set the named template as the tokenizer's chat template, after checking that its special tokens exist."""
    template = TEMPLATES[name]
    if getattr(tokenizer, "chat_template", None) == template:
        return
    missing = [t for t in TEMPLATE_TOKENS[name] if not _is_one_token(tokenizer, t)]
    if name == "alpaca" and getattr(tokenizer, "eos_token", None) is None:
        missing.append("an EOS token")
    if missing:
        owner = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ConfigError(f"data.template {name!r} needs {', '.join(repr(t) if t.startswith('<') else t for t in missing)}"
                          f" as single tokens, which the tokenizer of {owner} lacks (adding tokens means training new "
                          "embeddings); use a template built on this tokenizer's own tokens, or data.template: alpaca / "
                          "plain (they need only EOS)")
    tokenizer.chat_template = template


def uses_chat_template(tokenizer: Any, cfg: DataConfig) -> bool:
    """Whether prompts are rendered with a chat template: a named ``data.template`` (set on the tokenizer here), or with
    ``auto`` the tokenizer's own when it has one; ``plain`` (or ``data.chat_template: false``) never."""
    if cfg.template == "plain" or not cfg.chat_template:
        return False
    if cfg.template != "auto":
        apply_template(tokenizer, cfg.template)
        return True
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(example: Example, cfg: DataConfig) -> list[dict[str, str]]:
    messages = list(example.messages) or [{"role": "user", "content": example.prompt}]
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages


def format_prompt(tokenizer: Any, example: Example, cfg: DataConfig, task_type: str = "CAUSAL_LM") -> str:
    """The exact text placed before the answer, in training and in generation."""
    if task_type != "CAUSAL_LM":
        return example.prompt
    if uses_chat_template(tokenizer, cfg):
        return tokenizer.apply_chat_template(prompt_messages(example, cfg), tokenize=False, add_generation_prompt=True)
    if example.messages:
        turns = "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt_messages(example, cfg))
        return PLAIN_PROMPT_TEMPLATE.format(prompt=turns)
    system = f"{cfg.system_prompt}\n\n" if cfg.system_prompt else ""
    return system + PLAIN_PROMPT_TEMPLATE.format(prompt=example.prompt)


def encode_prompt(tokenizer: Any, prompt_text: str, cfg: DataConfig) -> list[int]:
    """Token ids of a formatted prompt: the chat template carries its own special tokens, plain text gets BOS."""
    if uses_chat_template(tokenizer, cfg):
        return tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]  # tokenizers that append EOS to every text
    return ids


# Marks the place of a message's content when a template is rendered to find where things are (private-use
# characters: never in real text, untouched by the ``trim`` filters templates apply to contents).
_MARK = "\ue000loralab{}\ue001"
_chat_end_cache: "weakref.WeakKeyDictionary[Any, dict[Any, list[int]]]" = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: bos/eos/pad/... and every added token flagged special (``<|eot_id|>``)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return ids


def _read_chat_end(tokenizer: Any) -> list[int]:
    answer = _MARK.format("answer")
    user = {"role": "user", "content": "Hi"}
    for messages in ([user, {"role": "assistant", "content": answer}],
                     [{"role": "system", "content": "Be brief."}, user, {"role": "assistant", "content": answer}]):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - templates raise anything (raise_exception, missing variables)
            continue
        if isinstance(text, str) and answer in text:
            break
    else:
        return []
    after = text[text.rindex(answer) + len(answer) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = _special_ids(tokenizer)
    end = next((i for i, token_id in enumerate(ids) if token_id in special), None)
    return [] if end is None else list(ids[: end + 1])


def chat_end_ids(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer's chat template writes right after an assistant message, up to and including the first
    special token: ChatML ``<|im_end|>``, Gemma ``<end_of_turn>``, Llama 3 ``<|eot_id|>`` (``[]`` when there is no
    template or no special token ends the turn).

    Read off by rendering a user message and an assistant message with a marker as its content. What the template
    writes after that special token (the newline after ``<end_of_turn>`` / ``<|im_end|>``, or a closing EOS) is left
    out: generation stops at the special token, so the model never has to produce what follows it.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return []
    key = (repr(template), getattr(tokenizer, "eos_token_id", None))
    try:
        cache = _chat_end_cache.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    if key not in cache:
        cache[key] = _read_chat_end(tokenizer)
    return list(cache[key])


def target_end_ids(tokenizer: Any, cfg: DataConfig) -> list[int]:
    """What every causal target ends with, supervised: the chat template's end of an assistant turn when the data is
    formatted with the template (``<end_of_turn>`` for Gemma, ``<|im_end|>`` for Qwen2.5 whose EOS is ``<|endoftext|>``),
    otherwise EOS."""
    if uses_chat_template(tokenizer, cfg):
        ids = chat_end_ids(tokenizer)
        if ids:
            return ids
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def target_end_id(tokenizer: Any, cfg: DataConfig) -> int | None:
    """The token a complete causal target ends with (the last of ``target_end_ids``), or None."""
    ids = target_end_ids(tokenizer, cfg)
    return ids[-1] if ids else None

