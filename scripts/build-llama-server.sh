#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` and `llama-quantize` from the llama.cpp sources vendored in a pinned llama-cpp-python sdist,
# into a cache folder outside the repo that later runs reuse. Prints the binary's path on its last line.
#   scripts/build-llama-server.sh            build (or reuse) the CPU binary: ~15-20 min on 2 cores
#   LLAMA_CUDA=1 scripts/build-llama-server.sh   build with CUDA (needs nvcc and a GPU; much longer)
#   scripts/build-llama-server.sh --path     print where the binary is (or would be), build nothing
#   LLAMA_SRC=dir-or.tar.xz scripts/build-llama-server.sh   build from sources at hand, no download (offline;
#       scripts/gpu_wheelhouse.sh packs llama.cpp-src.tar.xz for the GPU machine)
# Where: $LLAMA_BUILD_DIR, default ~/.cache/ai-server/llama-server-<pin>-r<recipe>[-cuda]: bin/llama-server,
# bin/llama-quantize (quantize on create), and convert/
# (llama.cpp's convert_hf_to_gguf.py). Point LLAMA_SERVER at the binary (app.py and the tests also look in the
# default folder on their own).
set -euo pipefail
PIN=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python3}
cuda=${LLAMA_CUDA:-}
if [ -z "$cuda" ] && command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  cuda=1   # nvcc alone is not enough: a CUDA build with no GPU to run it on costs an hour for nothing
fi
suffix=""; [ "$cuda" = 1 ] && suffix="-cuda"
RECIPE=3   # bump when the flags or targets below change: a cached build of another recipe is not reused
dest=${LLAMA_BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ai-server/llama-server-$PIN-r$RECIPE$suffix}
bin="$dest/bin/llama-server"
if [ "${1:-}" = "--path" ]; then echo "$bin"; exit 0; fi

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
sources() {
  if [ -n "${LLAMA_SRC:-}" ]; then  # the sources at hand: a llama.cpp folder, or a .tar.xz holding llama.cpp/ (offline)
    if [ -d "$LLAMA_SRC" ]; then src=$LLAMA_SRC; else tar -xJf "$LLAMA_SRC" -C "$work"; src="$work/llama.cpp"; fi
  else
    echo "llama-server: downloading the llama-cpp-python==$PIN sdist"
    "$PY" -m pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$PIN"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  fi
}
# llama.cpp's HF-to-GGUF converter (a script, its conversion/ package and gguf-py) beside the binary, in
# $dest/convert: app.py converts HF models with it (CONVERT_HF_TO_GGUF). Added to a cached build too.
converter() {
  rm -rf "$dest/convert.partial"; mkdir -p "$dest/convert.partial"
  cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$dest/convert.partial/"
  rm -rf "$dest/convert"; mv "$dest/convert.partial" "$dest/convert"
}

if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then
  [ -f "$dest/convert/convert_hf_to_gguf.py" ] || { sources; converter; }
  echo "llama-server: reusing $bin"; echo "$bin"; exit 0
fi
sources

flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
# CUDA: the kernels of one architecture (the card's own, found by CMake; LLAMA_CUDA_ARCH to name one, 89 or 90)
[ "$cuda" = 1 ] && flags+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${LLAMA_CUDA_ARCH:-native}")
if [ "$(uname -m)" = x86_64 ]; then
  # -march=native turns on ggml's AMX kernels where the CPU lists AMX, but a VM may not grant the tile
  # state: llama-server then segfaults in ggml_backend_amx_mul_mat on its first decode (seen here).
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  flags+=("-DCMAKE_C_FLAGS=$noamx" "-DCMAKE_CXX_FLAGS=$noamx")
fi
echo "llama-server: building (cuda=${cuda:-0}); this takes a while"
cmake -S "$src" -B "$work/build" "${flags[@]}" >"$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log"; exit 1; }
cmake --build "$work/build" --target llama-server llama-quantize -j"$(nproc)" >"$work/build.log" 2>&1 || {
  tail -40 "$work/build.log"; exit 1; }

mkdir -p "$dest/bin.partial"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-quantize" "$dest/bin.partial/"
rm -rf "$dest/bin"; mv "$dest/bin.partial" "$dest/bin"   # a half-copied folder is never taken for a build
converter
"$bin" --version 2>&1 | head -2 || true
echo "$bin"
