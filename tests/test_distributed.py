"""Several processes: `loralab train --nproc 2` (torchrun, gloo on CPU) writes the run folder once and trains as one
process with twice the gradient accumulation does (same global batch, same samples per step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import opposite_records, tiny_overrides

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")


def _loralab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "loralab", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setting(tiny_llama_dir, tmp_path_factory):
    """16 train / 4 eval examples (every step has the same 4 samples in every run) and one single-process run with
    twice the gradient accumulation, the reference for the multi-process runs."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = tmp / "d.json"
    data.write_text(json.dumps(opposite_records()[:20]))
    common = tiny_overrides(tiny_llama_dir, data, tmp / "runs", **{"train.batch_size": 2, "train.epochs": 2,
                                                                   "train.logging_steps": 1})
    sets = [a for o in common for a in ("--set", o)]
    one = _loralab(["train", *sets, "--set", "name=ga", "--set", "train.gradient_accumulation=2", "--skip-checks"], tmp)
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp, sets


def _assert_same_training(run: Path, reference: Path) -> None:
    rows, want_rows = _rows(run), _rows(reference)
    assert len(rows) == len(want_rows)  # every line once
    for key in ("loss", "eval_loss"):
        got = {r["step"]: r[key] for r in rows if key in r}
        want = {r["step"]: r[key] for r in want_rows if key in r}
        assert got.keys() == want.keys() and len(got) == len([r for r in rows if key in r])
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=2e-3), f"{key} at step {step}"
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].numel() and torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in a)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 8
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "config.yaml", "data.json",
                                                     "metrics.jsonl", "summary.json"]


def test_two_processes_write_once_and_match_gradient_accumulation(setting):
    tmp, sets = setting
    two = _loralab(["train", "--nproc", "2", *sets, "--set", "name=ddp", "--skip-checks"], tmp)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trainable params") == 1  # the summary once, from rank 0
    _assert_same_training(tmp / "runs" / "ddp", tmp / "runs" / "ga")


def test_fsdp_saves_a_whole_peft_adapter_equal_to_the_single_process_one(setting, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, sets = setting
    fsdp = _loralab(["train", "--nproc", "2", *sets, "--set", "name=fsdp", "--set", "train.fsdp=full_shard",
                     "--skip-checks"], tmp)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    _assert_same_training(tmp / "runs" / "fsdp", tmp / "runs" / "ga")  # gathered, not shards
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    logits = []
    for name in ("fsdp", "ga"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                          tmp / "runs" / name / "adapter").eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_saves_a_whole_peft_adapter_equal_to_the_single_process_one(setting, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'loralab[deepspeed]')")
    tmp, sets = setting
    config = Path(__file__).resolve().parents[1] / "examples" / "deepspeed" / f"{stage}.json"
    run = _loralab(["train", "--nproc", "2", *sets, "--set", f"name={stage}", "--set", f"train.deepspeed={config}",
                    "--skip-checks"], tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_training(tmp / "runs" / stage, tmp / "runs" / "ga")  # ZeRO-3: gathered from the shards


def test_nproc_larger_than_the_machine_is_refused_before_anything_starts(tmp_path):
    result = _loralab(["train", "--nproc", "4096"], tmp_path)
    assert result.returncode == 1 and "more processes than this machine has" in result.stderr
    assert not (tmp_path / "runs").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_through_torchrun_rendezvous_train_like_one_process(setting):
    """Multi-node as README documents it (--nnodes/--node_rank/--rdzv_endpoint), both "nodes" on this machine and
    the run folder on storage both see: the same training as one process, written once."""
    tmp, sets = setting
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                               "--rdzv_id", "loralab-test", "-m", "loralab", "train", *sets, "--set", "name=nodes",
                               "--skip-checks"], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert sum(out.count("trainable params") for out, _ in outputs) == 1  # one summary, from global rank 0
    _assert_same_training(tmp / "runs" / "nodes", tmp / "runs" / "ga")
