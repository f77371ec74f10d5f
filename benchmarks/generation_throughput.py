"""Generation throughput of ``loralab eval``: batched vs. one prompt at a time, same prompts, greedy, in one run.

    python benchmarks/generation_throughput.py [RUN_DIR] [--prompts N] [--batch-size B] [--max-new-tokens T]

RUN_DIR defaults to the run that `loralab train` makes with no arguments (runs/smollm2-135m-instruct-demo).
Prompts are the run's eval split. Both ways use the adapter, KV cache and greedy decoding; the script checks that
they give the same answers and prints answers/s and generated tokens/s for each, and the speedup.
"""

from __future__ import annotations

import argparse
import time

from loralab.evaluation import eval_examples
from loralab.generation import GenerationSettings, generate_answers, load_run_model


def timed(run, prompts, settings: GenerationSettings) -> tuple[list[str], float]:
    started = time.perf_counter()
    answers = generate_answers(run, prompts, settings)
    return answers, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/smollm2-135m-instruct-demo")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    run = load_run_model(args.run_dir)
    prompts = eval_examples(run.config, run.task_type, args.run_dir)[: args.prompts]
    generate_answers(run, prompts[:2], GenerationSettings(max_new_tokens=4, batch_size=2))  # warm-up
    batched, t_batched = timed(run, prompts, GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
    single, t_single = timed(run, prompts, GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=1))
    tokens = sum(len(run.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in single)
    same = sum(a == b for a, b in zip(batched, single))
    print(f"{len(prompts)} prompts, greedy, max_new_tokens={args.max_new_tokens}, ~{tokens} answer tokens")
    print(f"{'way':12s} {'seconds':>8s} {'answers/s':>10s} {'tokens/s':>9s}")
    for name, seconds in ((f"batch {args.batch_size}", t_batched), ("one by one", t_single)):
        print(f"{name:12s} {seconds:8.1f} {len(prompts) / seconds:10.2f} {tokens / seconds:9.1f}")
    print(f"identical answers: {same}/{len(prompts)}")
    print(f"speedup_batched_answers_per_s: {t_single / t_batched:.2f}")


if __name__ == "__main__":
    main()
