"""The Ollama ``Modelfile`` next to a GGUF export: FROM, the chat template as a Go template, its stop tokens, the run's
system prompt; ``ollama create NAME -f FILE.Modelfile`` works as is.

The Go template is read off the model's Jinja chat template by rendering conversations with markers as contents:
what each role's message writes before and after its content, and the generation prompt. It is checked by rendering
a longer conversation both ways before it is written. Two layouts are recognised: one turn after another (ChatML,
Llama 3, SmolLM2, Qwen) and a system prompt folded into the first user turn (Gemma). A run formatted with loralab's
plain template gets that template (``### Instruction:`` / ``### Response:``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loralab.errors import LoralabError
from loralab.templates import PLAIN_PROMPT_TEMPLATE

_M = "\ue000{}\ue001"  # private-use markers: never in real text, untouched by templates' trim filters


@dataclass
class ChatLayout:
    """What a chat template writes around each message: ``before[role] + content + after[role]``."""

    prefix: str  # written once at the start when the conversation has no system message first (BOS, a default
    # system prompt); a first system message writes ``before["system"]`` instead
    before: dict[str, str]
    after: dict[str, str]
    generation: str  # what opens the assistant's answer
    system_in_user: bool = False  # Gemma: the system text opens the first user turn, followed by ``system_sep``
    system_sep: str = ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as this layout writes it (for checking against the Jinja template)."""
        first_is_system = bool(messages) and messages[0]["role"] == "system" and not self.system_in_user
        out, system = ["" if first_is_system else self.prefix], ""
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system" and self.system_in_user:
                system = content
            elif role == "user" and self.system_in_user:
                out.append(self.before["user"] + (system + self.system_sep if system else "") + content + self.after["user"])
                system = ""
            else:
                out.append(self.before[role] + content + self.after[role])
        if add_generation_prompt:
            out.append(self.generation)
        return "".join(out)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split(text: str, *markers: str) -> list[str]:
    """``text`` cut at the markers, in order: the pieces between them (head first, tail last)."""
    pieces, rest = [], text
    for marker in markers:
        if marker not in rest:
            raise ValueError(marker)
        head, rest = rest.split(marker, 1)
        pieces.append(head)
    return [*pieces, rest]


def chat_layout(tokenizer: Any) -> ChatLayout:
    """Read the layout off the tokenizer's Jinja chat template; a LoralabError when it is not one of the two."""
    s, u, u2, a = (_M.format(n) for n in ("system", "user", "user2", "assistant"))
    user, answer = {"role": "user", "content": u}, {"role": "assistant", "content": a}
    try:
        head1, after_user = _split(_render(tokenizer, [user], False), u)
        generation = _split(_render(tokenizer, [user], True), u)[1][len(after_user):]
        _, between, after_assistant = _split(_render(tokenizer, [user, answer], False), u, a)
        again = _split(_render(tokenizer, [user, answer, {"role": "user", "content": u2}], False), u, a, u2)[2]
    except Exception as exc:  # noqa: BLE001 - templates raise anything
        raise LoralabError(f"cannot read the chat template's layout ({type(exc).__name__}: {exc})") from None
    before_user = again[len(after_assistant):]  # a later user turn: what opens it, without the one-time prefix
    if not (between.startswith(after_user) and again.startswith(after_assistant) and head1.endswith(before_user)):
        raise LoralabError("the chat template writes turns in a layout a Modelfile template cannot express")
    prefix = head1[: len(head1) - len(before_user)]
    layout = ChatLayout(prefix, {"user": before_user, "assistant": between[len(after_user):]},
                        {"user": after_user, "assistant": after_assistant}, generation)
    try:
        head4, between4, _ = _split(_render(tokenizer, [{"role": "system", "content": s}, user], False), s, u)
    except Exception:  # noqa: BLE001 - a template without a system role
        return layout
    if head4 == head1:  # Gemma: the system text opens the first user turn
        layout.system_in_user, layout.system_sep = True, between4
    elif between4.endswith(layout.before["user"]):
        layout.before["system"] = head4
        layout.after["system"] = between4[: len(between4) - len(layout.before["user"])]
    return layout


def check_layout(tokenizer: Any, layout: ChatLayout) -> None:
    """Render a longer conversation with the Jinja template and with the layout; they must be equal."""
    messages = [{"role": "system", "content": "Be brief."}] if ("system" in layout.before or layout.system_in_user) else []
    messages += [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                 {"role": "user", "content": "Thanks"}]
    if layout.render(messages) != _render(tokenizer, messages, True):
        raise LoralabError("the chat template does not follow a layout a Modelfile template can express")


def _literal(text: str) -> str:
    """Text in a Go template: as is, or as a quoted string when it holds template delimiters."""
    return text if "{{" not in text and "}}" not in text else "{{ " + json.dumps(text) + " }}"


def go_template(layout: ChatLayout, runtime_adds_bos: bool, bos_token: str | None = None) -> str:
    """Ollama's TEMPLATE (Go text/template over ``.Messages``) for a chat layout. The runtime adds BOS itself when
    the GGUF says so; the template's own BOS is then left out (else it would be there twice)."""

    def lit(text: str) -> str:
        if runtime_adds_bos and bos_token and text.startswith(bos_token):
            text = text[len(bos_token):]
        return _literal(text)

    user_open = _literal(layout.before["user"])
    if layout.system_in_user:
        user_open += "{{ if $system }}{{ $system }}" + _literal(layout.system_sep) + '{{ $system = "" }}{{ end }}'
        system = "{{ $system = .Content }}"
    elif "system" in layout.before:
        system = lit(layout.before["system"]) + "{{ .Content }}" + _literal(layout.after["system"])
    else:
        system = ""
    start = "{{ if eq $i 0 }}" + (lit(layout.prefix) if layout.system_in_user else
                                  '{{ if ne .Role "system" }}' + lit(layout.prefix) + "{{ end }}") + "{{ end }}"
    body = ('{{ if eq .Role "system" }}' + system
            + '{{ else if eq .Role "user" }}' + user_open + "{{ .Content }}" + _literal(layout.after["user"])
            + "{{ if $last }}" + _literal(layout.generation) + "{{ end }}"
            + '{{ else if eq .Role "assistant" }}' + _literal(layout.before["assistant"]) + "{{ .Content }}"
            + "{{ if not $last }}" + _literal(layout.after["assistant"]) + "{{ end }}{{ end }}")
    return (('{{ $system := "" }}' if layout.system_in_user else "") + "{{ range $i, $_ := .Messages }}"
            + "{{ $last := eq (len (slice $.Messages $i)) 1 }}" + start + body + "{{ end }}")


def plain_go_template() -> str:
    """loralab's plain template (system prompt, ``### Instruction:``, ``### Response:``) for one prompt at a time."""
    head, tail = PLAIN_PROMPT_TEMPLATE.split("{prompt}")
    return "{{ if .System }}{{ .System }}\n\n{{ end }}" + head + "{{ .Prompt }}" + tail + "{{ .Response }}"


def plain_jinja_template() -> str:
    """The same plain template as a Jinja chat template (for the GGUF's ``tokenizer.chat_template``): the last user
    message, with the system message before it, as loralab formats a single prompt."""
    head, tail = PLAIN_PROMPT_TEMPLATE.split("{prompt}")
    return ("{%- set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list -%}"
            "{%- set users = messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | list -%}"
            "{%- if system %}{{ system[0] }}\n\n{% endif -%}" + head + "{{ users[-1] if users else '' }}" + tail)


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise LoralabError(f"the {what} holds three double quotes in a row, which a Modelfile cannot quote")
    return f'"""{value}"""'


def modelfile_text(gguf_name: str, template: str | None, stops: list[str], system: str | None, source: str) -> str:
    """The Modelfile: FROM the GGUF next to it, TEMPLATE, SYSTEM, one stop PARAMETER per stop token."""
    lines = [f"# Ollama Modelfile written by loralab export ({source}); use: ollama create NAME -f THIS_FILE",
             f"FROM ./{gguf_name}"] + ([f"TEMPLATE {_quoted(template, 'chat template')}"] if template is not None else [])
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt (data.system_prompt)')}")
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    return "\n".join(lines) + "\n"


def modelfile_for(tokenizer: Any, data_cfg: Any, gguf_name: str, runtime_adds_bos: bool, source: str) -> str:
    """The Modelfile for a run's tokenizer and data settings (its chat template or the plain one)."""
    from loralab.templates import chat_end_ids, uses_chat_template

    template: str | None
    if uses_chat_template(tokenizer, data_cfg):
        try:
            layout = chat_layout(tokenizer)
            check_layout(tokenizer, layout)
            template = go_template(layout, runtime_adds_bos, tokenizer.bos_token)
        except LoralabError as exc:  # Ollama then reads the Jinja template in the GGUF (tokenizer.chat_template)
            template, source = None, f"{source}; no TEMPLATE: {exc}"
        ids = chat_end_ids(tokenizer)[-1:] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    else:
        template = plain_go_template()
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids))
    return modelfile_text(gguf_name, template, stops, data_cfg.system_prompt, source)


def stop_texts(modelfile: str) -> list[str]:
    """The stop strings a Modelfile sets."""
    return [json.loads(line.split(" ", 2)[2]) for line in modelfile.splitlines() if line.startswith("PARAMETER stop ")]


def template_of(modelfile: str) -> str:
    """The TEMPLATE of a Modelfile (between its triple quotes)."""
    start = modelfile.index('TEMPLATE """') + len('TEMPLATE """')
    return modelfile[start : modelfile.index('"""', start)]
