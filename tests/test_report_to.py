"""train.report_to: the Trainer's trackers, offline, with the run's config and summary logged as parameters."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import run_cli, tiny_overrides
from loralab.config import build_config
from loralab.errors import ConfigError, LoralabError
from loralab.runs import config_differences, is_run_folder


def test_report_to_values():
    assert build_config({}).train.report_to == []
    assert build_config({}, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert build_config({}, ["train.report_to=none"]).train.report_to == []
    assert build_config({"train": {"report_to": ["mlflow", "wandb", "mlflow"]}}).train.report_to == ["mlflow", "wandb"]
    with pytest.raises(ConfigError, match="name them"):
        build_config({}, ["train.report_to=all"])
    with pytest.raises(ConfigError, match=r"train.report_to.*unknown tracker 'tensorbord'"):
        build_config({}, ["train.report_to=[tensorbord]"])


def test_report_to_is_not_part_of_what_a_resume_compares():
    a = build_config({}, ["train.report_to=[tensorboard]"])
    assert config_differences(a, build_config({})) == []
    assert config_differences(a, build_config({}, ["lora.r=4"])) == ["lora.r"]


def test_missing_tracker_package_is_one_clear_error(monkeypatch):
    from loralab import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX", "wandb") else real(name, *a))
    with pytest.raises(LoralabError, match=r"tensorboard, which needs the tensorboard package: pip install 'loralab\[tracking\]'"):
        tracking.check_trackers(["tensorboard"])
    with pytest.raises(LoralabError, match="needs the wandb package: pip install wandb"):
        tracking.check_trackers(["mlflow", "wandb"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_train_with_a_missing_tracker_says_what_to_install(tmp_path, tiny_llama_dir, opposites_file):
    sets = tiny_overrides(tiny_llama_dir, opposites_file, tmp_path, name="wb", **{"train.report_to": "[wandb]"})
    code, out = run_cli("train", "--skip-checks", *[arg for s in sets for arg in ("--set", s)])
    assert code == 1
    assert "train.report_to includes wandb, which needs the wandb package: pip install wandb" in " ".join(out.split())
    assert "Traceback" not in out


needs_tracking = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None or importlib.util.find_spec("mlflow") is None,
    reason="needs the tracking extra: pip install 'loralab[tracking]'")


@needs_tracking
def test_tensorboard_and_mlflow_get_curves_config_and_summary(tmp_path, tiny_llama_dir, opposites_file, monkeypatch):
    import mlflow
    from mlflow.tracking import _tracking_service
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loralab.training import train

    monkeypatch.chdir(tmp_path)  # MLflow's default: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", None)  # restored after the test
    config = build_config({}, tiny_overrides(tiny_llama_dir, opposites_file, tmp_path / "runs", name="tracked",
                                             **{"train.max_steps": 4, "train.report_to": "[tensorboard,mlflow]"}))
    summary = train(config, progress=False)
    run_dir = tmp_path / "runs" / "tracked"

    # TensorBoard: event files in the run folder, the Trainer's curves plus loralab's config and summary
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "eval/loss"} <= set(tags["scalars"]) | set(tags["tensors"])
    assert {"loralab/config/text_summary", "loralab/summary/text_summary"} <= set(tags["tensors"]), tags
    config_text = events.Tensors("loralab/config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "r: 8" in config_text and str(tiny_llama_dir) in config_text
    summary_text = events.Tensors("loralab/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| status | finished |" in summary_text
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams"), tags  # the HPARAMS tab
    assert [e.value for e in events.Scalars("summary/steps")] == [summary["steps"]] == [4]

    # MLflow: a local store in ./mlruns with one run holding the metrics and both sets of parameters
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    params, metrics = runs[0].data.params, runs[0].data.metrics
    assert params["config.lora.r"] == "8" and params["config.train.max_steps"] == "4"
    assert params["summary.status"] == "finished" and params["summary.steps"] == "4"
    assert float(params["summary.best_eval_loss"]) == pytest.approx(summary["best_eval_loss"])
    assert "loss" in metrics and "eval_loss" in metrics
    assert runs[0].info.run_name == "tracked"

    # the run folder stays a loralab run (tensorboard/ and checks.json are loralab's own)
    assert is_run_folder(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
