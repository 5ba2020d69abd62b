"""Pure helpers and in-process pieces: decisions, validation, registry, prompts, backends."""

from __future__ import annotations

import asyncio

import pytest
import torch

import app
from models import make_tiny_model, make_tokenizer


@pytest.mark.parametrize(("requested", "size", "bnb", "expected"), [
    ("auto", 10, True, "q4"),        # threshold lowered to 10 bytes: a "big" model goes 4-bit
    ("auto", 9, True, "no"),         # below it: the checkpoint's own dtype
    ("auto", 10**12, False, "no"),   # bitsandbytes unusable: never pick q4
    ("q8", 1, True, "q8"),           # explicit choices pass through
    ("fp32", 10**12, True, "fp32"),
])
def test_choose_quantization(requested, size, bnb, expected):
    assert app.choose_quantization(requested, size, threshold_bytes=10, bnb_usable=bnb) == expected


@pytest.mark.parametrize("bad", ["../etc", "/abs/path", "a/b/c", "a\\b", "~/x", "org/..", "-x/y", "a" * 97])
def test_repo_id_rejects(bad):
    with pytest.raises(ValueError, match="invalid model id"):
        app.check_repo_id(bad)


@pytest.mark.parametrize("good", ["gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_repo_id_accepts(good):
    assert app.check_repo_id(good) == good


def test_revision_rules():
    assert app.check_revision("main") == "main"
    assert app.check_revision("a" * 40)
    for bad in ("../main", "", "-x", "a b"):
        with pytest.raises(ValueError):
            app.check_revision(bad)


def feed_token_by_token(text, stops):
    tok = make_tokenizer()
    stream = app.TextStream(tok, stops)
    pieces = [stream.push([i]) for i in tok(text)["input_ids"]]
    return pieces, stream.finish(), stream


def test_text_stream_cuts_at_the_first_stop_across_tokens():
    pieces, tail, stream = feed_token_by_token("one two three four five", [" four", "two thr"])
    assert "".join(pieces) + tail == "one " and stream.stopped
    assert stream.output == "one "


def test_text_stream_holds_back_only_possible_stop_prefixes():
    pieces, tail, stream = feed_token_by_token("the quick brown fox jumps", ["fox jumps over"])
    released = "".join(pieces)
    assert released == "the quick brown "  # "fox jumps" could still grow into the stop string
    assert tail == "fox jumps" and not stream.stopped  # it did not: released at the end
    assert app.held_back("abc fo", ["fox"]) == 2 and app.held_back("abc", ["fox"]) == 0


def test_text_stream_without_stops_streams_everything():
    pieces, tail, _ = feed_token_by_token("hello world, the lazy dog.", [])
    assert "".join(pieces) == "hello world, the lazy dog." and tail == ""
    assert sum(1 for p in pieces if p) > 3  # really incremental


def test_pull_errors_say_what_to_do():
    settings = app.Settings(hf_cache="/tmp/cache", hf_endpoint="http://hub")
    full = OSError(28, "No space left on device")
    assert app.describe_pull_error(full, "a/b", "main", settings) == (
        "disk full while downloading into /tmp/cache: free space and pull again (it resumes)")
    assert "hub unreachable" in app.describe_pull_error(ConnectionError("refused"), "a/b", "main", settings)
    assert app.describe_pull_error(ValueError("odd"), "a/b", "main", settings) == "ValueError: odd"


def test_job_state_machine():
    job = app.PullJob("j", "a/b", "main", "auto", False, False)
    with pytest.raises(RuntimeError, match="illegal transition"):
        job.advance("succeeded")  # queued -> succeeded skips running
    job.advance("running")
    assert job.started_at.endswith("Z")
    job.advance("failed", "boom")
    assert (job.status, job.error) == ("failed", "boom")
    with pytest.raises(RuntimeError):
        job.advance("running")  # terminal


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("AI_SERVER_BACKENDS", "Pipeline, transformers")
    monkeypatch.setenv("MODEL_Q4_THRESHOLD_BYTES", "123")
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    s = app.Settings()
    assert s.backends == ["pipeline", "transformers"] and s.q4_threshold_bytes == 123
    assert "secret-token" not in str(s.public()) and s.public()["hf_token_set"] is True
    monkeypatch.setenv("AI_SERVER_BACKENDS", "llama-magic")
    with pytest.raises(ValueError, match="AI_SERVER_BACKENDS"):
        app.Settings()


def test_registry_survives_reopen_and_fails_interrupted_jobs(tmp_path):
    reg = app.Registry(tmp_path / "r.sqlite")
    rec = app.ModelRecord("Org/M", "Org/M", "main", "s" * 40, "/x", 5, "no", "LlamaForCausalLM", True, "hub",
                          app.utc_now_iso())
    reg.put_model(rec)
    running = app.PullJob("j1", "Org/M", "main", "auto", False, False)
    running.advance("running")
    reg.put_job(running)
    reg.put_job(app.PullJob("j2", "Org/N", "main", "auto", False, False))
    reg.close()
    reg = app.Registry(tmp_path / "r.sqlite")
    assert reg.get_model("org/m") == rec  # names are case-insensitive, fields round-trip
    assert reg.fail_interrupted_jobs() == 2
    assert {j.id: (j.status, j.error) for j in reg.list_jobs(10)} == {
        "j1": ("failed", "interrupted by restart"), "j2": ("failed", "interrupted by restart")}


def test_prompt_uses_chat_template_or_plain_fallback():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    templated = app.render_chat_prompt(make_tokenizer(chat_template=True), messages)
    assert templated.text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhello" in templated.text
    plain_tok = make_tokenizer(chat_template=False)
    plain = app.render_chat_prompt(plain_tok, messages)
    assert plain.text == "System: Be brief.\nUser: hello\nAssistant:"
    assert plain.ids == plain_tok(plain.text)["input_ids"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_a_system_turn_mid_conversation_is_folded_only_for_a_template_that_wants_it_first(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    turns = [{"role": "system", "content": "A"}, {"role": "user", "content": "hi"}, {"role": "system", "content": "B"}]
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert app.render_chat_prompt(tok, turns).text == "<system>A<user>hi<system>B"  # rendered where it stands
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
                         "{{ raise_exception('System message must be first') }}{% endif %}"
                         "<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert app.render_chat_prompt(tok, turns).text == "<system>A\n\nB<user>hi"  # folded into the first
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(app.BadRequest, match="refuses this conversation: Conversation roles must alternate"):
        app.render_chat_prompt(tok, turns[1:])


def plan(path, quantization):
    return app.LoadPlan("tiny", str(path), quantization, False, "cpu", app.choose_dtype(quantization, "fp32", "cpu"))


def generate(backend, loaded, prompt, params):
    """Runs a backend the way the server does; the streamed pieces must add up to the text."""
    pieces = []
    result = backend.generate(loaded, prompt, params, app.DecodeState(loaded.tokenizer, params, pieces.append))
    assert "".join(p.text for p in pieces) == result.text
    # each piece carries the tokens it came from (tokens of a half character at the end go out with none)
    streamed_ids = [i for p in pieces for i in p.ids]
    assert streamed_ids == result.output_ids[:len(streamed_ids)] and (streamed_ids or not pieces)
    return result


@pytest.mark.parametrize(("backend", "quantization", "quantized", "dtype"), [
    (app.TransformersBackend, "no", None, "float32"),
    (app.TransformersBackend, "q4", "4bit", None),
    (app.TransformersBackend, "q8", "8bit", None),
    (app.TransformersBackend, "fp16", None, "float16"),
    (app.PipelineBackend, "no", None, "float32"),
    (app.PipelineBackend, "q4", "4bit", None),
])
def test_backend_loads_and_generates(tiny_dir, backend, quantization, quantized, dtype):
    """Real loads of a real (tiny) checkpoint; bitsandbytes 4/8-bit run on CPU from 0.50 on."""
    b = backend()
    loaded = b.load(plan(tiny_dir, quantization))
    assert loaded.quantized == quantized
    if dtype:
        assert loaded.dtype == dtype
    prompt = app.render_chat_prompt(loaded.tokenizer, [{"role": "user", "content": "hello"}])
    result = generate(b, loaded, prompt, app.GenParams(max_tokens=12, temperature=0))
    assert result.prompt_tokens == len(prompt.ids) > 0
    assert 1 <= result.output_tokens <= 12
    assert result.done_reason in ("stop", "length")
    assert result.done_reason == "length" or result.output_tokens < 12
    assert result.eval_ns > 0 and result.prompt_eval_ns > 0
    b.unload(loaded)


def test_quantized_model_is_smaller(tiny_dir):
    full = app.TransformersBackend().load(plan(tiny_dir, "fp32"))
    q4 = app.TransformersBackend().load(plan(tiny_dir, "q4"))
    assert q4.memory_bytes < full.memory_bytes


def test_greedy_is_deterministic_and_seed_repeats(tiny_dir):
    b = app.TransformersBackend()
    loaded = b.load(plan(tiny_dir, "no"))
    prompt = app.render_chat_prompt(loaded.tokenizer, [{"role": "user", "content": "the quick"}])
    greedy = [generate(b, loaded, prompt, app.GenParams(max_tokens=16, temperature=0)).text for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [generate(b, loaded, prompt, app.GenParams(max_tokens=16, temperature=1.5, seed=7)).text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_length_and_stop_reasons(tiny_dir):
    """The tiny random model greedily repeats "\n" and never emits EOS: max_tokens ends it by
    length; a stop string ends it by stop, and is cut from the text as Ollama does."""
    b = app.TransformersBackend()
    loaded = b.load(plan(tiny_dir, "no"))
    prompt = app.render_chat_prompt(loaded.tokenizer, [{"role": "user", "content": "hello"}])
    by_length = generate(b, loaded, prompt, app.GenParams(max_tokens=5, temperature=0))
    assert (by_length.output_tokens, by_length.done_reason) == (5, "length")
    by_stop = generate(b, loaded, prompt, app.GenParams(max_tokens=40, temperature=0, stop=["\n\n"]))
    assert by_stop.done_reason == "stop" and "\n\n" not in by_stop.text
    assert by_stop.output_tokens < 40  # stopped early, not just trimmed afterwards


def test_parse_tool_calls_shapes():
    names = {"get_weather"}
    text, calls = app.parse_tool_calls('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                       '</tool_call>', names)
    assert text == "Sure." and calls == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    text, calls = app.parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}', names)
    assert text == "" and calls[0]["function"]["arguments"] == {"city": "Rome"}
    assert app.parse_tool_calls('{"name": "unknown", "arguments": {}}', names) == (
        '{"name": "unknown", "arguments": {}}', [])
    assert app.parse_tool_calls("no calls here", names) == ("no calls here", [])


def test_ollama_options_defaults_and_mapping():
    p = app.ollama_params(None, None, None)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.repeat_last_n, p.seed) == (0.8, 40, 0.9, None, 64, None)
    opts = app.OllamaOptions(num_predict=7, temperature=0, seed=-1, stop="x", num_ctx=99, mirostat=1)
    p = app.ollama_params(opts, "json", False)
    assert (p.max_tokens, p.temperature, p.seed, p.stop, p.num_ctx, p.truncate, p.format) == (
        7, 0, None, ["x"], 99, False, "json")


def test_repeat_penalties_follow_llama_cpp():
    import torch

    penalties = app.RepeatPenalties(app.GenParams(repeat_penalty=2.0, repeat_last_n=2, presence_penalty=0.5,
                                                  frequency_penalty=0.25))
    ids = torch.tensor([[0, 1, 1]])  # only the last 2 tokens count: token 1, twice
    scores = torch.tensor([[4.0, 4.0, -4.0]])
    out = penalties(ids, scores)
    assert out.tolist() == [[4.0, 4.0 / 2 - 0.5 - 0.5, -4.0]]


class FakeCudaOomBackend(app.TransformersBackend):
    """A NAMED FAKE for a CUDA-only path: torch.OutOfMemoryError is what CUDA raises when a
    generation step does not fit; on CPU the process is killed instead, so it cannot happen here."""

    name = "transformers"
    fail_next = True

    def generate(self, loaded, prompt, params, gen):
        if FakeCudaOomBackend.fail_next:
            FakeCudaOomBackend.fail_next = False
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(loaded, prompt, params, gen)


def test_out_of_memory_during_generation_is_503_and_the_model_keeps_serving(tiny_dir, tmp_path):
    import asyncio

    settings = app.Settings(home=tmp_path, default_model="", embed_model="")
    registry = app.Registry(tmp_path / "r.sqlite")
    rec = app.ModelRecord("tiny", "tiny", "main", "s", str(tiny_dir), 1, "no", None, False, "hub", app.utc_now_iso())
    registry.put_model(rec)
    cache = app.ModelCache(settings, registry, [FakeCudaOomBackend()], app.Metrics())
    cache.backend_errors = {"transformers": None}
    admission = app.Admission(cache, settings, cache.metrics)
    params = app.GenParams(max_tokens=4, temperature=0)

    async def run_once():
        build = lambda m, _cancel: app.render_chat_prompt(m.loaded.tokenizer, [{"role": "user", "content": "hi"}])  # noqa: E731
        return await app.run_to_end(app.GenerationRun(admission, rec, build, params, None))

    async def scenario():
        with pytest.raises(app.Busy, match="out of memory") as err:
            await run_once()
        assert err.value.headers["Retry-After"] == "5"
        assert admission.text_queue.running["tiny"] == 0 and cache.loaded["tiny"].refs == 0  # slot and model freed
        return await run_once()

    fin = asyncio.run(scenario())
    assert fin.result.output_tokens == 4  # the same loaded model serves the next request


@pytest.mark.parametrize(("bind", "checked"), [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                               ("localhost", True), ("0.0.0.0", False), ("::", False),
                                               ("192.168.1.20", False), ("10.0.0.5", False)])
def test_host_check_only_when_bound_to_loopback(bind, checked):
    assert app.bound_to_loopback(bind) is checked


def test_scheduler_admits_num_parallel_plus_max_queue_then_503s_in_fifo_order():
    async def burst():
        scheduler = app.Scheduler(num_parallel=1, max_queue=3, metrics=app.Metrics())
        order: list[int] = []

        async def request(i: int) -> int:
            try:
                number = await scheduler.enter("m", asyncio.Event())
            except app.Busy:
                return 503
            order.append(i)
            await asyncio.sleep(0)  # runs a while: the burst arrives meanwhile
            scheduler.leave("m", number)
            return 200

        first = await asyncio.gather(*(request(i) for i in range(10)))
        # the queue is exact: 1 runs, 3 wait, the rest are refused; all counters return to 0
        assert first == [200] * 4 + [503] * 6 and order == [0, 1, 2, 3]
        assert scheduler.waiting["m"] == scheduler.running["m"] == 0

        gone, waiting = asyncio.Event(), asyncio.Event()
        number = await scheduler.enter("m", waiting)  # holds the only slot
        queued = asyncio.ensure_future(scheduler.enter("m", gone))
        await asyncio.sleep(0)
        assert scheduler.waiting["m"] == 1
        gone.set()  # its client left while it waited: it never runs and frees its place
        with pytest.raises(app.ClientGone):
            await queued
        scheduler.leave("m", number)
        assert scheduler.waiting["m"] == scheduler.running["m"] == 0
        assert not scheduler._slots["m"].locked()

    asyncio.run(burst())


def test_scheduler_numbers_slots_and_gives_the_preferred_one_when_free():
    async def run():
        scheduler = app.Scheduler(num_parallel=3, max_queue=2, metrics=app.Metrics())
        a = await scheduler.enter("m", asyncio.Event(), "a", prefer=2)
        b = await scheduler.enter("m", asyncio.Event(), "b", prefer=2)  # taken: the first free one
        c = await scheduler.enter("m", asyncio.Event(), "c")
        assert (a, b, c) == (2, 0, 1) and scheduler.holders["m"] == ["b", "c", "a"]
        queued = asyncio.ensure_future(scheduler.enter("m", asyncio.Event(), "d", prefer=2))
        await asyncio.sleep(0)
        scheduler.leave("m", b)  # the waiter gets the slot that came free, not the one it preferred
        assert await queued == 0 and scheduler.holders["m"] == ["d", "c", "a"]

    asyncio.run(run())


def test_a_template_without_tools_sees_the_calls_made_before():
    """SmolLM2's template knows nothing of tools: an assistant turn with only tool_calls rendered empty, so the
    model never saw its own call before the tool's answer (found with the agents, issue 22)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    turn = app.calls_as_text({"role": "assistant", "content": "", "tool_calls": [call]})
    assert turn == {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                                    "</tool_call>"}
    said = app.calls_as_text({"role": "assistant", "content": "Let me look.", "tool_calls": [call]})
    assert said["content"].startswith("Let me look.\n<tool_call>") and "tool_calls" not in said
    assert app.calls_as_text({"role": "user", "content": "hi"}) == {"role": "user", "content": "hi"}
    parsed = app.parse_tool_calls(turn["content"], {"get_weather"})  # the syntax the reply parser reads back
    tok = make_tokenizer()  # a ChatML template without tools
    assert not app.template_takes_tools(tok)
    history = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
               {"role": "tool", "content": "22 C"}]
    assert '"city": "Paris"' in app.render_chat_prompt(tok, history).text
    assert parsed == ("", [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])


@pytest.mark.parametrize("reply, sent, calls", [
    ("Hello world!", "Hello world!", []),
    ('Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "Sure ", ["get_weather"]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "", ["get_weather"]),  # the forced-call shape
    ('{"answer": 1} more', '{"answer": 1} more', []),  # an object, but no call: a false start
    ('{"name": "nope", "arguments": {}} x', '{"name": "nope", "arguments": {}} x', []),  # no such tool
    ("  Hi <tool_callx> and <tool_call> hello there", "  Hi <tool_callx> and <tool_call> hello there", []),
    ("a <b", "a <b", []),
])
def test_tool_call_watch_streams_text_and_holds_back_only_calls(reply, sent, calls):
    """Issue 22: with tools declared a reply streams; only what looks like a call is held back, token by token
    (here: character by character, the worst case for a tag split across pieces)."""
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    watch = app.ToolCallWatch(tools)
    out = [p.text for c in reply if (p := watch.feed(app.Piece(c, [0]))) is not None]
    rest, found, _ = watch.finish(reply)
    assert "".join(out) == sent and [c["function"]["name"] for c in found] == calls
    if not calls:
        assert rest == "" and len(out) >= 3  # all of it went out as it came, in pieces


def test_tool_call_watch_without_tools_passes_every_piece_and_a_cut_call_is_text():
    watch = app.ToolCallWatch(None)
    piece = app.Piece("Hi", [1])
    assert watch.feed(piece) is piece and watch.finish("Hi") == ("", [], None)
    cut = '<tool_call>{"name": "get_weather", "argu'  # the token limit ended it mid-call
    watch = app.ToolCallWatch([{"type": "function", "function": {"name": "get_weather"}}])
    assert all(watch.feed(app.Piece(c, [0])) is None for c in cut)
    assert watch.finish(cut) == (cut, [], None)
