"""The real coding agents from npm, Claude Code and Codex CLI (pinned in scripts/agents/package.json, installed
by scripts/setup.sh --agents), driven through `python app.py launch` against ai-server on SmolLM2-135M (issue 22):
`claude -p` in text and stream-json output, `codex exec` on launch's provider config and `codex exec --oss`, each
answering "Say hello"; and a tool round trip on each agent: the model calls the shell tool, the agent runs it and
sends its output back, and the model answers (streamed, though a tool is declared).

A 135M model neither ends a reply on cue under a 3-6k-token agent prompt nor calls a tool when asked, and the
agents fail a reply cut by a token limit (Claude Code sends "resume" turns, Codex fails the turn). So each test
runs on a model created from smollm2:135m (POST /api/create, as a Modelfile would) with greedy decoding
(`temperature 0`: neither agent sends one) and MESSAGE turns showing the reply wanted: the agent's own turns, then
the answer, or the tool call, its output and the answer (twice: once is not enough for a 135M model to tell "call"
from "answer"). The agent's own turns carry its context (Claude Code's <system-reminder> block and agent list,
Codex's <environment_context>), which the example must repeat to be copied, so they are captured from the agent
itself, pointed at a stub that records its first request and refuses it. Nothing asserts the model's words, only
that the agents complete and that the tool ran. Skipped, saying so, where the agents are not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, ServerProcess, copy_home

SMOL = "smollm2:135m"
AGENTS_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ai-server" / "agents"
HELLO = "Say hello"
HELLO_REPLY = "Hello! How can I help you today?"
# The tool's output differs from the command's text: seeing it in the transcript means the command ran.
TOOL_PROMPT = "Run this shell command: echo agent-tool-ok | tr a-z A-Z"
TOOL_COMMAND = "echo agent-tool-ok | tr a-z A-Z"
TOOL_OUTPUT = "AGENT-TOOL-OK"
TOOL_ANSWER = f"The command printed {TOOL_OUTPUT}."
RUN_TIMEOUT_S = 300  # one agent run; each takes 10-60 s on 2 cores
# Created models' parameters: greedy; SmolLM2's whole context (the agents' prompts are 2.5-6k tokens, and the
# MESSAGE turns are the oldest, so the first to go when a prompt is trimmed); a reply bound for Codex, which
# sends none (Claude Code's is CLAUDE_CODE_MAX_OUTPUT_TOKENS below).
PARAMETERS = {"temperature": 0, "num_ctx": 8192, "num_predict": 256}


def agent_binary(agent: str) -> str | None:
    """Where `app.py launch` finds the agent: PATH, then scripts/setup.sh --agents' folder."""
    binary = AGENTS_DIR / "node_modules" / ".bin" / agent
    return shutil.which(agent) or (str(binary) if binary.is_file() else None)


def needs(agent: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(agent_binary(agent) is None, reason=(
        f"{agent} is NOT INSTALLED (not on PATH nor in {AGENTS_DIR}): run scripts/setup.sh --agents "
        "(npm install of scripts/agents/package.json; needs npm and its registry) to run the agent tests"))


@pytest.fixture(scope="module")
def server(hub, smollm2_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agents")
    server = ServerProcess(copy_home(smollm2_home, tmp / "home"), hub.url, tmp / "server.log",
                           AI_SERVER_BACKENDS="transformers,pipeline")
    yield server.start()
    server.stop()


def agent_env(tmp: Path, url: str, **extra: str) -> dict[str, str]:
    """A throwaway HOME and CODEX_HOME (nothing read from or written to the user's), the agents' cache folder
    as the user's, and the server."""
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(tmp / "home"), "CODEX_HOME": str(tmp / "codex"),
            "XDG_CACHE_HOME": str(AGENTS_DIR.parents[1]), "AI_SERVER_URL": url,
            # a reply that runs away fails in seconds, not at Claude Code's 32 000 tokens
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "256", **extra}


def run_agent(tmp: Path, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    work = tmp / "work"  # an empty folder, outside any git repository
    work.mkdir(exist_ok=True)
    (tmp / "codex").mkdir(exist_ok=True)
    try:
        return subprocess.run(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{argv[:4]} ran past {RUN_TIMEOUT_S} s:\nstdout: {exc.stdout}\nstderr: {exc.stderr}")


def launch(tmp: Path, url: str, agent: str, model: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run_agent(tmp, [sys.executable, str(ROOT / "app.py"), "launch", agent, "--model", model, "--", *args],
                     agent_env(tmp, url, **env))


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def said(proc: subprocess.CompletedProcess, server: ServerProcess) -> str:
    return f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}\n{server.log()}"


# --- the created models ------------------------------------------------------------------------------
class Recorder(BaseHTTPRequestHandler):
    """A stub server: /api/show answers (launch asks it); a request to /v1/messages or /v1/responses is recorded
    and refused (400), which ends the agent's run at once."""

    bodies: list[dict]

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path.startswith(("/v1/messages", "/v1/responses")):
            self.bodies.append(body)
            self.reply(400, {"type": "error", "error": {"type": "invalid_request_error", "message": "recorded"}})
        else:
            self.reply(200, {})


def agent_turns(tmp: Path, agent: str, *args: str) -> list[dict]:
    """The turns of the agent's first request for these arguments, as chat messages, less the instructions that
    open it (the real request brings those): what each agent sends around the prompt (Claude Code's
    <system-reminder> block and agent list, Codex's <environment_context>) depends on its version."""
    handler = type("Recording", (Recorder,), {"bodies": []})
    stub = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        launch(tmp, f"http://127.0.0.1:{stub.server_address[1]}", agent, SMOL, *args)
    finally:
        stub.shutdown()
        stub.server_close()
    assert handler.bodies, f"{agent} sent no request"

    def text(content) -> str:
        return content if isinstance(content, str) else "".join(b.get("text", "") for b in content)
    body = handler.bodies[0]
    if agent == "claude":  # its instructions are in `system`
        return [{"role": m["role"], "content": text(m["content"])} for m in body["messages"]]
    return [{"role": m["role"], "content": text(m["content"])} for m in body["input"]
            if m.get("type") == "message" and m["role"] == "user"]  # the developer turns are its instructions


def tool_example(prompt: list[dict], call: dict, output: str) -> list[dict]:
    """The prompt's turns, the call in the <tool_call> form the server parses, its output and the answer."""
    return [*prompt, {"role": "assistant", "content": f"<tool_call>{json.dumps(call)}</tool_call>"},
            {"role": "tool", "content": output}, {"role": "assistant", "content": TOOL_ANSWER}]


def create(server: ServerProcess, name: str, messages: list[dict]) -> str:
    r = server.client.post("/api/create", json={"model": name, "from": SMOL, "parameters": PARAMETERS,
                                                "messages": messages, "stream": False})
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    return name


@pytest.fixture(scope="module")
def claude_models(server, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("claude-capture")
    hello = agent_turns(tmp / "hello", "claude", "-p", HELLO)
    tool = tool_example(agent_turns(tmp / "tool", "claude", "-p", TOOL_PROMPT, *CLAUDE_TOOL_ARGS),
                        {"name": "Bash", "arguments": {"command": TOOL_COMMAND}}, TOOL_OUTPUT)
    return {"hello": create(server, "claude-agent:hello", [*hello, {"role": "assistant", "content": HELLO_REPLY}]),
            "tool": create(server, "claude-agent:tool", tool * 2)}


# Codex's shell tool's output comes back framed like this.
CODEX_OUTPUT = f"Chunk ID: 4f1a2b\nWall time: 0.0000 seconds\nProcess exited with code 0\nOriginal token count: 4\n" \
               f"Output:\n{TOOL_OUTPUT}\n"
CODEX_ARGS = ("exec", "--skip-git-repo-check", "--json")


@pytest.fixture(scope="module")
def codex_models(server, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("codex-capture")
    hello = agent_turns(tmp / "hello", "codex", *CODEX_ARGS, HELLO)
    tool = tool_example(agent_turns(tmp / "tool", "codex", *CODEX_ARGS, TOOL_PROMPT),
                        {"name": "exec_command", "arguments": {"cmd": TOOL_COMMAND}}, CODEX_OUTPUT)
    return {"hello": create(server, "codex-agent:hello", [*hello, {"role": "assistant", "content": HELLO_REPLY}]),
            "tool": create(server, "codex-agent:tool", tool * 2)}


# --- Claude Code ---------------------------------------------------------------------------------------
# Its Bash tool only (the default 24 tools are ~18k tokens, shortened by the server), allowed without asking.
CLAUDE_TOOL_ARGS = ("--tools", "Bash", "--allowedTools", "Bash")


@needs("claude")
def test_claude_print_says_hello(server, claude_models, tmp_path):
    proc = launch(tmp_path, server.url, "claude", claude_models["hello"], "-p", HELLO)
    assert proc.returncode == 0 and proc.stdout.strip(), said(proc, server)


@needs("claude")
def test_claude_stream_json_says_hello(server, claude_models, tmp_path):
    proc = launch(tmp_path, server.url, "claude", claude_models["hello"], "-p", "--output-format", "stream-json",
                  "--verbose", HELLO)
    assert proc.returncode == 0, said(proc, server)
    events = json_lines(proc.stdout)
    assert events[0]["type"] == "system" and events[0]["model"] == claude_models["hello"], events[0]
    result = events[-1]
    assert result["type"] == "result" and result["subtype"] == "success" and not result["is_error"], result
    assert result["result"].strip(), said(proc, server)


@needs("claude")
def test_claude_runs_a_tool_and_answers(server, claude_models, tmp_path):
    proc = launch(tmp_path, server.url, "claude", claude_models["tool"], "-p", TOOL_PROMPT, *CLAUDE_TOOL_ARGS,
                  "--output-format", "stream-json", "--verbose", "--include-partial-messages")
    assert proc.returncode == 0, said(proc, server)
    events = json_lines(proc.stdout)
    blocks = [(e["type"], b) for e in events if e["type"] in ("assistant", "user") for b in e["message"]["content"]
              if isinstance(b, dict)]
    calls = [b for kind, b in blocks if kind == "assistant" and b["type"] == "tool_use"]
    results = [b for kind, b in blocks if kind == "user" and b["type"] == "tool_result"]
    assert [c["name"] for c in calls] == ["Bash"] and "agent-tool-ok" in calls[0]["input"]["command"], said(
        proc, server)
    assert len(results) == 1 and results[0]["tool_use_id"] == calls[0]["id"] and not results[0].get("is_error")
    assert TOOL_OUTPUT in json.dumps(results[0]["content"]), results  # it ran: the model never wrote this text
    result = events[-1]  # the answer that came after the tool's output was sent
    assert result["type"] == "result" and result["subtype"] == "success" and not result["is_error"], result
    assert result["num_turns"] == 2 and result["result"].strip(), result
    # The answer streamed as it was made, though a tool is declared (its text in more than one delta).
    deltas = [e["event"]["delta"] for e in events if e["type"] == "stream_event"
              and e["event"]["type"] == "content_block_delta"]
    assert len([d for d in deltas if d["type"] == "text_delta"]) > 1, deltas


# --- Codex CLI ------------------------------------------------------------------------------------------
def codex_events(proc: subprocess.CompletedProcess, server: ServerProcess) -> list[dict]:
    assert proc.returncode == 0, said(proc, server)
    events = json_lines(proc.stdout)
    assert events[-1]["type"] == "turn.completed", said(proc, server)
    return events


def items(events: list[dict], kind: str) -> list[dict]:
    return [e["item"] for e in events if e["type"] == "item.completed" and e["item"]["type"] == kind]


@needs("codex")
def test_codex_exec_says_hello(server, codex_models, tmp_path):
    """launch's provider config: model_providers.ai_server with wire_api = "responses"."""
    proc = launch(tmp_path, server.url, "codex", codex_models["hello"], *CODEX_ARGS, HELLO)
    messages = items(codex_events(proc, server), "agent_message")
    assert messages and messages[-1]["text"].strip(), said(proc, server)


@needs("codex")
def test_codex_oss_says_hello(server, codex_models, tmp_path):
    """`codex --oss` as its documentation says for Ollama: it checks /api/version (>= 0.13.4) and that /api/tags
    lists the model, then talks to /v1/responses."""
    env = agent_env(tmp_path, server.url, CODEX_OSS_BASE_URL=f"{server.url}/v1")
    argv = [agent_binary("codex"), "exec", "--oss", "--local-provider", "ollama", "-m", codex_models["hello"],
            "-c", "analytics.enabled=false", "--skip-git-repo-check", "--json", HELLO]
    proc = run_agent(tmp_path, argv, env)
    messages = items(codex_events(proc, server), "agent_message")
    assert messages and messages[-1]["text"].strip(), said(proc, server)


@needs("codex")
def test_codex_runs_a_tool_and_answers(server, codex_models, tmp_path):
    proc = launch(tmp_path, server.url, "codex", codex_models["tool"], *CODEX_ARGS, TOOL_PROMPT)
    events = codex_events(proc, server)
    commands = items(events, "command_execution")
    assert len(commands) == 1 and "agent-tool-ok" in commands[0]["command"], said(proc, server)
    assert commands[0]["exit_code"] == 0 and TOOL_OUTPUT in commands[0]["aggregated_output"], commands
    ran = next(i for i, e in enumerate(events) if e.get("item") == commands[0])
    answers = items(events[ran:], "agent_message")  # the reply to the command's output
    assert answers and answers[-1]["text"].strip(), said(proc, server)
