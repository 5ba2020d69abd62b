"""Speculative decoding on llama-server (LLAMA_SPEC_TYPE) against none: one stream, greedy, tasks whose answer
repeats its prompt (copy a text, edit code). The embedded SmolLM2 (HF, converted to GGUF as the CPU default),
one ai-server at a time, rounds interleaved (off, on, off, on, ...), every round printed, then medians.

    .venv/bin/python scripts/bench_spec.py [--rounds 3] [--spec ngram-map-k] [--max-tokens 160]

Needs llama-server and its converter (scripts/setup.sh --llama). Numbers: README "Performance".
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "To be or not to be, that is the question. All that glitters is not gold. ")
CODE = '''def total(items):
    result = 0
    for item in items:
        result = result + item.price * item.quantity
    return result


def average(items):
    if not items:
        return 0
    return total(items) / len(items)
'''
TASKS = {"copy a text": "Repeat this text exactly, word for word:\n\n" + TEXT * 3,
         "edit code": "Rename the function `total` to `grand_total` everywhere in this code and print the whole "
                      "code again:\n\n" + CODE}


def serve(home: Path, port: int, spec: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "AI_SERVER_HOME": str(home), "AI_SERVER_PORT": str(port), "EMBED_MODEL": "",
           "STT_MODEL": "", "TTS_MODEL": "", "KEEP_ALIVE": "-1", "HF_HUB_OFFLINE": "1", "CONVERT_HF_TO_GGUF": "1",
           "AI_SERVER_BACKENDS": "llamacpp", "LLAMA_SPEC_TYPE": spec, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "serve"], env=env, stdout=log.open("a"),
                            stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit(f"ai-server did not start: {log}")


def ask(port: int, prompt: str, max_tokens: int) -> tuple[float, int, str]:
    start = time.monotonic()
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=600, json={
        "model": "smollm2:135m", "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}]})
    r.raise_for_status()
    body = r.json()
    return time.monotonic() - start, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spec", default="ngram-map-k")
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    home = tmp / "home"
    subprocess.run([sys.executable, str(ROOT / "app.py"), "import-default"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "AI_SERVER_HOME": str(home), "EMBED_MODEL": "", "STT_MODEL": "",
                        "TTS_MODEL": ""})
    rates: dict[tuple[str, str], list[float]] = {}
    texts: dict[tuple[str, str], set[str]] = {}
    try:
        for r in range(args.rounds):
            for spec in ("", args.spec):
                proc = serve(home, 8161, spec, tmp / "server.log")
                try:
                    ask(8161, "hi", 4)  # loads (and, the first time, converts) the model
                    for task, prompt in TASKS.items():
                        seconds, tokens, text = ask(8161, prompt, args.max_tokens)
                        rates.setdefault((task, spec), []).append(tokens / seconds)
                        texts.setdefault((task, spec), set()).add(text)
                        print(f"round {r} {task:12} spec={spec or 'off':12} {tokens} tokens in {seconds:.2f} s: "
                              f"{tokens / seconds:.1f} tok/s", flush=True)
                    metrics = httpx.get("http://127.0.0.1:8161/metrics").text
                    drafted = [ln for ln in metrics.splitlines() if ln.startswith("ai_server_draft")]
                    if drafted:
                        print("  " + "; ".join(drafted), flush=True)
                finally:
                    proc.terminate()
                    proc.wait(60)
        print("\n| task | off tok/s | " + args.spec + " tok/s | ratio | same text |\n|---|---|---|---|---|")
        for task in TASKS:
            off, on = (statistics.median(rates[(task, s)]) for s in ("", args.spec))
            same = texts[(task, "")] == texts[(task, args.spec)] and len(texts[(task, "")]) == 1
            print(f"| {task} | {off:.1f} | {on:.1f} | {on / off:.2f}x | {same} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
