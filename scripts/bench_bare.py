"""The single-stream ceiling: bare model.generate() in one process, no server, on the benchmark's
prompt and settings (greedy, EOS banned, the dtype ai-server picks). Reports output tok/s the way
scripts/bench.py does at C=1: tokens over the whole request, prefill included.

    .venv/bin/python scripts/bench_bare.py MODEL_DIR [--max-tokens 128] [--ban-tokens 0,2] [--out bare.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app import TORCH_DTYPES, choose_dtype  # noqa: E402  the same dtype choice as the server
from scripts.bench import prompt_of  # noqa: E402  the same prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ban-tokens", default="0,2")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype = choose_dtype("no", "auto", "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=TORCH_DTYPES.get(dtype, "auto")).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt_of(args.prompt_words)}],
                                         tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    bias = [[[int(t)], -100.0] for t in args.ban_tokens.split(",") if t] or None
    rates = []
    with torch.inference_mode():
        for run in range(args.runs + 1):  # the first is a warm-up
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 do_sample=False, sequence_bias=bias)
            n = out.shape[1] - ids.shape[1]
            if run:
                rates.append(n / (time.perf_counter() - start))
    result = {"engine": "bare model.generate()", "dtype": str(model.dtype), "prompt_tokens": ids.shape[1],
              "output_tokens": n, "tok_s_median": round(statistics.median(rates), 1),
              "tok_s_runs": [round(r, 1) for r in rates]}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
