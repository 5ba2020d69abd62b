"""LoRA adapters as models: PEFT adapters made here over the tiny test model (tiny/llama-a), published on the local
hub, pulled after their base and served by name on every API by the transformers backend, several at once beside
one copy of the base weights; the batch engine runs rows of different adapters (and the base) in the same step.
Checked against PEFT's own generate on the merged model."""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ollama
import openai
import pytest
from conftest import ServerProcess
from models import make_tiny_lora, make_tiny_model
from test_gguf import BINARY, needs_binary

BASE = "tiny/llama-a"  # seed 0 in conftest's hub
ADAPTERS = {"tiny/lora-one": 11, "tiny/lora-two": 12}
PROMPT = "hello world, the quick"


def adapter_files(seed: int, base_name: str = BASE, **edit) -> dict[str, bytes]:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_model(Path(tmp) / "base", 0)
        folder = make_tiny_lora(Path(tmp) / "lora", base, base_name, seed)
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if edit:
        files["adapter_config.json"] = json.dumps({**json.loads(files["adapter_config.json"]), **edit}).encode()
    return files


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    for name, seed in ADAPTERS.items():
        hub.add_repo(name, adapter_files(seed))
    tmp = tmp_path_factory.mktemp("lora")
    s = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers", DTYPE="fp32").start()
    s.pull_ok(BASE)
    for name in ADAPTERS:
        s.pull_ok(name)
    yield s
    s.stop()


def complete(server, model: str) -> list[int]:
    """The greedy output's token ids (a random model's text may be bytes that decode to nothing)."""
    r = server.client.post("/completion", json={"model": model, "prompt": PROMPT, "n_predict": 8, "temperature": 0,
                                                 "return_tokens": True})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def peft_reference(seed: int) -> list[int]:
    """PEFT's own greedy generate on the base merged with the adapter, in this process (fp32, as the server)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny_model(Path(tmp) / "base", 0)
        lora = make_tiny_lora(Path(tmp) / "lora", base, BASE, seed)
        tok = AutoTokenizer.from_pretrained(base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora)
        model = model.merge_and_unload().eval()
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]  # as /completion tokenizes it
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        return out[0, ids.shape[1]:].tolist()


def test_adapters_are_listed_as_models_of_their_base(server):
    tags = {m["name"]: m for m in server.client.get("/api/tags").json()["models"]}
    for name in ADAPTERS:
        entry = tags[f"{name}:latest"]
        assert entry["details"]["parent_model"] == BASE and entry["details"]["family"] == "lora"
    assert "completion" in ollama.Client(host=server.url).show("tiny/lora-one").capabilities


def test_an_adapter_answers_as_peft_does_and_leaves_the_base_alone(server):
    base_before = complete(server, BASE)
    one, two = complete(server, "tiny/lora-one"), complete(server, "tiny/lora-two")
    assert one == peft_reference(ADAPTERS["tiny/lora-one"])
    assert two == peft_reference(ADAPTERS["tiny/lora-two"])
    assert len({tuple(base_before), tuple(one), tuple(two)}) == 3
    assert complete(server, BASE) == base_before  # attaching adapters changed nothing for the base
    # the openai client names the adapter as its model (as with vLLM's --enable-lora)
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    reply = oa.completions.create(model="tiny/lora-one", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    assert reply.model == "tiny/lora-one" and len(reply.choices[0].logprobs.tokens) == len(one)


def test_adapters_and_base_interleaved_keep_their_own_outputs(server):
    want = {m: complete(server, m) for m in (BASE, *ADAPTERS)}
    models = [m for _ in range(16) for m in (BASE, *ADAPTERS)]
    with ThreadPoolExecutor(len(models)) as pool:
        got = list(pool.map(lambda m: (m, complete(server, m)), models))
    assert all(text == want[m] for m, text in got), [x for x in got if x[1] != want[x[0]]]
    entry = next(m for m in server.client.get("/status").json()["cache"] if m["name"].startswith(BASE))
    assert entry["batching"]["steps"] > 0 and entry["batching"]["running_rows"] == 0


def test_llama_cpp_lora_adapters_and_per_request_lora(server):
    """llama.cpp's /lora-adapters lists a base's adapters by id; a /completion's `lora` picks one by id (on
    transformers: one at scale 1, as naming it would)."""
    listed = server.client.get("/lora-adapters", params={"model": BASE}).json()
    assert [a["id"] for a in listed] == list(range(len(listed))) and all(a["scale"] == 0.0 for a in listed)
    one = next(a["id"] for a in listed if "lora-one" in a["path"])
    r = server.client.post("/completion", json={"model": BASE, "prompt": PROMPT, "n_predict": 8, "temperature": 0,
                                                 "return_tokens": True, "lora": [{"id": one, "scale": 1.0}]})
    assert r.status_code == 200 and r.json()["tokens"] == complete(server, "tiny/lora-one"), r.text
    for lora, says in (([{"id": one, "scale": 0.5}], "one adapter runs at a time"), ([{"id": 99, "scale": 1}],
                                                                                       "invalid adapter id 99")):
        r = server.client.post("/completion", json={"model": BASE, "prompt": PROMPT, "n_predict": 2, "lora": lora})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    r = server.client.post("/lora-adapters", params={"model": BASE}, json=[{"id": one, "scale": 0.5}])
    assert r.status_code == 400 and "global scales are llama-server's" in r.json()["error"]["message"]


def test_adapters_add_their_size_not_the_base(server, hub):
    hub.add_repo("tiny/lora-three", adapter_files(15))
    server.pull_ok("tiny/lora-three")
    three = [*ADAPTERS, "tiny/lora-three"]

    def memory() -> int:
        return next(m for m in server.client.get("/status").json()["cache"] if m["name"].startswith(BASE))[
            "memory_bytes"]

    server.client.post("/api/generate", json={"model": BASE, "keep_alive": 0})  # unloaded: then the base alone
    complete(server, BASE)
    alone = memory()
    for name in three:
        complete(server, name)
    ps = server.client.get("/api/ps").json()["models"]
    assert [m["name"] for m in ps] == [f"{BASE}:latest"]  # one copy of the base: the adapters live in it
    sizes = {m["name"]: m["size"] for m in server.client.get("/api/tags").json()["models"]}
    adapters = sum(sizes[f"{n}:latest"] for n in three)
    assert adapters < sizes[f"{BASE}:latest"] / 4
    assert memory() == alone + adapters


def test_an_adapter_needs_its_base_pulled_first(server, hub):
    hub.add_repo("tiny/lora-of-b", adapter_files(13, base_name="tiny/llama-b"))
    job = server.wait_job(server.pull("tiny/lora-of-b")["job_id"])
    assert job["status"] == "failed" and "pull 'tiny/llama-b' first" in job["error"], job
    hub.add_repo("tiny/lora-mistral", adapter_files(14, auto_mapping={"base_model_class": "MistralForCausalLM"}))
    job = server.wait_job(server.pull("tiny/lora-mistral")["job_id"])
    assert job["status"] == "failed" and "made for a MistralForCausalLM" in job["error"], job
    r = server.client.post("/api/chat", json={"model": "tiny/lora-nothing", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert r.status_code == 404


def test_ollama_create_with_adapters_serves_base_plus_adapter(server, tmp_path):
    """Modelfile FROM + ADAPTER through the ollama client: blobs uploaded, then create(from_, adapters)."""
    client = ollama.Client(host=server.url)
    digests = {}
    for name, data in adapter_files(ADAPTERS["tiny/lora-one"]).items():
        (tmp_path / name).write_bytes(data)
        digests[name] = client.create_blob(tmp_path / name)
    client.create(model="my-lora", from_=BASE, adapters=digests, system="You are terse.")
    assert complete(server, "my-lora") == complete(server, "tiny/lora-one")
    show = client.show("my-lora")
    assert show.details.parent_model == BASE and show.details.family == "lora"
    r = server.client.post("/api/create", json={"model": "bad-lora", "from": "tiny/lora-one", "adapters": digests})
    assert r.status_code == 400 and "itself a LoRA adapter" in r.json()["error"]
    r = server.client.post("/api/create", json={"model": "bad-lora", "adapters": digests})
    assert r.status_code == 400 and "need `from`" in r.json()["error"]


# --- GGUF: a LoRA of SmolLM2 converted by llama.cpp's convert_lora_to_gguf.py, on the embedded Q4_1 GGUF, served
# by the real llama-server (--lora-scaled at 0; every request sends every scale)
PULLED_ADAPTER = "hf.co/ggml-org/LoRA-SmolLM2-135M-Instruct-test-F16-GGUF"
GGUF_BASE = "hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_1"  # a re-upload, as most GGUF bases are


def llama_text(url: str, body: dict) -> str:
    import httpx

    r = httpx.post(f"{url}/completion", timeout=120, json={"prompt": "Once upon a time", "n_predict": 16,
                                                            "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()["content"]


@needs_binary
def test_gguf_adapters_on_llama_server_match_bare_llama_server(hub, start_server, smollm2_dir, tmp_path):
    import httpx
    from conftest import BareLlamaServer
    from gguf_files import smollm2_lora_gguf
    from test_gguf import embedded_gguf

    hub.add_repo("bartowski/SmolLM2-135M-Instruct-GGUF", {"SmolLM2-135M-Instruct-Q4_1.gguf":
                                                           embedded_gguf().read_bytes()})
    adapter = smollm2_lora_gguf(smollm2_dir, tmp_path, seed=0)
    # a GGUF adapter repo, as ggml-org publishes them: the file names its HF base (general.base_model.0)
    hub.add_repo("ggml-org/LoRA-SmolLM2-135M-Instruct-test-F16-GGUF", {adapter.name: adapter.read_bytes()})
    s = start_server(AI_SERVER_BACKENDS="llamacpp", LLAMA_SERVER=str(BINARY), NUM_PARALLEL="2")
    job = s.wait_job(s.pull(PULLED_ADAPTER)["job_id"])
    assert job["status"] == "failed" and "no GGUF of it is pulled here" in job["error"], job
    s.pull_ok(GGUF_BASE)
    base_before = llama_text(s.url, {"model": GGUF_BASE})
    client = ollama.Client(host=s.url)
    client.create(model="smol-lora", from_=GGUF_BASE, adapters={adapter.name: client.create_blob(adapter)})
    assert client.show("smol-lora").details.parent_model == GGUF_BASE.removeprefix("hf.co/")
    ours = llama_text(s.url, {"model": "smol-lora"})
    assert ours != base_before and llama_text(s.url, {"model": GGUF_BASE}) == base_before
    listed = s.client.get("/lora-adapters", params={"model": GGUF_BASE}).json()
    assert [(a["id"], a["scale"], Path(a["path"]).name) for a in listed] == [(0, 0.0, adapter.name)]
    assert llama_text(s.url, {"model": GGUF_BASE, "lora": [{"id": 0, "scale": 1.0}]}) == ours
    half = llama_text(s.url, {"model": GGUF_BASE, "lora": [{"id": 0, "scale": 0.5}]})
    # llama.cpp's global scales: the base's requests without `lora` take them, and the cache never mixes them
    assert s.client.post("/lora-adapters", params={"model": GGUF_BASE}, json=[{"id": 0, "scale": 1.0}]).json() == {
        "success": True}
    assert llama_text(s.url, {"model": GGUF_BASE}) == ours
    assert s.client.get("/lora-adapters", params={"model": GGUF_BASE}).json()[0]["scale"] == 1.0
    s.client.post("/lora-adapters", params={"model": GGUF_BASE}, json=[])
    assert llama_text(s.url, {"model": GGUF_BASE}) == base_before
    r = s.client.post("/completion", json={"model": GGUF_BASE, "prompt": "x", "lora": [{"id": 3, "scale": 1}]})
    assert r.status_code == 400 and "invalid adapter id 3" in r.json()["error"]["message"]
    # bare llama-server on the same files: the adapter at 1 and at 0.5 give the same text as ours
    bare = BareLlamaServer(BINARY, tmp_path / "llama-server.log", "-m", str(embedded_gguf()), "--lora-scaled",
                           f"{adapter}:0", "-c", "512")
    try:
        assert llama_text(bare.url, {"lora": [{"id": 0, "scale": 1.0}]}) == ours
        assert llama_text(bare.url, {"lora": [{"id": 0, "scale": 0.5}]}) == half
        assert llama_text(bare.url, {"lora": [{"id": 0, "scale": 0.0}]}) == base_before
        assert [set(a) for a in httpx.get(f"{bare.url}/lora-adapters").json()] == [set(a) for a in listed]
    finally:
        bare.stop()
    # the same adapter pulled from the hub: matched to the GGUF base here (its repo's stem), served by name
    s.pull_ok(PULLED_ADAPTER)
    assert client.show(PULLED_ADAPTER).details.parent_model == GGUF_BASE.removeprefix("hf.co/")
    assert llama_text(s.url, {"model": PULLED_ADAPTER}) == ours
    assert len(s.client.get("/lora-adapters", params={"model": GGUF_BASE}).json()) == 2
