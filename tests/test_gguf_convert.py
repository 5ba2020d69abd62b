"""HF models on llama-server (CONVERT_HF_TO_GGUF): the embedded SmolLM2 (HF safetensors, bf16) converted once by
llama.cpp's own convert_hf_to_gguf.py (beside the llama-server build), served by the llamacpp backend, checked
against bare llama-server on the same converted file and against transformers' own top token; a model the
converter cannot take falls back to transformers, and is tried once."""

from __future__ import annotations

import os

import httpx
import pytest
from conftest import BareLlamaServer, ServerProcess, copy_home
from test_gguf import BINARY, needs_binary

import app

CONVERTER = BINARY.resolve().parent.parent / "convert" / "convert_hf_to_gguf.py"
pytestmark = [needs_binary, pytest.mark.skipif(not CONVERTER.is_file(), reason=(
    f"no converter at {CONVERTER}: scripts/build-llama-server.sh puts it beside the binary"))]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,",
           "The opposite of hot is", "Water boils at", "My favourite colour is", "The sun rises in the"]


def completion(url: str, prompt: str, n: int, **body) -> dict:
    r = httpx.post(f"{url}/completion", timeout=120, json={"prompt": prompt, "n_predict": n, "temperature": 0,
                                                            **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_hf_model_served_converted_by_llama_server(hub, smollm2_home, smollm2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = copy_home(smollm2_home, tmp_path / "home")
    server = ServerProcess(home, hub.url, tmp_path / "server.log", AI_SERVER_BACKENDS="llamacpp,transformers",
                           LLAMA_SERVER=str(BINARY), CONVERT_HF_TO_GGUF="auto", NUM_PARALLEL="2").start()
    try:
        story = completion(server.url, "Once upon a time", 32, model="smollm2:135m")["content"]
        entry = server.model("smollm2:135m")
        assert entry["backend"] == "llamacpp" and "HF weights converted to GGUF BF16 (converted in" in entry["note"]
        converted = list((home / "gguf").glob("*.gguf"))
        assert len(converted) == 1 and app.read_gguf_metadata(str(converted[0]))["file_type_name"] == "BF16"
        os.link(converted[0], tmp_path / "smollm2-bf16.gguf")  # for bare llama-server, after the model is deleted
        # its answers are the HF model's: transformers' top next token (the bf16 weights, fp32 compute) on
        # each prompt where it leads the second by more than bf16 rounding can move
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        clear = 0
        for prompt in PROMPTS:
            with torch.no_grad():
                logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
            top = torch.topk(logits, 2)
            if top.values[0] - top.values[1] < 0.5:
                continue
            clear += 1
            ours = completion(server.url, prompt, 1, model="smollm2:135m", return_tokens=True)["tokens"]
            assert ours == [int(top.indices[0])], prompt
        assert clear >= 5
        # a second load takes the file made by the first
        server.client.post("/api/generate", json={"model": "smollm2:135m", "keep_alive": 0})
        assert completion(server.url, "Once upon a time", 32, model="smollm2:135m")["content"] == story
        assert "converted before" in server.model("smollm2:135m")["note"]
        # a model the converter cannot take (the tiny test tokenizer is not one llama.cpp knows) is transformers'
        server.pull_ok("tiny/llama-a")
        r = server.client.post("/api/chat", json={"model": "tiny/llama-a", "stream": False, "options": {
            "num_predict": 4}, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert server.model("tiny/llama-a")["backend"] == "transformers"
        assert "llamacpp failed to load: RuntimeError: llama.cpp's converter failed" in server.log_path.read_text()
        assert len(list((home / "gguf").glob("*.failed"))) == 1
        # deleting the model deletes its conversion
        assert server.client.request("DELETE", "/api/delete", json={"model": "smollm2:135m"}).status_code == 200
        assert not list((home / "gguf").glob("*.gguf"))
    finally:
        server.stop()
    # bare llama-server on the same file: the same greedy story
    bare = BareLlamaServer(BINARY, tmp_path / "llama-server.log", "-m", str(tmp_path / "smollm2-bf16.gguf"),
                           "-c", "1024")
    try:
        assert completion(bare.url, "Once upon a time", 32)["content"] == story
    finally:
        bare.stop()
