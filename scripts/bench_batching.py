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
b = app.TransformersBackend(app.Settings())
loaded = b.load(app.LoadPlan("m", path, "no", False, "cpu", app.choose_dtype("no", "auto", "cpu")))
model, tok = loaded.handle, loaded.tokenizer
qs = [f"Question {i}: tell me something about the number {i * 7}." for i in range(B)]
ps = [app.render_chat_prompt(tok, [{"role": "user", "content": q}]).ids for q in qs]
cfg = GenerationConfig(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=tok.eos_token_id or 0,
                       eos_token_id=model.generation_config.eos_token_id)
res = {}
def timed(name, fn):
    t = time.perf_counter(); fn(); res.setdefault(name, []).append(round(time.perf_counter() - t, 2)); print(name, res[name][-1], flush=True)
def serial():
    with torch.inference_mode():
        for p in ps:
            model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), generation_config=cfg)
def padded():
    w = max(map(len, ps)); pad = cfg.pad_token_id
    ids = torch.tensor([[pad] * (w - len(p)) + p for p in ps]); mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps])
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, generation_config=cfg)
def cb():
    model.generate_batch(ps, generation_config=cfg, warmup=False)
def engine():
    def one(p):
        params = app.GenParams(max_tokens=N, temperature=0)
        gen = app.Generation(tok, params, lambda t: None)
        loaded.engine.run(app.Row(list(p), N, app.RowSampler(loaded, model, params), gen, set()))
    ths = [threading.Thread(target=one, args=(p,)) for p in ps]; [t.start() for t in ths]; [t.join() for t in ths]
with torch.inference_mode():
    model.generate(torch.tensor([ps[0]]), max_new_tokens=4)
# Interleaved: the machine is noisy; each contender runs twice, the best run counts.
ORDER = [("BatchEngine", engine), ("padded generate()", padded), ("generate_batch (CB)", cb),
         ("serial generate()", serial), ("BatchEngine", engine), ("padded generate()", padded)]
for name, fn in ORDER:
    try:
        timed(name, fn)
    except Exception as exc:
        print(name, "failed", type(exc).__name__, exc); res.setdefault(name, []).append(None)
best = {k: min(v) for k, v in res.items() if v and None not in v}
print(json.dumps({"rows": B, "new_tokens": N, "dtype": loaded.dtype, "seconds": res,
                  "tok_per_s_best": {k: round(B * N / v, 1) for k, v in best.items()}}))
loaded.engine.close()
