"""The held-out test split: disjoint from train and eval, deterministic, fingerprinted, scored only on request."""

import json

import pytest

from loralab.config import DataConfig, build_config
from loralab.data import Example, hold_out, load_all_splits, split_examples
from loralab.errors import LoralabError
from loralab.evaluation import evaluate_run, test_examples
from loralab.generation import GenerationSettings
from loralab.training import load_tokenizer_and_data, train
from conftest import opposite_records, read_jsonl, run_cli, tiny_overrides

FAST = ["--max-new-tokens", "6"]


def rows(part):
    return [e.row for e in part]


def test_test_split_is_disjoint_deterministic_and_independent_of_the_eval_split():
    examples = [Example(prompt=f"p{i}", response="r", row=i + 1) for i in range(50)]
    train_part, eval_part, test_part = hold_out(examples, 7, eval_split=0.2, test_split=0.1)
    assert (len(train_part), len(eval_part), len(test_part)) == (35, 10, 5)
    assert set(rows(train_part)) | set(rows(eval_part)) | set(rows(test_part)) == set(range(1, 51))
    assert not set(rows(test_part)) & (set(rows(train_part)) | set(rows(eval_part)))
    assert not set(rows(eval_part)) & set(rows(train_part))
    assert hold_out(examples, 7, 0.2, 0.1) == (train_part, eval_part, test_part)  # same seed, same splits
    assert rows(hold_out(examples, 8, 0.2, 0.1).test) != rows(test_part)  # another seed, another test split
    assert hold_out(examples, 7, 0.4, 0.1).test == test_part  # the test split does not move with eval_split
    # without a test split the eval split is the one runs made before test splits existed
    assert hold_out(examples, 7, 0.2) == (*split_examples(examples, 0.2, 7), [])


def test_test_split_comes_out_of_the_data_file_also_with_an_eval_file(tmp_path, opposites_file):
    other = tmp_path / "eval.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in opposite_records()[:3]))
    train_part, eval_part, test_part = load_all_splits(DataConfig(path=str(opposites_file), eval_path=str(other),
                                                                  test_split=0.25), "CAUSAL_LM")
    assert len(test_part) == 6 and len(train_part) == 18 and rows(eval_part) == [1, 2, 3]
    assert not set(rows(train_part)) & set(rows(test_part))
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in opposite_records()[:4]))
    train_part, eval_part, test_part = load_all_splits(DataConfig(path=str(opposites_file), test_path=str(test_file)),
                                                       "CAUSAL_LM")
    assert rows(test_part) == [1, 2, 3, 4] and len(train_part) + len(eval_part) == 24


def test_config_refuses_both_test_sources_and_splits_that_leave_nothing():
    for overrides, words in [(["data.test_split=0.1", "data.test_path=t.json"], "both set"),
                             (["data.test_split=0.5", "data.eval_split=0.5"], "must stay below 1")]:
        with pytest.raises(LoralabError, match=words):
            build_config(overrides=overrides)


@pytest.fixture(scope="module")
def test_run(tiny_llama_dir, tmp_path_factory):
    """A tiny run holding out 4 test examples and 5 eval examples of 24."""
    tmp = tmp_path_factory.mktemp("test-split")
    data = tmp / "opposites.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in opposite_records()))
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp / "runs", name="t", **{
        "data.test_split": 0.15, "train.max_steps": 3}))
    summary = train(config, progress=False)
    return tmp / "runs" / "t", data, config, summary


def test_training_never_sees_the_test_split_and_records_its_rows(test_run):
    run_dir, data, config, summary = test_run
    record = json.loads((run_dir / "data.json").read_text())
    assert record["split"]["n_test"] == 4 and len(record["split"]["test_rows"]) == 4
    assert summary["n_train"] == 24 - 4 - 5 and summary["n_eval"] == 5
    _, _, prepared = load_tokenizer_and_data(config)
    test_rows = set(record["split"]["test_rows"])
    assert rows(prepared.test_examples) == record["split"]["test_rows"]
    assert not test_rows & set(rows(prepared.train_examples)) and not test_rows & set(rows(prepared.eval_examples))
    assert not test_rows & set(record["split"]["eval_rows"])


def test_eval_split_test_scores_the_test_rows_apart_from_eval_json(test_run):
    run_dir, _, config, _ = test_run
    before = (run_dir / "eval.json").read_text() if (run_dir / "eval.json").exists() else None
    code, out = run_cli("eval", run_dir, "--split", "test", *FAST)
    assert code == 0, out
    assert "test split" in out and "eval_test.json" in out
    report = json.loads((run_dir / "eval_test.json").read_text())
    assert report["split"] == "test" and report["data"] == "test split" and report["base"]["n"] == 4
    predicted = read_jsonl(run_dir / "predictions_test.jsonl")
    expected = test_examples(config, "CAUSAL_LM", run_dir)
    assert [p["row"] for p in predicted] == rows(expected)
    assert [p["reference"] for p in predicted] == [e.response for e in expected]
    assert ((run_dir / "eval.json").read_text() if (run_dir / "eval.json").exists() else None) == before
    default = evaluate_run(run_dir, limit=2, settings=GenerationSettings(max_new_tokens=4), progress=False)
    assert default["split"] == "eval" and default["data"] == "eval split"  # the eval split stays the default
    assert {p["row"] for p in default["predictions"]}.isdisjoint(rows(expected))


def test_a_changed_data_file_is_refused_for_the_test_split(test_run, tmp_path):
    run_dir, data, config, _ = test_run
    original = data.read_text()
    try:
        data.write_text(original + json.dumps({"instruction": "Give the opposite of in.", "response": "out"}) + "\n")
        code, out = run_cli("eval", run_dir, "--split", "test", *FAST)
        assert code == 1 and "cannot rebuild the test split" in out and "changed since training" in out, out
        assert "Traceback" not in out
    finally:
        data.write_text(original)
    assert len(test_examples(config, "CAUSAL_LM", run_dir)) == 4  # restored: accepted again


def test_split_test_without_a_test_split_or_with_data_is_one_clear_error(test_run, tiny_llama_dir, tmp_path,
                                                                          opposites_file):
    run_dir = test_run[0]
    code, out = run_cli("eval", run_dir, "--split", "test", "--data", opposites_file, *FAST)
    assert code == 1 and "--split test and --data" in out, out
    code, out = run_cli("eval", run_dir, "--split", "validation", *FAST)
    assert code == 1 and "--split must be eval or test" in out, out
    plain = build_config(overrides=tiny_overrides(tiny_llama_dir, opposites_file, tmp_path / "runs", name="p",
                                                  **{"train.max_steps": 1}))
    train(plain, progress=False)
    code, out = run_cli("eval", tmp_path / "runs" / "p", "--split", "test", *FAST)
    assert code == 1 and "has no test split" in out and "data.test_split" in out and "Traceback" not in out, out


def test_a_changed_test_file_is_refused(tiny_llama_dir, tmp_path, opposites_file):
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in opposite_records()[:3]))
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, opposites_file, tmp_path / "runs", name="f", **{
        "data.test_path": str(test_file), "train.max_steps": 1}))
    train(config, progress=False)
    run_dir = tmp_path / "runs" / "f"
    record = json.loads((run_dir / "data.json").read_text())
    assert record["files"]["test"]["path"] == str(test_file) and record["split"]["test_rows"] == [1, 2, 3]
    assert rows(test_examples(config, "CAUSAL_LM", run_dir)) == [1, 2, 3]
    test_file.write_text("".join(json.dumps(r) + "\n" for r in opposite_records()[:2]))
    with pytest.raises(LoralabError, match=r"cannot rebuild the test split .*test.jsonl changed since training"):
        test_examples(config, "CAUSAL_LM", run_dir)
