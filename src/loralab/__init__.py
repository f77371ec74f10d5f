"""loralab: a workbench for LoRA and QLoRA fine-tuning of language models.

The Python API behind the ``loralab`` command::

    from loralab import load_config, train
    summary = train(load_config(overrides=["lora.r=8", "train.epochs=1"]))
"""

from loralab.config import RunConfig, build_config, load_config
from loralab.errors import ConfigError, DataError, LoralabError

__version__ = "0.1.0"


def train(config: RunConfig, **kwargs):  # noqa: ANN001, ANN201 - thin lazy wrapper, see loralab.training.train
    """Train a LoRA adapter; see :func:`loralab.training.train`."""
    from loralab.training import train as _train

    return _train(config, **kwargs)


__all__ = ["RunConfig", "build_config", "load_config", "train", "LoralabError", "ConfigError", "DataError", "__version__"]
