"""The Ollama Modelfile: its Go template, rendered with Go's own text/template (the engine Ollama uses; skipped where
``go`` is not installed) for a conversation, gives exactly the token ids of loralab's own prompt formatting: system
prompt included, Gemma's system-in-the-first-user-turn, and the plain template of a model without a chat template."""

import json
import shutil
import subprocess

import pytest

from loralab.config import build_config
from loralab.errors import LoralabError
from loralab.export.gguf_tokenizer import added_specials
from loralab.export.modelfile import chat_layout, check_layout, modelfile_for, stop_texts, template_of
from loralab.generation import LoadedRun, prompt_token_ids
from loralab.templates import TEMPLATES, format_prompt
from conftest import CHAT_TEMPLATE, _corpus
from tiny_gemma import gemma_tokenizer

GO_RENDERER = r"""package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		Data     struct {
			Messages                 []Message
			System, Prompt, Response string
		}
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, in.Data); err != nil {
		panic(err)
	}
}
"""

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's own: a default system prompt when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("go is not installed (apt-get install golang-go): Ollama's templates are Go text/template")
    folder = tmp_path_factory.mktemp("gorender")
    (folder / "main.go").write_text(GO_RENDERER)
    subprocess.run(["go", "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, cwd=folder,
                   env={**__import__("os").environ, "GOCACHE": str(folder / "cache"), "GO111MODULE": "off"})

    def render(template: str, **data) -> str:
        out = subprocess.run([str(folder / "render")], input=json.dumps({"Template": template, "Data": data}),
                             capture_output=True, text=True, check=True)
        return out.stdout

    return render


@pytest.fixture()
def llama_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _run(tokenizer, **data):
    config = build_config(overrides=[f"data.{k}={v}" for k, v in data.items()])
    return LoadedRun(config, "CAUSAL_LM", tokenizer, None)


def _ollama_ids(go_render, modelfile, tokenizer, messages):
    """What Ollama feeds the model: the SYSTEM message first, the template rendered, BOS when the GGUF adds it."""
    system = modelfile.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in modelfile else ""
    template = template_of(modelfile)
    if ".Messages" in template:
        chat = ([{"Role": "system", "Content": system}] if system else []) + \
            [{"Role": m["role"], "Content": m["content"]} for m in messages]
        text = go_render(template, Messages=chat, System=system, Prompt="", Response="")
    else:
        text = go_render(template, Messages=[], System=system, Prompt=messages[-1]["content"], Response="")
    bos = [tokenizer.bos_token_id] if added_specials(tokenizer)[0] else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", ["tiny", "smollm2", "chatml", "llama3", "gemma", "alpaca"])
def test_chat_layout_renders_like_the_jinja_template(template, llama_tokenizer):
    tokenizer = gemma_tokenizer(_corpus()) if template == "gemma" else llama_tokenizer
    if template == "llama3":  # its special tokens, as a Llama 3 tokenizer has them
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                    "<|eot_id|>"]})
    tokenizer.chat_template = {"tiny": CHAT_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE}.get(template, TEMPLATES.get(template))
    layout = chat_layout(tokenizer)
    check_layout(tokenizer, layout)  # a longer conversation, with and without a system message
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "three"}]
    assert layout.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert layout.system_in_user == (template == "gemma")


def test_a_template_no_modelfile_can_express_is_left_to_the_gguf(llama_tokenizer):
    llama_tokenizer.chat_template = ("{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n"
                                     "{% endfor %}{% if add_generation_prompt %}Turn:{% endif %}")
    with pytest.raises(LoralabError, match="layout a Modelfile template cannot express"):
        check_layout(llama_tokenizer, chat_layout(llama_tokenizer))
    modelfile = modelfile_for(llama_tokenizer, build_config().data, "m.gguf", False, "a run")
    assert "TEMPLATE" not in modelfile.split("\n", 1)[1] and "no TEMPLATE: the chat template writes turns" in modelfile
    assert stop_texts(modelfile) == [llama_tokenizer.eos_token]  # EOS still stops answers


@pytest.mark.parametrize("case", ["chatml+system", "smollm2-default-system", "smollm2+system", "gemma+system",
                                  "plain+system", "plain"])
def test_modelfile_template_tokenizes_like_loralab(case, go_render, llama_tokenizer):
    if case.startswith("gemma"):
        tokenizer = gemma_tokenizer(_corpus())
    else:
        tokenizer = llama_tokenizer
        tokenizer.chat_template = None if case.startswith("plain") else \
            (SMOLLM2_TEMPLATE if case.startswith("smollm2") else CHAT_TEMPLATE)
    run = _run(tokenizer, **({"system_prompt": "'Answer in one word.'"} if "+system" in case else {}))
    modelfile = modelfile_for(tokenizer, run.config.data, "model.gguf", added_specials(tokenizer)[0], "a test run")
    assert modelfile.splitlines()[1] == "FROM ./model.gguf"
    assert ('SYSTEM """Answer in one word."""' in modelfile) == ("+system" in case)
    for prompt in ("Give the opposite of hot.", "水 猫 東京 こんにちは"):
        expected = prompt_token_ids(run, prompt)  # exactly what training and `loralab generate` feed the model
        assert _ollama_ids(go_render, modelfile, tokenizer, [{"role": "user", "content": prompt}]) == expected
    if not case.startswith("plain"):  # a conversation: earlier turns as loralab's own chat formatting writes them
        from loralab.formats import Example

        turns = [{"role": "user", "content": "Give the opposite of up."}, {"role": "assistant", "content": "down"},
                 {"role": "user", "content": "And of left?"}]
        example = Example(prompt=turns[-1]["content"], response="", row=0, messages=turns)
        text = format_prompt(tokenizer, example, run.config.data)
        bos = [tokenizer.bos_token_id] if added_specials(tokenizer)[0] and not text.startswith(tokenizer.bos_token) else []
        assert _ollama_ids(go_render, modelfile, tokenizer, turns) == bos + tokenizer(text, add_special_tokens=False)["input_ids"]
    stops = stop_texts(modelfile)
    assert stops[0] == {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "gemma": "<end_of_turn>"}.get(
        case.split("+")[0].split("-")[0], tokenizer.eos_token)
