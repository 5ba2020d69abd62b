"""Continuous batching and prefix reuse on the transformers backend, with the real SmolLM2 weights.

Correctness, not speed (speed is scripts/bench.py's): rows batched together give what they give
alone, each row keeps its own limit, stop strings and sampling, rows share forward passes, and
a chat's next turn reuses the previous turn's KV without changing a token.
"""

from __future__ import annotations

import asyncio
import json
import threading

import ollama
import pytest

import app

PROMPTS = ["Tell me a story about a cat.", "What is 2+2?", "List five fruits, one per line.",
           "Write a long poem about the sea, the wind and the stars at night."]


def load(path, quantization="fp32", **settings):
    backend = app.TransformersBackend(app.Settings(**settings))
    dtype = app.choose_dtype(quantization, "auto", "cpu")
    return backend, backend.load(app.LoadPlan("smollm2", str(path), quantization, False, "cpu", dtype))


def run(backend, loaded, prompt, params):
    return backend.generate(loaded, prompt, params, app.DecodeState(loaded.tokenizer, params, lambda text: None))


def concurrently(fn, args_list):
    results = [None] * len(args_list)

    def one(i, args):
        results[i] = fn(*args)

    threads = [threading.Thread(target=one, args=(i, args)) for i, args in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def chat_prompt(loaded, text):
    return app.render_chat_prompt(loaded.tokenizer, [{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    backend, loaded = load(smollm2_dir)
    assert loaded.engine is not None  # Llama's cache is plain per-layer KV: batchable
    yield backend, loaded
    backend.unload(loaded)


def test_batched_rows_equal_unbatched_and_bare_generate(smollm2):
    """Temperature 0, fp32: four prompts of different lengths, batched together, give token for
    token what each gives alone through the engine and through bare model.generate()."""
    backend, loaded = smollm2
    model = loaded.handle
    prompts = [chat_prompt(loaded, p) for p in PROMPTS]
    params = app.GenParams(max_tokens=48, temperature=0)
    bare = app.Loaded(model, loaded.tokenizer, **app.describe_hf_model(model))  # no engine: generate()
    expected = [run(backend, bare, p, params).output_ids for p in prompts]
    alone = [run(backend, loaded, p, params).output_ids for p in prompts]
    steps_before = loaded.engine.steps
    together = concurrently(lambda p: run(backend, loaded, p, params), [(p,) for p in prompts])
    assert alone == expected
    assert [r.output_ids for r in together] == expected
    assert len({len(ids) for ids in expected}) > 1  # rows of different lengths left at different steps
    # Shared forward passes: far fewer decoding steps than tokens generated.
    assert loaded.engine.steps - steps_before <= max(len(ids) for ids in expected) + len(prompts)
    assert sum(len(ids) for ids in expected) > 2 * (loaded.engine.steps - steps_before)


def test_each_row_keeps_its_own_limit_stop_sampling_and_format(smollm2):
    backend, loaded = smollm2
    story = chat_prompt(loaded, PROMPTS[0])
    cases = [
        app.GenParams(max_tokens=5, temperature=0),                               # its own limit
        app.GenParams(max_tokens=60, temperature=0, stop=["."]),                  # its own stop string
        app.GenParams(max_tokens=20, temperature=0.9, seed=11),                   # its own seeded sampler
        app.GenParams(max_tokens=40, temperature=0, format={"type": "object", "properties": {
            "name": {"type": "string"}}, "required": ["name"]}),                  # its own grammar
        app.GenParams(max_tokens=30, temperature=0, repeat_penalty=1.5),         # its own penalty
    ]
    alone = [run(backend, loaded, story, params) for params in cases]
    together = concurrently(lambda params: run(backend, loaded, story, params), [(p,) for p in cases])
    assert [r.text for r in together] == [r.text for r in alone]
    limited, stopped, sampled, formatted, penalised = together
    assert (limited.output_tokens, limited.done_reason) == (5, "length")
    assert stopped.done_reason == "stop" and "." not in stopped.text and stopped.output_tokens < 60
    assert 0 < sampled.output_tokens <= 20
    assert "name" in json.loads(formatted.text)
    greedy = run(backend, loaded, story, app.GenParams(max_tokens=30, temperature=0))
    assert penalised.text != greedy.text  # the penalty applied to that row only


def test_a_finished_row_frees_its_place_while_others_run(smollm2):
    """Continuous, not static, batching: a short request that arrives while a long one runs
    finishes first, without waiting for the long one."""
    backend, loaded = smollm2
    long_params = app.GenParams(max_tokens=200, temperature=0)
    order: list[str] = []
    started = threading.Event()

    def long_request():
        gen = app.DecodeState(loaded.tokenizer, long_params, lambda text: started.set())
        backend.generate(loaded, chat_prompt(loaded, PROMPTS[3]), long_params, gen)
        order.append("long")

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(60)
    short = run(backend, loaded, chat_prompt(loaded, PROMPTS[1]), app.GenParams(max_tokens=4, temperature=0))
    order.append("short")
    thread.join(120)
    assert short.output_tokens == 4 and order == ["short", "long"]


def test_prefix_reuse_gives_identical_text_and_prefills_only_the_new_turn(smollm2_dir):
    """A 4-turn chat, with and without the prefix cache: the same text at every turn; with the
    cache, each later turn starts from the previous turn's KV. In fp32, as every equality test here:
    on a CPU with native bf16 (avx512_bf16, amx) the bf16 sums of a suffix-only prefill round
    differently from a whole one, and the greedy text diverged (before this change too)."""
    transcripts = {}
    for label, cache_bytes in (("reuse", 256 * 2**20), ("none", 0)):
        backend, loaded = load(smollm2_dir, "fp32", prefix_cache_bytes=cache_bytes)
        messages, replies, reused = [], [], []
        for question in ("Name a colour.", "Why that one?", "Name another.", "Which of the two is warmer?"):
            messages.append({"role": "user", "content": question})
            before = loaded.engine.prefix.reused_tokens
            prompt = app.render_chat_prompt(loaded.tokenizer, messages)
            reply = run(backend, loaded, prompt, app.GenParams(max_tokens=24, temperature=0)).text
            reused.append((loaded.engine.prefix.reused_tokens - before, len(prompt.ids)))
            messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
        transcripts[label] = (replies, reused)
        backend.unload(loaded)
    assert transcripts["reuse"][0] == transcripts["none"][0]
    assert all(n == 0 for n, _ in transcripts["none"][1])
    first, *later = transcripts["reuse"][1]
    assert first[0] == 0
    # Each later turn reuses all of the previous prompt at least.
    assert all(n >= prev_len for (n, _), (_, prev_len) in zip(later, transcripts["reuse"][1]))


def test_dtype_is_bf16_on_cpus_that_compute_it_and_fp32_when_asked():
    native = app.cpu_native_bf16()
    assert app.choose_dtype("no", "auto", "cpu") == ("bf16" if native else "fp32")
    assert app.choose_dtype("auto", "auto", "cpu") == ("bf16" if native else "fp32")
    assert app.choose_dtype("no", "fp32", "cpu") == "fp32"  # DTYPE=fp32
    assert app.choose_dtype("fp32", "bf16", "cpu") == "fp32"  # a model's own quantize wins
    assert app.choose_dtype("no", "auto", "cuda") == "auto"  # GPUs: the checkpoint's dtype


def test_prefix_cache_is_bounded_by_bytes():
    def kv(n):
        return [(app.torch.zeros(1, 2, n, 4), app.torch.zeros(1, 2, n, 4))]  # 2*2*n*4*4 bytes = 64n

    cache = app.PrefixCache(max_bytes=64 * 25)
    cache.store([1, 2, 3], kv(3))
    cache.store([1, 2, 3, 4, 5], kv(5))  # extends the first: replaces it
    assert list(cache.entries) == [(1, 2, 3, 4, 5)] and cache.bytes == 64 * 5
    cache.store([7] * 10, kv(10))
    cache.store([8] * 12, kv(12))  # 5 + 10 + 12 > 25: the least recently used goes
    assert list(cache.entries) == [(7,) * 10, (8,) * 12] and cache.bytes == 64 * 22
    n, found = cache.lookup([7] * 10 + [9])
    assert n == 10 and found[0][0].shape[-2] == 10
    n, found = cache.lookup([7] * 10)  # a whole match still leaves one token to prefill
    assert n == 9 and found[0][0].shape[-2] == 9
    cache.store([9] * 30, kv(30))  # bigger than the whole cache: not stored
    assert (9,) * 30 not in cache.entries


# --- through the real server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_server(smollm2_home, hub, tmp_path_factory):
    from conftest import ServerProcess, copy_home

    tmp = tmp_path_factory.mktemp("batching")
    # fp32: in bf16 a batched row can differ from the same row alone at a near-tie, since batched
    # matrix products round differently (vLLM does not promise batch invariance either).
    server = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "server.log",
                           AI_SERVER_BACKENDS="transformers", DEFAULT_MODEL="smollm2:135m", DTYPE="fp32")
    yield server.start()
    server.stop()


def test_concurrent_clients_get_what_they_get_alone(smol_server):
    """Eight real ollama clients at once; each reply equals the same request made alone, and
    /status shows the batch at work (steps shared) and the model's tokens/s."""
    client = ollama.Client(host=smol_server.url)
    questions = [f"In one sentence, what is {n} times {n}?" for n in range(2, 10)]
    options = {"temperature": 0, "num_predict": 32}

    def ask(q):
        return client.chat(model="smollm2:135m", messages=[{"role": "user", "content": q}], options=options)

    alone = [ask(q).message.content for q in questions]
    steps_before = smol_server.client.get("/status").json()["cache"][0]["batching"]["steps"]

    async def burst():
        aclient = ollama.AsyncClient(host=smol_server.url)
        return await asyncio.gather(*(aclient.chat(model="smollm2:135m", options=options,
                                                   messages=[{"role": "user", "content": q}]) for q in questions))

    together = asyncio.run(burst())
    assert [r.message.content for r in together] == alone
    entry = smol_server.client.get("/status").json()["cache"][0]
    assert entry["dtype"] == "float32"  # DTYPE=fp32 asked
    tokens = sum(r.eval_count for r in together)
    assert entry["batching"]["steps"] - steps_before < tokens / 2
    assert entry["tokens_total"] >= 2 * tokens and entry["tokens_per_s"] > 0


def test_chat_turns_reuse_the_prefix_over_http(smol_server):
    client = ollama.Client(host=smol_server.url)
    messages = []
    hits = []
    for question in ("Hello! Who are you?", "What can you do?", "Thanks. Say goodbye."):
        messages.append({"role": "user", "content": question})
        reply = client.chat(model="smollm2:135m", messages=messages, options={"temperature": 0, "num_predict": 24})
        messages.append({"role": "assistant", "content": reply.message.content})
        hits.append(smol_server.client.get("/status").json()["cache"][0]["batching"]["prefix_cache"])
    assert hits[2]["reused_tokens"] > hits[1]["reused_tokens"] > hits[0]["reused_tokens"]
    assert 0 < hits[2]["bytes"] <= hits[2]["max_bytes"]


def test_openai_logit_bias_bans_eos_and_checks_ids(smol_server):
    """OpenAI's logit_bias (the benchmark bans EOS with it, so every reply runs to max_tokens)."""
    import openai

    client = openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused")
    ask = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "What is 2+2?"}],
           "max_tokens": 40, "temperature": 0}
    free = client.chat.completions.create(**ask)
    banned = client.chat.completions.create(**ask, logit_bias={"0": -100, "2": -100})  # <|endoftext|>, <|im_end|>
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 40
    assert banned.choices[0].finish_reason == "length" and banned.usage.completion_tokens == 40
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.chat.completions.create(**ask, logit_bias={"99999999": -100})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**ask, logit_bias={"2": -500})
