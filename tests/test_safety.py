"""Issue 9, "do this first": what an attacker or a careless client did to the server, each case
reproduced through the real server (or, for a mechanism inside one process, the real engine).

Each test failed on the code before the fix; the comment above it says how.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import app
from conftest import ROOT, ServerProcess, copy_home
from models import make_tokenizer, tiny_model_files

EVIL_ORIGIN = "https://evil.example"
GOOD = {"model": "tiny/llama-a", "stream": False}


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers,pipeline",
                           CONTEXT_LENGTH="128", MAX_CACHE_MODELS="4", NUM_PARALLEL="8")
    server.start()
    server.pull_ok("tiny/llama-a", quantize="fp32")  # batched rows equal unbatched ones exactly in fp32
    yield server
    server.stop()


# --- 1. a web page's request runs nothing ------------------------------------------------------
def evil_repo_files(marker: Path) -> dict[str, bytes]:
    """A tiny model whose repo ships code (auto_map) that leaves a file behind when it runs."""
    files = tiny_model_files(3)
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    files["config.json"] = json.dumps(config).encode()
    files["modeling_evil.py"] = (f"open({str(marker)!r}, 'w').write('ran')\n"
                                 "from transformers import LlamaForCausalLM as EvilForCausalLM\n").encode()
    return files


# Before: the no-cors form POST reached /pull (form bodies were read as JSON, Origin unchecked), the
# per-request trust_remote_code was honoured with ALLOW_REMOTE_CODE=0, and the repo's code ran.
def test_a_no_cors_form_post_from_a_page_runs_nothing(server, hub, tmp_path):
    marker = tmp_path / "remote-code-ran"
    hub.add_repo("evil/x", evil_repo_files(marker))
    body = json.dumps({"model": "evil/x", "trust_remote_code": True, "init": True})
    jobs_before = len(server.client.get("/jobs").json()["jobs"])
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
        r = server.client.post("/pull", content=body, headers={"Origin": EVIL_ORIGIN, "Content-Type": ctype})
        assert r.status_code == 403 and "Origin" in r.json()["error"], (ctype, r.text)
    copy = json.dumps({"source": "tiny/llama-a", "destination": "smollm2:135m"})
    assert server.client.post("/api/copy", content=copy, headers={"Origin": EVIL_ORIGIN}).status_code == 403
    for method, path in (("GET", "/api/tags"), ("DELETE", "/api/delete"), ("POST", "/api/chat"), ("GET", "/v1/models")):
        r = server.client.request(method, path, headers={"Origin": EVIL_ORIGIN}, content=b"{}")
        assert r.status_code == 403, (method, path, r.status_code)
    time.sleep(1)
    assert len(server.client.get("/jobs").json()["jobs"]) == jobs_before  # nothing was queued
    assert server.model("smollm2:135m") is None and not marker.exists()

    # The same body without a browser Origin (curl, scripts) is read as JSON whatever its type,
    # and the remote-code request itself is refused: only the operator enables it.
    for ctype in ("application/x-www-form-urlencoded", "text/plain", "application/octet-stream"):
        r = server.client.post("/pull", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 403 and "ALLOW_REMOTE_CODE=1" in r.json()["error"] \
            and "REMOTE_CODE_MODELS" in r.json()["error"], r.text
        r = server.client.post("/api/show", content=b'{"model": "tiny/llama-a"}', headers={"Content-Type": ctype})
        assert r.status_code == 200, (ctype, r.text)
    r = server.client.post("/api/show", content=b'{"model": "tiny/llama-a"}', headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200  # a local page (Open WebUI) still works
    assert not marker.exists()


def test_remote_code_runs_only_for_what_the_operator_allows(start_server, hub, tmp_path):
    marker = tmp_path / "remote-code-ran"
    hub.add_repo("evil/allowed", evil_repo_files(marker))
    server = start_server(REMOTE_CODE_MODELS="evil/allowed")
    server.pull_ok("evil/allowed", trust_remote_code=True, init=True)
    assert marker.exists()  # the operator listed it: its code ran on load


# --- 2. generic environment names --------------------------------------------------------------
# Before: HOST=0.0.0.0 bound publicly, PORT moved the port, HOME became the state folder.
def test_only_documented_names_configure_the_server(monkeypatch, tmp_path):
    for name, value in {"HOST": "0.0.0.0", "PORT": "1", "HOME": str(tmp_path), "DEVICE": "cuda",
                        "BACKENDS": "pipeline"}.items():
        monkeypatch.setenv(name, value)
    settings = app.Settings()
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8005, "auto")
    assert settings.home == Path("~/.ai-server").expanduser() and settings.backends == list(app.KNOWN_BACKENDS)
    monkeypatch.setenv("AI_SERVER_HOST", "0.0.0.0")
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "1m")
    assert app.Settings().host == "0.0.0.0" and app.Settings().keep_alive_s == 60


# --- 3. one bad request, one failed row ----------------------------------------------------------
# Before: each of these gave a 500 (to itself and to the requests batched with it), or was accepted.
BAD_FIELDS = [
    ("/api/generate", {"prompt": "hi", "options": {"repeat_penalty": 1e-40}}, "repeat_penalty"),
    ("/api/generate", {"prompt": "hi", "options": {"presence_penalty": 1e37}}, "presence_penalty"),
    ("/api/generate", {"prompt": "hi", "options": {"frequency_penalty": 1e300}}, "frequency_penalty"),
    ("/api/generate", {"prompt": "hi", "options": {"seed": 2 ** 63}}, "seed"),
    ("/api/generate", {"prompt": "hi", "options": {"stop": ["x"] * 300_000}}, "stop"),
    ("/api/generate", {"prompt": "hi", "options": {"stop": ["y" * 5000]}}, "stop"),
    ("/api/generate", {"prompt": "hi", "context": [-1]}, "context"),
    ("/api/generate", {"prompt": "hi", "keep_alive": 1e300}, "keep_alive"),
    ("/api/chat", {"messages": [{"role": "user", "content": "hi"}], "keep_alive": "99999999999h"}, "keep_alive"),
    ("/v1/completions", {"prompt": "hi", "seed": -(2 ** 64)}, "seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "presence_penalty"),
]


def test_out_of_range_numbers_are_400s_that_name_the_field(server):
    for path, extra, field in BAD_FIELDS:
        r = server.client.post(path, json={**GOOD, **extra})
        assert r.status_code == 400, (path, extra, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert field in (error["message"] if path.startswith("/v1/") else error), (path, error)
    # NaN and Infinity parse as JSON in Python: refused like any out-of-range number.
    r = server.client.post("/api/generate", content=b'{"model": "tiny/llama-a", "prompt": "hi", '
                                                    b'"options": {"temperature": NaN}}')
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    assert server.client.get("/api/ps").status_code == 200


BAD_AT_THE_MODEL = [  # pass the body's checks, fail only against the model
    ("/api/generate", {"prompt": "hi", "context": [10 ** 6]}, "vocabulary"),
    ("/v1/completions", {"prompt": ""}, "empty"),
]


# Before: out-of-range context ids (IndexError), temperature 1e-40 and an empty completion prompt
# failed every row of the batch they joined: innocent streams got 500s or were cut mid-way.
def test_bad_requests_fail_alone_and_batched_neighbours_finish(server):
    solo = server.client.post("/api/generate", json={**GOOD, "prompt": "one two three",
                                                     "options": {"temperature": 0, "num_predict": 60}}).json()
    good = {**GOOD, "prompt": "one two three", "stream": True, "options": {"temperature": 0, "num_predict": 60}}

    def stream_good() -> str:
        with server.client.stream("POST", "/api/generate", json=good) as r:
            lines = [json.loads(ln) for ln in r.iter_lines() if ln]
        assert r.status_code == 200 and "error" not in lines[-1], lines[-1]
        return "".join(ln.get("response", "") for ln in lines)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(stream_good) for _ in range(6)]
        bads = [pool.submit(server.client.post, path, json={**GOOD, **extra}) for path, extra, _ in BAD_AT_THE_MODEL]
        tiny_t = [pool.submit(server.client.post, "/api/generate",
                              json={**GOOD, "prompt": "one two three",
                                    "options": {"temperature": 1e-40, "num_predict": 60}})]
        texts = [g.result() for g in goods]
        for bad, (path, extra, word) in zip(bads, BAD_AT_THE_MODEL):
            r = bad.result()
            assert r.status_code == 400, (path, extra, r.text)
            assert word in r.text, r.text
        assert tiny_t[0].result().status_code == 200
        assert tiny_t[0].result().json()["response"] == solo["response"]  # a temperature that small is greedy
    assert texts == [solo["response"]] * 6  # every neighbour finished, token for token as alone


class Boom(Exception):
    pass


# The engine itself: a row whose sampler fails ends alone; a prefill that fails for one row of a
# group is retried row by row, so only that row fails. Before: both failed every row.
def test_the_batch_engine_isolates_a_failing_row(tmp_path):
    from models import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", seed=5)
    backend = app.TransformersBackend(app.Settings(prefix_cache_bytes=0))
    loaded = backend.load(app.LoadPlan("t", str(folder), "fp32", False, "cpu", "fp32"))
    engine, model = loaded.engine, loaded.handle
    params = app.GenParams(max_tokens=30, temperature=0.0)
    prompt = loaded.tokenizer("one two three")["input_ids"]

    def row(ids, sampler=None):
        sampler = sampler or app.RowSampler(loaded, model, params)
        return app.Row(list(ids), 30, sampler, app.DecodeState(loaded.tokenizer, params, lambda t: None), set())

    class FailsAtStep3(app.RowSampler):
        calls = 0

        def __call__(self, ids, logits):
            self.calls += 1
            if self.calls == 3:
                raise Boom("this row's own failure")
            return super().__call__(ids, logits)

    alone = row(prompt)
    engine.run(alone)
    failing = FailsAtStep3(loaded, model, params)
    failing.plain = False
    rows = [row(prompt), row(prompt, failing), row(list(prompt) + [10 ** 6]), row(prompt)]
    threads = [threading.Thread(target=lambda r=r: engine.inbox.put(r)) for r in rows]
    for t in threads:
        t.start()
    for r in rows:
        assert r.done.wait(60)
    assert isinstance(rows[1].error, Boom) and rows[1].generated == 2
    assert isinstance(rows[2].error, IndexError)  # out of the vocabulary: its own prefill failed, alone
    for r in (rows[0], rows[3]):
        assert r.error is None and r.ids == alone.ids
    backend.unload(loaded)


# --- 4. loads and torch's process-wide default dtype -----------------------------------------
# Before: two loads at once could leave the default dtype bf16 for good.
def test_concurrent_loads_leave_the_default_dtype_alone(start_server):
    server = start_server(MAX_CACHE_MODELS="4")
    server.pull_ok("tiny/llama-b", quantize="bf16")
    server.pull_ok("tiny/llama-c", quantize="fp32")

    def load(name: str, keep_alive: int) -> str:
        r = server.client.post("/api/generate", json={"model": name, "keep_alive": keep_alive})
        return r.json()["done_reason"]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(4):  # both load at once, then both unload
            assert list(pool.map(load, ["tiny/llama-b", "tiny/llama-c"], [60, 60])) == ["load", "load"]
            assert list(pool.map(load, ["tiny/llama-b", "tiny/llama-c"], [0, 0])) == ["unload", "unload"]
    assert server.client.get("/diag").json()["torch_default_dtype"] == "float32"
    r = server.client.post("/v1/completions", json={"model": "tiny/llama-c", "prompt": "one two", "max_tokens": 8,
                                                    "temperature": 0.9, "seed": 1, "logit_bias": {"5": -50}})
    assert r.status_code == 200, r.text


# --- 5. prompt fitting -------------------------------------------------------------------------
def counting_render(tokenizer):
    calls = []

    def render(messages, tools=None):
        calls.append(len(messages))
        return app.render_chat_prompt(tokenizer, messages, tools)

    return render, calls


# Before: one render per dropped message (3 200 messages: 65 s), with no way to cancel.
def test_fitting_many_messages_takes_few_renders_and_can_be_cancelled():
    tokenizer = make_tokenizer()
    messages = [{"role": "system", "content": "be brief"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} one two three"}
        for i in range(3200)] + [{"role": "user", "content": "the last question"}]
    render, calls = counting_render(tokenizer)
    prompt = app.fit_chat(render, messages, 256, True)
    assert len(prompt.ids) < 256 and len(calls) <= 16, len(calls)
    assert prompt.text.startswith("<|im_start|>system\nbe brief") and "the last question" in prompt.text
    again = render([m for m in messages if m["content"] in prompt.text])  # nothing more could have stayed
    assert len(again.ids) == len(prompt.ids)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(app.ClientGone):
        app.fit_chat(render, messages, 256, True, cancel)


# Before: a lone message too long for the context kept the end of the token ids, which cut the
# template's header (and, in the server, the reply came back empty).
def test_one_huge_message_is_cut_inside_its_template():
    tokenizer = make_tokenizer()
    render, _ = counting_render(tokenizer)
    messages = [{"role": "user", "content": "start " + "one two three four five " * 400 + "the end"}]
    prompt = app.fit_chat(render, messages, 100, True)
    sent = tokenizer.decode(prompt.ids)  # what the model sees
    assert len(prompt.ids) < 100 and sent == prompt.text
    assert sent.startswith("<|im_start|>user\n") and sent.endswith("the end<|im_end|>\n<|im_start|>assistant\n")


def open_webui_tools(n: int = 36) -> list[dict]:
    """The shape of Open WebUI's built-in tools as its browser chat sends them natively (36, ~26 KB)."""
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": f"Tool number {i} does one thing for the user. " + "It has details. " * 30,
        "parameters": {"type": "object", "properties": {f"arg_{j}": {"type": "string", "description": "an argument "
                                                                      "that means something"} for j in range(3)},
                       "required": ["arg_0"]}}} for i in range(n)]


# Before: Open WebUI's 36 tools, described in a system message (SmolLM2's template has none), filled
# the context; the prompt was cut to num_ctx - 1 and the answer got 1 token, done_reason "length".
def test_tools_a_template_cannot_use_go_before_turns_and_the_reply_keeps_room():
    tokenizer = make_tokenizer()  # a ChatML template that knows no tools
    tools = open_webui_tools()
    assert len(json.dumps(tools)) > 25_000
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "an older question"}, {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "the question now"}]
    render, _ = counting_render(tokenizer)
    assert len(render(messages, tools).ids) > 8192  # this test tokenizer spends a token on about each byte
    prompt = app.fit_chat(render, messages, 8192, True, tools=tools, native_tools=False, reserve=2048)
    assert len(prompt.ids) < 8192 - 2048 and prompt.truncated, len(prompt.ids)
    assert prompt.trimmed == "tool descriptions shortened (36 tools)"
    assert "tool_35" in prompt.text and "an older question" in prompt.text  # every turn stays
    # A smaller context: the tools go entirely before any turn does.
    prompt = app.fit_chat(render, messages, 256, True, tools=tools, native_tools=False, reserve=64)
    assert len(prompt.ids) < 256 - 64 and "tool_0" not in prompt.text and "an older question" in prompt.text
    assert prompt.trimmed == "tools left out (36 tools)"
    # Smaller still: then the oldest turns, never the system message or the last one.
    long_turns = [messages[0], *({"role": r, "content": f"turn {i} " + "words " * 20}
                                 for i, r in enumerate(["user", "assistant"] * 4)), messages[-1]]
    prompt = app.fit_chat(render, long_turns, 200, True, tools=tools, native_tools=False, reserve=50)
    assert len(prompt.ids) < 150 and "be brief" in prompt.text and "the question now" in prompt.text
    assert prompt.trimmed.startswith("tools left out (36 tools), ") and "oldest messages dropped" in prompt.trimmed
    # A prompt that already leaves the reply room is left whole; without truncation, one that does
    # not fit the context at all is a 400 that says what to do.
    assert not app.fit_chat(render, messages, 4096, True, reserve=1024).truncated
    with pytest.raises(app.BadRequest, match="exceeds the context length"):
        app.fit_chat(render, messages, 4096, False, tools=tools, native_tools=False, reserve=1024)


def test_the_reply_keeps_room_through_the_server(server):
    """Open WebUI's case end to end (num_ctx 128 here): tools shortened or left out, the answer
    gets its quarter of the context, and the log says what went (never the text)."""
    eos = 2  # <|im_end|>, banned so that the reply runs to its budget
    r = server.client.post("/v1/chat/completions", json={
        "model": "tiny/llama-a", "tools": open_webui_tools(), "logit_bias": {str(eos): -100},
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] < 128 - 32 and usage["completion_tokens"] >= 32, usage
    log = server.log_path.read_text()
    assert "prompt trimmed to" in log and "(36 tools)" in log and "hello there" not in log


def test_a_long_chat_is_fitted_through_the_server(server):
    messages = [{"role": "user", "content": f"message {i} one two three"} for i in range(3200)]
    r = server.client.post("/api/chat", json={**GOOD, "messages": messages, "options": {"num_predict": 4}})
    assert r.status_code == 200 and r.json()["prompt_eval_count"] < 128, r.text


# --- 6. keys that are not there -----------------------------------------------------------------
# Before: an empty keys file (or API_KEYS=" , ") served without auth while /status said keys were set.
@pytest.mark.parametrize("env", [{"API_KEYS_FILE": "EMPTY"}, {"API_KEYS": " , "}])
def test_keys_that_name_no_key_refuse_to_start(hub, tmp_path, env):
    (tmp_path / "keys").write_text("# no keys yet\n\n")
    env = {k: str(tmp_path / "keys") if v == "EMPTY" else v for k, v in env.items()}
    server = ServerProcess(tmp_path / "home", hub.url, tmp_path / "server.log", **env)
    done = subprocess.run([sys.executable, str(ROOT / "app.py"), "serve"], env=server.env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert ("API_KEYS" in done.stderr) and "Traceback" not in done.stderr, done.stderr[-2000:]


# --- 7. pulls that stall or are cancelled -----------------------------------------------------------
# Before: the cancelled, stalled pull kept its slot until the stalled read gave up, and the pull
# queued behind it waited.
def test_cancel_frees_the_pull_slot_at_once(start_server, hub, fresh_repo):
    server = start_server(MAX_CONCURRENT_PULLS="1", HF_HUB_DOWNLOAD_TIMEOUT="100")
    release = hub.stall(fresh_repo, "model.safetensors")
    try:
        stalled = server.pull(fresh_repo)["job_id"]
        deadline = time.monotonic() + 30
        while server.client.get(f"/jobs/{stalled}").json()["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        queued = server.pull("tiny/llama-d")["job_id"]
        time.sleep(1)
        assert server.client.get(f"/jobs/{queued}").json()["status"] == "queued"
        assert server.client.delete(f"/jobs/{stalled}").status_code == 200
        assert server.wait_job(queued)["status"] == "succeeded"
        assert not release.is_set()  # it ran while the cancelled download was still stalled
    finally:
        release.set()


# Before: metadata calls had no timeout: a hub that took the connection and never answered held the
# pull (and its slot) for as long as the hub kept quiet.
def test_a_silent_hub_fails_the_pull_within_the_hub_timeout(start_server, hub, fresh_repo):
    server = start_server(HUB_TIMEOUT_S="1", PULL_RETRIES="1", PULL_RETRY_BACKOFF_S="0")
    release = hub.stall_api(fresh_repo)
    try:
        job = server.wait_job(server.pull(fresh_repo)["job_id"])
        assert not release.is_set() and job["status"] == "failed", job  # it ended while the hub still said nothing
        assert "unreachable" in job["error"] or "Timeout" in job["error"], job["error"]
    finally:
        release.set()
        del hub.api_stalls[fresh_repo.lower()]


# --- 9. output bounded by the context --------------------------------------------------------------
# Before: max_tokens was not capped (1e6 accepted on a 64-token context).
def test_prompt_plus_output_fit_the_context(start_server):
    server = start_server(CONTEXT_LENGTH="64")
    server.pull_ok("tiny/llama-e")
    eos = json.loads((next((server.home / "hf-cache").rglob("config.json"))).read_text())["eos_token_id"]
    r = server.client.post("/v1/completions", json={"model": "tiny/llama-e", "prompt": "one two three",
                                                    "max_tokens": 1_000_000, "logit_bias": {str(eos): -100}})
    body = r.json()
    assert r.status_code == 200 and body["usage"]["total_tokens"] == 64, body
    assert body["choices"][0]["finish_reason"] == "length"
    r = server.client.post("/api/generate", json={"model": "tiny/llama-e", "prompt": "one", "stream": False,
                                                  "options": {"num_predict": 1_000_000, "num_ctx": 32}})
    body = r.json()
    assert body["prompt_eval_count"] + body["eval_count"] <= 32
    if body["eval_count"] + body["prompt_eval_count"] == 32:
        assert body["done_reason"] == "length"


# --- 11. shutdown past the grace period --------------------------------------------------------------
# Before: streams still running when the grace ended were cut with no final line.
def test_streams_cut_by_shutdown_end_with_an_error_line(hub, smollm2_home, tmp_path):
    server = ServerProcess(copy_home(smollm2_home, tmp_path / "home"), hub.url, tmp_path / "server.log",
                           DEFAULT_MODEL="smollm2:135m", GRACEFUL_SHUTDOWN_S="2", AI_SERVER_BACKENDS="transformers")
    server.start()
    try:
        body = {"model": "smollm2:135m", "prompt": "Write a very long story.",
                "options": {"num_predict": 3000, "temperature": 0.7, "num_ctx": 4096}}
        lines = []
        with server.client.stream("POST", "/api/generate", json=body) as r:
            for line in r.iter_lines():
                lines.append(json.loads(line))
                if len(lines) == 5:
                    server.proc.send_signal(signal.SIGTERM)
        assert "error" in lines[-1] and "shutting down" in lines[-1]["error"], lines[-3:]
        assert all("error" not in ln for ln in lines[:-1]) and len(lines) > 6
        server.proc.wait(30)
    finally:
        server.stop()


# --- 12. credentials in HF_ENDPOINT -------------------------------------------------------------
# Before: the mirror's password showed in /status, in /jobs errors and in the log.
def test_endpoint_credentials_are_never_shown(start_server, hub):
    secret = "hunter2-do-not-print"
    mirror = hub.url.replace("http://", f"http://ops:{secret}@")
    server = start_server(HF_ENDPOINT=mirror)
    server.pull_ok("tiny/llama-f")  # the mirror takes the login
    failed = server.wait_job(server.pull("nobody/nothing-here")["job_id"])
    assert failed["status"] == "failed"
    shown = server.client.get("/status").text + server.client.get("/jobs").text + failed["error"]
    assert server.client.get("/status").json()["config"]["hf_endpoint"].startswith("http://***@127.0.0.1")
    assert secret not in shown and secret not in server.log()


# --- low ---------------------------------------------------------------------------------------------
def test_small_things(server, hub):
    c = server.client
    # seed >= 2^63 is a 400 (handled with the numbers above); [::1] is a local Host
    assert c.get("/api/tags", headers={"Host": f"[::1]:{server.port}"}).status_code == 200
    # body-parse errors and unknown routes answer in the API's own error shape
    r = c.post("/api/chat", content=b"{not json")
    assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    r = c.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert set(c.get("/no/such/route").json()) == {"error"}
    assert c.get("/v1/nothing").json()["error"]["message"]
    # the OpenAPI schema documents the 400 the server sends, not FastAPI's 422
    spec = json.dumps(c.get("/openapi.json").json())
    assert '"422"' not in spec and '"400"' in spec
    # copy refuses to overwrite; delete and copy answer JSON
    r = c.post("/api/copy", json={"source": "tiny/llama-a", "destination": "mine:v1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json") and r.json()
    r = c.post("/api/copy", json={"source": "tiny/llama-a", "destination": "mine:v1"})
    assert r.status_code == 409 and "already exists" in r.json()["error"]
    r = c.request("DELETE", "/api/delete", json={"model": "mine:v1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json") and r.json()
    # a gated pull: the Hub's refusal, not a 401 that reads like this server's key check
    hub.add_repo("gated/model", tiny_model_files(4))
    hub.gate("gated/model", "the-right-token")
    r = c.post("/api/pull", json={"model": "gated/model", "stream": False})
    assert r.status_code == 403 and r.json()["error"].startswith("the Hub refused") and "HF_TOKEN" in r.json()["error"]


# Before: a corrupt or read-only registry ended in a raw traceback.
@pytest.mark.parametrize("damage", ["corrupt", "read-only", "a folder"])
def test_an_unusable_registry_is_said_plainly(hub, tmp_path, damage):
    home = tmp_path / "home"
    home.mkdir()
    registry = home / "registry.sqlite"
    if damage == "corrupt":
        registry.write_bytes(b"this is not a database" * 100)
    elif damage == "a folder":
        registry.mkdir()
    else:
        if os.geteuid() == 0:
            pytest.skip("running as root, which writes read-only files anyway")
        app.Registry(registry).close()
        os.chmod(registry, 0o444)
        os.chmod(home, 0o555)
    server = ServerProcess(home, hub.url, tmp_path / "server.log")
    try:
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), "serve"], env=server.env, capture_output=True,
                              text=True, timeout=120)
    finally:
        os.chmod(home, 0o755)
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "registry" in out and "Traceback" not in out, out[-3000:]


# Before: a pull killed mid-download left 0-byte .incomplete files for good.
def test_empty_partial_downloads_are_removed_at_start(start_server, hub, fresh_repo):
    server = start_server()
    release = hub.stall(fresh_repo, "model.safetensors")
    try:
        server.pull(fresh_repo)
        cache = server.home / "hf-cache"
        deadline = time.monotonic() + 30
        while not list(cache.rglob("*.incomplete")) and time.monotonic() < deadline:
            time.sleep(0.1)
        sizes = [p.stat().st_size for p in cache.rglob("*.incomplete")]
        assert sizes and not any(sizes), sizes
        server.stop(signal.SIGKILL)
    finally:
        release.set()
    server.start()
    assert not list((server.home / "hf-cache").rglob("*.incomplete"))


# Before: two pulls at once each passed the disk check alone and together overfilled the disk.
def test_concurrent_pulls_reserve_their_disk(start_server, hub):
    big = os.urandom(128 * 1024 * 1024)  # big against what other processes write meanwhile
    for name in ("disk/one", "disk/two"):
        hub.add_repo(name, {**tiny_model_files(0), "extra.bin": big + name.encode()})
    cache_probe = shutil.disk_usage("/tmp").free  # the test's homes live under the same tmp filesystem
    reserve = cache_probe - int(1.5 * len(big))  # room for one download, not for two (64 MiB to spare)
    server = start_server(PULL_MIN_FREE_BYTES=str(reserve), MAX_CONCURRENT_PULLS="2")
    if shutil.disk_usage(server.home).free != pytest.approx(cache_probe, abs=16 * 1024 * 1024):
        pytest.skip("the test's home is not on /tmp's filesystem, or it is busy")
    releases = [hub.stall(n, "extra.bin") for n in ("disk/one", "disk/two")]
    try:
        jobs = [server.pull(n)["job_id"] for n in ("disk/one", "disk/two")]
        time.sleep(3)
    finally:
        for name, r in zip(("disk/one", "disk/two"), releases):
            del hub.stalls[(name, "extra.bin")]  # the retry gets the whole file
            r.set()
    ended = [server.wait_job(j) for j in jobs]
    assert sorted(j["status"] for j in ended) == ["failed", "succeeded"], ended
    assert "not enough disk space" in next(j["error"] for j in ended if j["status"] == "failed")


# Before: two /api/pull of the embedded model at once converted into the same .partial folder.
def test_two_pulls_of_the_embedded_model_import_it_once(start_server):
    server = start_server()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: server.client.post("/api/pull", json={"model": "smollm2:135m",
                                                                              "stream": False}), range(2)))
    assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
    assert server.model("smollm2:135m") is not None
    assert not list((server.home / "models").glob("*.partial"))


def test_host_header_parsing_takes_ipv6_and_refuses_junk():
    assert app.is_local_host("[::1]:8005") and app.is_local_host("[::1]")
    assert not app.is_local_host("[") and not app.is_local_host("evil.example:80")


# Found by the fuzz run (tests/fuzz_hooks.py): OpenAI bodies the server read as untyped dicts were 500s.
def test_malformed_openai_message_parts_are_400s(server):
    hi = [{"role": "user", "content": "hi"}]
    call = {"role": "assistant", "tool_calls": [{"function": 5}]}
    tools = [{"type": "function", "function": {"name": "f"}}]
    for extra in ({"messages": hi, "response_format": {"type": "json_schema", "json_schema": "x"}},
                  {"messages": hi, "response_format": {"type": "json_schema", "json_schema": [None, None]}},
                  {"messages": hi, "tools": tools, "tool_choice": {"function": 5}},
                  {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
                  {"messages": [call, *hi]},
                  {"messages": [{**call, "tool_calls": [{"function": {"name": "f", "arguments": [None]}}]}, *hi]},
                  {"messages": [{**call, "tool_calls": [{"id": {}, "function": {"name": "f", "arguments": "{}"}}]}, *hi]}):
        r = server.client.post("/v1/chat/completions", json={"model": "tiny/llama-a", "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (extra, r.text)
    r = server.client.post("/v1/chat/completions", json={
        "model": "tiny/llama-a", "max_tokens": 2, "messages": [
            {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert r.status_code == 200, r.text
