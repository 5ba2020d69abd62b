"""Time to first token on a long prompt (~1 000 tokens), one stream: ai-server serving the embedded HF model
converted to GGUF (the CPU default) against bare llama-server on the same converted file, started with the flags
ai-server gives its own. Each prompt is new (no prefix reuse); rounds interleave the two servers; every request
is printed, then medians.

    .venv/bin/python scripts/bench_ttft.py [--rounds 2] [--requests 4] [--words 950]

Needs llama-server and its converter (scripts/setup.sh --llama). Numbers: README "Performance".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("river stone lantern orchard copper meadow harbor violet thunder saddle ember willow canyon marble falcon "
         "pepper glacier summit velvet anchor").split()


def wait(url: str, proc: subprocess.Popen) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not start")


def ttft(url: str, model: str, prompt: str) -> tuple[float, int]:
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=600, json={
            "model": model, "stream": True, "temperature": 0, "max_tokens": 8, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}) as r:
        first, tokens = None, 0
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.monotonic() - start
            tokens = (chunk.get("usage") or {}).get("prompt_tokens", tokens)
    return first or float("nan"), tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--words", type=int, default=950)
    args = parser.parse_args()
    binary = subprocess.run([str(ROOT / "scripts" / "build-llama-server.sh"), "--path"], capture_output=True,
                            text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ttft-"))
    home, rng, times = tmp / "home", random.Random(0), {"ai-server": [], "llama-server": []}
    env = {**os.environ, "AI_SERVER_HOME": str(home), "EMBED_MODEL": "", "STT_MODEL": "", "TTS_MODEL": "",
           "KEEP_ALIVE": "-1", "HF_HUB_OFFLINE": "1", "CONVERT_HF_TO_GGUF": "1", "AI_SERVER_BACKENDS": "llamacpp",
           "OMP_NUM_THREADS": "2", "AI_SERVER_PORT": "8171", "LLAMA_SERVER": binary}
    subprocess.run([sys.executable, str(ROOT / "app.py"), "import-default"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = (tmp / "servers.log").open("a")
    try:
        for r in range(args.rounds):
            for name in times:
                if name == "ai-server":
                    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "serve"], env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
                    url, model = "http://127.0.0.1:8171", "smollm2:135m"
                    wait(url, proc)
                    ttft(url, model, "hi")  # loads (the first time: converts) the model
                else:
                    gguf = next((home / "gguf").glob("*.gguf"))
                    proc = subprocess.Popen([binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", "8172", "-np",
                                             "16", "-c", str(16 * 4096), "-kvu", "--jinja", "--no-webui", "--cache-ram",
                                             "256", "-ngl", "0"], stdout=log, stderr=subprocess.STDOUT)
                    url, model = "http://127.0.0.1:8172", "smollm2"
                    wait(url, proc)
                try:
                    for i in range(args.requests):
                        prompt = f"Request {r}-{i}. Summarise: " + " ".join(rng.choice(WORDS) for _ in range(args.words))
                        seconds, tokens = ttft(url, model, prompt)
                        times[name].append(seconds)
                        print(f"round {r} {name:12} prompt {tokens} tokens: first token after {seconds * 1000:.0f} ms",
                              flush=True)
                finally:
                    proc.terminate()
                    proc.wait(60)
        ours, bare = (statistics.median(times[n]) for n in ("ai-server", "llama-server"))
        print(f"\nmedian TTFT: ai-server {ours * 1000:.0f} ms, bare llama-server {bare * 1000:.0f} ms: "
              f"{ours / bare:.2f}x")
    finally:
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
