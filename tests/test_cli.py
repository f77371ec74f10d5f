"""The command line: bad input gives one clear message and a non-zero exit, never a traceback."""

import json

import pytest
from typer.testing import CliRunner

from loralab.cli import app
from conftest import tiny_overrides

runner = CliRunner()


def _run(args):
    result = runner.invoke(app, args)
    text = result.stdout + (result.stderr if result.stderr_bytes is not None else "")
    return result.exit_code, text


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def test_config_show_resolves_overrides():
    code, out = _run(["config", "show", "--set", "lora.r=8", "--model", "some/model"])
    assert code == 0 and "r: 8" in out and "name_or_path: some/model" in out


@pytest.mark.parametrize("args, fragment", [
    (["--set", "lora.r=0"], "lora.r"),
    (["--set", "lora.dropout=1.5"], "lora.dropout"),
    (["--set", "model.task_type=MAGIC"], "model.task_type"),
    (["--set", "lora.rank=2"], "unknown config key 'lora.rank'"),
])
def test_bad_config_values(args, fragment):
    code, out = _run(["train", *args])
    assert code == 1 and fragment in out and "Traceback" not in out


def test_bad_data_files(tmp_path, tiny_llama_dir):
    missing = tmp_path / "missing.json"
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "response": "b"},\n{"instruction": ]')
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"question": "a", "answer": "b"}]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, fragment in [(missing, "data file not found"), (broken, "broken.json: invalid JSON at line 2"),
                           (wrong, "row 1: missing field 'instruction'"), (empty, "empty")]:
        code, out = _run(["train", "--model", str(tiny_llama_dir), "--data", str(path), "--output", str(tmp_path / "o")])
        assert code == 1 and fragment in out and "Traceback" not in out, out


def test_target_modules_matching_nothing(tmp_path, tiny_llama_dir, opposites_file):
    code, out = _run(["train", "--skip-checks", *_sets(tiny_overrides(tiny_llama_dir, opposites_file, tmp_path, name="x")),
                      "--set", "lora.target_modules=[wi, wo]"])
    assert code == 1 and "matched no module" in out and "q_proj" in out and "Traceback" not in out


def test_train_end_to_end_and_refuse_existing_folder(tmp_path, tiny_llama_dir, opposites_file):
    args = ["train", "--skip-checks", *_sets(tiny_overrides(tiny_llama_dir, opposites_file, tmp_path, name="cli",
                                                              **{"train.epochs": 1}))]
    code, out = _run(args)
    assert code == 0, out
    assert (tmp_path / "cli" / "adapter" / "adapter_model.safetensors").is_file()
    code, out = _run(args)
    assert code == 1 and "already holds a run" in out
    code, out = _run(args + ["--overwrite"])
    assert code == 0, out
