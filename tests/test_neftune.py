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
from loralab.neftune import call_lengths, embedding_layers, example_lengths, input_embeddings, noisy_embeddings
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
            seen.append((ids[-1], hidden.detach().float(), kwargs.get("position_ids")))

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
    assert not layer._forward_hooks and trainer._neftune_state is None
    session.model.train()  # the model is in train mode after training: no noise is left on it
    probe = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(layer(probe), layer.weight[probe])


def test_each_forward_of_a_step_takes_the_lengths_of_its_own_tensors():
    anchors = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]])
    positives = torch.tensor([[8, 0, 0, 0], [8, 9, 9, 9]])  # the same width as the anchors, other lengths
    batch = {"input_ids": anchors, "attention_mask": (anchors > 0).long(),
             "positive_input_ids": positives, "positive_attention_mask": (positives > 0).long()}
    lengths = lambda ids, side="input": call_lengths(ids, ids.shape, side, batch).squeeze(-1)[:, 0].tolist()  # noqa: E731
    assert lengths(anchors) == [3, 2]
    assert lengths(positives.clone()) == [1, 4]  # found by value as well as by identity
    # an encoder-decoder's decoder reads the labels shifted right: one token per supervised label
    seq2seq = {"input_ids": anchors, "attention_mask": (anchors > 0).long(),
               "labels": torch.tensor([[4, 4, -100], [4, -100, -100]])}
    assert call_lengths(torch.zeros(2, 3, dtype=torch.long), torch.Size([2, 3]), "decoder", seq2seq).squeeze(-1).tolist() \
        == [[2] * 3, [1] * 3]
    # ids found nowhere, no fitting mask: the width (the Trainer's own rule)
    assert call_lengths(torch.zeros(1, 6, dtype=torch.long), torch.Size([1, 6]), "input", batch).squeeze(-1).tolist() \
        == [[6] * 6]


def test_seq2seq_training_adds_noise_to_the_encoder_and_the_decoder_inputs(tiny_t5_dir, data_file, tmp_path):
    alpha = 5.0
    config = build_config(overrides=tiny_overrides(tiny_t5_dir, data_file, tmp_path, **{
        "train.neftune_noise_alpha": alpha, "train.max_steps": 2}))
    session = setup(config)
    (tmp_path / "paths").mkdir()
    trainer = build_trainer(session, RunPaths(tmp_path / "paths"), progress=False)
    layers = embedding_layers(session.model)
    base = session.model.get_base_model()
    assert [layer for layer, _ in layers] == [base.get_encoder().get_input_embeddings(),
                                              base.get_decoder().get_input_embeddings()]
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"input": [], "decoder": []}
    for layer, side in layers:  # registered before training: runs before the noise hook, records clean inputs
        layer.register_forward_hook(lambda module, args, out, side=side: seen[side].append((args[0], out.detach()))
                                    if module.training else None)
    batches, noisy, after_noise = [], {"input": [], "decoder": []}, []

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            batches.append(inputs)
            for layer, side in layers if not after_noise else ():  # registered after the noise hook: sees its output
                after_noise.append(layer.register_forward_hook(
                    lambda module, args, out, side=side: noisy[side].append(out.detach()) if module.training else None))
        return real(model, inputs, *args, **kwargs)

    real, trainer.compute_loss = trainer.compute_loss, compute_loss
    trainer.train()
    assert batches and len(seen["input"]) == len(seen["decoder"]) == len(noisy["decoder"]) == len(batches)
    width = layers[0][0].weight.shape[1]
    for batch, (ids, clean), hidden in zip(batches, seen["input"], noisy["input"]):
        assert torch.equal(ids, batch["input_ids"])
        bound = alpha / torch.sqrt(batch["attention_mask"].sum(1, keepdim=True).float() * width)
        per_token = (hidden.float() - clean.float()).abs().amax(-1)
        assert torch.all(per_token > 0) and torch.all(per_token <= bound + 1e-6)
    for batch, (ids, clean), hidden in zip(batches, seen["decoder"], noisy["decoder"]):
        supervised = (batch["labels"] != -100).sum(1, keepdim=True).float()
        per_token = (hidden.float() - clean.float()).abs().amax(-1)
        assert torch.all(per_token > 0) and torch.all(per_token <= alpha / torch.sqrt(supervised * width) + 1e-6)
    assert all(len(layer._forward_hooks) == 2 for layer, _ in layers)  # the test's two: the noise hook is gone
