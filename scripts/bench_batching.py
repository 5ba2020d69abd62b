"""How to batch on CPU, measured: serial generate(), one padded generate(), transformers'
ContinuousBatchingManager (generate_batch) and ai-server's BatchEngine, in one process, greedy,
EOS suppressed, the dtype the server picks. The choice is recorded in .specs/plans/batching.md.

    .venv/bin/python scripts/bench_batching.py MODEL_DIR [ROWS=16] [NEW_TOKENS=64]
"""
import json
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import app  # noqa: E402
path = sys.argv[1]
B, N = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (16, 64)
# Only one thread at a time may own an OpenMP team (see .specs/plans/batching.md): every contender
# runs on a fresh thread, and the engine exists only while it is measured.
settings = app.Settings(batching=False, prefix_cache_bytes=0)
loaded = app.TransformersBackend(settings).load(
    app.LoadPlan("m", path, "no", False, "cpu", app.choose_dtype("no", "auto", "cpu")))
model, tok = loaded.handle, loaded.tokenizer
qs = [f"Question {i}: tell me something about the number {i * 7}." for i in range(B)]
ps = [app.render_chat_prompt(tok, [{"role": "user", "content": q}]).ids for q in qs]
cfg = GenerationConfig(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=tok.eos_token_id or 0,
                       eos_token_id=model.generation_config.eos_token_id)
res: dict[str, list] = {}


def timed(name, fn):
    start = time.perf_counter()
    app.in_fresh_thread(fn)
    res.setdefault(name, []).append(round(time.perf_counter() - start, 2))
    print(name, res[name][-1], flush=True)


def serial():
    with torch.inference_mode():
        for p in ps:
            model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           generation_config=cfg)


def padded():
    w, pad = max(map(len, ps)), cfg.pad_token_id
    ids = torch.tensor([[pad] * (w - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps])
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, generation_config=cfg)


def cb():
    model.generate_batch(ps, generation_config=cfg, warmup=False, progress_bar=False)


def engine():
    batch = app.BatchEngine("bench", model, 0)

    def one(p):
        params = app.GenParams(max_tokens=N, temperature=0)
        gen = app.Generation(tok, params, lambda t: None)
        batch.run(app.Row(list(p), N, app.RowSampler(loaded, model, params), gen, set()))

    threads = [threading.Thread(target=one, args=(p,)) for p in ps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batch.close()


def warm_up():
    with torch.inference_mode():
        model.generate(torch.tensor([ps[0]]), max_new_tokens=4)


app.in_fresh_thread(warm_up)
# Interleaved: the machine is noisy; each contender runs twice, the best run counts.
ORDER = [("BatchEngine", engine), ("padded generate()", padded), ("generate_batch (CB)", cb),
         ("serial generate()", serial), ("BatchEngine", engine), ("padded generate()", padded),
         ("generate_batch (CB)", cb)]
for name, fn in ORDER:
    try:
        timed(name, fn)
    except Exception as exc:  # a contender that cannot run here is reported, not fatal
        print(name, "failed", type(exc).__name__, exc)
        res.setdefault(name, []).append(None)
best = {k: min(v) for k, v in res.items() if v and None not in v}
print(json.dumps({"rows": B, "new_tokens": N, "dtype": loaded.dtype, "seconds": res,
                  "tok_per_s_best": {k: round(B * N / v, 1) for k, v in best.items()}}))
