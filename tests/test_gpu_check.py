"""The GPU check's rehearsal (issue 28): scripts/gpu_check.sh --cpu runs every check's code on CPU (~1 min),
so the real run on a lent GPU machine has nothing left to discover but CUDA itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT
from test_gguf import BINARY


def test_the_gpu_check_rehearses_on_cpu(tmp_path):
    report = tmp_path / "gpu_check.json"
    proc = subprocess.run([str(ROOT / "scripts/gpu_check.sh"), "--cpu", "--json", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_WHEELHOUSE": str(tmp_path / "none")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    assert data["device"] == "cpu" and not data["summary"]["fail"]
    for name in ("env", "transformers", "bitsandbytes", "q4_by_size", "diffusers", "vision", "audio", "lora"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["transformers"]["details"]["greedy_equal_to_cpu"] and checks["lora"]["details"]["a1_equal_to_merged"]
    skipped = {n for n, c in checks.items() if c["status"] == "skip"}
    # llama-server runs with -ngl 0 where it is built here, a vision GGUF made by llama.cpp's converter
    assert checks["llama_server"]["status"] == ("pass" if BINARY.is_file() else "skip"), checks["llama_server"]
    assert skipped - {"llama_server"} == {"compiled_decoding", "vllm"} and all(checks[n]["details"] for n in skipped)
    assert f"skipped {len(skipped)} (on CPU: {', '.join(sorted(skipped, key=list(checks).index))})" in proc.stdout
