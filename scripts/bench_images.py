"""Seconds per image and denoising steps per second of ai-server's diffusers backend, in one process, on the
tiny random Stable Diffusion pipeline the tests use (tests/models.py), or on any diffusers folder given.

    .venv/bin/python scripts/bench_images.py                         # tiny pipeline: 64x64 and 512x512, 20 steps
    .venv/bin/python scripts/bench_images.py /path/to/sd-folder --sizes 512 --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a diffusers folder (default: the tiny test pipeline)")
    parser.add_argument("--sizes", default="64,512", help="square sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sampler", default="DPM++ 2M Karras")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from models import make_tiny_diffusion

            folder = str(make_tiny_diffusion(Path(tmp) / "sd"))
        backend = app.DiffusersBackend(app.Settings())
        loaded = backend.load(app.LoadPlan("bench", folder, "no", False, args.device, args.dtype))
        metrics = app.Metrics()
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            params = app.ImageParams("a lighthouse at dusk", width=size, height=size, steps=args.steps,
                                     sampler=args.sampler, seed=1)
            backend.generate_images(loaded, params, app.ImageJob("bench", args.steps), metrics)  # warm-up
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                backend.generate_images(loaded, params, app.ImageJob("bench", args.steps), metrics)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            rows.append({"size": f"{size}x{size}", "steps": args.steps, "sampler": args.sampler, "dtype": args.dtype,
                         "device": args.device, "s_per_image": round(median, 3),
                         "steps_per_s": round(args.steps / median, 1), "runs_s": [round(t, 3) for t in times]})
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
