"""Production hardening, end to end: API keys, /metrics, CORS and Host checks, input limits,
pull faults (disk, cancel, stall, retries), queueing and load, graceful shutdown, fuzzing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, copy_home
import app  # noqa: E402  (conftest puts the repo on sys.path)

KEYS = ("sk-test-alpha-7f3a91", "sk-test-bravo-2c8d44")
FILE_KEY = "sk-test-charlie-9e1b07"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition, 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# --- API keys ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(hub, tmp_path_factory):
    from conftest import ServerProcess

    tmp = tmp_path_factory.mktemp("keyed")
    (tmp / "keys").write_text(f"# operators' keys\n{FILE_KEY}\n\n")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers,pipeline",
                           API_KEYS=",".join(KEYS), API_KEYS_FILE=str(tmp / "keys"))
    server.client.headers["Authorization"] = f"Bearer {KEYS[0]}"
    yield server.start()
    server.stop()


# Each route's wire API (its router's): whose error shape its refusals take.
ROUTE_APIS = {r.path_format: r.api.name for r in app.app_routes(app.create_app(app.Settings()).routes)
              if isinstance(r, app.WireRoute)}


def test_every_route_but_the_public_ones_needs_a_key(keyed):
    spec = keyed.client.get("/openapi.json").json()
    anonymous = httpx.Client(base_url=keyed.url)
    for path in ("/", "/health", "/api/version"):
        assert anonymous.get(path).status_code == 200, path
    checked = 0
    for path, methods in spec["paths"].items():
        for method in methods:
            concrete = path.replace("{job_id}", "x").replace("{name}", "x/y").replace("{model}", "x")
            if path in ("/", "/health", "/api/version"):
                continue
            for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEYS[0]}"}):
                r = anonymous.request(method.upper(), concrete, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer"
                if method == "head":
                    continue
                body = r.json()
                nested = ROUTE_APIS[path] in ("openai", "responses", "anthropic", "llamacpp")  # {"error": {...}}
                assert ("API key" in body["error"]["message"]) if nested else ("API key" in body["error"])
            checked += 1
    assert checked >= 35  # every route of the four APIs was tried
    for key in (*KEYS, FILE_KEY):
        assert anonymous.get("/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_keys_work_with_the_real_clients_and_are_never_logged(keyed, monkeypatch):
    keyed.pull_ok("tiny/llama-a")
    monkeypatch.setenv("OLLAMA_API_KEY", KEYS[1])  # the ollama package sends it as a Bearer token
    assert "tiny/llama-a:latest" in {m.model for m in ollama.Client(host=keyed.url).list().models}
    monkeypatch.delenv("OLLAMA_API_KEY")
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=keyed.url).list()
    assert err.value.status_code == 401
    good = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=FILE_KEY)
    assert good.chat.completions.create(model="tiny/llama-a", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=2, temperature=0).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope").models.list()
    log = keyed.log()
    assert not any(k in log for k in (*KEYS, FILE_KEY))
    assert keyed.client.get("/status").json()["config"]["api_keys_set"] is True
    assert not any(k in keyed.client.get("/status").text for k in (*KEYS, FILE_KEY))


# --- metrics, CORS, Host, limits -----------------------------------------------------------------------
def test_metrics_move_with_traffic(shared_server):
    before = shared_server.client.get("/metrics").text
    shared_server.pull_ok("tiny/llama-a")
    shared_server.wait_job(shared_server.pull("nobody/nothing")["job_id"])
    for _ in range(2):
        assert shared_server.client.post("/api/generate", json={"model": "tiny/llama-a", "prompt": "hi", "stream": False,
                                                                "options": {"num_predict": 5, "temperature": 0}}).status_code == 200
    shared_server.client.post("/api/chat", json={"model": "nope", "messages": []})
    after = shared_server.client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    grew = lambda name, **lb: metric(text, name, **lb) - metric(before, name, **lb)  # noqa: E731
    assert grew("ai_server_requests_total", route="/api/generate", method="POST", status="200") == 2
    assert grew("ai_server_requests_total", route="/api/chat", method="POST", status="404") == 1
    assert grew("ai_server_generated_tokens_total", model="tiny/llama-a") == 10
    assert grew("ai_server_prompt_tokens_total", model="tiny/llama-a") > 0
    assert grew("ai_server_generations_total", model="tiny/llama-a") == 2
    assert grew("ai_server_time_to_first_token_seconds_count", model="tiny/llama-a") == 2
    assert grew("ai_server_request_duration_seconds_count", route="/api/generate") == 2
    assert metric(text, "ai_server_model_load_seconds_count", model="tiny/llama-a", backend="transformers") >= 1
    assert grew("ai_server_pull_jobs_total", status="succeeded") >= 1 and grew("ai_server_pull_jobs_total",
                                                                                status="failed") >= 1
    assert grew("ai_server_pull_bytes_total") > 0 or metric(text, "ai_server_pull_bytes_total") > 0
    assert metric(text, "ai_server_model_loaded", model="tiny/llama-a") == 1
    assert metric(text, "ai_server_model_memory_bytes", model="tiny/llama-a") > 0


def test_load_failures_are_counted(shared_server):
    shared_server.pull_ok("tiny/corrupt")
    shared_server.chat("tiny/corrupt")
    text = shared_server.client.get("/metrics").text
    assert metric(text, "ai_server_model_load_failures_total", model="tiny/corrupt") >= 1


def test_cors_allows_local_and_configured_origins_only(start_server):
    server = start_server(ORIGINS="chrome-extension://*,https://app.example.com")
    for origin, allowed in [("http://localhost:3000", True), ("http://127.0.0.1:8080", True), ("app://x", True),
                            ("chrome-extension://abcdef", True), ("https://app.example.com", True),
                            ("https://evil.example", False), ("http://localhost.evil.example", False)]:
        r = server.client.options("/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "content-type,authorization"})
        assert (r.headers.get("access-control-allow-origin") == origin) is allowed, (origin, r.status_code)
        simple = server.client.get("/api/tags", headers={"Origin": origin})
        assert (simple.headers.get("access-control-allow-origin") == origin) is allowed


def test_non_local_host_headers_are_refused_on_loopback(shared_server):
    for host, ok in [("localhost", True), (f"127.0.0.1:{shared_server.port}", True), ("192.168.1.7", True),
                     ("myhost.local", True), ("evil.example", False), ("attacker.com:8005", False)]:
        r = shared_server.client.get("/api/tags", headers={"Host": host})
        assert (r.status_code == 200) is ok, (host, r.status_code)
        if not ok:
            assert r.status_code == 403 and "DNS-rebinding" in r.json()["error"]


def test_input_limits_are_4xx_with_a_hint(start_server):
    server = start_server(MAX_BODY_BYTES="4096")
    big = {"model": "x", "prompt": "a" * 5000}
    r = server.client.post("/api/generate", json=big)
    assert r.status_code == 413 and "MAX_BODY_BYTES" in r.json()["error"]
    r = server.client.post("/v1/completions", json=big)
    assert r.status_code == 413 and "MAX_BODY_BYTES" in r.json()["error"]["message"]

    def chunks():
        yield b'{"model": "x", "prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    r = server.client.post("/api/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.status_code  # no Content-Length: cut off at the cap, never a 500
    for name in ("../../etc/passwd", "/abs/model", "a//b", "x" * 400, "bad name", "..."):
        r = server.client.post("/api/chat", json={"model": name, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "invalid model name" in r.json()["error"], name
    for body in ({"model": "m", "prompt": "x", "options": {"num_predict": 10**9}},
                 {"model": "m", "prompt": "x", "options": {"temperature": -1}},
                 {"model": "m", "prompt": "x", "options": {"num_ctx": 1}}):
        assert server.client.post("/api/generate", json=body).status_code == 400
    r = server.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 10**9})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# --- pull faults -----------------------------------------------------------------------------------------
def test_disk_space_is_checked_before_downloading(start_server, hub, fresh_repo):
    server = start_server(PULL_MIN_FREE_BYTES=str(10**18))
    job = server.wait_job(server.pull(fresh_repo)["job_id"])
    assert job["status"] == "failed" and "not enough disk space" in job["error"] and "HF_HUB_CACHE" in job["error"]
    assert hub.gets(fresh_repo) == []  # refused before a byte was fetched
    r = server.client.post("/api/pull", json={"model": fresh_repo, "stream": False})
    assert r.status_code == 507 and "not enough disk space" in r.json()["error"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a real filesystem that really fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the disk-full path needs one")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_filling_up_mid_download_fails_cleanly(start_server, hub, fresh_repo, small_disk):
    release = hub.stall(fresh_repo, "model.safetensors")
    server = start_server(HF_HUB_CACHE=str(small_disk / "hub"), PULL_MIN_FREE_BYTES="0", PULL_RETRIES="0")
    job_id = server.pull(fresh_repo)["job_id"]
    while server.client.get(f"/jobs/{job_id}").json()["downloaded_bytes"] == 0:
        time.sleep(0.05)  # small files are in; the weights hang in the hub
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # something else takes the rest of the disk meanwhile
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
    del hub.stalls[(fresh_repo.lower(), "model.safetensors")]  # retries must reach the real file
    release.set()
    job = server.wait_job(job_id)
    assert job["status"] == "failed" and "disk full" in job["error"], job
    assert server.model(fresh_repo) is None
    filler.unlink()
    server.pull_ok(fresh_repo)  # with room again, the same pull works
    assert server.client.get("/health").status_code == 200


def test_cancel_a_running_pull(start_server, hub, fresh_repo):
    release = hub.stall(fresh_repo, "model.safetensors")
    server = start_server()
    job_id = server.pull(fresh_repo)["job_id"]
    while server.client.get(f"/jobs/{job_id}").json()["status"] != "running":
        time.sleep(0.05)
    r = server.client.delete(f"/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "failed" and r.json()["error"] == "cancelled by request"
    del hub.stalls[(fresh_repo.lower(), "model.safetensors")]
    release.set()  # the stalled file now arrives: the cancelled pull must still register nothing
    time.sleep(1.5)
    assert server.model(fresh_repo) is None
    assert server.client.get(f"/jobs/{job_id}").json()["error"] == "cancelled by request"
    assert server.client.delete(f"/jobs/{job_id}").status_code == 409
    assert server.client.delete("/jobs/no-such-job").status_code == 404
    server.pull_ok(fresh_repo)  # a new pull of the same model works


def test_stalled_hub_times_out(start_server, hub, fresh_repo):
    release = hub.stall(fresh_repo, "model.safetensors")
    try:
        server = start_server(HF_HUB_DOWNLOAD_TIMEOUT="1", PULL_RETRIES="0")
        job = server.wait_job(server.pull(fresh_repo)["job_id"], timeout_s=90)
        assert job["status"] == "failed" and "pull again" in job["error"] and "Timeout" in job["error"], job
        assert server.model(fresh_repo) is None
    finally:
        release.set()


def test_transient_failures_are_retried_with_backoff(start_server, hub, fresh_repo):
    # huggingface_hub tries a file 6 times (1 + 5 retries); 6 drops defeat one snapshot_download.
    hub.drop(fresh_repo, "model.safetensors", after_bytes=0, times=6)
    server = start_server(PULL_RETRIES="2", PULL_RETRY_BACKOFF_S="0.1")
    job = server.wait_job(server.pull(fresh_repo)["job_id"], timeout_s=120)
    assert job["status"] == "succeeded", job
    assert "retry 1 of 2" in server.log()
    assert len(hub.gets(fresh_repo, "model.safetensors")) == 7


# --- queueing, load, cancellation ------------------------------------------------------------------------
async def fire(url: str, model: str, n: int, tokens: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        body = {"model": model, "prompt": "hello", "stream": False, "options": {"num_predict": tokens, "temperature": 0}}
        return await asyncio.gather(*(client.post("/api/generate", json=body) for _ in range(n)))


def test_64_clients_under_the_queue_limit_all_complete(start_server):
    server = start_server(MAX_QUEUE="128")
    server.pull_ok("tiny/llama-a")
    replies = asyncio.run(fire(server.url, "tiny/llama-a", 64, 8))
    assert [r.status_code for r in replies] == [200] * 64
    assert all(r.json()["done"] and r.json()["eval_count"] == 8 for r in replies)
    metrics = server.client.get("/metrics").text
    assert metric(metrics, "ai_server_generations_total", model="tiny/llama-a") == 64


def test_a_full_queue_answers_503_and_loses_nothing(start_server):
    server = start_server(MAX_QUEUE="8", NUM_PARALLEL="1")
    server.pull_ok("tiny/llama-a")
    server.chat("tiny/llama-a", max_tokens=1)  # loaded: the burst measures the queue, not the load
    replies = asyncio.run(fire(server.url, "tiny/llama-a", 64, 64))
    ok = [r for r in replies if r.status_code == 200]
    busy = [r for r in replies if r.status_code == 503]
    assert len(ok) + len(busy) == 64 and busy and len(ok) >= 9  # 1 running + 8 waiting at least
    assert all(r.json()["error"] == "server busy, please try again.  maximum pending requests exceeded" and
               r.headers["retry-after"] == "1" for r in busy)
    assert all(r.json()["eval_count"] == 64 for r in ok)
    metrics = server.client.get("/metrics").text
    assert metric(metrics, "ai_server_rejected_requests_total", model="tiny/llama-a") == len(busy)
    assert metric(metrics, "ai_server_generations_total", model="tiny/llama-a") == len(ok) + 1


def test_a_queued_request_whose_client_left_never_runs(start_server, smollm2_home, tmp_path):
    # SmolLM2: its 4096-token context takes minutes to fill, so the holder keeps its slot (output is
    # capped by the context; the tiny model's 512 tokens were done before the second request gave up).
    server = start_server(copy_home(smollm2_home, tmp_path / "smol"), NUM_PARALLEL="1")
    server.chat("smollm2:135m", max_tokens=1)  # warm-up: generation 1
    holder = {"model": "smollm2:135m", "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0,
              "stream": True, "logit_bias": {"0": -100, "2": -100}}  # its end tokens banned: it runs for minutes
    with httpx.stream("POST", f"{server.url}/v1/completions", json=holder, timeout=60) as stream:
        lines = stream.iter_lines()  # kept: a discarded iterator makes httpcore close the connection
        next(lines)  # generation 2 holds the only slot
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue behind it, then gives up
            httpx.post(f"{server.url}/api/generate", timeout=1, json={
                "model": "smollm2:135m", "prompt": "hi", "stream": False, "options": {"num_predict": 5}})
        deadline = time.monotonic() + 10
        while server.client.get("/status").json()["queue"]["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.client.get("/status").json()["queue"]["waiting"] == {}  # it left the queue
    deadline = time.monotonic() + 30  # closing the stream cancels generation 2 and frees the slot
    while server.client.get("/status").json()["queue"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.chat("smollm2:135m", max_tokens=1).status_code == 200  # generation 3
    metrics = server.client.get("/metrics").text
    assert metric(metrics, "ai_server_generations_total", model="smollm2:135m") == 3  # the one that left: never


# --- shutdown, fuzzing --------------------------------------------------------------------------------------
def test_sigterm_lets_running_generations_finish_and_persists_jobs(start_server, hub, fresh_repo):
    server = start_server(GRACEFUL_SHUTDOWN_S="60")
    server.pull_ok("tiny/llama-a")
    server.chat("tiny/llama-a", max_tokens=1)
    release = hub.stall(fresh_repo, "model.safetensors")
    job_id = server.pull(fresh_repo)["job_id"]
    result = {}

    def generate():
        result["r"] = server.client.post("/api/generate", json={
            "model": "tiny/llama-a", "prompt": "hi", "stream": False, "options": {"num_predict": 1500, "temperature": 0}})

    worker = threading.Thread(target=generate)
    worker.start()
    while server.client.get("/status").json()["queue"]["running"].get("tiny/llama-a") != 1:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(f"{server.url}/health", timeout=2)
    worker.join()
    done = result["r"].json()
    assert result["r"].status_code == 200 and done["done_reason"] == "length"  # finished, not cut
    assert done["prompt_eval_count"] + done["eval_count"] == 512  # to the tiny model's whole context
    # Then it exited, the stalled pull notwithstanding. uvicorn re-raises the SIGTERM it caught once
    # its graceful shutdown is complete, so -15 is its clean exit; the lifespan's last line proves it.
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
    assert "ai-server: stopped" in server.log()
    release.set()
    server.start()
    job = server.client.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["error"]) == ("failed", "interrupted by shutdown")


def test_json_logs(start_server):
    server = start_server(LOG_FORMAT="json")
    server.pull_ok("tiny/llama-a")
    lines = [ln for ln in server.log().splitlines() if ln.startswith("{")]
    events = [json.loads(ln) for ln in lines]
    assert any(e["logger"] == "ai_server" and "pull" in e["message"] for e in events)
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in events)


# --- fuzzing -----------------------------------------------------------------------------------
# Schemathesis over the app's own /openapi.json, every operation, all four phases, against a server
# with a real (tiny) model: tests/fuzz_hooks.py points half of the generated model names at it (so
# sampling, templates, stops, context and keep_alive are fuzzed, not just 404s), describes what the
# loosely typed fields really hold, and links the operations for the stateful phase. Run twice, on a
# server without and with API keys. The keyed run skips the coverage phase, which is deterministic: it
# would send the open run's ~5 000 cases again, key and all (~110 s for 66 operations); it fuzzes with its
# own seed. Measured on 2 cores at 100 examples: open ~7 min (428 s in a CI run), keyed ~4 min (229 s;
# 421 s with coverage). scripts/fuzz.sh runs the same test with FUZZ_MAX_EXAMPLES=300 (the long run).
# Each distinct 5xx is listed with a curl line that repeats it; schemathesis.txt and fuzz.ndjson go to
# FUZZ_REPORT_DIR.
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261122"))
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "100"))  # per operation and phase
FUZZ_PHASES = {"open": "examples,coverage,fuzzing,stateful", "keyed": "fuzzing,stateful"}
FUZZ_MODEL = "tiny/llama-a"
FUZZ_GENERATION = ("POST /chat", "POST /api/chat", "POST /api/generate", "POST /v1/chat/completions",
                   "POST /v1/completions")
FUZZ_CHECKS = "not_a_server_error,response_schema_conformance,unsupported_method,ensure_resource_availability"


@pytest.fixture(params=["open", "keyed"])
def fuzz_server(request, hub, tmp_path):
    """A server with the fuzz model, the embedding model and a voice, without and with API keys. A short
    context keeps every generation short; pull retries are quick (fuzzed pulls mostly 404)."""
    from conftest import ServerProcess

    env = {"AI_SERVER_BACKENDS": "transformers,pipeline", "CONTEXT_LENGTH": "128", "NUM_PARALLEL": "4",
           "MAX_QUEUE": "64", "PULL_RETRY_BACKOFF_S": "0.1", "OMP_NUM_THREADS": "1",
           "TTS_MODEL": "piper:en_US-joe-medium"}  # the embedded voice, for /v1/audio/speech
    if request.param == "keyed":
        env["API_KEYS"] = KEYS[1]
    server = ServerProcess(tmp_path / "home", hub.url, tmp_path / "server.log", **env)
    if request.param == "keyed":
        server.client.headers["Authorization"] = f"Bearer {KEYS[1]}"
    server.start()
    server.pull_ok(FUZZ_MODEL)
    r = server.client.post("/api/pull", json={"model": "all-minilm", "stream": False})  # for the embedding routes
    assert r.status_code == 200, r.text
    yield server
    server.stop()


class Neighbour(threading.Thread):
    """Ordinary generations on the fuzz model all through the run, so that fuzzed requests share
    batches with them: a bad request must fail alone, never the requests it is batched with."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=server.url, headers=server.client.headers, timeout=120)
        self.stopping, self.failures, self.done = threading.Event(), [], 0

    def run(self):
        body = {"model": FUZZ_MODEL, "prompt": "hello", "stream": False, "options": {"num_predict": 8}}
        while not self.stopping.is_set():
            try:
                r = self.client.post("/api/generate", json=body)
                if r.status_code != 200 or not r.json().get("done"):
                    self.failures.append(f"{r.status_code} {r.text[:300]}")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.done += 1
            self.stopping.wait(0.3)


def fuzz_report(path) -> dict:
    """From schemathesis's NDJSON report: requests per phase, status codes per operation, and each
    distinct 5xx answer with the shortest request that got it (schemathesis lists one per operation)."""
    phases, statuses, errors = {}, {}, {}
    for line in path.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished")
        if not scenario:
            continue
        label = scenario["recorder"].get("label", "?")
        for interaction in (scenario["recorder"].get("interactions") or {}).values():
            phases[scenario["phase"]] = phases.get(scenario["phase"], 0) + 1
            response = interaction.get("response")
            code = response["status_code"] if response else "no response"
            statuses.setdefault(label, {}).setdefault(code, 0)
            statuses[label][code] += 1
            if response and code >= 500:
                request = interaction["request"]
                sent = base64.b64decode((request.get("body") or {}).get("$base64", "")).decode(errors="replace")
                said = base64.b64decode(response.get("content", {}).get("$base64", "")).decode(errors="replace")
                key = (label, code, said[:200])
                if key not in errors or len(sent) < len(errors[key][1]):
                    errors[key] = (request, sent)
    return {"phases": phases, "statuses": statuses, "errors": errors}


def curl_line(request: dict, sent: str) -> str:
    headers = "".join(f" -H '{k}: {v[0]}'" for k, v in request.get("headers", {}).items()
                      if k.lower() in ("content-type", "authorization"))
    data = " -d '" + sent.replace("'", "'\\''") + "'" if sent else ""
    return f"curl -X {request['method']}{headers}{data} '{request['uri']}'"


@pytest.mark.timeout(900 + 12 * FUZZ_EXAMPLES)
def test_schemathesis_finds_no_server_errors(fuzz_server, tmp_path, request):
    """Seeded fuzz run of every operation, all phases, with and without a key: no 5xx, no
    response off its schema, no request left hanging (--request-timeout), no traceback in the
    server log, no ordinary request failed by a fuzzed one it was batched with - and a real share
    of the generation requests reached the model."""
    out = Path(os.environ.get("FUZZ_REPORT_DIR") or tmp_path) / request.node.callspec.id
    phases = FUZZ_PHASES[request.node.callspec.id]
    out.mkdir(parents=True, exist_ok=True)
    generations = lambda: metric(fuzz_server.client.get("/metrics").text, "ai_server_generations_total",  # noqa: E731
                                 model=FUZZ_MODEL)
    before = generations()
    command = [shutil.which("schemathesis", path=os.path.dirname(sys.executable)), "run",
               f"{fuzz_server.url}/openapi.json", "--checks", FUZZ_CHECKS,
               "--phases", phases, "--max-examples", str(FUZZ_EXAMPLES),
               "--seed", str(FUZZ_SEED + (request.node.callspec.id == "keyed")), "--workers", "1",
               "--request-timeout", "60", "--generation-database", "none", "--output-sanitize", "false",
               "--suppress-health-check", "filter_too_much,too_slow", "--continue-on-failure", "--no-color",
               "--report", "ndjson",
               "--report-ndjson-path", str(out / "fuzz.ndjson"), *shlex.split(os.environ.get("FUZZ_EXTRA_ARGS", ""))]
    if "Authorization" in fuzz_server.client.headers:
        command += ["-H", f"Authorization: {fuzz_server.client.headers['Authorization']}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(ROOT / "tests" / "fuzz_hooks.py"), "FUZZ_MODEL": FUZZ_MODEL}
    neighbour = Neighbour(fuzz_server)
    neighbour.start()
    started = time.monotonic()
    try:  # workers 1: schemathesis 4.32.5 with more workers races in its own code (SystemError from ast)
        done = subprocess.run(command, capture_output=True, text=True, cwd=out, env=env,
                              timeout=780 + 12 * FUZZ_EXAMPLES)
    finally:
        neighbour.stopping.set()
        neighbour.join(180)
    (out / "schemathesis.txt").write_text(done.stdout + done.stderr)
    report = fuzz_report(out / "fuzz.ndjson")
    print(f"\nfuzz[{request.node.callspec.id}]: {time.monotonic() - started:.0f} s, phases {phases}, "
          f"max-examples {FUZZ_EXAMPLES}, "
          f"requests per phase {report['phases']}, model generations {generations() - before:.0f}, "
          f"neighbour requests {neighbour.done}; report in {out}")
    for label, codes in sorted(report["statuses"].items()):
        print(f"  {label:32} {dict(sorted(codes.items(), key=str))}")
    for (label, code, said), (sent_request, sent) in sorted(report["errors"].items()):
        print(f"  {code} from {label}: {said[:200]}\n      {curl_line(sent_request, sent)}")

    problems = [f"{label} answered {code} {said[:200]!r}\n  {curl_line(*report['errors'][label, code, said])}"
                for label, code, said in sorted(report["errors"])]
    if done.returncode != 0:  # schemathesis's own account: each failure with the curl line that repeats it
        text = done.stdout
        cut = min((text.find(h) for h in ("= ERRORS =", "= FAILURES =") if h in text), default=len(text) - 12000)
        cut = text.rfind("\n", 0, max(cut, 0)) + 1
        problems.append(f"schemathesis exited {done.returncode}:\n{text[cut:][:30000]}{done.stderr[-2000:]}")
    if fuzz_server.client.get("/health").status_code != 200:
        problems.append("the server is not healthy after the run")
    log = fuzz_server.log_path.read_text(errors="replace")
    if "Traceback" in log:
        first = max(log.index("Traceback") - 300, 0)
        problems.append(f"tracebacks in the server log, the first:\n{log[first:first + 6000]}")
    if neighbour.failures:
        problems.append(f"{len(neighbour.failures)} plain requests failed beside the fuzzer: {neighbour.failures[:5]}")
    # The run must have exercised the model, not only validation and 404s.
    if generations() - before < 2 * FUZZ_EXAMPLES + 300:  # ~1000 at 100 examples
        problems.append(f"only {generations() - before:.0f} generations reached the model")
    problems += [f"{label}: only {codes.get(200, 0)} requests answered 200 ({codes})"
                 for label in FUZZ_GENERATION if (codes := report["statuses"].get(label, {})).get(200, 0) < 10]
    assert not problems, "\n\n".join(problems)


def test_the_dashboard_only_uses_metrics_the_server_exports(shared_server):
    dashboard = (ROOT / "scripts" / "monitoring" / "grafana-dashboard.json").read_text()
    exported = shared_server.client.get("/metrics").text
    used = set(re.findall(r"ai_server_[a-z_]+", dashboard))
    bases = {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in used}
    assert bases and all(f" {base}" in exported for base in bases), bases - {
        b for b in bases if f" {b}" in exported}
