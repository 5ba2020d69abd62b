"""llama.cpp's server API (section 19) as its clients use it: LLM for Unity 2.x (UnityWebRequest,
Bearer key, its own stream parser), LLM for Unity 3.x (LlamaLib's native client), and plain llama.cpp
clients. Real server process, real SmolLM2 (fp32: greedy replies compared across requests), real key.
The parsers below are written as the clients write them (LLMCaller.cs ConvertContent, LlamaLib's
chunk loop), so a framing change that breaks a client breaks a test."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import ServerProcess, copy_home

KEY = "unity-test-key"
UNITY_2X_AGENT = "UnityPlayer/2022.3.20f1 (UnityWebRequest/1.0, libcurl/8.5.0-DEV)"
LLAMALIB_AGENT = "cpp-httplib/0.20.0"


@pytest.fixture(scope="module")
def unity_server(hub, smollm2_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llamacpp")
    server = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "server.log",
                           AI_SERVER_BACKENDS="transformers", DEFAULT_MODEL="smollm2:135m", EMBED_MODEL="all-minilm",
                           API_KEYS=KEY, DTYPE="fp32")
    yield server.start()
    server.stop()


def client(server: ServerProcess, key: str | None = KEY, agent: str = LLAMALIB_AGENT) -> httpx.Client:
    headers = {"User-Agent": agent, **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.Client(base_url=server.url, headers=headers, timeout=300)


# --- LLM for Unity 2.x: LLMCaller.PostRequest and ConvertContent, in Python ------------------------
def unity_2x_convert_content(response: str) -> dict:
    """LLMCaller.ConvertContent: a streamed body is every `data: ` part joined into one JSON array."""
    response = response.strip()
    if response.startswith("data: "):
        parts = [p for p in response.replace("\n\n", "").split("data: ") if p != ""]
        response = '{"data": [' + ",\n".join(parts) + "]}"
    return json.loads(response)


def unity_2x_post(http: httpx.Client, endpoint: str, body: dict, retries: int = 3) -> tuple[dict | None, int]:
    """LLMCaller.PostRequest: POST, retry on failure with a growing delay, stop at once on 401.
    Returns (parsed result or None, attempts made)."""
    attempts = 0
    for attempt in range(retries):
        attempts += 1
        r = http.post(f"/{endpoint}", content=json.dumps(body), headers={"Content-Type": "application/json"})
        if r.is_success:
            return unity_2x_convert_content(r.text), attempts
        if r.status_code == 401:
            break
        time.sleep(0.05 * (attempt + 1))
    return None, attempts


def unity_2x_multi_chat_content(result: dict) -> str:  # LLMCharacter.MultiChatContent
    return "".join(part["content"] for part in result["data"]).strip()


def test_unity_2x_client_loop_with_key(unity_server):
    http = client(unity_server, agent=UNITY_2X_AGENT)
    template, _ = unity_2x_post(http, "template", {})
    assert template == {"template": "chatml"}  # SmolLM2's template is ChatML: the asset formats with it
    prompt = "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"  # formatted client-side
    request = {"prompt": prompt, "id_slot": -1, "temperature": 0.0, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
               "n_predict": 24, "n_keep": -1, "stop": ["<|im_end|>"], "typical_p": 1.0, "repeat_penalty": 1.1,
               "repeat_last_n": 64, "penalize_nl": True, "presence_penalty": 0.0, "frequency_penalty": 0.0,
               "penalty_prompt": None, "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "seed": 0,
               "ignore_eos": False, "logit_bias": None, "n_probs": 0, "cache_prompt": True, "tfs_z": 1.0}
    streamed, _ = unity_2x_post(http, "completion", {**request, "stream": True})
    whole, _ = unity_2x_post(http, "completion", {**request, "stream": False})
    text = unity_2x_multi_chat_content(streamed)
    assert text and text == whole["content"].strip()  # the asset's parse of the stream gives the same reply
    assert streamed["data"][-1]["stop"] is True and all(not p["stop"] for p in streamed["data"][:-1])

    tokens, _ = unity_2x_post(http, "tokenize", {"content": text})
    assert tokens["tokens"] and all(isinstance(t, int) for t in tokens["tokens"])
    back, _ = unity_2x_post(http, "detokenize", {"tokens": tokens["tokens"]})
    assert back["content"].strip() == text
    embedding, _ = unity_2x_post(http, "embeddings", {"content": text})
    assert len(embedding["embedding"]) == 384  # the asset's EmbeddingsResult: one flat vector (all-minilm)
    assert abs(sum(x * x for x in embedding["embedding"]) - 1.0) < 1e-3  # llama.cpp's default: L2-normalized

    refused, attempts = unity_2x_post(client(unity_server, key="wrong", agent=UNITY_2X_AGENT), "completion", request)
    assert refused is None and attempts == 1  # the asset stops at a 401 instead of retrying
    r = client(unity_server, key=None).post("/completion", json=request)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


# --- LLM for Unity 3.x: LlamaLib's native client -----------------------------------------------------
def llamalib_stream(http: httpx.Client, path: str, body: dict) -> tuple[str, list[int], dict]:
    """LlamaLib's chunk loop: strip `data: `, stop at [DONE] if one comes, accumulate `content` and
    `tokens`; an `error` object is a failure. Returns (content, tokens, last chunk)."""
    content, tokens, last = "", [], {}
    with http.stream("POST", path, json=body, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            line = line.strip()
            if not line:
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise AssertionError(f"stream failed: {chunk['error']}")
            content += chunk.get("content", "")
            tokens += chunk.get("tokens", [])
            last = chunk
    return content, tokens, last


def test_llamalib_3x_client(unity_server):
    http = client(unity_server)
    assert 200 <= http.post("/health").status_code < 300  # LlamaLib's is_server_alive
    props = http.post("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 4096 and props["total_slots"] == 16
    prompt = http.post("/apply-template", json={"messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Say hi."}]}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nBe brief.<|im_end|>" in prompt
    content, tokens, last = llamalib_stream(http, "/completion", {"prompt": prompt, "n_predict": 16, "seed": 7,
                                                                  "temperature": 0.7, "stream": True})
    assert last["stop"] is True and last["tokens_predicted"] == len(tokens) > 0
    detokenized = http.post("/detokenize", json={"tokens": tokens}).json()["content"]  # special tokens shown
    assert detokenized.removesuffix("<|im_end|>") == content  # the chunks' tokens add up, the end token included
    vectors = http.post("/embeddings", json={"content": "hello"}).json()  # llama.cpp's shape for every other client
    assert vectors[0]["index"] == 0 and len(vectors[0]["embedding"]) == 1 and len(vectors[0]["embedding"][0]) == 384


# --- llama.cpp's /completion contract ----------------------------------------------------------------
def test_prompt_forms_and_reply_fields(unity_server):
    http = client(unity_server)
    base = {"n_predict": 4, "temperature": 0}
    text = http.post("/completion", json={**base, "prompt": "The capital of France is"}).json()
    ids = http.post("/tokenize", json={"content": "The capital of France is"}).json()["tokens"]
    by_ids = http.post("/completions", json={**base, "prompt": ids, "return_tokens": True}).json()
    assert by_ids["content"] == text["content"] and len(by_ids["tokens"]) == by_ids["tokens_predicted"] == 4
    assert text["tokens"] == [] and text["stop_type"] == "limit" and text["tokens_evaluated"] == len(ids)
    mixed = http.post("/completion", json={**base, "prompt": ["The capital", *ids[2:]]}).json()
    assert mixed["content"] == text["content"]  # strings and ids in one prompt
    many = http.post("/completion", json={**base, "prompt": ["One, two,", "Red, green,"]}).json()
    assert [m["index"] for m in many] == [0, 1] and all(m["stop"] for m in many)
    only = http.post("/completion", json={**base, "prompt": "Hi", "response_fields": ["content", "timings/prompt_n",
                                                                                     "generation_settings/n_predict"]})
    assert set(only.json()) == {"content", "timings/prompt_n", "generation_settings/n_predict"}
    stopped = http.post("/completion", json={"prompt": "1, 2, 3, 4,", "n_predict": 20, "temperature": 0,
                                             "stop": [" 6"]}).json()
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == " 6" and " 6" not in stopped["content"]
    warm = http.post("/completion", json={"prompt": "Warm this prompt up.", "n_predict": 0}).json()
    assert warm["content"] == "" and warm["tokens_predicted"] == 0  # LLM for Unity's warm-up: the prompt only
    again = http.post("/completion", json={"prompt": "Warm this prompt up.", "n_predict": 1, "cache_prompt": True})
    assert again.json()["timings"]["cache_n"] > 0  # the warm-up filled the prefix cache


def test_n_probs_grammar_and_json_schema(unity_server):
    http = client(unity_server)
    probs = http.post("/completion", json={"prompt": "Once upon a", "n_predict": 3, "temperature": 0,
                                           "n_probs": 3}).json()
    entries = probs["completion_probabilities"]
    assert len(entries) == probs["tokens_predicted"] == 3
    for e in entries:  # greedy: the chosen token is the most likely one
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e["id"] == e["top_logprobs"][0]["id"]
        assert e["logprob"] <= 0 and bytes(e["bytes"]).decode() == e["token"]
    post = http.post("/completion", json={"prompt": "Once upon a", "n_predict": 1, "temperature": 0, "n_probs": 2,
                                          "post_sampling_probs": True}).json()["completion_probabilities"][0]
    assert 0 < post["prob"] <= 1 and len(post["top_probs"]) == 2

    answer = http.post("/completion", json={"prompt": "Is the sky blue? Answer:", "n_predict": 4, "temperature": 1.0,
                                            "seed": 3, "grammar": 'root ::= " yes" | " no"'}).json()
    assert answer["content"] in (" yes", " no")  # the GBNF grammar is enforced while decoding
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    reply = http.post("/completion", json={"prompt": "Alice is 31 years old. As JSON:", "n_predict": 24,
                                           "temperature": 0, "json_schema": schema}).json()
    assert isinstance(json.loads(reply["content"])["age"], int) and reply["stop_type"] == "eos"


def test_errors_in_llama_cpp_shape(unity_server):
    http = client(unity_server)

    def error(path: str, body: dict, status: int, kind: str = "invalid_request_error") -> dict:
        r = http.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == status and err["type"] == kind and err["message"]
        return err

    error("/completion", {"prompt": []}, 400)
    error("/completion", {"prompt": "x", "n_predict": "a"}, 400)
    error("/completion", {"prompt": {"not": "a prompt"}}, 400)
    error("/completion", {"prompt": "x", "grammar": "root ::= undefined-rule"}, 400)
    error("/completion", {"prompt": "x", "mirostat": 2}, 400)
    error("/detokenize", {"tokens": [10 ** 9]}, 400)
    long = error("/completion", {"prompt": "hello " * 5000}, 400, "exceed_context_size_error")
    assert long["n_ctx"] == 4096 and long["n_prompt_tokens"] > 4096
    missing = error("/completion", {"prompt": "x", "model": "nobody/nothing"}, 404, "not_found_error")
    assert "pull it first" in missing["message"]
    error("/infill", {"input_prefix": "def f(", "input_suffix": "):"}, 501, "not_supported_error")  # no FIM tokens
    r = http.post("/nothing-here", json={})
    assert r.status_code == 404  # not a llama.cpp route: the native shape
    r = httpx.post(f"{unity_server.url}/completion", json={"prompt": "x"}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_busy_slots_metrics_and_a_client_that_leaves(start_server, smollm2_home, tmp_path):
    """One slot, no queue: a second request is llama.cpp's 503 while a stream holds the slot; /slots
    shows who holds it; the client leaving mid-stream frees it within moments (it would otherwise
    generate for minutes: end tokens are ignored), and /metrics counted all of it."""
    server = start_server(copy_home(smollm2_home, tmp_path / "busy"), DEFAULT_MODEL="smollm2:135m", NUM_PARALLEL="1",
                          MAX_QUEUE="0")
    http = client(server, key=None)
    body = {"prompt": "Tell me a long story.", "n_predict": -1, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/completion", json=body) as stream:
        first = next(line for line in stream.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["stop"] is False
        slots = http.get("/slots").json()
        assert len(slots) == 1 and slots[0]["is_processing"] and slots[0]["n_prompt_tokens"] > 0
        busy = http.post("/completion", json={"prompt": "Hi", "n_predict": 2})
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "unavailable_error"
        assert busy.headers["Retry-After"]
    deadline = time.monotonic() + 20
    while http.get("/slots").json()[0]["is_processing"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not http.get("/slots").json()[0]["is_processing"], "the slot was not freed when its client left"
    assert http.post("/completion", json={"prompt": "Hi", "n_predict": 2}).status_code == 200  # served again
    metrics = http.get("/metrics").text
    assert 'ai_server_rejected_requests_total{model="smollm2:135m"} 1.0' in metrics
    assert 'route="/completion"' in metrics and 'status="503"' in metrics
    assert "generation cancelled" in server.log()
