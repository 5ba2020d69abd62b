"""OpenAI's Responses API (/v1/responses) through the real `openai` SDK on SmolLM2-135M, as Codex CLI and
`client.responses.create` use it: text and item input, instructions, previous_response_id, the typed
stream, function tools with function_call_output items, text.format json_schema (issue 13)."""
from __future__ import annotations

import json

import openai
import pytest

from conftest import ServerProcess, copy_home

SMOL = "smollm2:135m"
FRANCE = "What is the capital of France? Answer in one word."
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def oai(hub, smollm2_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("responses")
    server = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "server.log",
                           AI_SERVER_BACKENDS="transformers,pipeline")
    server.start()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    server.stop()


def test_text_in_text_out_and_a_follow_up(oai):
    first = oai.responses.create(model=SMOL, input=FRANCE, instructions="You are a geography teacher.",
                                 temperature=0, max_output_tokens=20)
    assert first.object == "response" and first.status == "completed" and first.id.startswith("resp_")
    assert "Paris" in first.output_text and first.output[0].type == "message"
    assert first.usage.input_tokens > 10 and 0 < first.usage.output_tokens <= 20
    # The next turn through previous_response_id: the earlier turns are in its prompt.
    follow = oai.responses.create(model=SMOL, input="And of Germany?", previous_response_id=first.id,
                                  temperature=0, max_output_tokens=20)
    alone = oai.responses.create(model=SMOL, input="And of Germany?", temperature=0, max_output_tokens=20)
    assert follow.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert follow.previous_response_id == first.id and follow.output_text
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.BadRequestError, match="not found"):
        oai.responses.create(model=SMOL, input="x", previous_response_id="resp_nope")


def test_item_input_and_max_output_tokens(oai):
    items = [{"role": "developer", "content": "Answer in one word."},
             {"role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}]
    r = oai.responses.create(model=SMOL, input=items, temperature=0, max_output_tokens=20)
    assert "Paris" in r.output_text
    cut = oai.responses.create(model=SMOL, input="Write a long story.", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3


def test_the_typed_stream(oai):
    with oai.responses.stream(model=SMOL, input=FRANCE, temperature=0, max_output_tokens=20) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text and "Paris" in final.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_function_tools_and_their_outputs(oai):
    call = oai.responses.create(model=SMOL, input="What is the weather in Paris?", tools=[WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                max_output_tokens=60)
    fc = next(item for item in call.output if item.type == "function_call")
    assert fc.name == "get_weather" and "city" in json.loads(fc.arguments) and fc.call_id.startswith("call_")
    # The call is in the prompt as the model wrote it: a 135M model offered the tool again repeats the call,
    # so none is offered for the answer.
    answer = oai.responses.create(model=SMOL, previous_response_id=call.id, tools=[WEATHER], tool_choice="none",
                                  temperature=0, max_output_tokens=30,
                                  input=[{"type": "function_call_output", "call_id": fc.call_id,
                                          "output": "22 C and sunny"}])
    assert answer.output[0].type == "message" and answer.output_text
    with oai.responses.stream(model=SMOL, input="What is the weather in Paris?", tools=[WEATHER],
                              tool_choice="required", temperature=0, max_output_tokens=60) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds and final.output[-1].type == "function_call"


def test_namespace_tools_are_expanded_and_hosted_tools_left_out(oai):
    """Codex's default tools: a `namespace` tool (its members offered as `namespace.member`, the call's name
    un-prefixed again with its `namespace`) and hosted `web_search`, which this server cannot run: left out of
    the prompt, never a 400 (issue 22)."""
    spaced = {"type": "namespace", "name": "weather", "description": "Weather tools",
              "tools": [{k: v for k, v in WEATHER.items()}]}
    hosted = [{"type": "web_search", "external_web_access": False}, {"type": "file_search"},
              {"type": "code_interpreter", "container": {"type": "auto"}}]
    call = oai.responses.create(model=SMOL, input="What is the weather in Paris?", tools=[spaced, *hosted],
                                tool_choice="required", temperature=0, max_output_tokens=60)
    fc = next(item for item in call.output if item.type == "function_call")
    assert fc.name == "get_weather" and fc.namespace == "weather" and "city" in json.loads(fc.arguments)
    # Codex sends the call back with its namespace: the history names the tool as it was offered.
    back = [{"type": "function_call", "call_id": fc.call_id, "name": fc.name, "namespace": "weather",
             "arguments": fc.arguments}, {"type": "function_call_output", "call_id": fc.call_id, "output": "22 C"}]
    answer = oai.responses.create(model=SMOL, input=back, tools=[spaced, *hosted], tool_choice="none", temperature=0,
                                  max_output_tokens=20)
    assert answer.output[0].type == "message" and answer.output_text
    only_hosted = oai.responses.create(model=SMOL, input=FRANCE, tools=hosted, temperature=0, max_output_tokens=20)
    assert "Paris" in only_hosted.output_text


def test_json_schema_output(oai):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"],
              "additionalProperties": False}
    r = oai.responses.create(model=SMOL, input=FRANCE, temperature=0, max_output_tokens=40,
                             text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"capital"}
