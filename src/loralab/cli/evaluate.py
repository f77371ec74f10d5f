"""``loralab eval``, ``compare``, ``generate`` and ``chat``: a trained adapter (or any PEFT adapter) on prompts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from loralab.cli.common import AdapterOpt, BaseModelOpt, TrustOpt, app, handle_errors
from loralab.cli.output import console, err_console, print_eval
from loralab.errors import LoralabError

RunArg = typer.Argument(..., help="A run folder (runs/<name>).")
RunOrAdapterArg = typer.Argument(None, help="A run folder (runs/<name>); or give --adapter PATH --model BASE.")
CheckpointOpt = typer.Option("best", "--checkpoint", help="Adapter: best (the run's adapter), latest, or a step number.")
PromptOpt = typer.Option(None, "--prompt", help="A prompt (repeatable).")
PromptsFileOpt = typer.Option(None, "--prompts-file", help="One prompt per line, or a JSON / JSONL / CSV data file.")
MaxNewTokensOpt = typer.Option(64, "--max-new-tokens", help="Most tokens per answer.")
DoSampleOpt = typer.Option(False, "--do-sample", help="Sample instead of greedy decoding.")
TemperatureOpt = typer.Option(None, "--temperature", help="Sampling temperature (needs --do-sample).")
TopKOpt = typer.Option(None, "--top-k", help="Sample from the k most likely tokens (needs --do-sample).")
TopPOpt = typer.Option(None, "--top-p", help="Nucleus sampling threshold (needs --do-sample).")
NumBeamsOpt = typer.Option(1, "--num-beams", help="Beam search width (1: no beam search).")
BatchSizeOpt = typer.Option(8, "--batch-size", help="Prompts generated together.")
SeedOpt = typer.Option(None, "--seed", help="Random seed, for reproducible sampling.")
def _settings(max_new_tokens: int, do_sample: bool, temperature: Optional[float], top_k: Optional[int],
              top_p: Optional[float], num_beams: int, batch_size: int, seed: Optional[int]) -> Any:
    from loralab.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, num_beams=num_beams, batch_size=batch_size, seed=seed)


def _load_run(run_dir: Optional[Path], checkpoint: str, adapter: Optional[Path] = None, model: Optional[str] = None,
              allow_classifier: bool = False) -> Any:
    """The run's model with its adapter (or any PEFT adapter on its base model)."""
    from loralab.adapters import load_model_with_adapter
    return load_model_with_adapter(run_dir, checkpoint, adapter=adapter, base_model=model,
                                   allow_classifier=allow_classifier)


def _prompts(run: Any, prompt: Optional[list[str]], prompts_file: Optional[Path]) -> list[Any]:
    from loralab.evaluation import read_prompts

    found: list[Any] = list(prompt or [])
    if prompts_file:
        found.extend(read_prompts(prompts_file, run.config.data, run.task_type))
    return found


def _need_prompts(prompt: Optional[list[str]], prompts_file: Optional[Path]) -> None:
    if not prompt and not prompts_file:
        raise LoralabError("no prompts given; pass --prompt TEXT (repeatable) or --prompts-file FILE")


@app.command("eval")
@handle_errors
def eval_command(run_dir: Optional[Path] = RunOrAdapterArg,
                 data: Optional[Path] = typer.Option(None, "--data", help="Every row of this file instead of the eval split."),
                 split: str = typer.Option("eval", "--split", help="eval (default) or test: the split held out by "
                                           "data.test_split / data.test_path (writes eval_test.json)."),
                 limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N examples (a quick look)."),
                 checkpoint: str = CheckpointOpt, show: int = typer.Option(3, "--show", min=0, help="Example answers to print."),
                 max_new_tokens: int = MaxNewTokensOpt, do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt,
                 top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt,
                 batch_size: int = BatchSizeOpt, seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt,
                 adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt,
                 output: Optional[Path] = typer.Option(None, "--output", help="With --adapter: the folder for eval.json "
                                                       "and predictions.jsonl (default: eval-<adapter folder name>)."),
                 general_text: Optional[Path] = typer.Option(None, "--general-text", help="Perplexity change on this "
                                                             "text file ({text, lang} rows) instead of the bundled sample."),
                 no_general_text: bool = typer.Option(False, "--no-general-text", help="Skip the general-text "
                                                      "perplexity (what the adapter cost elsewhere).")) -> None:
    """Score base vs adapter answers on the run's eval split (or --split test); writes eval.json and predictions.jsonl."""
    from loralab.evaluation import evaluate_run

    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, batch_size, seed)
    loaded = None
    if adapter is not None or model is not None:  # any PEFT adapter: scored on --data, written to --output
        if data is None:
            raise LoralabError("--adapter has no run and no eval split: pass --data FILE (rows with reference answers)")
        loaded = _load_run(run_dir, checkpoint, adapter, model, allow_classifier=True)  # QA, embeddings too
        run_dir = output or Path(f"eval-{Path(adapter or '.').resolve().name}")
    report = evaluate_run(run_dir, data_path=data, limit=limit, checkpoint=checkpoint, settings=settings, progress=True,
                          split=split, loaded=loaded, general_text=False if no_general_text else general_text or True)
    print_eval(report, run_dir, show)


@app.command()
@handle_errors
def compare(run_dir: Optional[Path] = RunOrAdapterArg, prompt: Optional[list[str]] = PromptOpt, prompts_file: Optional[Path] = PromptsFileOpt,
            checkpoint: str = CheckpointOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
            max_new_tokens: int = MaxNewTokensOpt, do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt,
            top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt,
            batch_size: int = BatchSizeOpt, seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt,
            adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt,
            context: Optional[str] = typer.Option(None, "--context", help="QUESTION_ANSWERING runs: the passage the "
                                                  "--prompt questions are answered from.")) -> None:
    """Base and adapter answers side by side for the given prompts."""
    import json

    from loralab.evaluation import compare_prompts

    _need_prompts(prompt, prompts_file)
    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, batch_size, seed)
    run = _load_run(run_dir, checkpoint, adapter, model, allow_classifier=True)  # a classifier compares labels
    if run.task_type == "QUESTION_ANSWERING" or context is not None:  # spans of a context: loralab.tasks.qa_eval
        from loralab.tasks.qa_eval import compare_cli

        return compare_cli(run, run_dir or adapter, checkpoint, prompt, prompts_file, context, batch_size, as_json)
    rows = compare_prompts(run_dir or adapter, _prompts(run, prompt, prompts_file), settings, loaded=run)
    run_dir = run_dir or adapter
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if run.task_type == "TOKEN_CLS":  # each word with its tag from the base head and the trained head
        from loralab.tasks.token_eval import print_token_compare

        return print_token_compare(rows, f"{run_dir} (adapter {checkpoint})")
    if run.task_type == "FEATURE_EXTRACTION":  # the closest eval passages under the base model and the adapter
        from loralab.tasks.retrieval import print_embedding_compare

        return print_embedding_compare(rows, f"{run_dir} (adapter {checkpoint})")
    if run.task_type == "SEQ_CLS":  # label (probability) from the base head and the trained head
        table = Table("text", "base head", "trained head", title=f"{run_dir} (adapter {checkpoint})", show_lines=True)
        for row in rows:
            table.add_row(row["prompt"], f"{row['base']} ({row['base_probability']:.2f})",
                          f"{row['adapter']} ({row['adapter_probability']:.2f})")
        console.print(table, markup=False)
        return
    table = Table("prompt", "base", "adapter", title=f"{run_dir} (adapter {checkpoint})", show_lines=True)
    for row in rows:
        table.add_row(row["prompt"], row["base"], row["adapter"])
    console.print(table, markup=False)


@app.command()
@handle_errors
def generate(run_dir: Optional[Path] = RunOrAdapterArg, prompt: Optional[list[str]] = PromptOpt, prompts_file: Optional[Path] = PromptsFileOpt,
             checkpoint: str = CheckpointOpt, base: bool = typer.Option(False, "--base", help="Answer with the base model."),
             max_new_tokens: int = MaxNewTokensOpt, do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt,
             top_k: Optional[int] = TopKOpt, top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt,
             batch_size: int = BatchSizeOpt, seed: Optional[int] = SeedOpt, trust_remote_code: bool = TrustOpt,
             adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt) -> None:
    """Answer prompts with the adapter (one prompt: just the answer; several: each prompt, then its answer)."""
    from loralab.generation import generate_answers

    _need_prompts(prompt, prompts_file)
    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, batch_size, seed)
    run = _load_run(run_dir, checkpoint, adapter, model)
    prompts = _prompts(run, prompt, prompts_file)
    answers = generate_answers(run, prompts, settings, use_adapter=not base, progress=len(prompts) > batch_size)
    if len(prompts) == 1:
        typer.echo(answers[0])
        return
    for item, answer in zip(prompts, answers):
        typer.echo(f"> {getattr(item, 'prompt', item)}\n{answer}\n")


@app.command()
@handle_errors
def chat(run_dir: Path = RunArg, checkpoint: str = CheckpointOpt,
         base: bool = typer.Option(False, "--base", help="Chat with the base model."),
         max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Most tokens per answer."),
         do_sample: bool = DoSampleOpt, temperature: Optional[float] = TemperatureOpt, top_k: Optional[int] = TopKOpt,
         top_p: Optional[float] = TopPOpt, num_beams: int = NumBeamsOpt, seed: Optional[int] = SeedOpt,
         trust_remote_code: bool = TrustOpt) -> None:
    """Chat with the adapter: one message per line; '/reset' starts over, 'exit' or Ctrl-D quits."""
    from loralab.generation import chat_reply

    settings = _settings(max_new_tokens, do_sample, temperature, top_k, top_p, num_beams, 1, seed)
    run = _load_run(run_dir, checkpoint)
    who = "base model" if base else f"adapter {checkpoint}"
    err_console.print(f"chatting with {run_dir} ({who}); '/reset' starts over, 'exit' or Ctrl-D quits", highlight=False)
    history: list[dict[str, str]] = []
    while True:
        typer.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            typer.echo("")
            break
        text = line.strip()
        if text.lower() in ("exit", "quit", "/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            continue
        if text:
            typer.echo(f"bot> {chat_reply(run, history, text, settings, use_adapter=not base)}")
