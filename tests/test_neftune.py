"""NEFTune (train.neftune_noise_alpha): noise on the input embeddings while training, scaled by each example's own
length (packed rows too), off outside Trainer.train()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import opposite_records, tiny_overrides
from loralab.config import build_config
from loralab.errors import ConfigError
from loralab.neftune import example_lengths, input_embeddings, noisy_embeddings
from loralab.runs import RunPaths
from loralab.trainer import build_trainer
from loralab.training import setup


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("neftune") / "opposites.json"
    path.write_text(json.dumps(opposite_records(), indent=1), encoding="utf-8")
    return path


def test_lengths_are_each_examples_own():
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    lengths = example_lengths(packed.shape, position_ids=packed).squeeze(-1)
    assert lengths.tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4], [6] * 6 + [3] * 3]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert example_lengths(mask.shape, attention_mask=mask).squeeze(-1).tolist() == [[3] * 4, [4] * 4]
    assert example_lengths(torch.Size([2, 5])).squeeze(-1).tolist() == [[5] * 5] * 2


def test_noise_is_bounded_by_alpha_over_sqrt_length_times_width():
    torch.manual_seed(0)
    lengths = torch.tensor([[3.0] * 3 + [12.0] * 12]).unsqueeze(-1)
    noise = noisy_embeddings(torch.zeros(1, 15, 256), 5.0, lengths)
    bound = 5.0 / torch.sqrt(lengths * 256)
    per_token = noise.abs().amax(dim=-1, keepdim=True)
    assert torch.all(per_token <= bound + 1e-7)
    assert torch.all(per_token > 0.95 * bound)  # uniform over the whole interval, not a fraction of it


def test_config_refuses_a_non_positive_alpha(tiny_llama_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{"train.neftune_noise_alpha": 0}))


def test_training_adds_noise_per_packed_example_and_removes_it_after(tiny_llama_dir, data_file, tmp_path):
    alpha = 5.0
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data_file, tmp_path, **{
        "train.neftune_noise_alpha": alpha, "train.max_steps": 3, "train.packing": True}))
    session = setup(config)
    (tmp_path / "paths").mkdir()
    trainer = build_trainer(session, RunPaths(tmp_path / "paths"), progress=False)
    layer = input_embeddings(session.model)
    first_block = session.model.get_base_model().model.layers[0]
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    ids: list[torch.Tensor] = []
    layer.register_forward_pre_hook(lambda module, args: ids.append(args[0]))

    def block_input(module, args, kwargs):
        if module.training:
            hidden = args[0] if args else kwargs["hidden_states"]
            batch = layer._loralab_neftune_batch
            seen.append((ids[-1], hidden.detach().float(), batch["position_ids"]))

    handle = first_block.register_forward_pre_hook(block_input, with_kwargs=True)
    trainer.train()
    handle.remove()
    assert seen, "no training step reached the first decoder layer"
    width = layer.weight.shape[1]
    beyond_row_bound = False
    for input_ids, hidden, position_ids in seen:
        assert position_ids is not None and int((position_ids == 0).sum()) > input_ids.shape[0], "rows not packed"
        noise = hidden - layer.weight.detach().float()[input_ids]
        per_token = noise.abs().amax(dim=-1)
        assert torch.all(per_token > 0), "a training token got no noise"
        bound = alpha / torch.sqrt(example_lengths(input_ids.shape, position_ids).squeeze(-1) * width)
        assert torch.all(per_token <= bound + 1e-6)
        beyond_row_bound |= bool((per_token > 1.01 * alpha / math.sqrt(input_ids.shape[1] * width)).any())
    # packed rows hold several examples: their noise follows the example's length, larger than the row's would give
    assert beyond_row_bound
    assert not layer._forward_hooks and not hasattr(layer, "_loralab_neftune_alpha")
    session.model.train()  # the model is in train mode after training: no noise is left on it
    probe = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(layer(probe), layer.weight[probe])
