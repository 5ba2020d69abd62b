#!/usr/bin/env python3
"""Open WebUI's browser chat against ai-server, end to end, in headless Chromium (issue 13).

Outside the CI gate: `pip install open-webui` is large. One-time setup, outside the repo:

    python3 -m venv ~/.cache/ai-server/owui && ~/.cache/ai-server/owui/bin/pip install torch==2.13.0 \
        open-webui==0.12.4 playwright==1.65.2
    sudo apt-get install -y chromium        # Playwright drives Debian's Chromium (no browser download)

Then, with ai-server serving smollm2:135m on 127.0.0.1:8005 (`python app.py serve`):

    ~/.cache/ai-server/owui/bin/python scripts/open_webui_check.py [--out /tmp/owui]

It starts Open WebUI (no login, offline, pointed at ai-server's Ollama API), opens it in Chromium,
sends one chat message as a user would, waits for the answer, saves a screenshot, and prints the
answer and what ai-server logged about the prompt (its `prompt trimmed ...` line, if any). Before the
fix, the browser's built-in tools (36, ~26 KB) filled SmolLM2's context and the answer was one token.
Exit 0 when the answer has more than a few words.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="http://127.0.0.1:8005", help="ai-server's URL")
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--port", type=int, default=8080, help="Open WebUI's port")
    ap.add_argument("--out", type=Path, default=Path("/tmp/owui"), help="screenshot, logs and Open WebUI's data")
    ap.add_argument("--server-log", type=Path, help="ai-server's log, to show what it said about the prompt")
    ap.add_argument("--message", default="What is the capital of France?")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wait_http(f"{args.server}/api/version", 10)
    env = {**os.environ, "OLLAMA_BASE_URL": args.server, "WEBUI_AUTH": "False", "ENABLE_OPENAI_API": "False",
           "OFFLINE_MODE": "True", "HF_HUB_OFFLINE": "1", "ENABLE_VERSION_UPDATE_CHECK": "False",
           "RAG_EMBEDDING_ENGINE": "ollama", "RAG_EMBEDDING_MODEL": "all-minilm", "DEFAULT_MODELS": args.model,
           "DATA_DIR": str(args.out / "data"), "ENABLE_EVALUATION_ARENA_MODELS": "False"}
    webui = shutil.which("open-webui", path=os.path.dirname(sys.executable)) or "open-webui"
    log = open(args.out / "open-webui.log", "w")
    proc = subprocess.Popen([webui, "serve", "--host", "127.0.0.1", "--port", str(args.port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=args.out)  # its .webui_secret_key goes there
    try:
        wait_http(f"http://127.0.0.1:{args.port}/health", 600)
        return drive(args)
    finally:
        proc.terminate()
        proc.wait(30)


def drive(args: argparse.Namespace) -> int:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{args.port}/", wait_until="domcontentloaded", timeout=120_000)
        box = page.locator("#chat-input")
        box.wait_for(timeout=120_000)
        page.wait_for_timeout(3000)  # first-run dialogs (what's new) open a moment after the page
        for _ in range(5):
            dialog = page.locator('div[role="dialog"]')
            if not dialog.count() or not dialog.first.is_visible():
                break
            page.screenshot(path=str(args.out / "dialog.png"))
            buttons = dialog.first.get_by_role("button", name=re.compile(r"okay|let's go|get started|close|dismiss",
                                                                          re.IGNORECASE))
            if buttons.count():
                buttons.first.click()
            else:
                page.keyboard.press("Escape")
            page.wait_for_timeout(1000)
        box.click()
        page.keyboard.type(args.message)
        page.keyboard.press("Enter")
        # The answer is done when its text has stopped changing for a few seconds.
        answer, stable, deadline = "", 0, time.monotonic() + 600
        while stable < 5 and time.monotonic() < deadline:
            page.wait_for_timeout(1000)
            boxes = page.locator("#response-content-container")
            text = boxes.last.inner_text() if boxes.count() else ""
            stable = stable + 1 if text and text == answer else 0
            answer = text
        shot = args.out / "open-webui.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"answer ({len(answer.split())} words): {answer!r}\nscreenshot: {shot}")
    if args.server_log and args.server_log.exists():
        for line in args.server_log.read_text(errors="replace").splitlines():
            if "prompt trimmed" in line:
                print("ai-server:", line)
    return 0 if len(answer.split()) > 3 else 1


if __name__ == "__main__":
    sys.exit(main())
