"""Streaming while tools are declared (issue 22): agents always declare tools, and a reply held back whole
left Codex silent until its stream idle timeout. On every API (Ollama's /api/chat, OpenAI's chat completions
and Responses, Anthropic's messages) and on both text engines (transformers, llama.cpp's llama-server), a plain
reply streams as it is made, piece by piece, and a forced tool call still comes out whole and parsed. Raw HTTP
streams, so that the events themselves are checked; the SDKs' tests are in test_anthropic.py, test_responses.py
and test_compat.py."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from conftest import ServerProcess, copy_home
from test_gguf import BINARY, STEM, embedded_gguf

POEM = "Write a short poem about the sea."
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FORCED = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["parameters"]},
          "required": ["name", "arguments"]}


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def engine(request, hub, smollm2_home, tmp_path_factory):
    """(server, model name): the embedded SmolLM2 on transformers, and its GGUF on llama-server."""
    tmp = tmp_path_factory.mktemp(f"tool-stream-{request.param}")
    if request.param == "transformers":
        server = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "server.log",
                               AI_SERVER_BACKENDS="transformers,pipeline")
        yield server.start(), "smollm2:135m"
        server.stop()
        return
    if not BINARY.is_file():
        pytest.skip(f"llama-server not found at {BINARY}: build it with scripts/setup.sh --llama")
    repo = "test/SmolLM2-135M-Instruct-GGUF-tools"
    hub.add_repo(repo, {f"{STEM}-Q4_1.gguf": embedded_gguf().read_bytes()})
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="llamacpp")
    server.start().pull_ok(f"hf.co/{repo}:Q4_1")
    yield server, f"hf.co/{repo}:Q4_1"
    server.stop()
    shutil.rmtree(tmp / "home", ignore_errors=True)


def events(server: ServerProcess, path: str, body: dict) -> list[dict]:
    """The stream's events, in order (NDJSON lines or SSE data lines)."""
    out = []
    with server.client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            line = line.removeprefix("data: ").strip()
            if line and line != "[DONE]" and not line.startswith("event:"):
                out.append(json.loads(line))
    return out


def ollama(server, model, forced):
    body = {"model": model, "messages": [{"role": "user", "content": "What is the weather in Paris?" if forced else POEM}],
            "tools": [{"type": "function", "function": WEATHER}], "options": {"temperature": 0, "num_predict": 40}}
    if forced:  # Ollama has no tool_choice: a format that is the call's schema forces one
        body["format"] = FORCED
    chunks = events(server, "/api/chat", body)
    texts = [c["message"]["content"] for c in chunks if not c["done"] and c["message"]["content"]]
    calls = [(t["function"]["name"], t["function"]["arguments"]) for c in chunks for t in c["message"].get("tool_calls", [])]
    return texts, calls


def openai_chat(server, model, forced):
    body = {"model": model, "messages": [{"role": "user", "content": "What is the weather in Paris?" if forced else POEM}],
            "tools": [{"type": "function", "function": WEATHER}], "temperature": 0, "max_tokens": 40,
            **({"tool_choice": "required"} if forced else {})}
    chunks = events(server, "/v1/chat/completions", body)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    texts = [d["content"] for d in deltas if d.get("content")]
    calls = [(t["function"]["name"], json.loads(t["function"]["arguments"])) for d in deltas for t in d.get("tool_calls", [])]
    return texts, calls


def anthropic(server, model, forced):
    body = {"model": model, "max_tokens": 40, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the weather in Paris?" if forced else POEM}],
            "tools": [{"name": WEATHER["name"], "description": WEATHER["description"],
                       "input_schema": WEATHER["parameters"]}], **({"tool_choice": {"type": "any"}} if forced else {})}
    evs = events(server, "/v1/messages", body)
    texts = [e["delta"]["text"] for e in evs if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
             and e["delta"]["text"]]
    starts = {e["index"]: e["content_block"] for e in evs if e["type"] == "content_block_start"}
    args = {e["index"]: e["delta"]["partial_json"] for e in evs
            if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"}
    calls = [(b["name"], json.loads(args[i])) for i, b in starts.items() if b["type"] == "tool_use"]
    assert sorted(starts) == list(range(len(starts)))  # blocks numbered in order, text first
    return texts, calls


def responses(server, model, forced):
    body = {"model": model, "input": "What is the weather in Paris?" if forced else POEM, "temperature": 0,
            "max_output_tokens": 40, "tools": [{"type": "function", **WEATHER}],
            **({"tool_choice": "required"} if forced else {})}
    evs = events(server, "/v1/responses", body)
    texts = [e["delta"] for e in evs if e["type"] == "response.output_text.delta" and e["delta"]]
    calls = [(e["item"]["name"], json.loads(e["item"]["arguments"])) for e in evs
             if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert evs[-1]["type"] in ("response.completed", "response.incomplete")
    return texts, calls


@pytest.mark.parametrize("api", [ollama, openai_chat, anthropic, responses], ids=lambda f: f.__name__)
def test_text_streams_while_tools_are_declared_and_a_forced_call_comes_whole(engine, api):
    server, model = engine
    texts, calls = api(server, model, forced=False)
    # A plain reply goes out as it is made: many text events, not one at the end.
    assert not calls and len(texts) >= 5, texts
    texts, calls = api(server, model, forced=True)
    assert not texts and len(calls) == 1, (texts, calls)
    name, args = calls[0]
    assert name == "get_weather" and isinstance(args.get("city"), str), calls
