"""Anthropic's Messages API (/v1/messages) through the real `anthropic` SDK, on SmolLM2-135M: what Claude
Code and the SDK send (ANTHROPIC_BASE_URL, x-api-key), streamed and not, stop sequences, tools with
tool_use and tool_result blocks, token counting, and Anthropic's error shape (issue 13)."""
from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from conftest import ServerProcess, copy_home

KEY = "sk-ant-local-test"
SMOL = "smollm2:135m"
FRANCE = "What is the capital of France? Answer in one word."
# SDK 2.x no longer has temperature/top_p/top_k arguments (older SDKs and raw requests send them, and
# they are honoured): tests that need greedy decoding send it as an extra body field.
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(hub, smollm2_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anthropic")
    server = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "server.log",
                           AI_SERVER_BACKENDS="transformers,pipeline", API_KEYS=KEY)
    server.client.headers["Authorization"] = f"Bearer {KEY}"
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def test_a_message_and_its_usage(claude):
    msg = claude.messages.create(model=SMOL, max_tokens=20, extra_body=GREEDY, system="You are a geography teacher.",
                                 messages=[{"role": "user", "content": FRANCE}])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == SMOL and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and "Paris" in msg.content[0].text
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens > 10 and 0 < msg.usage.output_tokens <= 20


def test_content_blocks_stop_sequences_and_max_tokens(claude):
    blocks = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    msg = claude.messages.create(model=SMOL, max_tokens=30, extra_body=GREEDY, stop_sequences=["Paris"],
                                 messages=[{"role": "user", "content": blocks}])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "Paris", msg
    assert "Paris" not in msg.content[0].text
    msg = claude.messages.create(model=SMOL, max_tokens=3, extra_body=GREEDY,
                                 messages=[{"role": "user", "content": "Write a long story."}])
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


def test_the_stream_is_anthropics(claude, server):
    with claude.messages.stream(model=SMOL, max_tokens=20, extra_body=GREEDY,
                                messages=[{"role": "user", "content": FRANCE}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == final.content[0].text and "Paris" in final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    # The raw events, in Anthropic's order, each with its `event:` line.
    body = {"model": SMOL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": FRANCE}]}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        raw = r.read().decode()
    events = [line.split(": ", 1)[1] for line in raw.splitlines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "content_block_start"] and events[-3:] == [
        "content_block_stop", "message_delta", "message_stop"] and set(events[2:-3]) == {"content_block_delta"}
    datas = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    assert [d["type"] for d in datas] == events and datas[0]["message"]["usage"]["input_tokens"] > 0


def test_tools_tool_use_and_tool_result(claude):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    msg = claude.messages.create(model=SMOL, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                 tool_choice={"type": "tool", "name": "get_weather"}, messages=ask)
    assert msg.stop_reason == "tool_use", msg
    use = next(b for b in msg.content if b.type == "tool_use")
    assert use.name == "get_weather" and isinstance(use.input, dict) and "city" in use.input
    assert use.id.startswith("toolu_")
    # The answer to the call goes back as a tool_result block, after the call (in the prompt as the model wrote
    # it: a 135M model offered the tool again repeats the call, so none is offered); the reply is text again.
    follow = claude.messages.create(model=SMOL, max_tokens=30, extra_body=GREEDY, tools=[WEATHER],
                                    tool_choice={"type": "none"}, messages=[
        *ask, {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "22 C and sunny"}]}])
    assert follow.content and follow.content[0].type == "text" and follow.content[0].text
    alone = claude.messages.count_tokens(model=SMOL, messages=ask)
    assert follow.usage.input_tokens > alone.input_tokens + msg.usage.output_tokens  # the call and its result
    # Streamed: the call arrives as a tool_use block whose input comes as input_json_delta.
    with claude.messages.stream(model=SMOL, max_tokens=60, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "any"}, messages=ask) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"
    assert final.content[-1].input == use.input


def test_server_tools_are_left_out_and_the_context_window_has_its_own_stop_reason(claude, server):
    """Issue 22. Anthropic's server tools (web_search, ...) run on Anthropic's side: this server leaves them out
    of the prompt, never a 400. A reply the context window ends, not max_tokens (Claude Code asks for 32 000),
    says model_context_window_exceeded; Claude Code would otherwise send "resume" turns for minutes."""
    hosted = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
    ask = [{"role": "user", "content": FRANCE}]
    msg = claude.messages.create(model=SMOL, max_tokens=20, extra_body=GREEDY, tools=[hosted], messages=ask)
    assert msg.content[0].type == "text" and "Paris" in msg.content[0].text
    assert claude.messages.count_tokens(model=SMOL, tools=[hosted], messages=ask).input_tokens == \
        claude.messages.count_tokens(model=SMOL, messages=ask).input_tokens
    r = server.client.post("/api/create", json={"model": "short-window", "from": SMOL, "parameters": {"num_ctx": 96}})
    assert r.status_code == 200, r.text
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    try:
        full = claude.messages.create(model="short-window", max_tokens=32000, extra_body=GREEDY, messages=story,
                                      timeout=300)  # (the SDK wants a stream, or a timeout, above ~21 000 tokens)
        assert full.stop_reason == "model_context_window_exceeded", full
        assert full.usage.input_tokens + full.usage.output_tokens >= 90
        with claude.messages.stream(model="short-window", max_tokens=32000, extra_body=GREEDY, messages=story) as s:
            assert s.get_final_message().stop_reason == "model_context_window_exceeded"
        capped = claude.messages.create(model="short-window", max_tokens=3, extra_body=GREEDY, messages=story)
        assert capped.stop_reason == "max_tokens"
        openai_style = server.client.post("/v1/chat/completions", json={"model": "short-window", "messages": story,
                                                                        "max_tokens": 32000, "temperature": 0})
        assert openai_style.json()["choices"][0]["finish_reason"] == "length"
    finally:
        server.client.request("DELETE", "/api/delete", json={"model": "short-window"})


def test_count_tokens(claude):
    short = claude.messages.count_tokens(model=SMOL, messages=[{"role": "user", "content": "hi"}])
    longer = claude.messages.count_tokens(model=SMOL, system="You are a helpful assistant.", tools=[WEATHER],
                                          messages=[{"role": "user", "content": FRANCE}])
    assert 0 < short.input_tokens < longer.input_tokens


def test_a_system_turn_inside_messages_as_claude_code_sends_it(claude):
    """Claude Code (2.1.154 on) puts a {"role": "system"} turn inside `messages` on every request, its content
    a string or text blocks: an instruction mid-conversation, rendered where it stands."""
    turns = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi! How can I help?"},
             {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
             {"role": "user", "content": FRANCE}]
    msg = claude.messages.create(model=SMOL, max_tokens=10, extra_body=GREEDY, system="You are a geography teacher.",
                                 messages=turns)
    assert msg.content[0].text and msg.usage.input_tokens > 20
    counted = claude.messages.count_tokens(model=SMOL, system="You are a geography teacher.", messages=turns)
    without = claude.messages.count_tokens(model=SMOL, system="You are a geography teacher.",
                                           messages=[t for t in turns if t["role"] != "system"])
    assert counted.input_tokens > without.input_tokens  # the system turn is in the prompt
    assert counted.input_tokens == msg.usage.input_tokens


def test_errors_have_anthropics_shape(claude, server):
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "not_found_error"
    r = server.client.post("/v1/messages", json={"model": SMOL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=SMOL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="does not support chat"):
        claude.messages.create(model="all-minilm", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    r = server.client.post("/v1/messages/nope", json={})
    assert r.status_code == 404 and r.json()["type"] == "error"
