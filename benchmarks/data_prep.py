"""Data preparation at scale: time and peak memory of ``prepare_data`` for 10k, 50k and 200k examples, first run
(read, validate, split, tokenize, write the cache) and cached run (read back from the cache).

    pip install 'loralab[bench]'        # chitchat-dataset: 7,168 real conversations (MIT), not in the default install
    python benchmarks/data_prep.py [--sizes 10000,50000,200000] [--max-length 512] [--format jsonl|json]

The examples are real multi-turn conversations from the ``chitchat-dataset`` package (the BYU Chit Chat Challenge):
the first speaker is the user, the other the assistant, consecutive messages of one speaker joined; each
conversation cut into windows of up to 4 exchanges (what chat SFT data looks like), cycled to the size asked for, and
written as a messages-format JSONL file (``--format json``: one JSON array, which the reader streams too). They are
tokenized with the built-in model's tokenizer (SmolLM2, ChatML template), every assistant turn supervised. Each
measurement runs in its own child process, one after another, so peak memory is per run: the process's peak anonymous memory (heap, sampled from /proc every 20 ms; memory-mapped Arrow
pages, which the kernel can drop, are not in it) and its peak RSS (``ru_maxrss``, mapped pages included), each with
its baseline after importing loralab and loading the tokenizer, and the largest child's RSS (the tokenizing workers,
forked: they share the parent's pages). The children import a snapshot of loralab taken when
the benchmark starts, so edits to the working tree while it runs change neither the code measured nor the cache key.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def chitchat_messages(conversation: dict) -> list[dict[str, str]]:
    """One chitchat-dataset conversation as alternating user / assistant messages: the first sender is the user,
    a sender's consecutive messages are joined, empty ones dropped."""
    messages: list[dict[str, str]] = []
    first = None
    for message in conversation["messages"]:
        text = " ".join(u["text"] for u in message).strip()
        if not text:
            continue
        first = first or message[0]["sender"]
        role = "user" if message[0]["sender"] == first else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += " " + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def conversations() -> list[list[dict[str, str]]]:
    """chitchat-dataset's conversations as user / assistant messages, cut into windows of up to 4 exchanges."""
    try:
        import chitchat_dataset
    except ImportError:
        sys.exit("this benchmark needs the chitchat-dataset package: pip install 'loralab[bench]'")
    windows = []
    for conversation in chitchat_dataset.Dataset().values():
        messages = chitchat_messages(conversation)
        for start in range(0, len(messages), 8):
            window = messages[start : start + 8]
            if window and window[-1]["role"] != "assistant":
                window = window[:-1]
            if len(window) >= 2 and window[0]["role"] == "user":
                windows.append(window)
    return windows


def write_examples(path: Path, n: int, pool: list[list[dict[str, str]]]) -> None:
    """n conversations as JSON Lines (``.jsonl``) or one pretty-printed JSON array (``.json``), written a row at a time."""
    array = path.suffix == ".json"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("[\n" if array else "")
        for i in range(n):
            row = json.dumps({"messages": pool[i % len(pool)]}, ensure_ascii=False, indent=1 if array else None)
            handle.write(row + (",\n" if array and i < n - 1 else "\n"))
        handle.write("]\n" if array else "")


def anonymous_mb() -> int:
    """This process's anonymous resident memory (RssAnon), in MB; 0 where /proc has no such line."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def child(path: str, max_length: int) -> None:
    """One measurement: prepare the file's data with the built-in tokenizer; print a JSON line."""
    import loralab
    from loralab.config import DataConfig, ModelConfig
    from loralab.data import prepare_data
    from loralab.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(), "CAUSAL_LM")
    baseline, anonymous = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, anonymous_mb()
    peak = [anonymous]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], anonymous_mb())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    prepared = prepare_data(DataConfig(path=path, max_length=max_length), tokenizer, "CAUSAL_LM")
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "seconds": round(elapsed, 2), "baseline_mb": round(baseline), "train": len(prepared.train),
        "anonymous_baseline_mb": anonymous, "anonymous_peak_mb": max(peak[0], anonymous_mb()),
        "eval": len(prepared.eval or []), "supervised_tokens": prepared.supervised_tokens(),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "worker_peak_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "loralab": str(Path(loralab.__file__).parent),
    }))


def measure(path: Path, cache: Path, max_length: int, snapshot: Path) -> dict:
    env = {**os.environ, "LORALAB_DATA_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(snapshot), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(snapshot / Path(__file__).name), "--child", str(path), "--max-length",
                           str(max_length)], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--format", choices=["jsonl", "json"], default="jsonl",
                        help="the file the examples are written to: JSON Lines or one JSON array")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.max_length)
    sizes = [int(s) for s in args.sizes.split(",")]
    pool = conversations()
    print(f"{cpu_name()}, {os.cpu_count()} cores; {len(pool)} conversation windows from chitchat-dataset, "
          f"{sum(len(w) for w in pool) / len(pool):.1f} messages each; max_length {args.max_length}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loralab-data-prep-") as tmp:
        import loralab

        snapshot = Path(tmp) / "code"
        shutil.copytree(Path(loralab.__file__).parent, snapshot / "loralab", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(__file__, snapshot)
        for n in sizes:
            path, cache = Path(tmp) / f"chats-{n}.{args.format}", Path(tmp) / f"cache-{n}"
            write_examples(path, n, pool)
            first = measure(path, cache, args.max_length, snapshot)
            print(json.dumps({"examples": n, "first": first}), flush=True)
            cached = measure(path, cache, args.max_length, snapshot)
            print(json.dumps({"examples": n, "cached": cached}), flush=True)
            rows.append((n, path.stat().st_size / 2**20, first, cached))
            path.unlink()
    print(f"\n| examples | {args.format.upper()} | first run | examples/s | cached run | "
          "peak heap first / cached (baseline) | "
          "peak RSS first / cached (baseline) | largest child RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, mb, first, cached in rows:
        print(f"| {n:,} | {mb:.0f} MB | {first['seconds']:.1f} s | {n / first['seconds']:,.0f} | "
              f"{cached['seconds']:.2f} s | {first['anonymous_peak_mb']} / {cached['anonymous_peak_mb']} MB "
              f"({first['anonymous_baseline_mb']} MB) | {first['peak_mb']} / {cached['peak_mb']} MB "
              f"({first['baseline_mb']} MB) | {first['worker_peak_mb']} MB |")


if __name__ == "__main__":
    main()
