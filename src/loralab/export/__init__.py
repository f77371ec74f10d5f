"""Export: merge an adapter into its base (checked against the adapter), a GGUF file for llama.cpp / Ollama /
LM Studio (checked by llama.cpp when it is installed), and an Ollama Modelfile.

- ``merge``: the merge, the safetensors model folder, its marker and ``export_report.json``;
- ``verify``: prompts through the adapter and the export, max |logit difference|, greedy answers, tolerances;
- ``gguf_writer`` / ``gguf_tokenizer``: weights, hyperparameters and tokenizer in llama.cpp's layout;
- ``llamacpp``: running a GGUF file with llama.cpp (``llama-cpp-python``) to check it;
- ``modelfile``: the Ollama Modelfile (template, stop tokens, system prompt).
"""

from loralab.export.merge import DTYPES, MARKER, REPORT, check_export_target, export_merged, read_report, write_export

__all__ = ["DTYPES", "MARKER", "REPORT", "check_export_target", "export_merged", "read_report", "write_export"]
