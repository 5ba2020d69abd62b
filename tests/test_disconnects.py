"""A client that leaves stops its generation within a token, on every generating route, streamed or
not, with tools or without (issue 13). A model with a 32k context and greedy decoding runs for
minutes when nobody stops it, so each case proves the stop by the server's own log line and the
model's freed slot."""
from __future__ import annotations

import time

import httpx
import pytest

from conftest import ServerProcess
from models import tiny_model_files

MODEL = "tiny/long-context"
HELLO = [{"role": "user", "content": "hello"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    hub.add_repo(MODEL, tiny_model_files(4, max_positions=32768))
    tmp = tmp_path_factory.mktemp("disconnects")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers,pipeline",
                           CONTEXT_LENGTH="32768", DEFAULT_MODEL="", EMBED_MODEL="")
    server.start()
    server.pull_ok(MODEL)
    yield server
    server.stop()


def body_for(path: str, stream: bool, tools: bool) -> dict:
    """Each API's request for an answer with no length limit (the context's 32k tokens)."""
    with_tools = {"tools": TOOLS} if tools else {}
    if path == "/api/chat":
        return {"model": MODEL, "messages": HELLO, "stream": stream, "options": {"temperature": 0, "num_predict": -1},
                **with_tools}
    if path == "/api/generate":
        return {"model": MODEL, "prompt": "hello", "stream": stream, "options": {"temperature": 0, "num_predict": -1}}
    if path == "/v1/chat/completions":
        return {"model": MODEL, "messages": HELLO, "stream": stream, "temperature": 0, **with_tools}
    if path == "/v1/completions":
        return {"model": MODEL, "prompt": "hello", "stream": stream, "temperature": 0, "max_tokens": 30000}
    if path == "/chat":
        return {"model": MODEL, "messages": HELLO, "stream": stream, "temperature": 0, "max_tokens": 30000}
    if path == "/completion":
        return {"model": MODEL, "prompt": "hello", "stream": stream, "temperature": 0, "n_predict": -1}
    raise AssertionError(path)


CASES = [(path, stream, tools)
         for path in ("/api/chat", "/v1/chat/completions")
         for stream in (True, False) for tools in (False, True)] + [
    (path, stream, False) for path in ("/api/generate", "/v1/completions", "/chat", "/completion")
    for stream in (True, False)]


def cancelled_lines(server: ServerProcess) -> list[str]:
    return [ln for ln in server.log_path.read_text(errors="replace").splitlines()
            if f"model {MODEL}: generation cancelled after" in ln]


@pytest.mark.parametrize("path,stream,tools", CASES,
                         ids=[f"{p}-{'stream' if s else 'whole'}{'-tools' if t else ''}" for p, s, t in CASES])
def test_a_client_that_leaves_stops_its_generation(server, path, stream, tools):
    before = len(cancelled_lines(server))
    body = body_for(path, stream, tools)
    if stream and not tools:  # pieces flow: read two, then hang up
        with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=30) as r:
            assert r.status_code == 200, r.read()
            lines = (line for line in r.iter_lines() if line.strip())
            next(lines), next(lines)
    else:  # nothing is sent until the answer is whole (a tool call is parsed whole): give up waiting
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}{path}", json=body, timeout=httpx.Timeout(10, read=2))
    deadline = time.monotonic() + 20
    while len(cancelled_lines(server)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = cancelled_lines(server)
    assert len(lines) == before + 1, server.log()
    tokens = int(lines[-1].split("after ")[1].split()[0])
    assert 0 < tokens < 30000, lines[-1]
    cache = {m["name"]: m for m in server.client.get("/status").json()["cache"]}
    assert cache[MODEL]["in_use"] == 0  # the slot is free again
