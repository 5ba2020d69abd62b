#!/usr/bin/env bash
# Run HERE, before a GPU machine is lent: downloads the wheels its image lacks (Python 3.12, manylinux x86-64;
# it has torch, transformers, accelerate, peft, safetensors, tokenizers, huggingface_hub, sentence-transformers,
# prometheus-client, httpx, numpy, pillow, pytest) into .gpu-wheelhouse/, at the versions requirements.txt pins,
# and checks that they and the tree fit the 64 MiB a device call carries. Then, on the device:
#   run(command="scripts/gpu_check.sh", carry=[".gpu-wheelhouse"])
# The list (one command's worth; vLLM is not in it: its wheel alone is ~400 MB):
#   app.py's imports: fastapi starlette uvicorn pydantic pydantic-core pydantic-settings python-dotenv
#     annotated-types typing-inspection anyio sniffio h11 click python-multipart
#   the checks' engines: diffusers bitsandbytes gguf xgrammar
# and llama/: llama.cpp's sources as llama-server's build needs them (from the pinned llama-cpp-python sdist; the
# sdist itself is 73 MiB) and a tiny Gemma 3 GGUF with its projector, for `scripts/gpu_check.sh --only llama_server`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_WHEELHOUSE:-.gpu-wheelhouse}
LIMIT=$((64 * 1024 * 1024))
pin() { grep -iE "^$1==" requirements.txt | head -1 || true; }
# Pinned where requirements.txt pins them; their dependencies at the versions this venv resolved.
have() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
specs=()
for p in fastapi uvicorn pydantic pydantic-settings python-multipart diffusers bitsandbytes gguf xgrammar; do
  spec=$(pin "$p"); specs+=("${spec:-$p==$(have "$p")}")
done
for p in starlette pydantic-core python-dotenv annotated-types typing-inspection anyio sniffio h11 click; do
  specs+=("$p==$(have "$p")")
done
rm -rf "$OUT"; mkdir -p "$OUT"
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$OUT" "${specs[@]}" 2>&1 \
  | grep -v "WARNING: Location" || true
mkdir -p "$OUT/llama"
"$PY" - "$OUT/llama" <<'PY'
import sys, tarfile
from pathlib import Path
sys.path.insert(0, "tests")
from models import make_tiny_gemma3
from vision_files import gemma3_gguf, llama_cpp_source

out = Path(sys.argv[1])
src = llama_cpp_source()
with tarfile.open(out / "llama.cpp-src.tar.xz", "w:xz") as tar:  # what its CMake build of llama-server reads
    for part in ("CMakeLists.txt", "LICENSE", "app", "cmake", "common", "ggml", "include", "licenses", "scripts",
                 "src", "tools", "vendor"):
        tar.add(src / part, f"llama.cpp/{part}")
gemma3_gguf(make_tiny_gemma3(out / "hf"), out)
PY
rm -rf "$OUT/llama/hf"
ls -la "$OUT/llama"
wheels=$(du -cb "$OUT"/*.whl "$OUT"/llama/* | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
ls -1 "$OUT"
echo "gpu_wheelhouse: $(ls "$OUT"/*.whl | wc -l) wheels and llama/, $((wheels / 1024 / 1024)) MiB; with the tree ($((tree / 1024)) KiB)" \
     "$(((wheels + tree) / 1024 / 1024)) MiB of the 64 MiB a device call carries"
if [ $((wheels + tree)) -gt $LIMIT ]; then echo "gpu_wheelhouse: over the limit: split the list"; exit 1; fi
