"""Each speed lever gives the same loss as the plain path on the same batch (within tolerance)."""

import json

import pytest
import torch

from loralab.config import build_config
from loralab.data import IGNORE_INDEX, make_collator
from loralab.speed import PackingCollator, cast_frozen_weights, supervised_lm_loss, supports_supervised_logits
from loralab.training import setup, train
from conftest import tiny_overrides


@pytest.fixture(scope="module")
def session(tiny_llama_dir, tmp_path_factory):
    from conftest import opposite_records

    data = tmp_path_factory.mktemp("speed") / "d.json"
    data.write_text(json.dumps(opposite_records()))
    config = build_config(overrides=tiny_overrides(tiny_llama_dir, data, tmp_path_factory.mktemp("out"),
                                                   **{"lora.init_lora_weights": "gaussian"}))
    return setup(config)


def _features(session, n=6):
    return [session.data.train[i] for i in range(n)]


def _padded_batch(session, n=6):
    session.tokenizer.padding_side = "right"
    return make_collator(session.tokenizer, "CAUSAL_LM")(_features(session, n))


def test_supervised_logits_loss_equals_model_loss(session):
    model = session.model.eval()
    batch = _padded_batch(session)
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        reference = model(**batch).loss
        loss_sum, count = supervised_lm_loss(model, batch)
    assert count.item() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert torch.allclose(loss_sum / count, reference, atol=1e-5)
    assert supports_supervised_logits(model)


def test_packing_keeps_each_example_separate(session):
    model = session.model.eval()
    features = _features(session)
    packed = PackingCollator(session.tokenizer.pad_token_id, pack_length=64)(features)
    assert packed["input_ids"].shape[0] < len(features)  # examples really share rows
    assert "attention_mask" not in packed
    padded = _padded_batch(session)
    with torch.no_grad():
        packed_sum, packed_count = supervised_lm_loss(model, packed)
        padded_sum, padded_count = supervised_lm_loss(model, padded)
        model_loss = model(**packed).loss  # the model's own forward gives the same as well
    assert packed_count == padded_count
    # attention leaking across examples would change every loss after the first example of a row
    assert torch.allclose(packed_sum, padded_sum, rtol=1e-4)
    assert torch.allclose(model_loss, padded_sum / padded_count, rtol=1e-4)


def test_packing_masks_the_first_label_of_each_example(session):
    features = _features(session, 3)
    packed = PackingCollator(session.tokenizer.pad_token_id, pack_length=1000)(features)
    assert packed["input_ids"].shape[0] == 1
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3 and all(packed["labels"][0, s].item() == IGNORE_INDEX for s in starts)


def test_bf16_frozen_weights_keep_lora_in_fp32_and_loss_close(session):
    import copy

    model = copy.deepcopy(session.model).eval()
    batch = _padded_batch(session)
    with torch.no_grad():
        reference = model(**batch).loss
    assert cast_frozen_weights(model) > 0
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def _first_logged_loss(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def test_fast_training_path_matches_plain_path(tiny_llama_dir, opposites_file, tmp_path):
    common = {"train.max_steps": 1, "train.logging_steps": 1, "train.gradient_accumulation": 2, "data.eval_split": 0.0}
    fast = build_config(overrides=tiny_overrides(tiny_llama_dir, opposites_file, tmp_path, name="fast", **common,
                                                 **{"train.packing": True}))
    plain = build_config(overrides=tiny_overrides(tiny_llama_dir, opposites_file, tmp_path, name="plain", **common,
                                                  **{"train.packing": False, "train.supervised_logits_only": False,
                                                     "train.group_by_length": False}))
    assert fast.train.packing and fast.train.supervised_logits_only
    train(fast, progress=False)
    train(plain, progress=False)
    assert _first_logged_loss(tmp_path / "fast") == pytest.approx(_first_logged_loss(tmp_path / "plain"), rel=1e-3)


def test_fast_dropout_has_dropout_statistics_and_replaces_lora_dropout(session):
    import copy

    from loralab.speed import FastDropout, use_fast_dropout

    dropout = FastDropout(0.1).train()
    x = torch.ones(400, 500)
    y = dropout(x)
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - 0.1) < 0.005  # 200k draws: 5 sigma is ~0.0034
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    assert not torch.equal(dropout(x), y)  # a fresh mask each call
    assert torch.equal(dropout.eval()(x), x)
    model = copy.deepcopy(session.model)
    for module in model.modules():  # the tiny session uses dropout 0; give it some
        if hasattr(module, "lora_dropout"):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(0.05)
    assert use_fast_dropout(model) == 14
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == 14
