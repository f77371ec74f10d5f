"""Experiment trackers (``train.report_to``): the Trainer's own integrations, offline unless told otherwise, with
the run's config and summary.json logged as parameters.

Where each one writes by default: TensorBoard event files in ``RUN_DIR/tensorboard/``; MLflow a local SQLite
store ``./mlruns/mlflow.db``, artifacts beside it (``MLFLOW_TRACKING_URI`` overrides); wandb in offline mode under
``./wandb`` (``WANDB_MODE=online`` syncs live, ``wandb sync`` later). Config keys are logged as
``config.<dotted key>``, the summary as ``summary.<key>``, so that they never clash with the Trainer's arguments.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loralab.config import RunConfig
from loralab.errors import LoralabError
from loralab.runs import RunPaths

log = logging.getLogger(__name__)

EXTRA = "pip install 'loralab[tracking]'"
# tracker -> (the module the Trainer's integration imports, how to install it)
PACKAGES = {"tensorboard": ("tensorboard", EXTRA), "mlflow": ("mlflow", EXTRA), "wandb": ("wandb", "pip install wandb"),
            "azure_ml": ("azureml", "pip install azureml-core"), "flyte": ("flytekit", "pip install flytekit"),
            "kubeflow": ("kubeflow", "pip install kubeflow")}


def check_trackers(names: list[str]) -> list[str]:
    """``train.report_to`` if every tracker's package is installed, else one clear error naming the install."""
    for name in names:
        module, install = PACKAGES.get(name, (name, f"pip install {name.replace('_', '-')}"))
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise LoralabError(f"train.report_to includes {name}, which needs the {module} package: {install} "
                               "(or remove it from train.report_to)")
    return list(names)


def offline_defaults(names: list[str]) -> None:
    """Local, offline destinations unless the user's environment names others."""
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        if not mlflow.is_tracking_uri_set():  # one set from Python (mlflow.set_tracking_uri) wins
            folder = Path("mlruns").resolve()  # MLflow's SQLite store (its file store is retired) in ./mlruns
            folder.mkdir(exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"lora.r": 8}``; lists as JSON text, None left out (trackers want scalars)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers (losses, times, counts), for trackers that compare runs by metrics."""
    return {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrackingCallback(TrainerCallback):
    """Logs the run's config when training starts and its summary.json after (``log_summary``), to every tracker in
    ``train.report_to`` that loralab knows how to reach: tensorboard, mlflow, wandb."""

    def __init__(self, config: RunConfig, paths: RunPaths, tensorboard: Any = None):
        self.config, self.paths, self.names = config, paths, list(config.train.report_to)
        self.tensorboard = tensorboard  # the Trainer's TensorBoardCallback
        self.mlflow_run_id: str | None = None
        self.params = flat_params(config.model_dump(mode="json"), "config.")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        for name in self.names:
            self._safely(name, "config", getattr(self, f"_config_{name}", None))

    def log_summary(self, summary: dict[str, Any]) -> None:
        for name in self.names:
            self._safely(name, "summary", getattr(self, f"_summary_{name}", None), summary)

    def _safely(self, name: str, what: str, step: Any, *args: Any) -> None:
        if step is None:
            return
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not fail a run that trained
            log.warning("could not log the run's %s to %s: %s: %s", what, name, type(exc).__name__, exc)

    # ---------------------------------------------------------------- tensorboard

    def _config_tensorboard(self) -> None:
        writer = getattr(self.tensorboard, "tb_writer", None)
        if writer is not None:
            writer.add_text("loralab/config", "```\n" + self.config.to_yaml() + "```")
            writer.flush()

    def _summary_tensorboard(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = getattr(self.tensorboard, "logging_dir", None) or str(self.paths.tensorboard)
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.params.items()}
        metrics = {f"summary/{k}": v for k, v in summary_metrics(summary).items()}
        with SummaryWriter(log_dir=folder) as writer:
            rows = "\n".join(f"| {k} | {v} |" for k, v in flat_params(summary).items())
            writer.add_text("loralab/summary", "| key | value |\n|---|---|\n" + rows, summary.get("steps"))
            for summary_proto in hparams(values, metrics):  # the HPARAMS tab: runs side by side
                writer.file_writer.add_summary(summary_proto)
            for key, value in metrics.items():
                writer.add_scalar(key, value, summary.get("steps"))

    # ---------------------------------------------------------------- mlflow

    def _mlflow_log(self, params: dict[str, Any]) -> None:
        import mlflow
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        items = [(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            mlflow.log_params(dict(items[i:i + MAX_PARAMS_TAGS_PER_BATCH]))

    def _config_mlflow(self) -> None:
        import mlflow

        run = mlflow.active_run()  # started by the Trainer's MLflowCallback (or by the caller)
        if run is not None:
            self.mlflow_run_id = run.info.run_id
            self._mlflow_log(self.params)

    def _summary_mlflow(self, summary: dict[str, Any]) -> None:
        import mlflow

        if self.mlflow_run_id is None:
            return
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.mlflow_run_id:
            self._mlflow_log(flat_params(summary, "summary."))
            return
        with mlflow.start_run(run_id=self.mlflow_run_id):  # the Trainer ended it at the end of training
            self._mlflow_log(flat_params(summary, "summary."))

    # ---------------------------------------------------------------- wandb

    def _config_wandb(self) -> None:
        import wandb

        if wandb.run is not None:
            wandb.run.config.update(self.params, allow_val_change=True)

    def _summary_wandb(self, summary: dict[str, Any]) -> None:
        import wandb

        if wandb.run is not None:  # the Trainer's WandbCallback leaves the run open after training
            wandb.run.summary.update(flat_params(summary, "summary."))


def attach_trackers(trainer: Any, config: RunConfig, paths: RunPaths) -> None:
    """Point the Trainer's TensorBoard writer into the run folder and add the config/summary logger."""
    if not config.train.report_to:
        return
    tensorboard = None
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            tensorboard = callback
            if not os.environ.get("TENSORBOARD_LOGGING_DIR"):
                callback.logging_dir = str(paths.tensorboard)
    trainer.add_callback(TrackingCallback(config, paths, tensorboard))


def log_summary(trainer: Any, summary: dict[str, Any]) -> None:
    """After summary.json is written: log it to the run's trackers (nothing when ``train.report_to`` is empty)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrackingCallback):
            callback.log_summary(summary)
