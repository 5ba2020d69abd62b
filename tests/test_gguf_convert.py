"""HF models on llama-server (CONVERT_HF_TO_GGUF): the embedded SmolLM2 (HF safetensors, bf16) converted once by
llama.cpp's own convert_hf_to_gguf.py (beside the llama-server build), served by the llamacpp backend, checked
against bare llama-server on the same converted file and against transformers' own top token; a model the
converter cannot take falls back to transformers, and is tried once. Quantize on create (Ollama's `quantize`),
by llama.cpp's llama-quantize from the same build, through the `ollama` client."""

from __future__ import annotations

import os

import httpx
import ollama
import pytest
from conftest import BareLlamaServer, ServerProcess, copy_home
from test_gguf import BINARY, needs_binary

import app

CONVERTER = BINARY.resolve().parent.parent / "convert" / "convert_hf_to_gguf.py"
QUANTIZE = BINARY.resolve().parent / "llama-quantize"
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


@pytest.mark.skipif(not QUANTIZE.is_file(), reason=f"no {QUANTIZE}: scripts/build-llama-server.sh builds it")
def test_quantize_on_create_as_ollama(hub, smollm2_home, tmp_path):
    server = ServerProcess(copy_home(smollm2_home, tmp_path / "home"), hub.url, tmp_path / "server.log",
                           AI_SERVER_BACKENDS="llamacpp,transformers", LLAMA_SERVER=str(BINARY), NUM_PARALLEL="2").start()
    client = ollama.Client(host=server.url)
    try:
        with pytest.raises(ollama.ResponseError) as bad:
            client.create(model="smol-q", from_="smollm2:135m", quantize="q4_z")
        assert bad.value.status_code == 400 and "use one of Q4_0" in bad.value.error and "Q4_K_M" in bad.value.error
        progress = list(client.create(model="smol-q4", from_="smollm2:135m", quantize="q4_K_M", stream=True))
        statuses = [p.status for p in progress]
        assert statuses[0] == "converting model to GGUF" and statuses[-2:] == ["writing manifest", "success"]
        ticks = [p for p in progress if p.status == "quantizing BF16 model to Q4_K_M" and p.total]
        assert ticks and ticks[-1].completed == ticks[-1].total > 100  # a line per tensor, as llama-quantize goes
        show = client.show("smol-q4")
        assert (show.details.quantization_level, show.details.parent_model) == ("Q4_K_M", "smollm2:135m")
        sizes = {m.model: m.size for m in client.list().models}
        assert sizes["smol-q4:latest"] < sizes["smollm2:135m"] / 2
        answer = client.generate("smol-q4", "The capital of France is", options={"temperature": 0, "num_predict": 8})
        assert answer.response.strip() and server.model("smol-q4")["backend"] == "llamacpp"
        # from a GGUF: an unquantized one (BF16, made the same way) quantizes; a quantized one is refused
        client.create(model="smol-bf16", from_="smollm2:135m", quantize="bf16")
        client.create(model="smol-q8", from_="smol-bf16", quantize="Q8_0")
        assert client.show("smol-q8").details.quantization_level == "Q8_0"
        with pytest.raises(ollama.ResponseError) as again:
            client.create(model="smol-q2", from_="smol-q4", quantize="q2_K")
        assert again.value.status_code == 400 and "already quantized (Q4_K_M)" in again.value.error
    finally:
        server.stop()


REPEAT = ("Repeat this text exactly, word for word:\n\n" + "The quick brown fox jumps over the lazy dog. A journey of a "
          "thousand miles begins with a single step. To be or not to be, that is the question. " * 2)


def test_speculative_decoding_keeps_greedy_text_and_counts_drafts(hub, smollm2_home, tmp_path):
    """LLAMA_SPEC_TYPE: llama-server drafts tokens from the context's n-grams; the greedy text is the same with and
    without it, and /metrics counts the drafts it accepted."""
    texts = {}
    for spec in ("", "ngram-map-k"):
        server = ServerProcess(copy_home(smollm2_home, tmp_path / f"home-{spec or 'off'}"), hub.url,
                               tmp_path / f"server-{spec or 'off'}.log", AI_SERVER_BACKENDS="llamacpp",
                               LLAMA_SERVER=str(BINARY), CONVERT_HF_TO_GGUF="1", LLAMA_SPEC_TYPE=spec,
                               NUM_PARALLEL="2").start()
        try:
            r = server.client.post("/v1/chat/completions", json={
                "model": "smollm2:135m", "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "user", "content": REPEAT}]})
            assert r.status_code == 200, r.text
            texts[spec] = r.json()["choices"][0]["message"]["content"]
            metrics = server.client.get("/metrics").text
        finally:
            server.stop()
    assert texts[""] == texts["ngram-map-k"] and "quick brown fox" in texts[""]
    accepted = [float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith('ai_server_draft_accepted_tokens_total{model="smollm2:135m"}')]
    assert accepted and accepted[0] > 10
