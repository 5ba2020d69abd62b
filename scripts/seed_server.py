"""The seed design, kept as the benchmark baseline: one transformers pipeline, one request at a
time behind a lock, streamed with TextIteratorStreamer, OpenAI SSE only.

    .venv/bin/python scripts/seed_server.py MODEL_DIR [--port 8091]
"""

import argparse
import json
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import TextIteratorStreamer, pipeline


def create_app(model_dir: str) -> FastAPI:
    pipe = pipeline("text-generation", model=model_dir, device=-1)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run() -> None:
            with lock, torch.inference_mode():
                # logit_bias only so the benchmark can ban EOS for every peer alike (the seed had none).
                bias = [[[int(t)], float(b)] for t, b in (body.get("logit_bias") or {}).items()] or None
                pipe(body["messages"], max_new_tokens=body.get("max_tokens", 128), do_sample=False,
                     streamer=streamer, sequence_bias=bias)

        threading.Thread(target=run, daemon=True).start()

        def events():
            text = ""
            for piece in streamer:  # blocks a threadpool worker per request, as the seed did
                text += piece
                chunk = {"created": int(time.time()), "choices": [{"index": 0, "delta": {"content": piece}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            # The seed reported no counts; re-tokenizing the text lets the benchmark count tokens, not pieces.
            usage = {"completion_tokens": len(pipe.tokenizer(text, add_special_tokens=False)["input_ids"])}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, default=8091)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")
