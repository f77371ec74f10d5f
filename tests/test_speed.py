"""Each speed lever gives the same loss as the plain path on the same batch (within tolerance)."""

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from loralab.config import build_config
from loralab.data import IGNORE_INDEX, make_collator
from loralab.speed import (PackingCollator, cast_frozen_weights, supervised_lm_loss, supervised_logits_exact,
                           supports_packing)
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
    assert supervised_logits_exact(model) and supports_packing(model)


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


# ---------------------------------------------------------------- the supervised-logits loss is exact, or not taken


def _tiny_model_dir(folder, config_class, model_class, **settings):
    """A tiny random causal LM of another architecture, with the tokenizer of conftest's tiny Llama."""
    from conftest import CHAT_TEMPLATE, _fast, train_tokenizer

    tokenizer = _fast(train_tokenizer(["<|im_start|>", "<|im_end|>", "<unk>"]), bos_token="<|im_start|>",
                      eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.3, **settings)
    model = model_class(config)
    with torch.no_grad():  # non-zero biases, so that training them matters
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    """Qwen2: q/k/v projections with biases (what lora.bias=all / lora_only train)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), Qwen2Config, Qwen2ForCausalLM)


@pytest.fixture(scope="module")
def speed_data(tmp_path_factory):
    from conftest import opposite_records

    path = tmp_path_factory.mktemp("speed-data") / "d.json"
    path.write_text(json.dumps(opposite_records()))
    return path


def _session_for(model_dir, data, out, **overrides):
    return setup(build_config(overrides=tiny_overrides(model_dir, data, out, **{"lora.init_lora_weights": "gaussian",
                                                                                 **overrides})))


def _batch(session, n=6):
    session.tokenizer.padding_side = "right"
    batch = make_collator(session.tokenizer, "CAUSAL_LM")([session.data.train[i] for i in range(n)])
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == IGNORE_INDEX).any()
    return batch


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def _nonzero_lora(model, copy_first=True):
    """The model (a copy) with non-zero LoRA B matrices, so that every LoRA weight gets a non-zero gradient."""
    model = copy.deepcopy(model) if copy_first else model
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _fast_loss(model, batch, fused=False):
    total, count = supervised_lm_loss(model, batch, fused_head=fused)
    return total / count


def assert_fast_matches_plain(model, batch, context=contextlib.nullcontext, fast_model=None, rtol=1e-5, fused=False):
    """The fast loss and its LoRA gradients equal the model's own loss (with labels) and gradients (``fused``: with
    the output layer's projection and the loss in ``head_cross_entropy``)."""
    model.train()
    with context():
        plain, plain_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    with context():
        fast, fast_grads = _loss_and_grads(model, lambda: _fast_loss(fast_model or model, batch, fused))
    assert torch.isfinite(plain) and fast.item() == pytest.approx(plain.item(), rel=rtol)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (fast_grads[name] - grad).abs().max().item() <= max(10 * rtol, 1e-6) * scale, name
    return plain


@pytest.mark.parametrize("fused", [False, True])
def test_fast_loss_and_gradients_equal_plain_path(session, fused):
    batch = _padded_batch(session)
    assert_fast_matches_plain(_nonzero_lora(session.model), batch, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_fast_loss_exact_on_packed_batches(session, fused):
    packed = PackingCollator(session.tokenizer.pad_token_id, pack_length=64)(_features(session))
    assert "attention_mask" not in packed and (packed["position_ids"][:, 1:] == 0).any()
    assert_fast_matches_plain(_nonzero_lora(session.model), packed, fused=fused)


def test_fused_head_loss_never_builds_the_full_logits(session, monkeypatch):
    from loralab.speed import fused_head_applies, head_loss

    model = _nonzero_lora(session.model)
    assert fused_head_applies(model)
    head = model.get_base_model().get_output_embeddings()
    rows_seen = []
    monkeypatch.setattr(head, "forward", lambda x, real=head.forward: rows_seen.append(x.shape[1]) or real(x))  # no hook:
    calls = []  # a hook on the output layer turns the fused loss off (checked below)
    real = head_loss._HeadCrossEntropy.forward
    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 0)  # the smallest chunks: 16 rows
    monkeypatch.setattr(head_loss._HeadCrossEntropy, "forward",
                        staticmethod(lambda ctx, *a: calls.append(a[0].shape) or real(ctx, *a)))
    total, count = supervised_lm_loss(model, _padded_batch(session), fused_head=True)
    assert rows_seen == [0] and calls == [(count.item(), head.weight.shape[1])] and count.item() > 16  # several chunks
    # a trainable output layer, or hooks on it, take the usual path
    head.weight.requires_grad_(True)
    assert not fused_head_applies(model)
    head.weight.requires_grad_(False)
    handle = head.register_forward_hook(lambda *a: None)
    assert not fused_head_applies(model)
    handle.remove()


def test_head_cross_entropy_equals_the_plain_loss_call_after_call(monkeypatch):
    """Chunks share buffers kept between calls: losses and gradients stay those of logits + cross-entropy for every
    size (one partial chunk, several chunks, a smaller call after a larger one), and a first call's gradient is
    intact after a second call reused the buffers before the first one's backward."""
    from loralab.speed import head_loss

    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 0)  # 16-row chunks
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 24, generator=generator) * 0.3).bfloat16()
    pending = []
    for rows in (5, 40, 16, 3, 33):
        hidden = torch.randn(rows, 24, generator=generator).bfloat16().requires_grad_()
        targets = torch.randint(0, 300, (rows,), generator=generator)
        reference = hidden.detach().clone().requires_grad_()
        expected = F.cross_entropy((reference @ weight.t()).float(), targets, reduction="sum")
        expected.backward()
        loss = head_loss.head_cross_entropy(hidden, weight, targets)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        pending.append((loss, hidden, reference.grad))
    for loss, hidden, expected_grad in pending:  # backward only after every forward
        (2 * loss).backward()
        assert torch.allclose(hidden.grad.float(), 2 * expected_grad.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_fast_loss_exact_with_trained_biases_under_bf16_autocast(tiny_qwen2_dir, speed_data, tmp_path, bias, fused):
    # bf16 frozen weights (as setup stores them for train.precision=bf16) with trainable fp32 biases: calling the
    # decoder outside autocast failed with "self and mat2 must have the same dtype"
    session = _session_for(tiny_qwen2_dir, speed_data, tmp_path, **{"lora.bias": bias, "train.precision": "bf16"})
    model = _nonzero_lora(session.model, copy_first=False)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    trained_biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert trained_biases and all(dtypes[n] == torch.float32 for n in trained_biases)
    assert any(d == torch.bfloat16 for d in dtypes.values())
    # autocast only around the model's forward, as accelerate applies it in training (the old path skipped it)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    # fused: the hidden-state gradient is rounded to bf16 before the loss scale is applied (one rounding more)
    rtol = 2e-3 if fused else 1e-3
    assert_fast_matches_plain(model, _batch(session), rtol=rtol, fused=fused)
    # and inside an autocast context (e.g. loralab's checks)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert_fast_matches_plain(model, _batch(session), context=bf16, rtol=rtol, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_fast_loss_exact_under_fp16_autocast(session, fused):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, AssertionError) as exc:  # pragma: no cover - old torch
        pytest.skip(f"no fp16 autocast on CPU: {exc}")
    model = _nonzero_lora(session.model)
    model.forward = torch.autocast("cpu", dtype=torch.float16)(model.forward)  # as accelerate does for fp16
    with torch.no_grad():
        assert model(**_padded_batch(session)).logits.dtype == torch.float16  # autocast really applies
    assert_fast_matches_plain(model, _padded_batch(session), rtol=1e-3, fused=fused)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_fast_loss_keeps_the_models_own_logit_soft_capping(arch, speed_data, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    classes = {"gemma2": (Gemma2Config, Gemma2ForCausalLM), "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
    folder = _tiny_model_dir(tmp_path / arch, *classes, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                             final_logit_softcapping=2.0)
    session = _session_for(folder, speed_data, tmp_path / "out")
    model, batch = _nonzero_lora(session.model, copy_first=False), _batch(session)
    assert supervised_logits_exact(model) and supports_packing(model) == (arch == "gemma3_text")  # tests/test_gemma.py
    from loralab.speed import fused_head_applies

    assert not fused_head_applies(model)  # soft-capped logits: the fused loss would skip it, so it is not taken
    plain = assert_fast_matches_plain(model, batch, fused=True)
    with torch.no_grad():  # the plain head (lm_head of the last hidden state) would be wrong: soft-capping matters
        base = model.get_base_model()
        hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = base.lm_head(hidden)[:, :-1]
        uncapped = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert abs(uncapped.item() - plain.item()) > 0.01


def test_fast_loss_exact_through_data_parallel(session):
    model = _nonzero_lora(session.model)
    wrapped = torch.nn.DataParallel(model)
    assert not wrapped.device_ids  # no GPU: DataParallel calls the module itself
    assert supervised_logits_exact(wrapped)
    assert_fast_matches_plain(model, _padded_batch(session), fast_model=wrapped)


def test_trainer_loss_exact_through_data_parallel_and_falls_back_over_several_devices(session, tmp_path):
    from transformers import TrainingArguments

    from loralab.training import SupervisedLogitsTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = SupervisedLogitsTrainer(model=session.model, args=args)
    batch = _padded_batch(session)
    wrapped = torch.nn.DataParallel(session.model)
    count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        reference = session.model(**batch).loss
        assert trainer.compute_loss(wrapped, batch).item() == pytest.approx(reference.item(), rel=1e-5)
        assert trainer.compute_loss(wrapped, batch, num_items_in_batch=count).item() == pytest.approx(reference.item(), rel=1e-5)
    assert trainer.loss_is_scaled_for_ga is True
    # replicas on several GPUs would each see a slice of the rows: the Trainer's own loss is used instead
    wrapped.device_ids = [0, 1]
    assert not supervised_logits_exact(wrapped)
    assert not trainer._supervised_logits_apply(wrapped, batch)  # compute_loss takes the Trainer's own path
    with pytest.raises(ValueError):
        supervised_lm_loss(wrapped, batch)


def test_fast_loss_exact_through_distributed_data_parallel(session, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = _nonzero_lora(session.model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert supervised_logits_exact(wrapped)
        batch = _padded_batch(session)
        model.train()
        plain, plain_grads = _loss_and_grads(model, lambda: wrapped(**batch).loss)
        fast, fast_grads = _loss_and_grads(model, lambda: _fast_loss(wrapped, batch))
        assert fast.item() == pytest.approx(plain.item(), rel=1e-5)
        assert all(torch.allclose(fast_grads[n], g, rtol=1e-4, atol=1e-7) for n, g in plain_grads.items())
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _hooked(module, pre=None, post=None):
    handles = [module.register_forward_pre_hook(pre)] if pre else []
    handles += [module.register_forward_hook(post)] if post else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def test_fast_loss_is_exact_or_raises_when_the_output_layer_is_used_unexpectedly(session):
    model = copy.deepcopy(session.model).eval()
    head = model.get_base_model().get_output_embeddings()
    batch = _padded_batch(session)
    with torch.no_grad():
        reference = model(**batch).loss
    # the output layer sees no [B, T, H] hidden states (another hook, registered first, reshapes them): the
    # selection is not applied and the model's own full logits give the loss
    with _hooked(head, pre=lambda m, args: (args[0].unsqueeze(2),), post=lambda m, args, out: out.squeeze(2)):
        with torch.no_grad():
            total, count = supervised_lm_loss(model, batch)
    assert (total / count).item() == pytest.approx(reference.item(), rel=1e-5)
    # logits that do not line up with the targets
    with _hooked(head, pre=lambda m, args: (args[0].flatten(0, 1),)):
        with torch.no_grad(), pytest.raises(RuntimeError, match="logits of shape"):
            supervised_lm_loss(model, batch)
    # the output layer run twice in one forward
    again = []

    def run_again(module, args, output):
        if not again:
            again.append(True)
            module(args[0])
        return output

    with _hooked(head, post=run_again), torch.no_grad(), pytest.raises(RuntimeError, match="ran 2 times"):
        supervised_lm_loss(model, batch)


def test_bias_all_bf16_run_trains_with_finite_loss(tiny_qwen2_dir, speed_data, tmp_path):
    import math

    config = build_config(overrides=tiny_overrides(tiny_qwen2_dir, speed_data, tmp_path, name="bias",
                                                   **{"lora.bias": "all", "train.precision": "bf16",
                                                      "train.max_steps": 2, "train.logging_steps": 1,
                                                      "data.eval_split": 0.0}))
    assert config.train.supervised_logits_only
    train(config, progress=False)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "bias" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)


def _lora_grads(model, batch):
    model.zero_grad()
    loss_sum, count = supervised_lm_loss(model, batch)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss_sum.detach(), grads


def test_segment_attention_gives_the_padded_batches_loss_and_gradients(session, monkeypatch):
    from loralab.speed import attention

    model = session.model.eval()  # dropout off: both paths see the same function
    assert attention.use_segment_attention(model)
    assert model.config._attn_implementation == attention.SEGMENT_ATTENTION
    features = _features(session)
    packed = PackingCollator(session.tokenizer.pad_token_id, pack_length=64, segments=True)(features)
    lengths = [len(f["input_ids"]) for f in features]
    assert packed["input_ids"].shape == (1, sum(lengths))  # one row, no padding
    assert packed["cu_seq_lens_q"].tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    calls = []
    real = attention.segment_bounds
    monkeypatch.setattr(attention, "segment_bounds", lambda *a: calls.append(1) or real(*a))
    packed_sum, packed_grads = _lora_grads(model, packed)
    assert calls, "the per-example path did not run"
    padded_sum, padded_grads = _lora_grads(model, _padded_batch(session))
    assert torch.allclose(packed_sum, padded_sum, rtol=1e-4)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        assert torch.allclose(grad, padded_grads[name], rtol=1e-3, atol=1e-6), name


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_segment_attention_equals_a_block_diagonal_mask(kv_heads):
    from transformers.masking_utils import find_packed_sequence_indices

    from loralab.speed.attention import segment_attention

    torch.manual_seed(0)
    lengths, width = [[5, 3, 4], [7, 5]], 12
    position_ids = torch.tensor([[i for n in row for i in range(n)] for row in lengths])
    ends = [0]
    for r, row in enumerate(lengths):
        for n in row:
            ends.append(ends[-1] + n)
    query = torch.randn(2, 4, width, 8, requires_grad=True)
    key, value = (torch.randn(2, kv_heads, width, 8, requires_grad=True) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 4 // kv_heads
    out, _ = segment_attention(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=torch.tensor(ends))
    seq = find_packed_sequence_indices(position_ids)
    causal = torch.arange(width)[:, None] >= torch.arange(width)[None, :]
    mask = (seq[:, :, None] == seq[:, None, :]) & causal
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(4 // kv_heads, 1), value.repeat_interleave(4 // kv_heads, 1),
        attn_mask=mask[:, None], scale=0.3).transpose(1, 2)
    assert out.shape == (2, width, 4, 8)
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    got = [t.grad.clone() for t in (query, key, value)]
    for t in (query, key, value):
        t.grad = None
    expected.square().sum().backward()
    assert all(torch.allclose(g, t.grad, atol=1e-4) for g, t in zip(got, (query, key, value)))
    # an example longer than a sliding window: the (windowed) mask is used instead, through transformers' SDPA
    windowed, _ = segment_attention(module, query, key, value, torch.ones(2, 1, width, width, dtype=torch.bool),
                                    scaling=0.3, sliding_window=4, cu_seq_lens_q=torch.tensor(ends))
    full = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(4 // kv_heads, 1), value.repeat_interleave(4 // kv_heads, 1), scale=0.3)
    assert torch.allclose(windowed, full.transpose(1, 2), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [9, 3, 1])
def test_causal_attention_is_sdpas_in_fp32_also_under_autocast(kv_heads):
    from loralab.speed.attention import causal_attention

    torch.manual_seed(0)
    query = torch.randn(1, 9, 40, 16, requires_grad=True)
    key, value = (torch.randn(1, kv_heads, 40, 16, requires_grad=True) for _ in range(2))

    def reference(q, k, v):
        repeat = 9 // kv_heads
        return F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                              is_causal=True, scale=0.3)

    out, expected = causal_attention(query, key, value, 0.3), reference(query, key, value)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))
    assert all(torch.allclose(g, e, atol=1e-4) for g, e in zip(grads, expected_grads))
    # bf16 inputs under autocast: computed in fp32 all the same, rounded once to bf16 at the end
    low = [t.detach().bfloat16() for t in (query, key, value)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = causal_attention(*low, 0.3)
    exact = reference(*(t.float() for t in low))
    assert out16.dtype == torch.bfloat16 and torch.allclose(out16.float(), exact, rtol=2**-8, atol=1e-5)  # 1 ulp


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_lora_forward_gives_peft_loss_and_gradients(session, dropout):
    from peft.tuners.lora import Linear as LoraLinear

    from loralab.speed import FastDropout
    from loralab.speed.lora_forward import FusedLoraLinear, use_fused_lora

    model = _nonzero_lora(session.model).train()  # train mode: the same generator state gives both the same masks
    for module in model.modules():
        if isinstance(module, FusedLoraLinear):
            module.__dict__.pop("_lora_siblings", None)  # each layer draws its own mask, in PEFT's order
            if dropout:  # the fused path zeroes x by the mask and scales the r-wide A output by 1 / (1 - p)
                module.lora_dropout["default"] = FastDropout(dropout)
    batch = _padded_batch(session)

    def loss_and_grads(fused, bf16=False):
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.__class__ = FusedLoraLinear if fused else LoraLinear  # PEFT's own forward, or the fused one
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return _lora_grads(model, batch)

    reference, reference_grads = loss_and_grads(fused=False)
    fused, fused_grads = loss_and_grads(fused=True)
    assert torch.allclose(fused, reference, rtol=1e-5)
    assert fused_grads.keys() == reference_grads.keys() and len(fused_grads) == 2 * 14
    for name, grad in fused_grads.items():
        assert (grad - reference_grads[name]).norm() <= 1e-4 * reference_grads[name].norm() > 0, name
    # bf16 (a bf16 base under autocast): the fused path rounds in other places than PEFT's; measured 4-5% off the
    # fp32 gradients, as PEFT's own bf16 path is
    cast_frozen_weights(model)
    peft16, peft16_grads = loss_and_grads(fused=False, bf16=True)
    fused16, fused16_grads = loss_and_grads(fused=True, bf16=True)
    assert torch.allclose(fused16, reference, rtol=2e-2) and torch.allclose(peft16, reference, rtol=2e-2)
    errors = {path: torch.stack([(g[n] - reference_grads[n]).norm() / reference_grads[n].norm() for n in g])
              for path, g in (("peft", peft16_grads), ("fused", fused16_grads))}
    assert errors["fused"].mean() <= 1.5 * errors["peft"].mean() and errors["fused"].max() <= 1.5 * errors["peft"].max()
    # a merged adapter, or a second active adapter, runs PEFT's own forward
    layer = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    x = torch.randn(2, layer.in_features)
    assert layer._fused_adapter(x, (), {}) is not None
    assert layer._fused_adapter(x, (), {"adapter_names": ["default"]}) is None
    layer.merged_adapters.append("default")
    assert layer._fused_adapter(x, (), {}) is None


def test_lean_steps_count_flops_and_clip_gradients_as_the_trainer_does(session, tmp_path):
    from transformers import Trainer

    from loralab.runs import RunPaths
    from loralab.trainer import build_trainer

    trainer = build_trainer(session, RunPaths(tmp_path / "run"), progress=False)
    batch = session.collator([session.data.train[i] for i in range(3)])
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    model = _nonzero_lora(trainer.model).train()  # a copy: the session is shared by the module
    trainer.compute_loss(model, batch).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 14
    trainer.args.max_grad_norm = 1e-3  # far below the norm: every gradient is scaled down

    def clipped(clip):
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
        norm = clip(model)
        return norm, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    norm, lean = clipped(trainer._clip_grad_norm)
    reference_norm, reference = clipped(lambda m: Trainer._clip_grad_norm(trainer, m))
    assert torch.allclose(norm, reference_norm) and norm > 1e-2
    assert lean.keys() == reference.keys() and all(torch.allclose(lean[n], reference[n]) for n in lean)
    assert all(not torch.allclose(lean[n], grads[n]) for n in lean if grads[n].abs().max() > 0)


def test_setup_switches_on_the_cpu_levers_and_each_switch_turns_its_lever_off(tiny_llama_dir, speed_data, tmp_path):
    from loralab.runs import RunPaths
    from loralab.speed.attention import SEGMENT_ATTENTION
    from loralab.speed.lora_forward import FusedLoraLinear
    from loralab.trainer import build_trainer

    def levers(**overrides):
        session = _session_for(tiny_llama_dir, speed_data, tmp_path / f"out{len(overrides)}", **overrides)
        trainer = build_trainer(session, RunPaths(tmp_path / f"run{len(overrides)}"), progress=False)
        batch = session.collator([session.data.train[i] for i in range(3)])
        return {"segments": session.model.config._attn_implementation == SEGMENT_ATTENTION,
                "cu_seq_lens": "cu_seq_lens_q" in batch and batch["input_ids"].shape[0] == 1,
                "fused_lora": any(isinstance(m, FusedLoraLinear) for m in session.model.modules()),
                "siblings": any("_lora_siblings" in m.__dict__ for m in session.model.modules()),
                "fused_cross_entropy": trainer.fused_cross_entropy}

    names = ["segments", "cu_seq_lens", "fused_lora", "siblings", "fused_cross_entropy"]
    assert levers() == dict.fromkeys(names, True)
    off = {"train.segment_attention": False, "train.fused_lora": False, "train.fused_cross_entropy": False}
    assert levers(**off) == dict.fromkeys(names, False)
    assert levers(**{"train.share_sibling_dropout": False})["siblings"] is False


def _sibling_group(model):
    from loralab.speed.lora_forward import FusedLoraLinear

    attention = next(m for m in model.modules() if isinstance(getattr(m, "q_proj", None), FusedLoraLinear))
    group = attention.q_proj.__dict__.get("_lora_siblings")
    assert group is not None and [attention.q_proj, attention.k_proj, attention.v_proj] == group.members
    return attention, group


def test_sibling_lora_layers_share_one_mask_with_pefts_dropout_rate(session):
    from loralab.speed import FastDropout

    model = copy.deepcopy(session.model).train()
    attention, group = _sibling_group(model)
    q, k, v = group.members
    x = torch.ones(4, 50, q.in_features)
    rank = q.lora_A["default"].weight.shape[0]
    with torch.no_grad():
        for layer in (q, k, v):  # each A reads the first `rank` features as they are: h = dropout(x)[..., :rank]
            layer.lora_A["default"].weight.copy_(torch.eye(rank, q.in_features))
            layer.lora_dropout["default"] = FastDropout(0.25)
        o_dropout = attention.o_proj.lora_dropout["default"] = FastDropout(0.25)
    torch.manual_seed(0)
    hidden = [group.hidden(layer, x, "default") for layer in (q, k, v)]
    assert hidden[0] is not None and all(torch.equal(h, hidden[0]) for h in hidden[1:])  # one mask for the three
    values = hidden[0].unique()
    assert torch.allclose(values, torch.tensor([0.0, 1 / 0.75]))  # inverted dropout, as PEFT's
    assert abs((hidden[0] == 0).float().mean().item() - 0.25) < 0.03
    # another input is not served from the cache; a layer outside the group draws its own mask
    other = group.hidden(k, x.clone(), "default")
    assert other is not None and not torch.equal(other, hidden[1])
    assert not torch.equal(o_dropout(x)[..., :rank], hidden[0])
    # an input changed in place since the first sibling's call is not served from the cache either
    first = group.hidden(q, x, "default")
    x.mul_(1.0)
    assert not torch.equal(group.hidden(k, x, "default"), first)


def test_sibling_lora_groups_leave_the_adapter_and_the_exact_path_unchanged(session):
    from peft.tuners.lora import Linear as LoraLinear

    model = _nonzero_lora(session.model).train()  # dropout 0: sharing is exact
    _sibling_group(model)
    batch = _padded_batch(session)
    grouped, grouped_grads = _lora_grads(model, batch)
    keys = set(model.state_dict())
    for module in model.modules():
        if type(module).__name__ == "FusedLoraLinear":
            module.__class__ = LoraLinear  # PEFT's own forward: no fused add, no groups
    reference, reference_grads = _lora_grads(model, batch)
    assert set(model.state_dict()) == keys and not any("siblings" in key for key in keys)
    assert torch.allclose(grouped, reference, rtol=1e-5)
    for name, grad in reference_grads.items():
        assert (grouped_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-8, name
