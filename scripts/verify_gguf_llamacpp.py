"""Check GGUF exports with llama.cpp itself, for every quant type, on the built-in model (or your run / adapter).

    pip install 'loralab[gguf]'          # llama-cpp-python: builds llama.cpp from source (a few minutes)
    python scripts/verify_gguf_llamacpp.py                      # a LoRA adapter made here on the built-in model
    python scripts/verify_gguf_llamacpp.py --run runs/my-run    # your run's adapter
    python scripts/verify_gguf_llamacpp.py --adapter DIR --model BASE --quants f16,q8_0

Each quant type is exported with ``loralab export --format gguf`` (which runs the llama.cpp check itself: tokenization
of the prompts and CJK text equal to the model's tokenizer, logits within the type's tolerance); the table shows the
max |logit difference| to the merged model and how many greedy answers llama.cpp gives token for token equal.
Exits non-zero when an export fails, or when f16 does not give the merged model's greedy tokens on a prompt where the
merged model's two best tokens are not a near tie (closer than the measured difference).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

QUANTS = ("f16", "bf16", "q8_0", "q5_0", "q4_0")


def make_adapter(folder: Path, base: str, seed: int = 0) -> Path:
    """A LoRA adapter made with plain peft (not loralab) on ``base``, with small random weights that change answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loralab.models import resolve_model_path

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # a nudge the size of a short fine-tune, not noise that drowns the model
    peft_model.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A loralab run folder (default: an adapter made on the built-in model).")
    parser.add_argument("--adapter", type=Path, help="Any PEFT adapter folder (with --model).")
    parser.add_argument("--model", default=None, help="Base model of --adapter, or the model to make an adapter on "
                        "(default: smollm2-135m-instruct).")
    parser.add_argument("--quants", default=",".join(QUANTS), help=f"Comma-separated, from {', '.join(QUANTS)}.")
    parser.add_argument("--output", type=Path, help="Folder for the GGUF files (default: a temporary folder).")
    parser.add_argument("--json", type=Path, help="Also write the measurements to this JSON file.")
    args = parser.parse_args()

    from loralab.export import llamacpp

    if not llamacpp.available():
        print(f"llama-cpp-python is not installed: {llamacpp.INSTALL_HINT}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="loralab-gguf-") as work:  # the adapter made here, GGUFs without --output
        return measure(args, Path(work))


def measure(args: argparse.Namespace, work: Path) -> int:
    """Export each quant type, print a row per type; the exit code (see the module docstring)."""
    from loralab.config import DEFAULT_MODEL
    from loralab.errors import LoralabError
    from loralab.export.gguf_export import export_gguf, sidecars

    out = args.output or work
    out.mkdir(parents=True, exist_ok=True)
    adapter, base = args.adapter, args.model
    if args.run is None and adapter is None:
        base = base or DEFAULT_MODEL
        adapter = make_adapter(work / "adapter", base)
    rows, failed = [], False
    print(f"{'quant':6} {'size MB':>8} {'max|dlogit|':>12} {'of |logit|':>10} {'greedy equal':>13} {'near ties':>10} "
          f"{'tokenization':>13} {'s':>6}", flush=True)
    for quant in [q.strip() for q in args.quants.split(",") if q.strip()]:
        path = out / f"export-{quant}.gguf"
        start = time.perf_counter()
        try:
            export_gguf(args.run, path, quant=quant, overwrite=True, adapter=adapter, base_model=base,
                        llamacpp_check=True)
        except LoralabError as exc:
            print(f"{quant}: FAILED: {exc}", file=sys.stderr, flush=True)
            failed = True
            continue
        report = json.loads(sidecars(path)["report"].read_text(encoding="utf-8"))
        check = next(c for c in report["checks"] if c["name"] == "llama.cpp")
        tok = report["llama_cpp"]["tokenization"]
        row = {"quant": quant, "size_mb": round(path.stat().st_size / 2**20, 1),
               "max_abs_logit_diff": round(check["max_abs_logit_diff"], 4),
               "relative": round(check["max_abs_logit_diff"] / check["logit_scale"], 4),
               "greedy_agree": check["greedy_agree"], "n": check["n"], "near_ties": check["near_ties"],
               "tokenization_equal": f"{tok['equal']}/{tok['texts']}", "seconds": round(time.perf_counter() - start, 1),
               "adapter_effect": next(c["max_abs_logit_diff"] for c in report["checks"] if c["name"] == "adapter effect")}
        rows.append(row)
        print(f"{quant:6} {row['size_mb']:8} {row['max_abs_logit_diff']:12} {row['relative']:10} "
              f"{str(row['greedy_agree']) + '/' + str(row['n']):>13} {row['near_ties']:10} "
              f"{row['tokenization_equal']:>13} {row['seconds']:6}", flush=True)
        # f16 must give the merged model's greedy tokens, except where the merged model itself hesitates
        if quant == "f16" and check["greedy_agree"] + check["near_ties"] != check["n"]:
            failed = True
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
