"""Schemathesis hooks for the fuzz runs: make generated requests reach a real model.

Loaded by the schemathesis CLI with SCHEMATHESIS_HOOKS=<path of this file>, by
tests/test_hardening.py::test_schemathesis_finds_no_server_errors (CI) and scripts/fuzz.sh (long run).

1. Real model names (`map_case`, every phase). Left alone, every generated model name ("0",
   "A.b:c") is unknown to the server, so generation requests are all 404s and sampling, templates,
   penalties, stops, context and keep_alive are never fuzzed. For about FUZZ_REAL_SHARE (half) of
   the cases of each operation, a generated *string* in a model-name field becomes a name the
   server has; the rest of the case stays as generated, and the other half keep their random names:

     generation (/chat, /api/chat, /api/generate, /v1/chat/completions, /v1/completions,
     /v1/messages, /v1/messages/count_tokens, /v1/responses),
     /api/show, GET /v1/models/{model}                     -> FUZZ_MODEL (tiny/llama-a)
     /api/embed, /api/embeddings, /v1/embeddings           -> FUZZ_EMBED_MODEL (all-minilm)
     /v1/audio/speech (and its voice)                      -> FUZZ_SPEECH_MODEL (piper:en_US-joe-medium)
     /api/copy: source -> FUZZ_MODEL, destination          -> FUZZ_COPY (fuzz/copy)
     DELETE /api/delete, DELETE /models/{name}             -> FUZZ_COPY
     POST /pull, POST /api/pull                            -> FUZZ_PULL (tiny/llama-b, on the test hub)

   A non-string name (123, null: a negative case) is kept, so that field's validation is still
   fuzzed. The coverage phase sends "" as nearly every prompt and [] as /api/chat's messages, which
   with a real model is only the load/unload or "empty prompt" path, so 3 in 4 of the swapped
   generation cases get a short prompt instead. Which cases are swapped is a hash of the case, so a
   run is reproducible from its seed; new containers are assigned (not edited in place) so that
   schemathesis relabels the case positive/negative from what is sent.

2. Deletes never take the fuzz models away. They target the throwaway copy FUZZ_COPY (which
   /api/copy recreates, so "deleted" and "not found" both happen), and a `before_call` guard
   redirects any delete or pull that would hit FUZZ_MODEL or FUZZ_EMBED_MODEL - whatever produced
   the name, e.g. a name the stateful phase took from GET /models - to FUZZ_COPY / FUZZ_PULL:
   deleting or re-pulling the fuzz model would turn the rest of the run into 404s. Copies share
   the model's files, so deleting one never removes them.

3. The structure behind the schema's loose objects (`before_load_schema`): see
   structure_loose_objects below (response_format, tool_choice, content parts, tool calls, format).

4. Links for the stateful phase (`before_load_schema`): see LINKS below.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import schemathesis

MODEL = os.environ.get("FUZZ_MODEL", "tiny/llama-a")
EMBED_MODEL = os.environ.get("FUZZ_EMBED_MODEL", "all-minilm")
COPY = os.environ.get("FUZZ_COPY", "fuzz/copy")
PULL = os.environ.get("FUZZ_PULL", "tiny/llama-b")
SPEECH_MODEL, VOICE = os.environ.get("FUZZ_SPEECH_MODEL", "piper:en_US-joe-medium"), "en_US-joe-medium"
SHARE = float(os.environ.get("FUZZ_REAL_SHARE", "0.5"))
TEXT_SHARE = 0.75  # of the swapped generation cases, those whose empty prompt gets some text
PROMPT = "Why is the sky blue? Answer in one word."

GENERATION = ("/chat", "/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions", "/v1/messages",
              "/v1/messages/count_tokens", "/v1/responses")
EMBEDDING = ("/api/embed", "/api/embeddings", "/v1/embeddings")
NAME_FIELDS = ("model", "name")  # ModelNameBody takes either

# (method, path) -> {field: replacement}; "path:<param>" names a path parameter.
TARGETS: dict[tuple[str, str], dict[str, str]] = {
    **{("POST", p): {"model": MODEL} for p in GENERATION},
    **{("POST", p): {"model": EMBED_MODEL} for p in EMBEDDING},
    ("POST", "/api/show"): {f: MODEL for f in NAME_FIELDS},
    ("GET", "/v1/models/{model}"): {"path:model": MODEL},
    ("POST", "/api/copy"): {"source": MODEL, "destination": COPY},
    ("DELETE", "/api/delete"): {f: COPY for f in NAME_FIELDS},
    ("DELETE", "/models/{name}"): {"path:name": COPY},
    ("POST", "/pull"): {"model": PULL},
    ("POST", "/api/pull"): {f: PULL for f in NAME_FIELDS},
    ("POST", "/v1/audio/speech"): {"model": SPEECH_MODEL, "voice": VOICE},
}
# Operations whose target must never be one of the fuzz run's own models, and what to use instead.
GUARDED = {("DELETE", "/api/delete"): COPY, ("DELETE", "/models/{name}"): COPY,
           ("POST", "/pull"): PULL, ("POST", "/api/pull"): PULL}


def _key(case: Any) -> tuple[str, str]:
    return case.method.upper(), case.operation.path


def _draw(case: Any) -> float:
    """A number in [0, 1) that depends only on the case: the same case is always treated alike."""
    try:
        raw = json.dumps([case.method, case.operation.path, case.path_parameters, case.query,
                          None if not isinstance(case.body, (dict, list, str, int, float, bool)) else case.body],
                         sort_keys=True, default=repr)
    except (TypeError, ValueError):
        raw = repr(case)
    return int(hashlib.sha256(raw.encode()).hexdigest()[:8], 16) / 2 ** 32


def _swap(case: Any, fields: dict[str, str]) -> None:
    body = dict(case.body) if isinstance(case.body, dict) else None
    params = dict(case.path_parameters or {})
    body_changed = params_changed = False
    for field, value in fields.items():
        if field.startswith("path:"):
            name = field.removeprefix("path:")
            if isinstance(params.get(name), str):
                params[name], params_changed = value, True
        elif body is not None and isinstance(body.get(field), str):
            body[field], body_changed = value, True
    # Assigning (not editing in place) marks the containers dirty, so schemathesis relabels the
    # case positive/negative from what is actually sent.
    if body_changed:
        case.body = body
    if params_changed:
        case.path_parameters = params


def _give_text(case: Any) -> None:
    """The coverage phase sends "" (the smallest valid string) as nearly every prompt and [] as
    /api/chat's messages: with a real model that is only ever the load/unload or "empty prompt"
    path. Give most of the swapped cases some text so that they generate."""
    body = case.body
    if not isinstance(body, dict):
        return
    if body.get("prompt") == "":
        case.body = {**body, "prompt": PROMPT}
    elif isinstance(body.get("prompt"), list) and body["prompt"][:1] == [""]:
        case.body = {**body, "prompt": [PROMPT, *body["prompt"][1:]]}
    elif case.operation.path == "/api/chat" and body.get("messages") == []:
        case.body = {**body, "messages": [{"role": "user", "content": PROMPT}]}
    elif case.operation.path == "/v1/responses" and body.get("input") in ("", []):
        case.body = {**body, "input": PROMPT}


@schemathesis.hook
def map_case(context, case):
    fields = TARGETS.get(_key(case))
    draw = _draw(case)
    if fields and draw < SHARE:
        _swap(case, fields)
        if case.operation.path in GENERATION and draw < SHARE * TEXT_SHARE:
            _give_text(case)
    return case


def _canonical(name: str) -> str:
    """A model name as the server resolves it: no hf.co/ prefix, no :latest, any case."""
    name = name.strip().lower()
    for prefix in ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/"):
        name = name.removeprefix(prefix)
    return name.removesuffix(":latest")


PROTECTED = {_canonical(MODEL), _canonical(EMBED_MODEL)}


def _value(case: Any, field: str) -> Any:
    if field.startswith("path:"):
        return (case.path_parameters or {}).get(field.removeprefix("path:"))
    return case.body.get(field) if isinstance(case.body, dict) else None


@schemathesis.hook
def before_call(context, case, kwargs):
    """The last word before sending, whatever produced the name (a link in the stateful phase too)."""
    instead = GUARDED.get(_key(case))
    if instead is None:
        return
    hits = {f: instead for f in TARGETS[_key(case)]
            if isinstance(v := _value(case, f), str) and _canonical(v) in PROTECTED}
    if hits:
        _swap(case, hits)


# --- links for the stateful phase ----------------------------------------------------------------
# FastAPI writes no OpenAPI links and its responses are untyped objects, so schemathesis infers
# almost nothing to chain (0 links covered without these). These say how the API's resources flow:
# a pull's job is polled and cancelled, a copy is used, shown and deleted, a pulled model is used,
# a generation's `context` is sent back. A link is added only when both operations are in the schema.
BY_NAME = ((("DELETE", "/models/{name}"), "path.name"), (("GET", "/v1/models/{model}"), "path.model"))
LINKS: list[tuple[tuple[str, str, str], tuple[str, str], dict[str, Any]]] = [
    *[(("POST", "/pull", "202"), target, {"parameters": {"path.job_id": "$response.body#/job_id"}})
      for target in (("GET", "/jobs/{job_id}"), ("DELETE", "/jobs/{job_id}"))],
    *[(("GET", "/jobs", "200"), target, {"parameters": {"path.job_id": "$response.body#/jobs/0/job_id"}})
      for target in (("GET", "/jobs/{job_id}"), ("DELETE", "/jobs/{job_id}"))],
    *[(("POST", "/api/copy", "200"), ("POST", path), {"requestBody": {"model": "$request.body#/destination"}})
      for path in ("/api/chat", "/api/generate", "/v1/chat/completions", "/api/show")],
    (("POST", "/api/copy", "200"), ("DELETE", "/api/delete"),
     {"requestBody": {"model": "$request.body#/destination"}}),
    *[(("POST", "/api/copy", "200"), target, {"parameters": {param: "$request.body#/destination"}})
      for target, param in BY_NAME],
    *[(("POST", "/api/pull", "200"), ("POST", path), {"requestBody": {"model": "$request.body#/model"}})
      for path in ("/api/show", "/api/generate")],
    (("POST", "/api/generate", "200"), ("POST", "/api/generate"),
     {"requestBody": {"model": "$request.body#/model", "context": "$response.body#/context"}}),
    *[(("GET", "/models", "200"), target, {"parameters": {param: "$response.body#/models/0/name"}})
      for target, param in BY_NAME],
]


@schemathesis.hook
def before_load_schema(context, raw_schema):
    structure_loose_objects(raw_schema)
    add_links(raw_schema)


def add_links(raw_schema: dict) -> None:
    paths = raw_schema.get("paths", {})

    def op(method: str, path: str) -> dict | None:
        return paths.get(path, {}).get(method.lower())

    for n, ((method, path, status), (t_method, t_path), link) in enumerate(LINKS):
        source, target = op(method, path), op(t_method, t_path)
        if source is None or target is None or "operationId" not in target:
            continue
        response = source.setdefault("responses", {}).setdefault(status, {"description": "ok"})
        name = f"fuzz{n}_{t_method}_{t_path}".replace("/", "_").replace("{", "").replace("}", "")
        response.setdefault("links", {})[name] = {"operationId": target["operationId"], **link}


# --- the structure behind the schema's loose objects --------------------------------------------
# Several request fields are `dict[str, Any]` in the app, so the schema says only "an object" while
# the server reads a structure out of it: response_format, tool_choice, OpenAI content parts and
# tool calls, Ollama tool calls, tool parameters and `format` (JSON Schemas). Random objects never
# hit that code (it needs e.g. {"type": "json_schema", "json_schema": ...}), so for the fuzz run
# the loose object is replaced by the structure the server expects. Schemathesis then generates
# it (positive cases) and every single violation of it (negative cases: a wrong type at one spot,
# a missing key), which is where unchecked `.get()`s and joins fail; a random object still comes
# out as a negative case. Only the loose-object branches change; a field that is gone or typed by
# now is left alone.
JSON_SCHEMA_REF = "#/components/schemas/FuzzJsonSchema"
JSON_SCHEMA = {  # a JSON Schema, as `format`, response_format and tool parameters carry; kept small and
    # flat: the coverage phase tries every keyword's edge values, and the schema itself goes to the
    # grammar compiler, whose errors the server already turns into 400s.
    "type": "object",
    "properties": {
        "type": {"enum": ["object", "string", "integer", "number", "boolean", "array", "null"]},
        "properties": {"type": "object", "maxProperties": 2, "additionalProperties": {
            "type": "object", "properties": {"type": {"enum": ["string", "integer"]}}}},
        "required": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "items": {"type": "object", "properties": {"type": {"enum": ["string", "integer"]}}},
        "enum": {"type": "array", "maxItems": 3},
        "pattern": {"type": "string"},
        "minLength": {"type": "integer"},
        "maximum": {"type": "number"},
    },
}
RESPONSE_FORMATS = [
    {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"]},
    {"type": "object", "required": ["type", "json_schema"], "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["schema"], "properties": {
            "name": {"type": "string"}, "strict": {"type": "boolean"}, "schema": {"$ref": JSON_SCHEMA_REF}}}}},
]
TOOL_CHOICE = {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}
CONTENT_PART = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "image_url"]}, "text": {"type": "string"},
    "image_url": {"type": "object", "properties": {"url": {"type": "string"}}}}}
OPENAI_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
OLLAMA_TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "object"}}}}}


def _is_loose_object(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "object" and "properties" not in schema


def _structure(components: dict, model: str, field: str, *, object_as: list | None = None,
               items_as: dict | None = None) -> None:
    """In components[model].field's anyOf, replace a loose object with `object_as` (alternatives),
    and a list of loose objects with a list of `items_as`."""
    schema = components.get(model, {}).get("properties", {}).get(field)
    if not isinstance(schema, dict) or not isinstance(schema.get("anyOf"), list):
        return
    branches = []
    for branch in schema["anyOf"]:
        if object_as is not None and _is_loose_object(branch):
            branches += copy.deepcopy(object_as)
        elif items_as is not None and branch.get("type") == "array" and _is_loose_object(branch.get("items")):
            branches.append({**branch, "items": copy.deepcopy(items_as)})
        else:
            branches.append(branch)
    schema["anyOf"] = branches


def structure_loose_objects(raw_schema: dict) -> None:
    components = raw_schema.setdefault("components", {}).setdefault("schemas", {})
    components["FuzzJsonSchema"] = copy.deepcopy(JSON_SCHEMA)
    _structure(components, "OpenAIChatBody", "response_format", object_as=RESPONSE_FORMATS)
    _structure(components, "OpenAIChatBody", "tool_choice", object_as=[TOOL_CHOICE])
    _structure(components, "OpenAIMessage", "content", items_as=CONTENT_PART)
    _structure(components, "OpenAIMessage", "tool_calls", items_as=OPENAI_TOOL_CALL)
    _structure(components, "OllamaMessage", "tool_calls", items_as=OLLAMA_TOOL_CALL)
    _structure(components, "ToolFunction", "parameters", object_as=[{"$ref": JSON_SCHEMA_REF}])
    for body in ("OllamaChatBody", "OllamaGenerateBody"):
        _structure(components, body, "format", object_as=[{"$ref": JSON_SCHEMA_REF}])
