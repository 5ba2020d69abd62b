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

With `--image PATH` (and a vision model, e.g. `--model tiny/llava`: tests/models.py's make_tiny_llava
pulled from a tests/hub.py LocalHub) it attaches the picture as a user does ("+" menu, "Upload Files",
the file chooser), waits for its thumbnail, then sends the message. Open WebUI 0.12.4 allows images
unless its own model settings say `capabilities.vision: false` (the default is allowed; it does not read
Ollama's /api/show `capabilities`). Exit 0 when an answer appeared in the page and `--server-log` (then
required) shows ai-server's `model ...: N image(s) and M sound clip(s) in the prompt` line for the chat.
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
    ap.add_argument("--image", type=Path, help="a picture to attach to the message (needs --server-log)")
    args = ap.parse_args()
    if args.image and not (args.server_log and args.server_log.exists()):
        ap.error("--image needs --server-log: ai-server's log is how the check sees that the image arrived")
    if args.image and not args.image.is_file():
        ap.error(f"--image {args.image}: no such file")
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
        if args.image:
            attach(page, args)
        log_start = args.server_log.stat().st_size if args.server_log and args.server_log.exists() else 0
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
    print(f"answer ({len(answer.split())} words, {len(answer)} chars): {answer!r}\nscreenshot: {shot}")
    images = []
    if args.server_log and args.server_log.exists():
        with open(args.server_log, "rb") as f:
            f.seek(0 if not args.image else log_start)  # with an image: only what this chat logged
            for line in f.read().decode(errors="replace").splitlines():
                if "prompt trimmed" in line or args.image and "image(s) and" in line:
                    print("ai-server:", line)
                if re.search(rf"model {re.escape(args.model)}\S*: [1-9]\d* image\(s\) and", line):
                    images.append(line)
    if not args.image:
        return 0 if len(answer.split()) > 3 else 1
    if not images:
        print(f"FAIL: ai-server's log has no '{args.model}: N image(s) and ...' line since the message "
              "was sent: the image did not reach the model")
    if not answer.strip():
        print("FAIL: no answer appeared in the page")
    return 0 if images and answer.strip() else 1


def attach(page, args: argparse.Namespace) -> None:
    """Attach args.image as a user does: the "+" menu's "Upload Files" opens the file chooser. Returns
    once the upload has finished and the thumbnail shows; exits (1) when Open WebUI refuses it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    sent, done, toasts = [], [], []

    def is_upload(request) -> bool:
        return "/api/v1/files" in request.url and request.method == "POST"

    page.on("request", lambda r: sent.append(r) if is_upload(r) else None)
    page.on("response", lambda r: done.append(r) if is_upload(r.request) else None)

    def refused(why: str) -> SystemExit:
        page.screenshot(path=str(args.out / "attach.png"))
        return SystemExit(f"FAIL: {why} (Open WebUI said: {toasts}); screenshot {args.out / 'attach.png'}")

    try:
        page.locator("#input-menu-button").click(timeout=10_000)
        with page.expect_file_chooser(timeout=10_000) as chooser:
            page.get_by_text("Upload Files", exact=True).click(timeout=10_000)
        chooser.value.set_files(str(args.image))
    except PlaywrightTimeout as e:  # the menu changed: the chat's hidden file input is what it opens
        print(f"the '+' menu's Upload Files did not open a file chooser ({e.message.splitlines()[0]}); "
              "setting the chat's file input instead")
        page.keyboard.press("Escape")
        page.locator("#files-input").set_input_files(str(args.image))
    started = time.monotonic()
    while not done and time.monotonic() - started < (120 if sent else 10):
        page.wait_for_timeout(500)  # a refusal is a toast ("Selected model(s) do not support image inputs")
        toasts += [t for t in page.locator("[data-sonner-toast]").all_inner_texts() if t not in toasts]
    if not done:
        raise refused("Open WebUI did not upload the picture" if not sent else "the upload did not finish")
    if not done[-1].ok:
        raise refused(f"Open WebUI's upload answered {done[-1].status}: {done[-1].text()[:500]}")
    form = page.locator("#chat-input").locator("xpath=ancestor::form[1]")  # the thumbnail shows in the input
    try:
        form.locator("img").last.wait_for(timeout=30_000)
    except PlaywrightTimeout:
        raise refused("the attachment did not show in the chat input") from None
    page.wait_for_timeout(1000)
    page.screenshot(path=str(args.out / "attached.png"))
    print(f"attached {args.image} ({args.image.stat().st_size} bytes); screenshot {args.out / 'attached.png'}")


if __name__ == "__main__":
    sys.exit(main())
