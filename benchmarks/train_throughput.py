"""Training throughput: the usual LoRA recipe vs. a well-tuned plain transformers+peft run vs. loralab's default.

    python benchmarks/train_throughput.py [--quick] [--examples N] [--recipes usual,plain,loralab] [--datasets demo,alpaca]
                                          [--rounds K]

All recipes train the built-in model (SmolLM2-135M-Instruct) with LoRA r=16, alpha=32, dropout 0.05 on all linear
layers of the decoder, learning rate 3e-4, one epoch over the same examples, formatted with the same chat template
and masked the same way (prompt and padding -100, response + EOS supervised). Two datasets, each timed with every
recipe: ``demo`` (the bundled demo dataset: short counselling answers, loralab's own data) and ``alpaca`` (generated
alpaca-shaped pairs nobody tuned for: instruction 10-60 tokens, response 20-80 tokens, uniform, 400 by default). Each recipe runs in
its own child process, one after another (never two at once: they would share the cores), so peak memory is
per recipe. With ``--rounds K`` the recipes take turns K times (plain, loralab, plain, loralab, ...) and the table
shows each recipe's median round: on a shared 2-core machine one process can run 15% slower than the next, which
turns means that load hits one recipe more than another. Throughput counts the same tokens for every recipe: each example's supervised tokens, and each
example's non-pad prompt+response tokens; "processed" tokens include padding. The final loss is computed the same
way for every recipe: its saved adapter on a fresh fp32 base, mean supervised cross-entropy over the same examples.

Recipes:
  usual    Trainer + peft, every example padded to max_length 256, fp32, batch size 5 (the copied notebook).
  plain    Trainer + peft done well: dynamic padding, length-grouped batches, bf16 autocast, loralab's batch size.
  loralab  loralab's default training path (loralab.training.setup + build_trainer) and default batch size.
  qlora    the loralab path on a 4-bit NF4 base (model.load_in_4bit; opt in: --recipes loralab,qlora).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LR, R, ALPHA, DROPOUT = 3e-4, 16, 32, 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- shared by all recipes


DATASETS = ("demo", "alpaca")
DEFAULT_EXAMPLES = {"demo": 254, "alpaca": 400}
WORDS = ("the a of to and in is it that for on with as was at by this be from or have an are not which you they "
         "we can all one there when would what more out about so up into some time only new could people like other "
         "than then now look two way first find use water long day make thing see know get write number sound place "
         "year work back give most very after word little just name good sentence man think say great where help "
         "through much before line right too mean old any same tell boy follow came want show also around form three "
         "small set put end does another well large must big even such because turn here why ask went men read need "
         "land different home us move try kind hand picture again change off play spell air away animal house point "
         "page letter mother answer found study still learn should America world high every near add food between own "
         "below country plant last school father keep tree never start city earth eye light thought head under story "
         "saw left few while along might close something seem next hard open example begin life always those both paper "
         "together got group often run important until children side feet car mile night walk white sea began grow took "
         "river four carry state once book hear stop without second later miss idea enough eat face watch far Indian "
         "real almost let above girl sometimes mountain cut young talk soon list song being leave family it's").split()


def alpaca_shaped(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n generated instruction/response pairs of the shape of alpaca-style data: the instruction 10-60 tokens, the
    response 20-80 tokens of SmolLM2's tokenizer (uniform), made of common English words and punctuation."""
    import random

    from transformers import AutoTokenizer

    tokenizer, rng = AutoTokenizer.from_pretrained(model_path()), random.Random(seed)

    def text(tokens: int) -> str:
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
            word = rng.choice(WORDS)
            words.append(word.capitalize() if not words or words[-1].endswith(".") else word)
            if rng.random() < 0.08:
                words[-1] += rng.choice([".", ",", "?", ":"])
        return " ".join(words)

    return [{"instruction": text(rng.randint(10, 60)), "response": text(rng.randint(20, 80))} for _ in range(n)]


def examples(n: int, dataset: str = "demo") -> list[dict[str, str]]:
    """The first n training examples of the demo dataset (loralab's own 80/20 split, seed 42), or n alpaca-shaped ones."""
    if dataset == "alpaca":
        return alpaca_shaped(n)
    from loralab.config import DataConfig
    from loralab.data import load_examples, split_examples

    train, _ = split_examples(load_examples(DataConfig(), "CAUSAL_LM"), 0.2, 42)
    return [{"instruction": e.prompt, "response": e.response} for e in train[:n]]


def encode(tokenizer, record: dict[str, str]) -> tuple[list[int], list[int]]:
    """Chat-template prompt + response + EOS; labels -100 on the prompt (what every recipe trains on)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def model_path() -> str:
    from loralab.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


class CountingCollator:
    """Wraps a collator and counts every token position it hands to the model (padding included)."""

    def __init__(self, inner):
        self.inner, self.processed = inner, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.processed += batch["input_ids"].numel()
        return batch


def final_loss(adapter_dir: str, records: list[dict[str, str]]) -> float:
    """Mean supervised cross-entropy of an adapter on a fresh fp32 base over the given examples."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32), adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            ids, labels = encode(tokenizer, record)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def hf_trainer(model, tokenizer, dataset, collator, out: str, batch_size: int, bf16: bool, group_by_length: bool):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, learning_rate=LR, num_train_epochs=1,
                             lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1000, save_strategy="no",
                             report_to="none", bf16=bf16, use_cpu=True, seed=42, data_seed=42, disable_tqdm=True,
                             train_sampling_strategy="group_by_length" if group_by_length else "random",
                             remove_unused_columns=False, label_names=["labels"])
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer)


# ---------------------------------------------------------------- recipes (each runs in a child process)


BATCH = {"usual": 5, "plain": None, "loralab": None, "qlora": None}  # None: --batch-size (default: loralab's own default)


def recipe_hf(records, out: str, padded: bool, batch: int) -> tuple[object, CountingCollator, int]:
    """The usual recipe (padded=True) or the well-tuned plain one (padded=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS))
    dataset = []
    for record in records:
        ids, labels = encode(tokenizer, record)
        if padded:  # padding="max_length", labels -100 on padding (by position: pad == EOS here)
            pad = 256 - len(ids)
            dataset.append({"input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
                            "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                            "labels": torch.tensor(labels + [-100] * pad)})
        else:
            dataset.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    tokenizer.padding_side = "right"
    collator = CountingCollator(default_data_collator if padded else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    trainer = hf_trainer(model, tokenizer, dataset, collator, out, batch, bf16=not padded, group_by_length=not padded)
    return trainer, collator, batch


def recipe_loralab(records, out: str, batch: int | None, extra: list[str]) -> tuple[object, CountingCollator, int]:
    from loralab.config import build_config
    from loralab.runs import RunPaths
    from loralab.training import build_trainer, setup

    data = Path(out) / "data.json"
    data.write_text(json.dumps(records))
    config = build_config(overrides=[f"data.path={data}", "data.eval_split=0", "train.epochs=1", f"train.learning_rate={LR}",
                                     f"lora.r={R}", f"lora.alpha={ALPHA}", f"lora.dropout={DROPOUT}", "train.save_total_limit=1",
                                     f"output_dir={out}", "name=run", *([f"train.batch_size={batch}"] if batch else []), *extra])
    session = setup(config)
    session.collator = CountingCollator(session.collator)
    paths = RunPaths(Path(out) / "run")
    paths.root.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(session, paths, progress=False)
    trainer.args.save_strategy = "no"
    return trainer, session.collator, config.train.batch_size


def run_child(name: str, n: int, batch: int | None, extra: list[str], dataset: str = "demo") -> dict:
    """Train one recipe and measure it (called in a fresh process)."""
    from loralab.config import TrainConfig
    from loralab.precision import resolve_precision

    torch.manual_seed(0)
    records = examples(n, dataset)
    batch = BATCH[name] or batch or TrainConfig().batch_size
    with tempfile.TemporaryDirectory() as out:
        if name in ("loralab", "qlora"):  # qlora: loralab's path on a 4-bit NF4 base (model.load_in_4bit)
            quantized = ["model.load_in_4bit=true"] if name == "qlora" else []
            trainer, collator, batch = recipe_loralab(records, out, batch, [*quantized, *extra])
        else:
            trainer, collator, batch = recipe_hf(records, out, padded=name == "usual", batch=batch)
        started = time.perf_counter()
        result = trainer.train()
        elapsed = time.perf_counter() - started
        steps = trainer.state.global_step
        trainer.model.save_pretrained(f"{out}/adapter")
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        loss = final_loss(f"{out}/adapter", records)
    return {"recipe": name, "seconds": elapsed, "steps": steps, "batch_size": batch, "processed_tokens": collator.processed,
            "peak_rss_mib": peak_mib, "final_loss": loss, "train_loss": result.training_loss,
            "bf16": name == "plain" or (name in ("loralab", "qlora") and resolve_precision("auto") == "bf16")}


# ---------------------------------------------------------------- the parent: peaks, children, table


def matmul_peak(dtype: torch.dtype, size: int = 2048, reps: int = 5) -> float:
    """Best-of-reps GFLOP/s of a square matmul in ``dtype`` on this machine."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def run_dataset(dataset: str, n: int, args: argparse.Namespace, peaks: dict[str, float], flops_per_token: float) -> dict:
    """Every recipe on one dataset, one after another; prints the table and returns the results."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    encoded = [encode(tokenizer, r) for r in examples(n, dataset)]
    tokens = sum(len(ids) for ids, _ in encoded)
    supervised = sum(sum(1 for x in labels if x != -100) for _, labels in encoded)
    print(f"\n[{dataset}] {n} examples, {tokens} non-pad tokens ({supervised} supervised)", flush=True)
    rounds: dict[str, list[dict]] = {}
    for name in [recipe for _ in range(args.rounds) for recipe in args.recipes.split(",")]:
        command = [sys.executable, __file__, "--child", name, "--examples", str(n), "--datasets", dataset]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        command += [arg for item in args.loralab_set for arg in ("--loralab-set", item)]
        child = subprocess.run(command, capture_output=True, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"})
        if child.returncode != 0:
            sys.exit(f"recipe {name} failed on {dataset}:\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["supervised_tokens_per_s"] = supervised / result["seconds"]
        result["tokens_per_s"] = tokens / result["seconds"]
        result["processed_tokens_per_s"] = result["processed_tokens"] / result["seconds"]
        result["seconds_per_step"] = result["seconds"] / max(1, result["steps"])
        result["mfu"] = tokens / result["seconds"] * flops_per_token / (peaks["bf16" if result["bf16"] else "fp32"] * 1e9)
        rounds.setdefault(name, []).append(result)
        print(f"  {name:8s} done in {result['seconds']:.1f} s ({result['tokens_per_s']:.1f} tok/s)", flush=True)
    results = [median_round(runs) for runs in rounds.values()]

    header = f"{'recipe':8s} {'sup tok/s':>10s} {'tok/s':>8s} {'proc tok/s':>10s} {'s/step':>7s} {'batch':>5s} " \
             f"{'peak MiB':>9s} {'final loss':>10s} {'MFU':>6s}"
    print(f"\n[{dataset}]\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r['recipe']:8s} {r['supervised_tokens_per_s']:10.1f} {r['tokens_per_s']:8.1f} {r['processed_tokens_per_s']:10.1f} "
              f"{r['seconds_per_step']:7.2f} {r['batch_size']:5d} {r['peak_rss_mib']:9.0f} {r['final_loss']:10.4f} {r['mfu']:6.1%}")
    if args.rounds > 1:
        print("tok/s of each round: " + "; ".join(f"{r['recipe']} {r['rounds_tokens_per_s']}" for r in results))
    return {"examples": n, "tokens": tokens, "supervised": supervised, "results": results}


def median_round(runs: list[dict]) -> dict:
    """The round with the median throughput (the lower middle one of an even count), with every round's tok/s."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer examples (80 per dataset)")
    parser.add_argument("--examples", type=int, default=None,
                        help="training examples per dataset (default: demo 254, alpaca 400; quick 80)")
    parser.add_argument("--recipes", default="usual,plain,loralab")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of the plain and loralab recipes (default: loralab's default); usual uses 5")
    parser.add_argument("--loralab-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the loralab recipe, for ablations (e.g. train.packing=true)")
    parser.add_argument("--rounds", type=int, default=1, help="times the recipes take turns; the table shows each "
                        "recipe's median round (default 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        sys.exit(f"--datasets: unknown {unknown or args.datasets!r}; choose from {', '.join(DATASETS)}")
    size = lambda dataset: args.examples or (80 if args.quick else DEFAULT_EXAMPLES[dataset])  # noqa: E731
    if args.child:
        print(json.dumps(run_child(args.child, size(datasets[0]), args.batch_size, args.loralab_set, datasets[0])))
        return

    from loralab.data import IGNORE_INDEX  # noqa: F401  (fail early if loralab is not installed)

    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_path()).parameters())
    flops_per_token = 4 * params  # forward 2N + backward (activation gradients) 2N; LoRA's own share is negligible
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"model {params / 1e6:.1f}M params; matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    runs = {dataset: run_dataset(dataset, size(dataset), args, peaks, flops_per_token) for dataset in datasets}
    print("MFU: 4 x params FLOPs per non-pad token against the measured matmul peak of the recipe's precision.")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "datasets": runs}, indent=2))
    for dataset, run in runs.items():
        by_name = {r["recipe"]: r for r in run["results"]}
        if dataset == "demo" and "usual" in by_name and "loralab" in by_name:
            speedup = by_name["loralab"]["supervised_tokens_per_s"] / by_name["usual"]["supervised_tokens_per_s"]
            print(f"speedup_supervised_tokens_per_s: {speedup:.2f}")
        if "plain" in by_name and "loralab" in by_name:
            print(f"speedup_vs_plain_{dataset}: {by_name['loralab']['tokens_per_s'] / by_name['plain']['tokens_per_s']:.2f}")
        if "qlora" in by_name and "loralab" in by_name:
            q, lora = by_name["qlora"], by_name["loralab"]
            print(f"qlora_vs_lora_{dataset}: tok/s {q['tokens_per_s'] / lora['tokens_per_s']:.2f}x, "
                  f"peak memory {q['peak_rss_mib'] / lora['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
