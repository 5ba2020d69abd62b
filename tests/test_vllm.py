"""The vLLM backend, for real: needs the CPU build in its own venv (transformers<5.20).

    scripts/setup.sh --vllm && .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py

.ci/run runs it when .venv-vllm exists (setup takes ~2 min, the engine start ~35 s on CPU).
"""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest

from conftest import copy_home

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm not installed: scripts/setup.sh --vllm, then run with .venv-vllm")]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
          "additionalProperties": False}


def test_vllm_backend_loads_smollm2_and_answers(start_server, smollm2_home, tmp_path):
    server = start_server(home=copy_home(smollm2_home, tmp_path / "home"), AI_SERVER_BACKENDS="vllm,transformers",
                          VLLM_CPU_KVCACHE_SPACE="1", VLLM_MAX_MODEL_LEN="1024")
    assert server.client.get("/status").json()["backends"][0] == {"name": "vllm", "available": True, "error": None}
    reply = server.chat("smollm2:135m", "What is the capital of France? Answer in one sentence.",
                        temperature=0, max_tokens=40).json()
    assert "Paris" in reply["message"]["content"] and reply["done_reason"] == "stop"
    assert reply["eval_count"] > 0 and reply["prompt_eval_count"] > 10 and reply["load_duration"] > 0
    entry = server.model("smollm2:135m")
    assert (entry["backend"], entry["dtype"]) == ("vllm", "bfloat16")
    limited = server.chat("smollm2:135m", "Write a long story about a dragon.", temperature=0, max_tokens=5).json()
    assert (limited["eval_count"], limited["done_reason"]) == (5, "length")
    stopped = server.chat("smollm2:135m", "What is the capital of France? Answer in one sentence.",
                          temperature=0, max_tokens=40, stop=["Paris"]).json()
    assert "Paris" not in stopped["message"]["content"] and stopped["done_reason"] == "stop"
    # Ollama's API on the vLLM backend, with vLLM's own structured outputs enforcing the schema.
    shaped = server.client.post("/api/chat", json={
        "model": "smollm2:135m", "stream": False, "format": SCHEMA, "options": {"temperature": 0, "num_predict": 60},
        "messages": [{"role": "user", "content": "Which city is France's capital?"}]}).json()
    jsonschema.validate(json.loads(shaped["message"]["content"]), SCHEMA)
    with server.client.stream("POST", "/api/generate", json={"model": "smollm2:135m", "prompt": "Say hi.",
                                                             "options": {"temperature": 0, "num_predict": 8}}) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == len(lines[-1]["context"]) - lines[-1][
        "prompt_eval_count"]
