"""Sources: a Hub dataset id (tested offline on a local dataset folder, the same load_dataset code path), a split and
subset, a mixture of sources by weight or count, and one clear message when a source cannot be read."""

import json
from pathlib import Path

import pytest

from loralab.config import DataConfig, build_config
from loralab.data import load_all_splits, load_examples, prepare_data, row_ids
from loralab.errors import DataError, LoralabError
from loralab.fingerprints import changed_files, data_record
from conftest import opposite_records
from test_conversations import chatml_tokenizer


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """load_dataset's own Arrow cache in the test's folder (not ~/.cache/huggingface)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "response": f"{prefix} answer {i}"} for i in range(n)]


@pytest.fixture()
def dataset_dir(tmp_path) -> Path:
    """A script-less dataset folder as on the Hub: one data file per split."""
    folder = tmp_path / "my-dataset"
    write_jsonl(folder / "train.jsonl", pairs("train", 12))
    write_jsonl(folder / "test.jsonl", pairs("test", 4))
    return folder


def test_hub_dataset_splits_are_read_with_load_dataset(dataset_dir):
    train = load_examples(DataConfig(path=f"hub:{dataset_dir}"), "CAUSAL_LM")
    assert [e.prompt for e in train] == [f"train question {i}" for i in range(12)] and train[0].row == 1
    cfg = DataConfig(path=f"hub:{dataset_dir}", eval_path=f"hub:{dataset_dir}?split=test")
    train_part, eval_part, _ = load_all_splits(cfg, "CAUSAL_LM")
    assert len(train_part) == 12 and [e.response for e in eval_part] == [f"test answer {i}" for i in range(4)]
    prepared = prepare_data(cfg, chatml_tokenizer(), "CAUSAL_LM")
    assert len(prepared.train) == 12 and len(prepared.eval) == 4
    record = data_record(cfg, prepared.train_examples, prepared.eval_examples)
    assert record["files"]["eval"]["split"] == "test" and record["files"]["train"]["rows"] == 12
    assert changed_files(record, cfg) == []
    write_jsonl(dataset_dir / "test.jsonl", pairs("test", 5))  # the Hub split changed: its fingerprint differs
    assert changed_files(record, cfg) == [f"hub:{dataset_dir} (split test) changed since training (4 -> 5 rows, "
                                          "sha256 differs)"]  # the train split's rows did not change
    assert build_config(overrides=[f"data.path=hub:{dataset_dir}"]).run_name().endswith("-my-dataset")


def test_hub_errors_name_the_dataset_the_row_and_what_was_expected(dataset_dir, tmp_path):
    write_jsonl(dataset_dir / "train.jsonl", pairs("train", 3) + [{"instruction": "q", "answer": "a"}])
    # a table: the row has the column (its cell is null)
    with pytest.raises(DataError, match=rf"dataset hub:{dataset_dir} \(split train\), row 4: field 'response' is empty"):
        load_examples(DataConfig(path=f"hub:{dataset_dir}"), "CAUSAL_LM")
    for path, words in [(f"hub:{dataset_dir}?split=validation", r"Unknown split \"validation\". Should be one of "
                                                                r"\['train', 'test'\]; set the split"),
                        (f"hub:{tmp_path}/missing", "no such folder"),
                        ("hub:loralab-tests/no-such-dataset", "needs the network to download from the Hugging Face Hub "
                                                              "and HF_HUB_OFFLINE is set"),
                        (f"hub:{dataset_dir}?splt=train", "unknown option 'splt'")]:
        with pytest.raises(DataError, match=words):
            load_examples(DataConfig(path=path), "CAUSAL_LM")


def test_sources_are_mixed_by_weight_and_count_deterministically(tmp_path, dataset_dir):
    a = write_jsonl(tmp_path / "a.jsonl", pairs("a", 90))
    b = write_jsonl(tmp_path / "b.jsonl", pairs("b", 20))
    mix = {"data": {"sources": [{"path": str(a), "weight": 0.75}, {"path": str(b), "weight": 0.25},
                                {"path": f"hub:{dataset_dir}", "count": 5}]}}
    cfg = build_config(mix).data
    examples = load_examples(cfg, "CAUSAL_LM")
    by_source = [[e for e in examples if e.source == i] for i in range(3)]
    assert [len(part) for part in by_source] == [60, 20, 5]  # b, the scarcest for its weight, is taken whole
    assert by_source[0][0].prompt.startswith("a ") and by_source[2][0].prompt.startswith("train ")
    assert [e.row for e in by_source[0]] == sorted(e.row for e in by_source[0])  # a sample, in file order
    assert load_examples(cfg, "CAUSAL_LM") == examples  # the same seed, the same mix
    other = load_examples(cfg.model_copy(update={"seed": 7}), "CAUSAL_LM")
    assert [e.row for e in other if e.source == 0] != [e.row for e in by_source[0]]
    train_part, eval_part, _ = load_all_splits(cfg, "CAUSAL_LM")
    ids = row_ids(eval_part)
    assert len(ids) == 17 and all(isinstance(i, list) and len(i) == 2 for i in ids)  # [source, row]
    assert not {tuple(i) for i in ids} & {tuple(i) for i in row_ids(train_part)}
    prepared = prepare_data(cfg.model_copy(update={"num_proc": 2}), chatml_tokenizer(), "CAUSAL_LM")
    assert row_ids(prepared.train_examples) == row_ids(train_part) and row_ids(prepared.eval_examples) == ids
    assert [e.source for e in prepared.train_examples] == [e.source for e in train_part]  # tokenized in 2 processes
    assert build_config(mix).run_name().endswith("-a-mix")


def test_bad_mixtures_are_refused_naming_the_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pairs("a", 10))
    with pytest.raises(DataError, match=r"a.jsonl has 10 rows, fewer than its count 50"):
        load_examples(build_config({"data": {"sources": [{"path": str(a), "count": 50}]}}).data, "CAUSAL_LM")
    for data, words in [({"sources": [{"path": str(a), "count": 5, "weight": 1}]}, "sets both weight and count"),
                        ({"path": str(a), "sources": [{"path": str(a)}]}, "data.path and data.sources are both set"),
                        ({"sources": [{"path": str(a), "split": "test"}]}, "split and subset apply to hub:ID"),
                        ({"sources": [{"path": str(a), "weight": 0}]}, "greater than 0")]:
        with pytest.raises(LoralabError, match=words):
            build_config({"data": data})


def test_a_tune_study_on_a_hub_dataset_is_told_apart_by_its_rows(dataset_dir, tmp_path):
    from loralab.config import build_config
    from loralab.tune import load_tune

    spec = load_tune(tmp_path / "tune", build_config(overrides=[f"data.path=hub:{dataset_dir}"]))
    first = spec.record()["data"]["train"]
    assert first["rows"] == 12 and len(first["sha256"]) == 64
    write_jsonl(dataset_dir / "train.jsonl", pairs("train", 13))  # other rows: another study
    assert spec.record()["data"]["train"]["sha256"] != first["sha256"]
