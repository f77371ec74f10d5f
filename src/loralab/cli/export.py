"""``loralab export`` (the merged model: safetensors or GGUF) and ``loralab ui`` (the local dashboard)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from loralab.cli.common import AdapterOpt, BaseModelOpt, TrustOpt, app, handle_errors
from loralab.cli.output import err_console
from loralab.errors import LoralabError

@app.command("export")
@handle_errors
def export(run_dir: Optional[Path] = typer.Argument(None, help="A run folder made by loralab train (or --adapter)."),
           output: Path = typer.Option(..., "--output", help="hf: the folder for the merged model; gguf: FILE.gguf "
                                       "(FILE.Modelfile and FILE.export_report.json go next to it)."),
           fmt: str = typer.Option("hf", "--format", help="hf (safetensors model folder) or gguf (one file for "
                                   "llama.cpp, Ollama, LM Studio)."),
           quant: Optional[str] = typer.Option(None, "--quant", help="gguf: f16 (default), bf16, q8_0, q5_0 or q4_0."),
           checkpoint: str = typer.Option("best", "--checkpoint", help="best, latest or a step number."),
           dtype: str = typer.Option("float32", "--dtype", help="hf: float32, bfloat16 or float16."),
           overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier loralab export in --output "
                                          "(never files loralab did not export)."),
           llamacpp_check: Optional[bool] = typer.Option(None, "--llamacpp-check/--no-llamacpp-check", help="gguf: run "
                                                         "the file with llama.cpp to check it (default: when "
                                                         "llama-cpp-python is installed)."),
           adapter: Optional[Path] = AdapterOpt, model: Optional[str] = BaseModelOpt,
           trust_remote_code: bool = TrustOpt) -> None:
    """Merge the adapter into its base, check the merged model against the adapter, and save it (safetensors or GGUF)."""
    from loralab.cli.output import print_export, tensor_progress
    from loralab.export import export_merged, read_report

    if fmt not in ("hf", "gguf"):
        raise LoralabError(f"--format must be hf or gguf, got {fmt!r}")
    if fmt == "hf" and quant is not None:
        raise LoralabError("--quant is for --format gguf; a safetensors export takes --dtype")
    if fmt == "gguf" and dtype != "float32":
        raise LoralabError("--dtype is for --format hf; a GGUF export takes --quant (f16, bf16, q8_0, q5_0, q4_0)")
    if fmt == "hf":
        folder = export_merged(run_dir, output, checkpoint=checkpoint, dtype=dtype, overwrite=overwrite,
                               adapter=adapter, base_model=model)
        report_path = folder / "export_report.json"
        print_export(read_report(report_path) if report_path.is_file() else None, folder)
        return
    from loralab.export.gguf_export import export_gguf, sidecars

    with tensor_progress() as on_tensor:
        path = export_gguf(run_dir, output, quant=quant or "f16", checkpoint=checkpoint, overwrite=overwrite,
                           adapter=adapter, base_model=model, llamacpp_check=llamacpp_check, on_tensor=on_tensor)
    print_export(read_report(sidecars(path)["report"]), path)


@app.command()
@handle_errors
def ui(runs: Path = typer.Option(Path("runs"), "--runs", help="Folder of run folders (or one run folder)."),
       sweeps: Path = typer.Option(Path("sweeps"), "--sweeps", help="Folder of sweep folders."),
       host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (default: this machine only)."),
       port: int = typer.Option(8765, "--port", help="Port (0: any free one)."),
       allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a --host other machines can reach; "
                                         "the dashboard has no authentication.")) -> None:
    """A local web dashboard: every run and sweep, loss curves, eval tables, predictions, compare on your prompts."""
    from loralab.ui import serve

    serve(runs, sweeps, host=host, port=port, allow_remote=allow_remote,
          say=lambda text: err_console.print(escape(text), highlight=False, soft_wrap=True))
