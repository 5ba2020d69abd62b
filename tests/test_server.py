"""End to end: ai-server as a real process, pulling through snapshot_download from the local hub."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ROOT, SMOLLM2_REPO, copy_home, free_port

FRANCE = "What is the capital of France? Answer in one sentence."


# --- the real model, the default model, and a restart -------------------------------------
def test_smollm2_pull_chat_restart(start_server, hub, smollm2_dir, smollm2_home, tmp_path):
    hub.add_dir(SMOLLM2_REPO, smollm2_dir)
    # The home already holds the embedded default, imported by `app.py import-default`.
    server = start_server(home=copy_home(smollm2_home, tmp_path / "home"), DEFAULT_MODEL="smollm2:135m")

    default = server.chat("smollm2:135m", FRANCE, temperature=0, max_tokens=40)
    assert default.status_code == 200, default.text
    assert "Paris" in default.json()["message"]["content"]

    accepted = server.pull(SMOLLM2_REPO)
    assert accepted["status"] == "queued" and accepted["model"] == SMOLLM2_REPO
    seen_running = []
    while (job := server.client.get(f"/jobs/{accepted['job_id']}").json())["status"] not in ("succeeded", "failed"):
        if job["status"] == "running" and job["total_bytes"]:
            seen_running.append(job)
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    total = sum(len(f.data) for f in hub.repos[SMOLLM2_REPO.lower()].files.values())
    assert job["total_bytes"] == job["downloaded_bytes"] == total and job["progress"] == 1.0
    assert all(0 <= j["progress"] <= 1 for j in seen_running)
    assert job["created_at"].endswith("Z") and job["finished_at"] >= job["started_at"] >= job["created_at"]

    entry = server.model(SMOLLM2_REPO)
    assert entry["architecture"] == "LlamaForCausalLM" and entry["size_bytes"] == total
    assert entry["sha"] == hub.repos[SMOLLM2_REPO.lower()].sha and entry["quantization"] == "no"

    reply = server.chat(SMOLLM2_REPO, FRANCE, temperature=0, max_tokens=40).json()
    assert "Paris" in reply["message"]["content"]
    assert reply["message"]["role"] == "assistant" and reply["done"] is True and reply["done_reason"] == "stop"
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(reply[key], int) and reply[key] > 0, key
    assert reply["total_duration"] >= reply["load_duration"] + reply["eval_duration"]
    assert reply["prompt_eval_count"] > 10 and 0 < reply["eval_count"] <= 40

    again = server.chat(SMOLLM2_REPO, FRANCE, temperature=0, max_tokens=40).json()
    assert again["load_duration"] == 0 and again["message"] == reply["message"]  # cached; greedy repeats

    server.restart()
    hub_calls = len(hub.requests)
    names = {m["name"] for m in server.client.get("/models").json()["models"]}
    assert {SMOLLM2_REPO, "smollm2:135m"} <= names
    after = server.chat(SMOLLM2_REPO, FRANCE, temperature=0, max_tokens=40).json()
    assert after["message"] == reply["message"] and after["load_duration"] > 0
    assert len(hub.requests) == hub_calls  # loaded from local files: no hub call of any kind


def test_default_model_is_imported_at_startup(start_server):
    """A fresh home with DEFAULT_MODEL set: the server imports the embedded GGUF before serving."""
    server = start_server(DEFAULT_MODEL="smollm2:135m")
    entry = server.model("smollm2:135m")
    assert entry["source"] == "embedded" and entry["architecture"] == "LlamaForCausalLM"
    assert (server.home / "models" / "smollm2-135m" / "model.safetensors").is_file()
    stopped = server.chat("smollm2:135m", FRANCE, temperature=0, max_tokens=40, stop=["Paris"]).json()
    assert stopped["message"]["content"].strip() == "The capital of France is" and stopped["done_reason"] == "stop"
    short = server.chat("smollm2:135m", "Write a long story about a dragon.", temperature=0, max_tokens=6).json()
    assert (short["eval_count"], short["done_reason"]) == (6, "length")


# --- pulls: jobs, errors, faults --------------------------------------------------------------
def test_pull_validation_is_400(shared_server):
    for body in ({"model": "../../etc/passwd"}, {"model": "/abs/path"}, {"model": "a/b/c"},
                 {"model": "ok/name", "quantize": "q3"}, {"model": "ok/name", "revision": "../x"}, {}):
        r = shared_server.client.post("/pull", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"].startswith("invalid request:"), r.text
    r = shared_server.client.post("/pull", content=b"{not json")
    assert r.status_code == 400


def test_unknown_repo_and_revision_fail_clearly(shared_server):
    missing = shared_server.wait_job(shared_server.pull("nobody/nothing")["job_id"])
    assert missing["status"] == "failed" and "not found" in missing["error"] and "HF_TOKEN" in missing["error"]
    bad_rev = shared_server.wait_job(shared_server.pull("tiny/llama-a", revision="v9")["job_id"])
    assert bad_rev["status"] == "failed" and "revision 'v9' not found" in bad_rev["error"]
    assert shared_server.model("nobody/nothing") is None and shared_server.model("tiny/llama-a") is None


def test_jobs_listing_and_404(shared_server):
    first = shared_server.pull_ok("tiny/llama-b")
    second = shared_server.pull_ok("tiny/llama-c")
    listed = shared_server.client.get("/jobs").json()["jobs"]
    ids = [j["job_id"] for j in listed]
    assert ids.index(second["job_id"]) < ids.index(first["job_id"])  # newest first
    r = shared_server.client.get("/jobs/does-not-exist")
    assert r.status_code == 404 and "GET /jobs" in r.json()["error"]


def test_dropped_connection_is_retried_within_a_pull(shared_server, hub, fresh_repo):
    hub.drop(fresh_repo, "model.safetensors", after_bytes=50_000, times=1)
    shared_server.pull_ok(fresh_repo)
    # huggingface_hub retried the broken GET itself (from byte 0 here: it reads 10 MB chunks,
    # so a drop inside a 400 KB file leaves no whole chunk to resume from).
    assert len(hub.gets(fresh_repo, "model.safetensors")) == 2
    assert shared_server.model(fresh_repo)["size_bytes"] > 50_000


def test_hub_dropping_mid_file_fails_then_next_pull_succeeds(shared_server, hub, fresh_repo):
    hub.drop(fresh_repo, "model.safetensors", after_bytes=50_000, times=99)
    failed = shared_server.wait_job(shared_server.pull(fresh_repo)["job_id"])
    assert failed["status"] == "failed" and "connection lost" in failed["error"] and "pull again" in failed["error"]
    assert shared_server.model(fresh_repo) is None  # never half-registered
    small_files = {p for _, p, _ in hub.gets(fresh_repo) if not p.endswith("model.safetensors")}
    hub.drops.clear()
    shared_server.pull_ok(fresh_repo)
    assert shared_server.model(fresh_repo) is not None
    assert shared_server.chat(fresh_repo, max_tokens=4).status_code == 200
    # Files completed by the failed pull are kept: the second pull fetched only the broken one.
    refetched = [p for _, p, _ in hub.gets(fresh_repo) if p in small_files]
    assert len(refetched) == len(small_files)


def test_concurrent_pulls_of_one_model_share_one_job(shared_server, hub, fresh_repo):
    with ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(lambda _: shared_server.pull(fresh_repo), range(6)))
    assert len({j["job_id"] for j in jobs}) == 1
    shared_server.wait_job(jobs[0]["job_id"])
    per_file = {}
    for _, path, _ in hub.gets(fresh_repo):
        per_file[path] = per_file.get(path, 0) + 1
    assert per_file and set(per_file.values()) == {1}  # each file downloaded once


def test_model_not_pulled_is_404(shared_server):
    r = shared_server.chat("tiny/never-pulled")
    assert r.status_code == 404
    assert r.json()["error"] == ("model 'tiny/never-pulled' not found locally; pull it first: "
                                 "POST /pull {\"model\": \"tiny/never-pulled\"}")
    assert shared_server.client.delete("/models/tiny/never-pulled").status_code == 404


def test_chat_validation_is_400(shared_server):
    too_many = [{"role": "user", "content": "a"}] * 1001
    for body in ({"model": "x", "messages": []}, {"model": "x", "messages": [{"role": "robot", "content": "a"}]},
                 {"model": "x", "messages": too_many},
                 {"model": "x", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0},
                 {"model": "x", "messages": [{"role": "user", "content": "a"}], "temperature": -1}):
        r = shared_server.client.post("/chat", json=body)
        assert r.status_code == 400 and "invalid request" in r.json()["error"], r.text


# --- loading: failures, single flight, LRU, quantization ---------------------------------------
def test_all_backends_failing_cools_down_with_reasons(shared_server):
    shared_server.pull_ok("tiny/corrupt")
    r = shared_server.chat("tiny/corrupt")
    assert r.status_code == 429 and 0 < int(r.headers["Retry-After"]) <= 60
    body = r.json()
    assert [a["backend"] for a in body["attempts"]] == ["transformers", "pipeline"]
    assert all(a["error"] for a in body["attempts"]) and "failed to load on every backend" in body["error"]
    second = shared_server.chat("tiny/corrupt")
    assert second.status_code == 429 and second.json()["attempts"] == body["attempts"]
    cooldowns = shared_server.client.get("/status").json()["cooldowns"]
    assert 0 < cooldowns["tiny/corrupt"]["remaining_s"] <= 60
    assert shared_server.client.get("/status").json()["loads_total"].get("tiny/corrupt") is None


def test_init_reports_load_failure_on_the_job(shared_server):
    job = shared_server.pull_ok("tiny/corrupt", init=True)
    assert job["status"] == "succeeded" and "failed to load" in job["init_error"]


def test_concurrent_first_chats_load_once(start_server):
    server = start_server()
    assert server.client.get("/models").json() == {"models": []}  # DEFAULT_MODEL="" turns the import off
    server.pull_ok("tiny/llama-g")
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: server.chat("tiny/llama-g", max_tokens=8), range(5)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert server.client.get("/status").json()["loads_total"] == {"tiny/llama-g": 1}
    assert sum(r.json()["load_duration"] > 0 for r in replies) == 1  # only the request that loaded it


def test_lru_eviction_order(start_server):
    server = start_server(MAX_CACHE_MODELS="2")
    for name in ("a", "b", "c"):
        server.pull_ok(f"tiny/llama-{name}")

    def cache():
        return [m["name"] for m in server.client.get("/status").json()["cache"]]

    for name in ("a", "b", "a"):  # a hit refreshes a's recency
        assert server.chat(f"tiny/llama-{name}", max_tokens=2).status_code == 200
    assert cache() == ["tiny/llama-b", "tiny/llama-a"]  # least recently used first
    server.chat("tiny/llama-c", max_tokens=2)
    assert cache() == ["tiny/llama-a", "tiny/llama-c"]  # b was evicted, not a
    assert server.model("tiny/llama-b")["loaded"] is False
    assert server.client.get("/status").json()["loads_total"] == {"tiny/llama-a": 1, "tiny/llama-b": 1,
                                                                  "tiny/llama-c": 1}


def test_auto_quantization_loads_4bit_above_threshold(start_server):
    server = start_server(MODEL_Q4_THRESHOLD_BYTES="1")
    server.pull_ok("tiny/llama-h", init=True)
    entry = server.model("tiny/llama-h")
    assert (entry["quantization"], entry["loaded"], entry["quantized"]) == ("q4", True, "4bit")
    assert server.chat("tiny/llama-h", max_tokens=4).status_code == 200


def test_explicit_quantization_is_recorded_and_remote_code_is_the_operators(shared_server):
    r = shared_server.client.post("/pull", json={"model": "tiny/llama-i", "trust_remote_code": True})
    assert r.status_code == 403 and "ALLOW_REMOTE_CODE" in r.json()["error"]  # allowed: tests/test_safety.py
    shared_server.pull_ok("tiny/llama-i", quantize="q8")
    assert shared_server.chat("tiny/llama-i", max_tokens=3).status_code == 200
    entry = shared_server.model("tiny/llama-i")
    assert (entry["quantization"], entry["quantized"], entry["trust_remote_code"]) == ("q8", "8bit", False)
    assert entry["backend"] == "transformers"


def test_model_without_chat_template_uses_plain_prompt(shared_server):
    shared_server.pull_ok("tiny/no-template")
    reply = shared_server.chat("tiny/no-template", max_tokens=3, temperature=0)
    assert reply.status_code == 200 and reply.json()["prompt_eval_count"] > 0


def test_delete_unloads_and_removes_files(shared_server):
    shared_server.pull_ok("tiny/llama-j")
    shared_server.chat("tiny/llama-j", max_tokens=2)
    folder = shared_server.home / "hf-cache" / "models--tiny--llama-j"
    assert folder.is_dir()
    r = shared_server.client.delete("/models/tiny/llama-j")
    assert r.status_code == 200 and r.json() == {"deleted": "tiny/llama-j"}
    assert not folder.exists() and shared_server.model("tiny/llama-j") is None
    assert "tiny/llama-j" not in [m["name"] for m in shared_server.client.get("/status").json()["cache"]]
    assert shared_server.chat("tiny/llama-j").status_code == 404


# --- serving while busy, restarts, introspection ------------------------------------------------
def test_status_answers_during_a_long_generation(start_server, smollm2_home, tmp_path):
    server = start_server(home=copy_home(smollm2_home, tmp_path / "home"))
    server.chat("smollm2:135m", max_tokens=1)  # load first
    order = []

    def long_chat():
        server.chat("smollm2:135m", "Tell me a very long story.", max_tokens=300, temperature=0)
        order.append("chat")

    worker = threading.Thread(target=long_chat)
    worker.start()
    time.sleep(1.0)  # the generation is under way
    for _ in range(3):
        assert server.client.get("/status", timeout=10).status_code == 200
        order.append("status")
    worker.join()
    assert order == ["status", "status", "status", "chat"]


def test_interrupted_pull_is_failed_after_restart(start_server, hub):
    release = hub.stall("tiny/llama-k", "model.safetensors")
    server = start_server()
    job_id = server.pull("tiny/llama-k")["job_id"]
    while server.client.get(f"/jobs/{job_id}").json()["status"] != "running":
        time.sleep(0.05)
    server.stop(signal.SIGKILL)  # the process dies mid-download
    release.set()
    server.start()
    job = server.client.get(f"/jobs/{job_id}").json()
    assert (job["status"], job["error"]) == ("failed", "interrupted by restart")
    assert server.model("tiny/llama-k") is None
    del hub.stalls[("tiny/llama-k", "model.safetensors")]
    server.pull_ok("tiny/llama-k")  # and a new pull works


def test_health_status_diag(shared_server):
    assert shared_server.client.get("/health").json() == {"status": "ok"}
    status = shared_server.client.get("/status").json()
    assert [(b["name"], b["available"]) for b in status["backends"]] == [  # the chain, then image and speech
        (name, True) for name in ("transformers", "pipeline", "diffusers", "faster-whisper", "transformers-asr",
                                  "piper", "transformers-tts")]
    assert status["bitsandbytes"]["usable"] is True
    assert status["config"]["max_cache_models"] == 2 and "hf_token" not in status["config"]
    diag = shared_server.client.get("/diag").json()
    assert diag["torch"].startswith("2.13.0") and diag["cuda_available"] is False
    assert diag["packages"]["bitsandbytes"] == "0.50.2"


def test_health_is_503_without_a_usable_backend(start_server):
    server = start_server(AI_SERVER_BACKENDS="vllm")  # vllm is not installed in this venv
    r = server.client.get("/health")
    assert r.status_code == 503 and "no backend" in r.json()["status"]
    status = server.client.get("/status").json()
    assert status["backends"][0]["error"].startswith("ModuleNotFoundError")


def test_curl_style_body_without_json_content_type(shared_server):
    r = httpx.post(f"{shared_server.url}/chat", content=b'{"model":"tiny/never","messages":[{"role":"user","content":"x"}]}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 404  # parsed as JSON, then the model is unknown


@pytest.mark.parametrize("path", ["/models", "/jobs", "/status", "/diag", "/health"])
def test_introspection_routes_answer_json(shared_server, path):
    r = shared_server.client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")


def test_smoke_script_runs_the_seed_flow(shared_server):
    """scripts/smoke.sh (the bash twin of scripts/dai-cazzo.ps1) against a real server."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "smoke.sh"), "tiny/llama-a"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "BASE": shared_server.url})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pull job" in done.stdout and "smoke OK" in done.stdout


def test_pulls_beyond_the_limit_wait_queued_and_progress_is_visible(start_server, hub):
    release = hub.stall("tiny/llama-a", "model.safetensors")
    server = start_server(MAX_CONCURRENT_PULLS="1")
    first = server.pull("tiny/llama-a")["job_id"]
    while (running := server.client.get(f"/jobs/{first}").json())["status"] != "running":
        time.sleep(0.05)
    second = server.pull("tiny/llama-b")["job_id"]
    time.sleep(1.0)  # ample time for a free slot to be taken, were there one
    assert server.client.get(f"/jobs/{second}").json()["status"] == "queued"
    while (running := server.client.get(f"/jobs/{first}").json())["downloaded_bytes"] == 0:
        time.sleep(0.05)  # the small files arrive first; the weights hang in the hub
    total = sum(len(f.data) for f in hub.repos["tiny/llama-a"].files.values())
    assert running["total_bytes"] == total and 0 < running["downloaded_bytes"] < total
    assert 0 < running["progress"] < 1
    release.set()
    del hub.stalls[("tiny/llama-a", "model.safetensors")]
    # The stalled GET is cut; huggingface_hub retries it and the pull completes; then the next runs.
    assert server.wait_job(first)["status"] == "succeeded"
    assert server.wait_job(second)["status"] == "succeeded"


def test_gated_repo_needs_hf_token(start_server, hub):
    hub.add_repo("tiny/gated", {p: f.data for p, f in hub.repos["tiny/llama-a"].files.items()})
    hub.gate("tiny/gated", "hf_secret")
    without = start_server()
    job = without.wait_job(without.pull("tiny/gated")["job_id"])
    assert job["status"] == "failed" and "gated" in job["error"] and "HF_TOKEN" in job["error"]
    with_token = start_server(HF_TOKEN="hf_secret")
    with_token.pull_ok("tiny/gated")
    assert "Bearer hf_secret" in hub.auth_seen
    assert "hf_secret" not in with_token.client.get("/status").text
    assert "hf_secret" not in with_token.log()


def test_unreachable_hub_fails_clearly(start_server):
    server = start_server(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    job = server.wait_job(server.pull("tiny/llama-a")["job_id"])
    assert job["status"] == "failed" and "hub unreachable" in job["error"] and "pull again" in job["error"]


def test_running_request_keeps_its_model_through_eviction(start_server):
    server = start_server(MAX_CACHE_MODELS="1")
    server.pull_ok("tiny/llama-a")
    server.pull_ok("tiny/llama-b")
    server.chat("tiny/llama-a", max_tokens=1)
    results = {}

    def long_chat():
        results["a"] = server.chat("tiny/llama-a", max_tokens=3000, temperature=0)

    worker = threading.Thread(target=long_chat)
    worker.start()
    time.sleep(0.5)  # a's generation is under way
    results["b"] = server.chat("tiny/llama-b", max_tokens=2)  # evicts a while it is in use
    assert [m["name"] for m in server.client.get("/status").json()["cache"]] == ["tiny/llama-b"]
    worker.join()
    assert results["b"].status_code == 200
    a = results["a"].json()
    assert results["a"].status_code == 200 and a["prompt_eval_count"] + a["eval_count"] == 512  # capped by the context
