"""How the server is started and driven from a shell (issue 13): `python -m uvicorn app:app` (the
seeds' documented command), `python app.py --help`, and the `ollama`-like client commands (pull with
progress from the local hub, list, show, run, ps, stop, cp, rm) with exit codes a script can use."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT, ServerProcess, free_port


def test_python_m_uvicorn_app_app_serves(hub, tmp_path):
    """`app:app` is built from the environment on first access (state still opens in the lifespan), and
    it knows the address uvicorn's own flags bound it to (the Host check applies to loopback binds)."""
    port = free_port()
    env = {**os.environ, "AI_SERVER_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url,
           "HF_HUB_CACHE": str(tmp_path / "home" / "hf-cache"), "DEFAULT_MODEL": "", "EMBED_MODEL": "",
           "STT_MODEL": "", "TTS_MODEL": "", "AI_SERVER_PORT": "1"}  # uvicorn's --port wins: it is where the socket is
    log = open(tmp_path / "uvicorn.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        assert httpx.get(f"{url}/api/version").json()["version"]
        assert httpx.get(f"{url}/api/tags").json() == {"models": []}
        r = httpx.get(f"{url}/api/tags", headers={"Host": "evil.example:80"})
        assert r.status_code == 403 and "DNS-rebinding" in r.json()["error"]
        assert f"serving on 127.0.0.1:{port}" in (tmp_path / "uvicorn.log").read_text()
    finally:
        proc.terminate()
        proc.wait(60)
    # uvicorn re-raises the SIGTERM it handled (exit -15) once the app has shut down cleanly.
    assert proc.returncode in (0, -15) and "Application shutdown complete" in (tmp_path / "uvicorn.log").read_text()


def test_help_names_every_command_and_the_environment_table():
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("serve", "worker", "import-default", "--host", "--port", "--role", "README.md"):
        assert word in out.stdout, word


# --- the client commands, as a shell script would use them --------------------------------------------
@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers,pipeline",
                           API_KEYS="cli-key")
    yield server.start()
    server.stop()


def cli(server: ServerProcess | None, *args: str, stdin: str = "", url: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AI_SERVER_URL": url or server.url, "AI_SERVER_API_KEY": "cli-key", "OLLAMA_HOST": ""}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300)


def test_pull_list_show_run_ps_stop_cp_rm(server, hub):
    out = cli(server, "pull", "tiny/llama-h")
    assert out.returncode == 0, out.stderr
    assert "pulling manifest" in out.stderr and "success" in out.stderr
    bars = set(re.findall(r"pulling ([0-9a-f]{12})", out.stderr))  # a progress bar per file, as ollama's per layer
    assert bars == {(f.sha256 or f.oid)[:12] for f in hub.repos["tiny/llama-h"].files.values()}, out.stderr
    listed = cli(server, "list")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert any(line.startswith("tiny/llama-h:latest ") for line in listed.stdout.splitlines()), listed.stdout
    shown = cli(server, "show", "tiny/llama-h")
    assert shown.returncode == 0 and "llama" in shown.stdout and "completion" in shown.stdout
    # The CLI samples (as `ollama run` does): a random tiny model may end at once, so the answer may be empty,
    # but it is printed whole, newline-ended, and the model is then loaded (ps).
    ran = cli(server, "run", "tiny/llama-h", "hello", "there")
    assert ran.returncode == 0 and ran.stdout.endswith("\n"), ran.stderr
    ps = cli(server, "ps")
    assert ps.returncode == 0 and "tiny/llama-h:latest" in ps.stdout and "100% CPU" in ps.stdout
    assert cli(server, "stop", "tiny/llama-h").returncode == 0
    assert "tiny/llama-h:latest" not in cli(server, "ps").stdout
    # A chat from stdin, as a pipe gives it (no terminal): the answer, then exit 0.
    piped = cli(server, "run", "tiny/llama-h", stdin="hello\n")
    assert piped.returncode == 0 and piped.stdout.endswith("\n"), piped.stderr
    assert cli(server, "cp", "tiny/llama-h", "mine:v1").stdout.strip() == "copied 'tiny/llama-h' to 'mine:v1'"
    removed = cli(server, "rm", "mine:v1", "tiny/llama-h")
    assert removed.returncode == 0 and removed.stdout.splitlines() == ["deleted 'mine:v1'", "deleted 'tiny/llama-h'"]
    assert "tiny/llama-h" not in cli(server, "list").stdout


def test_errors_and_exit_codes_a_script_can_use(server):
    gone = cli(server, "rm", "no/such-model")
    assert gone.returncode == 1 and "not found" in gone.stderr and not gone.stdout
    bad = cli(server, "pull", "tiny/no-such-repo")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("Error: ")
    usage = cli(server, "cp", "only-one")
    assert usage.returncode == 2 and "usage: python app.py cp SOURCE DEST" in usage.stderr
    down = cli(None, "list", url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "could not connect" in down.stderr and "python app.py serve" in down.stderr
    wrong_key = subprocess.run([sys.executable, str(ROOT / "app.py"), "list"], capture_output=True, text=True,
                               timeout=300, env={**os.environ, "AI_SERVER_URL": server.url,
                                                 "AI_SERVER_API_KEY": "wrong", "OLLAMA_HOST": ""})
    assert wrong_key.returncode == 1 and "API key" in wrong_key.stderr


def test_launch_says_what_to_do_when_it_cannot_start(server, tmp_path):
    """`launch` (issue 22) checks the server and the model before it runs an agent, and says what to do when
    the agent is not installed (the agents themselves run in tests/test_agents.py)."""
    no_model = cli(server, "launch", "claude", "--model", "no/such-model")
    assert no_model.returncode == 1 and "not found" in no_model.stderr
    default = cli(server, "launch", "codex")  # DEFAULT_MODEL (smollm2:135m) is not on this server
    assert default.returncode == 1 and "smollm2:135m" in default.stderr
    down = cli(None, "launch", "claude", url=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 3 and "could not connect" in down.stderr
    assert cli(server, "launch", "cursor").returncode == 2  # not an agent it knows
    assert cli(server, "pull", "tiny/llama-h").returncode == 0
    try:  # no agent on PATH, none installed in the cache folder
        env = {**os.environ, "AI_SERVER_URL": server.url, "AI_SERVER_API_KEY": "cli-key", "OLLAMA_HOST": "",
               "PATH": os.path.dirname(sys.executable), "XDG_CACHE_HOME": str(tmp_path)}
        missing = subprocess.run([sys.executable, str(ROOT / "app.py"), "launch", "claude", "--model", "tiny/llama-h"],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert missing.returncode == 2 and "scripts/setup.sh --agents" in missing.stderr, missing.stderr
    finally:
        cli(server, "rm", "tiny/llama-h")
