"""Seconds per image and denoising steps per second of ai-server's diffusers backend, in one process, on the
tiny random Stable Diffusion pipeline the tests use (tests/models.py), or on any diffusers folder given: txt2img,
inpainting (a centre square repainted at strength 0.75) and hires fix (2x, Latent, its steps at strength 0.5).

    .venv/bin/python scripts/bench_images.py                         # tiny pipeline: 64x64 and 512x512, 20 steps
    .venv/bin/python scripts/bench_images.py /path/to/sd-folder --sizes 512 --steps 20 --device cuda --dtype fp16
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
    parser.add_argument("--modes", default="txt2img,inpaint,hires")
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
        for size, mode in ((int(s), m) for s in args.sizes.split(",") for m in args.modes.split(",")):
            params = app.ImageParams("a lighthouse at dusk", width=size, height=size, steps=args.steps,
                                     sampler=args.sampler, seed=1)
            if mode == "inpaint":
                from PIL import Image

                source = backend.generate_images(loaded, params, app.ImageJob("bench", args.steps), metrics)[0][0]
                mask = Image.new("L", (size, size), 0)
                mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
                params = app.ImageParams("a lighthouse at dusk", width=size, height=size, steps=args.steps,
                                         sampler=args.sampler, seed=1, init_images=[source], mask=mask)
            elif mode == "hires":
                params.hires = app.Hires(2 * size, 2 * size, "Latent", args.steps, 0.5, 2.0)
            steps = params.n_iter * params.denoising_steps(args.steps)
            backend.generate_images(loaded, params, app.ImageJob("bench", steps), metrics)  # warm-up
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                backend.generate_images(loaded, params, app.ImageJob("bench", steps, passes=1 + (mode == "hires")),
                                        metrics)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            size_out = 2 * size if mode == "hires" else size
            rows.append({"mode": mode, "size": f"{size_out}x{size_out}", "steps": steps, "sampler": args.sampler,
                         "dtype": args.dtype, "device": args.device, "s_per_image": round(median, 3),
                         "steps_per_s": round(steps / median, 1), "runs_s": [round(t, 3) for t in times]})
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
