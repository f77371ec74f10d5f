"""``loralab export RUN_DIR --format gguf``: merge, check the merge, write FILE.gguf, check it with llama.cpp, write
the Ollama Modelfile and the report next to it.

Next to ``FILE.gguf`` go ``FILE.Modelfile`` and ``FILE.export_report.json``. Each is written to a temporary file and
moved into place only when every check passed; ``--overwrite`` replaces only files an earlier loralab export wrote.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from loralab.errors import LoralabError
from loralab.export import llamacpp
from loralab.export.gguf_writer import QUANTS, architecture, check_config, write_gguf
from loralab.export.verify import MAX_NEW_TOKENS, TOLERANCE, check_passed, compare, measure
from loralab.runs import FILE_MODE, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

CJK_PROBES = ("用一句话解释什么是机器学习。", "東京は日本の首都です。", "안녕하세요, 반갑습니다.")
MODELFILE_MARK = "# Ollama Modelfile written by loralab export"


def sidecars(output: Path) -> dict[str, Path]:
    """The files written next to ``FILE.gguf``."""
    stem = output.name[: -len(".gguf")]
    return {"modelfile": output.with_name(f"{stem}.Modelfile"), "report": output.with_name(f"{stem}.export_report.json")}


def _written_by_loralab(path: Path, kind: str) -> bool:
    try:
        if kind == "gguf":
            import gguf

            return "loralab.source" in gguf.GGUFReader(path).fields
        head = path.read_text(encoding="utf-8")[:4096]
    except Exception:  # noqa: BLE001 - unreadable, not a GGUF, not text: not ours
        return False
    return head.startswith(MODELFILE_MARK) if kind == "modelfile" else '"loralab_export"' in head


def check_gguf_target(output: Path, overwrite: bool) -> None:
    """Refuse an output that is not ``*.gguf``, and existing files unless ``overwrite`` and an earlier export wrote them."""
    if output.suffix.lower() != ".gguf":
        raise LoralabError(f"--format gguf writes one file: give --output FILE.gguf (got {output})")
    if output.is_dir():
        raise LoralabError(f"export output {output} is a folder; give --output FILE.gguf")
    for kind, path in {"gguf": output, **sidecars(output)}.items():
        if not path.exists():
            continue
        if not overwrite:
            raise LoralabError(f"{path} exists; choose another --output or pass --overwrite")
        if not path.is_file() or not _written_by_loralab(path, kind):
            raise LoralabError(f"{path} was not written by loralab export; nothing was changed. --overwrite only "
                               "replaces an earlier export: choose another --output")


def source_config(source: str | Path | None, adapter: str | Path | None, base_model: str | None) -> Any:
    """The run (or outside adapter) config, read without loading weights."""
    if adapter is not None:
        from loralab.adapters import adapter_run_config

        return adapter_run_config(adapter, base_model)
    from loralab.runs import load_run_config

    if source is None:
        raise LoralabError("give a run folder (RUN_DIR) or --adapter PATH --model BASE")
    return load_run_config(source)


def check_supported(source: str | Path | None, adapter: str | Path | None, base_model: str | None, quant: str) -> None:
    """Fail on an unsupported quant type or architecture before any weights load."""
    from loralab.models import load_model_config

    if quant not in QUANTS:
        raise LoralabError(f"--quant {quant!r} is not supported for GGUF export; supported: {', '.join(QUANTS)}")
    config = source_config(source, adapter, base_model)
    hf_config = load_model_config(config.model)
    check_config(hf_config, architecture(hf_config))


def _temporary(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    os.close(fd)
    return Path(name)


def chat_template_for(run: Any) -> str | None:
    """The Jinja chat template the GGUF carries: the one training formatted with, or loralab's plain template."""
    from loralab.export.modelfile import plain_jinja_template
    from loralab.templates import uses_chat_template

    if uses_chat_template(run.tokenizer, run.config.data):
        return run.tokenizer.chat_template
    return plain_jinja_template()


def llamacpp_checks(path: Path, merged: Any, quant: str, stop_ids: list[int]) -> tuple[list[Any], dict[str, Any]]:
    """llama.cpp on the written file: tokenization of the probes (formatted prompts and CJK text) must equal the
    Hugging Face tokenizer's; logits and greedy answers are compared with the merged model (float32)."""
    from loralab.data import format_prompt
    from loralab.generation import as_example

    run = merged.run
    longest = max(len(p.ids) + len(t) for p, t in zip(merged.probes, merged.merged.tokens))
    model = llamacpp.LlamaCppModel(path, stop_ids, n_ctx=max(256, longest + MAX_NEW_TOKENS + 16))
    try:
        texts = [format_prompt(run.tokenizer, as_example(p.prompt), run.config.data, run.task_type)
                 for p in merged.probes] + list(CJK_PROBES)
        mismatches = llamacpp.tokenization_mismatches(run.tokenizer, model, texts)
        outputs = measure(model, merged.probes, merged.merged)
    finally:
        model.close()
    tokenization = {"texts": len(texts), "equal": len(texts) - len(mismatches), "mismatches": mismatches[:3]}
    if mismatches:
        first = mismatches[0]
        raise LoralabError(f"llama.cpp tokenizes {first['text'][:60]!r} as {first['llama.cpp'][:12]} but the model's "
                           f"tokenizer as {first['transformers'][:12]} ({len(mismatches)} of {len(texts)} texts "
                           "differ); nothing was written")
    decode = lambda ids: run.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    comparison = compare("llama.cpp", merged.merged, outputs, reference_label="merged model (float32)",
                         candidate_label=f"llama.cpp ({quant})", tolerance=TOLERANCE[quant], decode=decode,
                         probes=merged.probes)
    return [comparison], tokenization


def export_gguf(source: str | Path | None, output: str | Path, quant: str = "f16", checkpoint: str = "best",
                overwrite: bool = False, *, adapter: str | Path | None = None, base_model: str | None = None,
                llamacpp_check: bool | None = None, on_tensor: Callable[[int, int], None] | None = None) -> Path:
    """Merge, check, and write ``output`` (a ``.gguf`` file) with ``FILE.Modelfile`` and ``FILE.export_report.json``.

    ``llamacpp_check``: run the file with llama.cpp (default: when llama-cpp-python is installed); a tokenization
    difference or logits beyond the quant type's tolerance fail the export and nothing is written.
    """
    from loralab.export.merge import apply_run_template, merged_model
    from loralab.export.modelfile import modelfile_for
    from loralab.generation import stop_token_ids
    from loralab.templates import chat_end_ids, uses_chat_template

    output = Path(output)
    check_gguf_target(output, overwrite)
    check_supported(source, adapter, base_model, quant)
    if llamacpp_check and not llamacpp.available():
        raise LoralabError(f"the llama.cpp check needs llama-cpp-python: {llamacpp.INSTALL_HINT}")
    check = llamacpp.available() if llamacpp_check is None else llamacpp_check
    merged = merged_model(source, checkpoint, "float32", adapter=adapter, base_model=base_model)
    run = merged.run
    apply_run_template(run)
    uses_template = uses_chat_template(run.tokenizer, run.config.data)
    end_of_turn = (chat_end_ids(run.tokenizer) or [None])[-1] if uses_template else None
    described = f"{adapter or source}" + ("" if adapter else f", adapter {checkpoint}")
    metadata = {"source": str(adapter or source), "checkpoint": "" if adapter else str(checkpoint),
                "base_model": run.config.model.name_or_path}
    files = {"gguf": output, **sidecars(output)}
    temporary = _temporary(output)
    try:
        log.info("writing %s (%s)", output, quant)
        written = write_gguf(temporary, run.model, run.tokenizer, quant, name=output.stem,
                             chat_template=chat_template_for(run), end_of_turn=end_of_turn, metadata=metadata,
                             on_tensor=on_tensor)
        stop_ids = stop_token_ids(run.model, run.tokenizer)
        comparisons = list(merged.comparisons)
        tokenization: dict[str, Any] | None = None
        if check:
            log.info("checking %s with llama.cpp", output.name)
            gc.collect()
            found, tokenization = llamacpp_checks(temporary, merged, quant, stop_ids)
            comparisons += found
            check_passed(found, f"llama.cpp on the exported {quant} file",
                         "llama.cpp does not compute what the merged model computes: please report it with the base "
                         "model's name and this message")
        modelfile = modelfile_for(run.tokenizer, run.config.data, output.name, written["tokenizer"]["add_bos"],
                                  described)
        skipped = "switched off (--no-llamacpp-check)" if llamacpp.available() else \
            f"llama-cpp-python is not installed: {llamacpp.INSTALL_HINT}"
        report = {**merged.report, "format": "gguf", "quant": quant, "output": str(output), **written,
                  "llama_cpp": {"checked": True, "tokenization": tokenization} if check else
                  {"checked": False, "reason": skipped},
                  "checks": [c.to_dict() for c in comparisons],
                  "files": {files["gguf"].name: temporary.stat().st_size,
                            files["modelfile"].name: len(modelfile.encode("utf-8"))}}
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, output)  # only now, every check passed
        write_text_atomic(files["modelfile"], modelfile)
        write_json_atomic(files["report"], report)
    finally:
        temporary.unlink(missing_ok=True)
    return output
