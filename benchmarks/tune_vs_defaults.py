"""`loralab tune` against loralab's defaults and the usual recipe, on a task nobody tuned for.

    python benchmarks/tune_vs_defaults.py [--quick] [--budget 20m] [--seeds 1,2,3] [--output DIR]

The task: extract a person's name, city and age from a sentence as JSON (``{"name": ..., "city": ..., "age": ...}``).
The training sentences use 8 phrasings, the eval split (what the search judges trials by, ``data.eval_path``) 4
others, the test split (``data.test_path``, held out of every trial, checkpoint choice and ranking) 4 more: a model
that memorises the training phrasings does well on its training loss and badly on the test split.

Three configs, each trained once per seed and scored by exact match (JSON compared by value) on the whole test
split, mean ± sd over the seeds:
  defaults      loralab's defaults (the config below: only the model, the data files and data.max_length set)
  usual-recipe  the recipe most LoRA tutorials copy: r 16, alpha 32, lr 2e-4, 3 epochs
  tuned         `loralab tune` with --metric exact_match and a wall-clock --budget, then its best.yaml
Printed: the table, the search's wall time, and each config's training time (mean per seed). Everything stays in
--output (default: a temporary folder): the tune folder with report.md, and tune/final/ with the trained runs.

The full run (the built-in SmolLM2-135M-Instruct, 240 training sentences, a 20-minute budget, then 9 training runs)
took 18 minutes of search and 108 minutes of training and scoring on 2 AMD EPYC cores (shared part of the time with
other jobs); the table is in the README. --quick (a tiny random model, 24 sentences, 3 short trials,
2 seeds; it learns nothing) only checks that the whole path works: 8 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jonas", "Kemal", "Lena", "Mina",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tomas", "Uma", "Viktor", "Wen", "Yara", "Zoe"]
CITIES = ["Lisbon", "Oslo", "Kyoto", "Lagos", "Quito", "Tartu", "Perth", "Cusco", "Gdansk", "Hanoi", "Turin", "Leeds",
          "Dakar", "Porto", "Graz", "Bergen", "Izmir", "Cork", "Lyon", "Split"]
TRAIN_PHRASINGS = [
    "{name} is {age} years old and lives in {city}.",
    "My neighbour {name}, aged {age}, comes from {city}.",
    "In {city} there is {name}, who just turned {age}.",
    "{name} ({age}) moved to {city} last spring.",
    "Meet {name} from {city}; {name} is {age}.",
    "At {age}, {name} still calls {city} home.",
    "The form says: {name}, {age}, resident of {city}.",
    "{city} is where {name}, {age}, grew up.",
]
EVAL_PHRASINGS = [
    "Yesterday I met {name}; they are {age} and based in {city}.",
    "{name}, a {age}-year-old, works in {city}.",
    "Living in {city}, {name} celebrated birthday number {age}.",
    "Record: {city} / {name} / age {age}.",
]
TEST_PHRASINGS = [
    "Our new colleague {name} relocated from {city} at the age of {age}.",
    "{name} was born {age} years ago and has always lived in {city}.",
    "Ask {name} about {city}: {age} years there and counting.",
    "Passenger {name}, {age}, boarding for {city}.",
]
INSTRUCTION = "Extract the person's name, city and age from the sentence as JSON with the keys name, city, age.\n\n"
USUAL = "usual-recipe"


def records(phrasings: list[str], n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        sentence = phrasings[i % len(phrasings)].format(name=name, city=city, age=age)
        rows.append({"instruction": INSTRUCTION + sentence,
                     "response": json.dumps({"name": name, "city": city, "age": age})})
    rng.shuffle(rows)
    return rows


def write_task(folder: Path, n_train: int, n_eval: int, n_test: int, seed: int = 0) -> dict[str, Path]:
    """The three files of the task; the same seed gives the same rows."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for part, phrasings, n in (("train", TRAIN_PHRASINGS, n_train), ("eval", EVAL_PHRASINGS, n_eval),
                               ("test", TEST_PHRASINGS, n_test)):
        files[part] = folder / f"{part}.json"
        files[part].write_text(json.dumps(records(phrasings, n, rng), indent=1), encoding="utf-8")
    return files


def tiny_model(folder: Path, texts: list[str]) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained on the task's text (for --quick)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>")
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                               "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
                               "}}{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model and 3 trials: a smoke check")
    parser.add_argument("--budget", default="20m", help="wall-clock budget of the search (default 20m)")
    parser.add_argument("--seeds", default=None, help="seeds every config is trained with (default 1,2,3; --quick: 1,2)")
    parser.add_argument("--output", type=Path, default=None, help="where the data, the tune and the runs go")
    parser.add_argument("--train", type=int, default=240, help="training sentences (default 240)")
    parser.add_argument("--eval-limit", type=int, default=32, help="eval sentences each trial evaluation answers (default 32)")
    args = parser.parse_args()

    import transformers

    from loralab.config import build_config
    from loralab.sweeps import parse_seeds
    from loralab.tune import load_tune, parse_duration, progress_line, run_tune

    transformers.logging.set_verbosity_error()
    seeds = parse_seeds(args.seeds or ("1,2" if args.quick else "1,2,3"))
    out = args.output or Path(tempfile.mkdtemp(prefix="loralab-tune-vs-defaults-"))
    n_train, n_eval, n_test = (24, 6, 8) if args.quick else (args.train, 60, 100)
    files = write_task(out / "data", n_train, n_eval, n_test)
    overrides = [f"data.path={files['train']}", f"data.eval_path={files['eval']}", f"data.test_path={files['test']}",
                 "data.max_length=128"]
    if args.quick:
        texts = [r["instruction"] + " " + r["response"] for part in files.values()
                 for r in json.loads(part.read_text(encoding="utf-8"))]
        overrides += [f"model.name_or_path={tiny_model(out / 'tiny-model', texts * 4)}", "train.precision=fp32"]
    base = build_config(overrides=overrides)
    quick_space = ["train.max_steps=8,12", "lora.r=4,8", "lora.coverage=attention"]  # short trials, few choices
    spec = load_tune(out / "tune", base, metric="exact_match", eval_limit=4 if args.quick else args.eval_limit,
                     lr_steps=10 if args.quick else None, space_args=quick_space if args.quick else ())
    say = lambda progress: print(progress_line(progress), flush=True)  # noqa: E731

    started = time.monotonic()
    search = run_tune(spec, budget_s=None if args.quick else parse_duration(args.budget), trials=3 if args.quick else None,
                      on_progress=say)
    search_s = time.monotonic() - started
    print(f"search: {len(search.trials)} trials in {search_s:.0f} s; best trial {search.best.number if search.best else '-'}",
          flush=True)
    started = time.monotonic()
    final = run_tune(load_tune(out / "tune"), seeds=seeds, baselines=True).final
    final_s = time.monotonic() - started

    cells = {cell.name: cell for cell in final.cells()}
    print(f"\nexact match on the test split ({n_test} sentences in phrasings no trial saw), mean ± sd over seeds "
          f"{', '.join(map(str, seeds))}:")
    print(f"{'config':<14} {'test exact match':>18} {'n':>3} {'eval exact match':>18} {'train time / seed':>18}")
    for name in ("defaults", USUAL, "tuned"):
        cell = cells[name]
        train = cell.stat("train_time_s")
        print(f"{name:<14} {cell.stat('test_exact_match').text(3):>18} {len(cell.done):>3} "
              f"{cell.stat('exact_match').text(3):>18} {train.text(0) + ' s':>18}")
    print(f"\nwall time: search {search_s:.0f} s (budget {'3 trials' if args.quick else args.budget}), training and "
          f"scoring the three configs x {len(seeds)} seeds {final_s:.0f} s")
    print(f"reports: {out / 'tune' / 'report.md'}, {final.sweep_dir / 'comparison.md'}")
    tuned, others = cells["tuned"].stat("test_exact_match"), [cells[n].stat("test_exact_match") for n in ("defaults", USUAL)]
    if tuned.mean is not None and all(o.mean is not None for o in others):
        print(f"tuned_minus_best_other_test_exact_match: {tuned.mean - max(o.mean for o in others):+.3f}")


if __name__ == "__main__":
    main()
