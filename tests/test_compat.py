"""Drop-in compatibility: the real `ollama` and `openai` client packages against a real server,
plus byte-level checks of the NDJSON and SSE framing and of every route's error shape."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time

import httpx
import jsonschema
import ollama
import openai
import pytest

from conftest import ROOT, ServerProcess, copy_home

import app

FRANCE = "What is the capital of France? Answer in one sentence."
GREEDY = {"temperature": 0, "num_predict": 40}
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "is_capital": {"type": "boolean"}},
               "required": ["city", "is_capital"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}


@pytest.fixture(scope="module")
def server(hub, smollm2_home, tmp_path_factory):
    """Serves smollm2:135m and all-minilm (imported by the CLI) and pulls tiny models from the hub."""
    tmp = tmp_path_factory.mktemp("compat")
    server = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "server.log",
                           AI_SERVER_BACKENDS="transformers,pipeline", MAX_CACHE_MODELS="3")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


# --- the ollama package --------------------------------------------------------------------------
def test_ollama_list_show_and_version(client, server):
    names = {m.model for m in client.list().models}
    assert {"smollm2:135m", "all-minilm:latest"} <= names
    smol = next(m for m in client.list().models if m.model == "smollm2:135m")
    assert smol.details.family == "llama" and smol.details.parameter_size == "135M" and smol.size > 0
    shown = client.show("smollm2:135m")
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] == 8192
    assert "completion" in shown.capabilities and "<|im_start|>" in shown.template
    assert client.show("all-minilm").capabilities == ["embedding"]
    assert httpx.get(f"{server.url}/api/version").json()["version"].count(".") == 2
    assert httpx.get(f"{server.url}/").text == "Ollama is running"


def test_api_version_is_the_ollama_level_the_routes_follow(server):
    """/api/version names the Ollama release that added the newest API served here (issue 22: `codex --oss`
    refused 0.13.0, and wants at least 0.13.4); each route OLLAMA_API_LEVELS names must be served."""
    def level(v: str) -> tuple[int, ...]:
        return tuple(map(int, v.split(".")))

    version = httpx.get(f"{server.url}/api/version").json()["version"]
    assert version == max(app.OLLAMA_API_LEVELS, key=level) and level(version) >= (0, 13, 4)
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for method, path in app.OLLAMA_API_LEVELS.values():
        assert method.lower() in paths.get(path, {}), f"{method} {path} is not served"


def test_ollama_chat_streaming_and_not(client):
    messages = [{"role": "user", "content": FRANCE}]
    whole = client.chat(model="smollm2:135m", messages=messages, options=GREEDY)
    assert "Paris" in whole.message.content and whole.done and whole.done_reason == "stop"
    assert whole.eval_count > 0 and whole.prompt_eval_count > 10 and whole.total_duration > whole.eval_duration
    chunks = list(client.chat(model="smollm2:135m", messages=messages, options=GREEDY, stream=True))
    assert len(chunks) > 3 and all(c.message.role == "assistant" for c in chunks)
    assert "".join(c.message.content for c in chunks) == whole.message.content
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].eval_count == whole.eval_count and chunks[-1].message.content == ""


def test_ollama_generate_with_context_and_raw(client):
    first = client.generate(model="smollm2:135m", prompt=FRANCE, options=GREEDY)
    assert "Paris" in first.response and len(first.context) == first.prompt_eval_count + first.eval_count
    follow = client.generate(model="smollm2:135m", prompt="And of Germany?", context=first.context, options=GREEDY)
    assert follow.prompt_eval_count > len(first.context)  # the earlier exchange was fed back in
    streamed = list(client.generate(model="smollm2:135m", prompt=FRANCE, options=GREEDY, stream=True))
    assert "".join(c.response for c in streamed) == first.response and streamed[-1].context == first.context
    raw = client.generate(model="smollm2:135m", prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 5})
    assert raw.context is None and raw.eval_count == 5 and raw.done_reason == "length"


def test_ollama_options(client):
    base = {"temperature": 0.9, "seed": 42, "num_predict": 12}
    a = client.generate(model="smollm2:135m", prompt="Tell me a story.", options=base)
    b = client.generate(model="smollm2:135m", prompt="Tell me a story.", options={**base, "numa": True, "mirostat": 0})
    assert a.response == b.response  # same seed, same text; legacy keys ignored
    stopped = client.generate(model="smollm2:135m", prompt=FRANCE, options={**GREEDY, "stop": ["Paris"]})
    assert "Paris" not in stopped.response and stopped.done_reason == "stop"
    penalised = client.generate(model="smollm2:135m", prompt="Repeat: la la la la la la",
                                options={"temperature": 0, "num_predict": 20, "repeat_penalty": 1.8,
                                         "presence_penalty": 1.0, "frequency_penalty": 1.0})
    plain = client.generate(model="smollm2:135m", prompt="Repeat: la la la la la la",
                            options={"temperature": 0, "num_predict": 20})
    assert penalised.response != plain.response  # the penalties reach the sampler


def test_ollama_num_ctx_truncates_or_refuses(client, server):
    long = "word " * 300
    refused = httpx.post(f"{server.url}/api/generate", json={  # the ollama package has no `truncate` yet
        "model": "smollm2:135m", "prompt": long, "truncate": False, "stream": False,
        "options": {"num_ctx": 64, "num_predict": 2}})
    assert refused.status_code == 400 and "exceeds the context length" in refused.json()["error"]
    cut = client.generate(model="smollm2:135m", prompt=long, options={"num_ctx": 64, "num_predict": 2})
    assert cut.prompt_eval_count < 64
    history = [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "Say hi."}]
    kept = client.chat(model="smollm2:135m", messages=history, options={"num_ctx": 128, "num_predict": 4})
    assert kept.prompt_eval_count < 128  # old turns were dropped, the last one kept


def test_ollama_json_schema_format_is_enforced(client):
    reply = client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "Which city is France's capital?"}],
                        format=CITY_SCHEMA, options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(reply.message.content), CITY_SCHEMA)
    loose = client.generate(model="smollm2:135m", prompt="Describe Paris as JSON.", format="json",
                            options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(loose.response), dict)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="smollm2:135m", prompt="x", format={"type": "no-such-type"})
    assert err.value.status_code == 400 and "invalid format" in err.value.error


def test_ollama_embed_and_legacy_embeddings(client):
    out = client.embed(model="all-minilm", input=["a cat", "a kitten", "a spreadsheet"])
    cat, kitten, sheet = out.embeddings
    assert len(cat) == 384 and all(abs(math.hypot(*v) - 1) < 1e-4 for v in out.embeddings)  # L2-normalised
    dot = lambda u, v: sum(a * b for a, b in zip(u, v))  # noqa: E731
    assert dot(cat, kitten) > dot(cat, sheet)  # a real model: meaning, not noise
    assert out.prompt_eval_count > 0
    short = client.embed(model="all-minilm", input="a cat", dimensions=64)
    assert len(short.embeddings[0]) == 64 and abs(math.hypot(*short.embeddings[0]) - 1) < 1e-4
    legacy = client.embeddings(model="all-minilm", prompt="a cat")
    # Not re-normalised by the server (Ollama's legacy contract); this model's own last layer normalises.
    assert legacy.embedding == pytest.approx(cat_alone(client), abs=1e-5)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="smollm2:135m", input="x")
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="all-minilm", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 400 and err.value.error == '"all-minilm" does not support chat'
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="all-minilm", prompt="hi")
    assert err.value.status_code == 400 and err.value.error == '"all-minilm" does not support generate'


def cat_alone(client):
    return client.embed(model="all-minilm", input="a cat").embeddings[0]


def test_ollama_pull_streams_progress_through_the_job_system(client, server):
    statuses = [p.status for p in client.pull("tiny/llama-a", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest",
                                                                   "success"]
    assert any(s.startswith("pulling ") and s != "pulling manifest" for s in statuses)
    assert client.pull("hf.co/tiny/llama-b:latest").status == "success"  # stream=False waits
    jobs = server.client.get("/jobs").json()["jobs"]
    assert {"tiny/llama-a", "tiny/llama-b"} <= {j["model"] for j in jobs}  # the same jobs /pull makes
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("nobody/nothing")
    assert err.value.status_code == 404 and "not found" in err.value.error


def test_ollama_pull_stream_reports_failure_as_a_final_error_line(server):
    with httpx.stream("POST", f"{server.url}/api/pull", json={"model": "nobody/nothing", "stream": True}) as r:
        lines = [json.loads(line) for line in r.iter_lines()]
    assert r.status_code == 200 and lines[0] == {"status": "pulling manifest"}
    assert "not found" in lines[-1]["error"]


def test_ollama_ps_copy_delete(client, server):
    client.pull("tiny/llama-c")
    client.generate(model="tiny/llama-c", prompt="hi", options={"num_predict": 2})
    running = {m.model: m for m in client.ps().models}
    assert "tiny/llama-c:latest" in running and running["tiny/llama-c:latest"].expires_at is not None
    # The context in use (CONTEXT_LENGTH 4096 within the model's 512), then the latest request's num_ctx;
    # not the model's maximum.
    assert running["tiny/llama-c:latest"].context_length == 512
    client.generate(model="tiny/llama-c", prompt="hi", options={"num_predict": 2, "num_ctx": 256})
    assert {m.model: m for m in client.ps().models}["tiny/llama-c:latest"].context_length == 256
    client.copy("tiny/llama-c", "mytiny:v1")
    assert "mytiny:v1" in {m.model for m in client.list().models}
    assert client.generate(model="mytiny:v1", prompt="hi", options={"num_predict": 2}).done
    client.delete("mytiny:v1")
    assert "mytiny:v1" not in {m.model for m in client.list().models}
    assert client.generate(model="tiny/llama-c", prompt="hi", options={"num_predict": 2}).done  # files kept
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("mytiny:v1")
    assert err.value.status_code == 404 and err.value.error == "model 'mytiny:v1' not found"


def test_keep_alive_load_unload_and_expiry(client, server):
    client.pull("tiny/llama-d")
    loaded = client.generate(model="tiny/llama-d", prompt="")
    assert loaded.done_reason == "load" and "tiny/llama-d:latest" in {m.model for m in client.ps().models}
    unloaded = client.generate(model="tiny/llama-d", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and "tiny/llama-d:latest" not in {m.model for m in client.ps().models}
    client.chat(model="tiny/llama-d", messages=[{"role": "user", "content": "hi"}], keep_alive=0,
                options={"num_predict": 2})
    assert "tiny/llama-d:latest" not in {m.model for m in client.ps().models}  # unloaded right after
    client.chat(model="tiny/llama-d", messages=[], keep_alive="1s")
    assert "tiny/llama-d:latest" in {m.model for m in client.ps().models}
    deadline = time.monotonic() + 15
    while "tiny/llama-d:latest" in {m.model for m in client.ps().models} and time.monotonic() < deadline:
        time.sleep(0.25)
    assert "tiny/llama-d:latest" not in {m.model for m in client.ps().models}  # expired while idle
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny/llama-d", prompt="", keep_alive="5 minutes")
    assert err.value.status_code == 400 and "invalid duration" in err.value.error


def test_ollama_tool_calls_come_back_as_objects(client):
    """A reply shaped {"name", "arguments"} (forced here with `format`) is parsed into
    message.tool_calls, arguments as an object, as Ollama's clients require."""
    call_schema = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                                    "arguments": WEATHER_TOOL["function"]["parameters"]},
                   "required": ["name", "arguments"]}
    for stream in (False, True):
        reply = client.chat(model="smollm2:135m", tools=[WEATHER_TOOL], format=call_schema, stream=stream,
                            messages=[{"role": "user", "content": "What's the weather in Paris?"}],
                            options={"temperature": 0, "num_predict": 80})
        calls = reply.message.tool_calls if not stream else next(c for c in reply if c.message.tool_calls).message.tool_calls
        assert calls[0].function.name == "get_weather"
        jsonschema.validate(dict(calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_generate_system_and_template(client):
    client.pull("tiny/llama-a")  # its template adds no default system turn (SmolLM2's does)
    with_system = client.generate(model="tiny/llama-a", prompt="hello", system="the quick brown fox",
                                  options={"temperature": 0, "num_predict": 3})
    without = client.generate(model="tiny/llama-a", prompt="hello", options={"temperature": 0, "num_predict": 3})
    assert with_system.prompt_eval_count > without.prompt_eval_count  # the system turn is in the prompt
    templated = client.generate(model="smollm2:135m", prompt="Paris is in", system="Geography.",
                                template="{{ .System }} Q: {{ .Prompt }} A:", options={"temperature": 0, "num_predict": 3})
    assert templated.done
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="smollm2:135m", prompt="x", template="{{ range .Messages }}{{ end }}")
    assert err.value.status_code == 400 and "template" in err.value.error


def test_thinking_capability(client):
    client.pull("tiny/thinker")
    assert "thinking" in client.show("tiny/thinker").capabilities
    reply = client.chat(model="tiny/thinker", think=True, messages=[{"role": "user", "content": "hi"}],
                        options={"num_predict": 3, "temperature": 0})
    assert reply.done and reply.eval_count == 3


def test_ollama_errors(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope:latest", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and err.value.error == "model 'nope:latest' not found"
    for path, body, fragment in [
        ("/api/generate", {"model": "smollm2:135m", "prompt": "x", "raw": True, "system": "s"}, "raw mode"),
        ("/api/generate", {"model": "smollm2:135m", "prompt": "x", "images": ["aGk="]}, "does not support images"),
        ("/api/generate", {"model": "smollm2:135m", "prompt": "x", "think": True}, "does not support thinking"),
        ("/api/generate", {"model": "tiny/llama-a", "prompt": "x", "suffix": "y"}, "does not support insert"),
        ("/api/chat", {"model": "smollm2:135m", "messages": [{"role": "robot", "content": "x"}]}, "invalid request"),
        ("/api/show", {}, "model is required"),
        ("/api/embed", {"model": "nope", "input": "x"}, 'model "nope" not found, try pulling it first'),
        ("/api/copy", {"source": "nope", "destination": "x"}, 'model "nope" not found'),
    ]:
        r = httpx.post(f"{server.url}{path}", json=body)
        assert 400 <= r.status_code < 500 and fragment in r.json()["error"], (path, r.status_code, r.text)
    r = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": "nope"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found"}


def test_suffix_needs_fim_tokens(client):
    """Fill-in-the-middle: a model whose tokenizer has <fim_prefix>/<fim_suffix>/<fim_middle> says
    "insert" and takes a suffix; SmolLM2's GGUF tokenizer has none, so it refuses with 400."""
    client.pull("tiny/fim")
    assert "insert" in client.show("tiny/fim").capabilities
    reply = client.generate(model="tiny/fim", prompt="def add(a, b):", suffix="\n", options={"num_predict": 4, "temperature": 0})
    assert reply.done and reply.eval_count == 4
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="smollm2:135m", prompt="def add(a, b):", suffix="\n")
    assert err.value.status_code == 400 and "does not support insert" in err.value.error


# --- byte-level framing and disconnects ------------------------------------------------------------
def test_ndjson_framing_bytes(server):
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": FRANCE}], "options": GREEDY}
    with httpx.stream("POST", f"{server.url}/api/chat", json=body) as r:  # stream defaults to true
        raw = b"".join(r.iter_bytes())
    assert r.headers["content-type"] == "application/x-ndjson"
    assert raw.endswith(b"}\n") and b"\n\n" not in raw and b"data:" not in raw
    lines = raw.decode().split("\n")[:-1]
    objs = [json.loads(line) for line in lines]
    assert all(line == json.dumps(o, separators=(",", ":"), ensure_ascii=False) for line, o in zip(lines, objs))
    assert [o["done"] for o in objs].count(True) == 1 and objs[-1]["done_reason"] == "stop"
    one = httpx.post(f"{server.url}/api/chat", json={**body, "stream": False})
    assert one.headers["content-type"].startswith("application/json") and one.text.count("\n") == 1


def test_stream_errors_before_the_first_byte_are_http_errors(server):
    r = httpx.post(f"{server.url}/api/generate", json={"model": "smollm2:135m", "prompt": "x",
                                                        "format": {"type": "no-such-type"}})
    assert r.status_code == 400 and "invalid format" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "nope", "stream": True,
                                                               "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_client_disconnect_stops_the_generation(server):
    server.pull_ok("tiny/llama-e")
    body = {"model": "tiny/llama-e", "prompt": "hello", "options": {"num_predict": 100000, "temperature": 0},
            "stream": True}
    with httpx.stream("POST", f"{server.url}/api/generate", json=body) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["done"] is False
        next(lines)
    deadline = time.monotonic() + 30
    while "tiny/llama-e: generation cancelled after" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(ln for ln in server.log().splitlines() if "tiny/llama-e: generation cancelled after" in ln)
    assert int(line.split("after ")[1].split()[0]) < 100000
    cache = {m["name"]: m for m in server.client.get("/status").json()["cache"]}
    assert cache["tiny/llama-e"]["in_use"] == 0  # the slot is free again
    assert server.client.post("/api/generate", json={**body, "stream": False,
                                                     "options": {"num_predict": 3}}).status_code == 200


def test_client_giving_up_on_a_non_streamed_request_stops_it(server):
    # SmolLM2: its 4096-token context takes minutes to fill (output is capped by the context now).
    body = {"model": "smollm2:135m", "prompt": "Write a very long story.", "stream": False,
            "options": {"num_predict": 4000, "temperature": 0.7}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/api/generate", json=body, timeout=2)
    deadline = time.monotonic() + 30
    while "smollm2:135m: generation cancelled after" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(ln for ln in server.log().splitlines() if "smollm2:135m: generation cancelled after" in ln)
    assert int(line.split("after ")[1].split()[0]) < 4000
    # (The handler then answers 499 "request canceled", as Ollama does; uvicorn logs no access
    # line for a client that is already gone, so that status is not observable from here.)


def test_native_chat_streams_too(server):
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": FRANCE}], "temperature": 0,
            "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{server.url}/chat", json=body) as r:
        objs = [json.loads(line) for line in r.iter_lines()]
    assert "Paris" in "".join(o["message"]["content"] for o in objs) and objs[-1]["done"] is True


# --- the openai package ------------------------------------------------------------------------------
def test_openai_models(oai):
    ids = {m.id for m in oai.models.list().data}
    assert {"smollm2:135m", "all-minilm:latest"} <= ids
    assert oai.models.retrieve("smollm2:135m").owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_openai_chat_streaming_and_not(oai):
    messages = [{"role": "user", "content": FRANCE}]
    whole = oai.chat.completions.create(model="smollm2:135m", messages=messages, temperature=0, max_tokens=40)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens == (
        whole.usage.prompt_tokens + whole.usage.completion_tokens)
    chunks = list(oai.chat.completions.create(model="smollm2:135m", messages=messages, temperature=0, max_tokens=40,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1


def test_openai_completions(oai):
    whole = oai.completions.create(model="smollm2:135m", prompt="The capital of France is", max_tokens=5,
                                   temperature=0)
    capped = oai.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "Tell a story."}],
                                         max_completion_tokens=4, temperature=0)
    assert capped.usage.completion_tokens == 4 and capped.choices[0].finish_reason == "length"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 5
    streamed = list(oai.completions.create(model="smollm2:135m", prompt="The capital of France is", max_tokens=5,
                                           temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_openai_json_schema_and_json_object(oai):
    reply = oai.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "Which city is France's capital?"}],
        temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY_SCHEMA)
    # The penalty keeps SmolLM2's greedy keys from repeating until max_tokens (on this machine's CPU it
    # wrote "population_density_per_square_square_..." and never closed the object, before this change too).
    obj = oai.chat.completions.create(model="smollm2:135m", temperature=0, max_tokens=300, frequency_penalty=1.0,
                                      messages=[{"role": "user", "content": "Give the capital of France as a JSON object."}],
                                      response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_openai_tool_call(oai):
    reply = oai.chat.completions.create(
        model="smollm2:135m", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    args = json.loads(choice.message.tool_calls[0].function.arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    follow = oai.chat.completions.create(  # the call and its result go back in, as an agent loop does
        model="smollm2:135m", temperature=0, max_tokens=20, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "What's the weather in Paris?"}, choice.message.model_dump(),
                  {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "21 C, sunny"}])
    assert follow.choices[0].message.content is not None


def test_openai_embeddings_float_and_base64(oai, server):
    floats = oai.embeddings.create(model="all-minilm", input=["a cat", "a dog"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 384
    b64 = oai.embeddings.create(model="all-minilm", input="a cat")  # the SDK asks for base64 and decodes it
    assert b64.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "all-minilm", "input": [], "encoding_format": "float"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_error_shapes(oai, server):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "not_found_error" and "nope" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="smollm2:135m", messages=[])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "x"}], n=2)
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{broken")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_sse_framing_bytes(server):
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": FRANCE}], "temperature": 0,
            "max_tokens": 20, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        raw = b"".join(r.iter_bytes()).decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    objs = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    assert [o["choices"][0]["finish_reason"] for o in objs][-1] == "stop"


def test_digests_are_content_digests(client, server, hub):
    """The pull's progress has a layer per file, named by its content (LFS sha256, else the git blob
    sha1), each ending whole; the same files give the same digests on every pull (before: a new one per
    pull job), in the progress and in the list; another repo's files give another."""
    files = hub.repos["tiny/llama-f"].files.values()
    expected = {f"sha256:{f.sha256}" if f.sha256 else f"sha1:{f.oid}": len(f.data) for f in files}

    def pulled():
        last = {line["digest"]: line for line in client.pull("tiny/llama-f", stream=True) if line.get("digest")}
        assert {d: (line.total, line.completed or 0) for d, line in last.items()} == \
            {d: (size, size) for d, size in expected.items()}
        listed = {m.model: m.digest for m in client.list().models}
        return set(last), listed["tiny/llama-f:latest"]

    first = pulled()
    client.delete("tiny/llama-f")
    assert pulled() == first and any(d.startswith("sha256:") for d in first[0])
    client.pull("tiny/llama-g")
    assert {m.model: m.digest for m in client.list().models}["tiny/llama-g:latest"] != first[1]


# --- logprobs (issue 13): Ollama's and OpenAI's shapes, the model's own numbers -----------------------
def test_ollama_logprobs(client):
    greedy = {"temperature": 0, "num_predict": 8}
    r = client.chat(model="smollm2:135m", messages=[{"role": "user", "content": FRANCE}], logprobs=True,
                    top_logprobs=3, options=greedy)
    assert len(r.logprobs) == r.eval_count - (r.done_reason == "stop")  # the end token has no text: not listed
    for lp in r.logprobs:
        # Greedy: each chosen token is the most likely one, first among its alternatives.
        assert len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token == lp.token
        assert lp.logprob == pytest.approx(lp.top_logprobs[0].logprob) and lp.logprob <= 0
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob >= lp.top_logprobs[2].logprob
    assert "".join(lp.token for lp in r.logprobs) == r.message.content
    chunks = list(client.generate(model="smollm2:135m", prompt="The capital of France is", logprobs=True,
                                  options=greedy, stream=True))
    streamed = [lp for c in chunks for lp in (c.logprobs or [])]
    assert len(streamed) == 8 and all(lp.top_logprobs == [] for lp in streamed)
    assert "".join(lp.token for lp in streamed) == "".join(c.response for c in chunks)
    assert client.chat(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}],
                       options=greedy).logprobs is None  # only when asked
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="smollm2:135m", prompt="x", logprobs=True, top_logprobs=21)
    assert err.value.status_code == 400 and "top_logprobs" in err.value.error


def test_openai_logprobs_and_echo(oai):
    chat = oai.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": FRANCE}],
                                       temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens - (chat.choices[0].finish_reason == "stop")
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    assert all(t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 2 for t in content)
    stream = oai.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": FRANCE}],
                                         temperature=0, max_tokens=8, logprobs=True, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    # bf16 on this CPU: the same tokens score a little differently with another batch or a reused prefix.
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], rel=0.1, abs=5e-2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        oai.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    done = oai.completions.create(model="smollm2:135m", prompt="The capital of France is", temperature=0,
                                  max_tokens=6, logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert all(max(alts.values()) == pytest.approx(v) for alts, v in zip(lp.top_logprobs, lp.token_logprobs))
    echoed = oai.completions.create(model="smollm2:135m", prompt="The capital of France is", temperature=0,
                                    max_tokens=6, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + done.choices[0].text
    # echo with logprobs: the prompt's own tokens first (the first has none: nothing comes before it),
    # scored by the model; the prompt plus the first answer token, echoed, scores that token as it was
    # scored when generated.
    both = oai.completions.create(model="smollm2:135m", prompt="The capital of France is", temperature=0,
                                  max_tokens=6, echo=True, logprobs=2)
    lp2 = both.choices[0].logprobs
    assert both.choices[0].text == "The capital of France is" + done.choices[0].text
    assert "".join(lp2.tokens) == both.choices[0].text and lp2.tokens[-6:] == lp.tokens
    assert lp2.token_logprobs[0] is None and lp2.top_logprobs[0] is None
    assert all(v <= 0 for v in lp2.token_logprobs[1:]) and lp2.text_offset[0] == 0
    assert lp2.token_logprobs[-6:] == pytest.approx(lp.token_logprobs, rel=0.1, abs=5e-2)
    longer = oai.completions.create(model="smollm2:135m", prompt="The capital of France is" + lp.tokens[0],
                                    temperature=0, max_tokens=1, echo=True, logprobs=1).choices[0].logprobs
    prompt_tokens = len(lp2.tokens) - 6
    assert longer.token_logprobs[prompt_tokens] == pytest.approx(lp.token_logprobs[0], rel=0.1, abs=5e-2)


def test_openai_embeddings_take_token_ids(oai, server):
    """Token ids (one list, or a list of lists) are the served model's own, as vLLM and llama.cpp read
    them: they embed as the text they spell. LangChain's OpenAIEmbeddings sends ids this way."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.home / "models" / "all-minilm")
    texts = ["a cat sat on the mat", "stock prices fell"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_text = [d.embedding for d in oai.embeddings.create(model="all-minilm", input=texts).data]
    by_ids = [d.embedding for d in oai.embeddings.create(model="all-minilm", input=ids).data]
    one = oai.embeddings.create(model="all-minilm", input=ids[0]).data
    assert len(one) == 1 and one[0].embedding == pytest.approx(by_text[0], abs=1e-5)
    for a, b in zip(by_ids, by_text):
        assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        oai.embeddings.create(model="all-minilm", input=[[10 ** 9]])


# --- /api/create and /api/blobs (issue 13): the ollama client's create() end to end --------------------
def test_create_from_a_model_with_a_modelfile(client, server):
    r = client.create(model="geo", from_="smollm2:135m", system="You are a geography teacher. Answer in one word.",
                      parameters={"temperature": 0, "num_predict": 12},
                      messages=[{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome"}])
    assert r.status == "success"
    assert "geo:latest" in {m.model for m in client.list().models}
    shown = server.client.post("/api/show", json={"model": "geo"}).json()  # (the client's model has no `system`)
    assert shown["system"] == "You are a geography teacher. Answer in one word." and "temperature 0" in shown["parameters"]
    assert client.show("geo").parameters == shown["parameters"]
    # Its Modelfile, as `ollama show --modelfile` has it, and the model it came from (issue 22).
    lines = shown["modelfile"].splitlines()
    assert shown["details"]["parent_model"] == "smollm2:135m" and "# FROM smollm2:135m" in lines
    assert 'SYSTEM """You are a geography teacher. Answer in one word."""' in lines
    assert {"PARAMETER temperature 0", "PARAMETER num_predict 12"} <= set(lines)
    assert ['MESSAGE user """Capital of Italy?"""', 'MESSAGE assistant """Rome"""'] == [
        line for line in lines if line.startswith("MESSAGE")]
    assert any(line.startswith('TEMPLATE """') for line in lines)
    # Its PARAMETERs hold under the OpenAI and Anthropic APIs too, for what a request leaves out, as in Ollama:
    # temperature 0 (neither coding agent sends one) gives the same reply twice.
    chat = {"model": "geo", "messages": [{"role": "user", "content": "Capital of France?"}]}
    replies = [server.client.post("/v1/chat/completions", json=chat).json() for _ in range(2)]
    assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]
    assert replies[0]["usage"]["completion_tokens"] <= 12  # num_predict 12
    anth = [server.client.post("/v1/messages", json={**chat, "max_tokens": 40}).json() for _ in range(2)]
    assert anth[0]["content"] == anth[1]["content"] and anth[0]["content"][0]["text"]
    ask = [{"role": "user", "content": "Capital of France?"}]
    first, again = client.chat(model="geo", messages=ask), client.chat(model="geo", messages=ask)
    plain = client.chat(model="smollm2:135m", messages=ask, options={"temperature": 0, "num_predict": 12})
    assert first.message.content == again.message.content and "Paris" in first.message.content  # temperature 0
    assert first.eval_count <= 12 and first.prompt_eval_count > plain.prompt_eval_count + 10  # system + MESSAGEs
    # The request's own system message and options win over the model's.
    own = client.chat(model="geo", messages=[{"role": "system", "content": "Be brief."}, *ask],
                      options={"num_predict": 2})
    assert own.eval_count <= 2
    client.delete("geo")
    assert client.chat(model="smollm2:135m", messages=ask, options={"num_predict": 2}).done  # the files stay


def test_created_model_num_ctx_bounds_the_generate_prompt(client, server):
    """A model created with `num_ctx 128` cuts a long /api/generate prompt to its context window, as /api/chat
    on the same model does (and as a request's own options.num_ctx does)."""
    assert client.create(model="short-ctx", from_="smollm2:135m",
                         parameters={"num_ctx": 128, "temperature": 0}).status == "success"
    try:
        long = "The quick brown fox jumps over the lazy dog. " * 150  # ~1 500 tokens
        chat = client.chat(model="short-ctx", messages=[{"role": "user", "content": long}],
                           options={"num_predict": 4})
        assert chat.prompt_eval_count <= 128, f"/api/chat: prompt_eval_count {chat.prompt_eval_count} > num_ctx 128"
        r = httpx.post(f"{server.url}/api/generate", timeout=120, json={
            "model": "short-ctx", "prompt": long, "stream": False, "options": {"num_predict": 4}})
        assert r.status_code == 200, r.text
        got = r.json()["prompt_eval_count"]
        assert got <= 128, (f"/api/generate on a model created with num_ctx 128: prompt_eval_count {got} > 128 "
                            f"(/api/chat on it gave {chat.prompt_eval_count}): the created num_ctx is not applied "
                            "to the prompt's fit")
    finally:
        client.delete("short-ctx")


def test_create_from_uploaded_files(client, server, tmp_path):
    from models import tiny_model_files

    files = {}
    for name, data in tiny_model_files(7).items():
        (tmp_path / name).write_bytes(data)
        files[name] = client.create_blob(tmp_path / name)
    assert server.client.head(f"/api/blobs/{files['config.json']}").status_code == 200
    progress = [p.status for p in client.create(model="uploaded:v1", files=files, stream=True)]
    assert progress[0].startswith("using existing layer sha256:") and progress[-1] == "success"
    r = client.generate(model="uploaded:v1", prompt="hello", options={"num_predict": 3, "temperature": 0})
    assert r.done and r.eval_count == 3
    listed = {m.model: m for m in client.list().models}
    assert listed["uploaded:v1"].digest and listed["uploaded:v1"].details.family == "llama"
    # Bad input: a digest that is not the body's, a blob never uploaded, a bad name; push is not offered.
    bad = server.client.post(f"/api/blobs/sha256:{'0' * 64}", content=b"not this")
    assert bad.status_code == 400 and "digest mismatch" in bad.json()["error"]
    assert server.client.head(f"/api/blobs/sha256:{'0' * 64}").status_code == 404
    with pytest.raises(ollama.ResponseError, match="upload it first"):
        client.create(model="broken", files={"config.json": f"sha256:{'1' * 64}"})
    with pytest.raises(ollama.ResponseError, match="relative path"):
        client.create(model="broken", files={"../x.json": files["config.json"]})
    with pytest.raises(ollama.ResponseError, match="already exists"):
        client.create(model="smollm2:135m", files=files)
    r = server.client.post("/api/push", json={"model": "uploaded:v1"})
    assert r.status_code == 400 and "not supported" in r.json()["error"]
    client.delete("uploaded:v1")


# --- LangChain's OpenAI integration (issue 13) ----------------------------------------------------------
def test_langchain_openai_chat_and_embeddings(server, oai):
    """ChatOpenAI (invoke, stream) and OpenAIEmbeddings against /v1. OpenAIEmbeddings' default
    tokenizes with tiktoken, whose BPE file is downloaded from the internet: unreachable here, so the
    test sends text (check_embedding_ctx_length=False); token-id input is checked with the openai client."""
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    chat = ChatOpenAI(model="smollm2:135m", base_url=f"{server.url}/v1", api_key="unused", temperature=0,
                      max_tokens=20)
    answer = chat.invoke(FRANCE)
    assert "Paris" in answer.content and answer.usage_metadata["output_tokens"] > 0
    assert "".join(c.content for c in chat.stream(FRANCE)) == answer.content
    emb = OpenAIEmbeddings(model="all-minilm", base_url=f"{server.url}/v1", api_key="unused",
                           check_embedding_ctx_length=False)
    vectors = emb.embed_documents(["a cat", "a kitten"])
    direct = [d.embedding for d in oai.embeddings.create(model="all-minilm", input=["a cat", "a kitten"]).data]
    assert len(vectors) == 2 and vectors[0] == pytest.approx(direct[0], abs=1e-5)
    assert emb.embed_query("a cat") == pytest.approx(direct[0], abs=1e-5)


LITELLM = ROOT / ".venv-litellm" / "bin" / "python"
LITELLM_SCRIPT = """
import asyncio, json, sys
import litellm

async def main(url):
    msgs = [{"role": "user", "content": sys.argv[2]}]
    kw = dict(model="ollama_chat/smollm2:135m", api_base=url, messages=msgs, temperature=0, max_tokens=20)
    r = await litellm.acompletion(**kw)
    parts = [c.choices[0].delta.content or "" async for c in await litellm.acompletion(**kw, stream=True)]
    print(json.dumps({"content": r.choices[0].message.content, "streamed": "".join(parts),
                      "completion_tokens": r.usage.completion_tokens}))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.skipif(not LITELLM.exists(), reason="LiteLLM's venv is missing: scripts/setup.sh --dev makes .venv-litellm")
def test_litellm_acompletion_on_ollama_chat(server):
    """LiteLLM's `ollama_chat/` provider (acompletion, streamed and not), from its own venv: it pins
    openai<3 and huggingface-hub<2. LITELLM_LOCAL_MODEL_COST_MAP: no fetch of its price list from GitHub."""
    out = subprocess.run([str(LITELLM), "-c", LITELLM_SCRIPT, server.url, FRANCE], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in r["content"] and r["streamed"] == r["content"] and 0 < r["completion_tokens"] <= 20


LITELLM_TOOLS_SCRIPT = """
import asyncio, json, sys
import litellm

async def main(url, tool):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="openai/smollm2:135m", api_base=url + "/v1", api_key="unused", tools=[tool], temperature=0,
              max_tokens=60)
    r = await litellm.acompletion(**kw, messages=ask, tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    chunks = [c async for c in await litellm.acompletion(**kw, messages=ask, tool_choice="required", stream=True)]
    built = litellm.stream_chunk_builder(chunks, messages=ask).choices[0].message.tool_calls[0]
    # The round trip: the call and the tool's result go back; the model answers (ollama_chat/, tools declared).
    back = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "22 C and sunny"}]
    parts = [c.choices[0].delta.content or "" async for c in await litellm.acompletion(
        model="ollama_chat/smollm2:135m", api_base=url, messages=back, tools=[tool], temperature=0, max_tokens=20,
        stream=True)]
    print(json.dumps({"call": [call.function.name, json.loads(call.function.arguments)],
                      "streamed_call": [built.function.name, json.loads(built.function.arguments)],
                      "answer_parts": parts}))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


@pytest.mark.skipif(not LITELLM.exists(), reason="LiteLLM's venv is missing: scripts/setup.sh --dev makes .venv-litellm")
def test_litellm_tool_calls(server):
    """LiteLLM with `tools=` (it imports its MCP handler then: requirements-litellm.txt has `mcp`, issue 22): a
    forced call through its `openai/` provider, whole and streamed, then the tool's result sent back through
    `ollama_chat/` with the tools still declared, and the answer streamed in pieces."""
    out = subprocess.run([str(LITELLM), "-c", LITELLM_TOOLS_SCRIPT, server.url, json.dumps(WEATHER_TOOL)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for name, args in (r["call"], r["streamed_call"]):
        assert name == "get_weather" and isinstance(args["city"], str)
    assert len([p for p in r["answer_parts"] if p]) > 1, r["answer_parts"]


def test_create_and_new_routes_refuse_bad_input_with_a_4xx(client, server):
    """Found by a review: long strings were refused by a list cap on str | list fields, and untyped
    inputs reached code that raised (500s). Each is now served or a 400 that says what to fix."""
    long = "word " * 3000  # 15 000 characters: a string, not 15 000 items
    r = server.client.post("/v1/messages", json={"model": "smollm2:135m", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": long}]})
    assert r.status_code == 200, r.text
    r = server.client.post("/v1/responses", json={"model": "smollm2:135m", "input": long, "max_output_tokens": 2})
    assert r.status_code == 200, r.text
    r = server.client.post("/v1/embeddings", json={"model": "all-minilm", "input": "x" * 150_000})
    assert r.status_code == 200, r.text
    bad = [("/api/create", {"model": "x", "from": "smollm2:135m", "parameters": {"temperature": -1}}),
           ("/v1/responses", {"model": "smollm2:135m", "input": [{"type": "function_call", "call_id": "c",
                                                                  "name": "f", "arguments": {"a": 1}}]}),
           ("/v1/responses", {"model": "smollm2:135m", "input": [{"role": "user", "content": [
               {"type": "input_text", "text": 5}]}]}),
           ("/v1/responses", {"model": "smollm2:135m", "input": "hi", "tools": [{"type": "function", "name": ["x"]}]}),
           ("/v1/messages", {"model": "smollm2:135m", "max_tokens": 2, "messages": [{"role": "user", "content": [
               {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": 5}]}]}]})]
    for path, body in bad:
        r = server.client.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
    # Created again from itself: new settings, the same files, served at once.
    client.create(model="again", from_="smollm2:135m", system="Say yes.")
    client.create(model="again", from_="again", system="Say no.")
    shown = server.client.post("/api/show", json={"model": "again"}).json()
    assert shown["system"] == "Say no." and client.generate(model="again", prompt="hi", options={"num_predict": 1}).done
    client.delete("again")
