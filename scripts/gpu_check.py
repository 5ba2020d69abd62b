#!/usr/bin/env python3
"""Every CUDA path of ai-server in one run, for a GPU machine that comes rarely and briefly (issue 28).

    scripts/gpu_check.sh                 on the GPU machine (installs .gpu-wheelhouse/ first, when it is there)
    scripts/gpu_check.sh --cpu           the rehearsal: the same checks on CPU, CUDA-only ones skipped (CI runs it)
    scripts/gpu_check.py --one NAME      one check, in this process (the driver runs each this way)

Each check runs in a process of its own under a time budget (a crash or a hang costs that check only), with tiny
models made in-process (tests/models.py): nothing is fetched. The report is JSON (--json, default
$OUT/gpu_check.json where $OUT is set, else /tmp/gpu_check.json) and a summary; exit 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# name, seconds it may take, what it proves; in order of value
CHECKS = [
    ("env", 60, "torch, CUDA, the card, library versions"),
    ("transformers", 120, "the transformers backend: batch engine at 1 and 16 streams, greedy equal to CPU fp32, "
                          "memory freed on unload"),
    ("bitsandbytes", 90, "4-bit and 8-bit loads: their quantisation and real memory"),
    ("q4_by_size", 30, "the seed's rule: quantize=auto picks q4 at MODEL_Q4_THRESHOLD_BYTES"),
    ("diffusers", 90, "txt2img in fp16 (fp32 on CPU), and the CPU-offload path"),
    ("vision", 90, "a vision model (tiny LLaVA) in the batch engine: two images, two answers"),
    ("audio", 90, "a model that hears (tiny Qwen2-Audio): two sounds, two answers"),
    ("lora", 90, "two LoRA adapters beside one base, rows of each in one step, equal to PEFT's merged model"),
    ("compiled_decoding", 10, "CUDA graphs in the batch engine"),
    ("vllm", 10, "vLLM on CUDA"),
    # Last, and on the GPU machine a command of its own (--only llama_server): its CUDA build takes minutes
    ("llama_server", 500, "llama-server built for this machine (CUDA: the card's architecture) serving a vision GGUF "
                          "with -ngl all"),
]
WHEELHOUSE = Path(os.environ.get("GPU_WHEELHOUSE") or ROOT / ".gpu-wheelhouse")


class Skip(Exception):
    """The check does not apply here; its message says why."""


def tiny(make, seed: int = 0) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "model"
    return make(folder, seed)


def plan(app, path: Path, device: str, dtype: str, quantization: str = "no"):
    return app.LoadPlan("check", str(path), quantization, False, device, dtype)


def greedy(app, loaded, ids: list[int], n: int = 16, adapter: str | None = None) -> list[int]:
    return answer(app, loaded, app.Prompt("", list(ids)), n, adapter)


def answer(app, loaded, prompt, n: int = 8, adapter: str | None = None) -> list[int]:
    """The greedy output ids of `prompt` (a media prompt too) on the transformers backend."""
    params = app.GenParams(max_tokens=n, temperature=0.0, adapter=adapter)
    gen = app.DecodeState(loaded.tokenizer, params, lambda _t: None, lambda _n: None)
    return app.TransformersBackend(app.Settings()).generate(loaded, prompt, params, gen).output_ids


def streams(app, loaded, ids: list[int], count: int, n: int = 32) -> float:
    """Tokens per second with `count` requests at once (each on a thread, as the server runs them)."""
    out: list[int] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda: out.append(len(greedy(app, loaded, ids, n)))) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(sum(out) / (time.perf_counter() - start), 1)


def check_env(app, device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for module in ("transformers", "peft", "diffusers", "bitsandbytes", "accelerate", "xgrammar", "fastapi"):
        info[module] = app.package_version(module)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gb=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info


def check_transformers(app, device: str) -> dict:
    import torch
    from models import make_tiny_model

    folder = tiny(make_tiny_model)
    ids = list(range(5, 25))
    backend = app.TransformersBackend(app.Settings())
    cpu = backend.load(plan(app, folder, "cpu", "fp32"))
    want = greedy(app, cpu, ids)
    with torch.inference_mode():
        cpu_logits = cpu.handle(torch.tensor([ids])).logits[0, -1].float()
    backend.unload(cpu)
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    loaded = backend.load(plan(app, folder, device, "fp32"))
    with torch.inference_mode():
        logits = loaded.handle(torch.tensor([ids], device=loaded.handle.device)).logits[0, -1].float().cpu()
    got = greedy(app, loaded, ids)
    out = {"device": loaded.device, "batch_engine": loaded.engine is not None,
           "logits_max_abs_diff_vs_cpu": float((logits - cpu_logits).abs().max()), "greedy_equal_to_cpu": got == want,
           "tokens_per_s_1_stream": streams(app, loaded, ids, 1), "tokens_per_s_16_streams": streams(app, loaded, ids, 16)}
    backend.unload(loaded)
    del loaded
    app.free_torch_memory()
    if device == "cuda":
        out["memory_left_after_unload_bytes"] = torch.cuda.memory_allocated() - before
    assert out["batch_engine"], "no batch engine"
    assert out["logits_max_abs_diff_vs_cpu"] < 1e-3, out
    assert out.get("memory_left_after_unload_bytes", 0) < 2**20, out
    bf16 = backend.load(plan(app, folder, device, "bf16"))  # the dtype GPUs run (greedy may differ: not asserted)
    out["bf16_greedy_equal_to_cpu"] = greedy(app, bf16, ids) == want
    backend.unload(bf16)
    return out


def check_bitsandbytes(app, device: str) -> dict:
    from models import make_tiny_model

    if app.bnb_probe() is not None:
        raise Skip(f"bitsandbytes unusable: {app.bnb_probe()}")
    folder = tiny(make_tiny_model)
    backend, out = app.TransformersBackend(app.Settings()), {}
    for quant in ("q4", "q8"):
        loaded = backend.load(plan(app, folder, device, "auto", quant))
        out[quant] = {"quantized": loaded.quantized, "memory_bytes": loaded.memory_bytes,
                      "tokens": len(greedy(app, loaded, list(range(5, 15)), 8))}
        backend.unload(loaded)
    assert out["q4"]["quantized"] == "4bit" and out["q8"]["quantized"] == "8bit", out
    return out


def check_q4_by_size(app, device: str) -> dict:
    settings = app.Settings()
    usable = app.bnb_probe() is None
    big = app.choose_quantization("auto", int(settings.q4_threshold_bytes), int(settings.q4_threshold_bytes), usable)
    small = app.choose_quantization("auto", 10**9, int(settings.q4_threshold_bytes), usable)
    assert big == ("q4" if usable else "no") and small == "no", (big, small)
    return {"bnb_usable": usable, "at_threshold": big, "small": small}


def check_diffusers(app, device: str) -> dict:
    from models import make_tiny_diffusion

    folder = tiny(make_tiny_diffusion)
    backend, out = app.DiffusersBackend(app.Settings()), {}
    dtype = "fp16" if device == "cuda" else "fp32"

    def txt2img(tag: str) -> None:
        loaded = backend.load(plan(app, folder, device, dtype))
        params = app.ImageParams("a red square", width=64, height=64, steps=2, seed=1)
        start = time.perf_counter()
        images = backend.generate_images(loaded, params, app.ImageJob(model="check", total_steps=2), app.Metrics())
        out[tag] = {"dtype": loaded.dtype, "images": len(images), "seconds": round(time.perf_counter() - start, 2),
                    "size": list(images[0][0].size)}
        backend.unload(loaded)

    txt2img("txt2img")
    if device != "cuda":
        out["offload"] = "skipped: CPU offload moves components to the GPU in turn (CUDA only)"
        return out
    free = app.available_memory_bytes
    app.available_memory_bytes = lambda _device: 1  # the load then takes the offload path
    try:
        txt2img("offload")
    finally:
        app.available_memory_bytes = free
    return out


def image(color: str) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, "PNG")
    return out.getvalue()


def check_vision(app, device: str) -> dict:
    import base64

    from models import make_tiny_llava

    backend = app.TransformersBackend(app.Settings())
    loaded = backend.load(plan(app, tiny(make_tiny_llava), device, "bf16" if device == "cuda" else "fp32"))
    answers = []
    for color in ("red", "blue"):
        picture = app.picture_of(base64.b64encode(image(color)).decode(), app.Settings())
        answers.append(answer(app, loaded, app.render_prompt(loaded, [
            {"role": "user", "content": "describe", "images": [picture]}])))
    out = {"dtype": loaded.dtype, "batch_engine": loaded.engine is not None, "answers_differ": answers[0] != answers[1]}
    backend.unload(loaded)
    assert out["answers_differ"], out
    return out


def check_audio(app, device: str) -> dict:
    import numpy as np
    from models import make_tiny_qwen2_audio

    backend = app.TransformersBackend(app.Settings())
    loaded = backend.load(plan(app, tiny(make_tiny_qwen2_audio), device, "bf16" if device == "cuda" else "fp32"))
    answers = []
    for hz in (200, 1800):
        samples = (0.4 * np.sin(2 * np.pi * hz * np.arange(32000) / 16000)).astype(np.float32)
        sound = app.Sound(samples, b"", str(hz))
        answers.append(answer(app, loaded, app.render_prompt(loaded, [
            {"role": "user", "content": "what", "audio": [sound]}])))
    out = {"dtype": loaded.dtype, "answers_differ": answers[0] != answers[1]}
    backend.unload(loaded)
    assert out["answers_differ"], out
    return out


def check_lora(app, device: str) -> dict:
    import torch
    from models import make_tiny_lora, make_tiny_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny(make_tiny_model)
    adapters = {f"a{seed}": make_tiny_lora(base.parent / f"a{seed}", base, "check", seed) for seed in (1, 2)}
    backend = app.TransformersBackend(app.Settings())
    loaded = backend.load(plan(app, base, device, "fp32"))
    ids = list(range(5, 25))
    plain = greedy(app, loaded, ids)
    for name, path in adapters.items():
        backend.add_adapter(loaded, name, str(path))
    got = {name: greedy(app, loaded, ids, adapter=name) for name in adapters}
    out = {"base_unchanged": greedy(app, loaded, ids) == plain, "adapters_differ": len({tuple(v) for v in got.values()}) == 2}
    for name, path in adapters.items():
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path).merge_and_unload()
        merged = merged.to(device).eval()
        with torch.inference_mode():
            ref = merged.generate(torch.tensor([ids], device=device), max_new_tokens=16, do_sample=False)
        out[f"{name}_equal_to_merged"] = ref[0, len(ids):].tolist() == got[name][:16]
    backend.unload(loaded)
    assert all(out.values()), out
    return out


def check_llama_server(app, device: str) -> dict:
    """Built here from the carried sources when there is no binary (only when asked for by --only: minutes), then a
    tiny Gemma 3 GGUF with its projector (made by scripts/gpu_wheelhouse.sh; here, by llama.cpp's converter) with
    every layer on the GPU (-ngl 0 on CPU) answers an image."""
    import base64
    import urllib.request

    env = {**os.environ, **({"LLAMA_CUDA": "1"} if device == "cuda" else {})}
    script = str(ROOT / "scripts/build-llama-server.sh")
    binary = Path(subprocess.run([script, "--path"], env=env, capture_output=True, text=True).stdout.strip())
    out: dict = {"binary": str(binary)}
    if not binary.is_file():
        source = WHEELHOUSE / "llama" / "llama.cpp-src.tar.xz"
        if not source.is_file() or not os.environ.get("GPU_CHECK_BUILD_LLAMA"):
            raise Skip(f"no llama-server at {binary}: build it with {'LLAMA_CUDA=1 ' if device == 'cuda' else ''}"
                       "scripts/build-llama-server.sh, or run `scripts/gpu_check.sh --only llama_server` with the "
                       "wheelhouse's llama/ folder (scripts/gpu_wheelhouse.sh) carried")
        start = time.perf_counter()
        built = subprocess.run([script], env={**env, "LLAMA_SRC": str(source)}, capture_output=True, text=True)
        assert built.returncode == 0 and binary.is_file(), built.stdout[-3000:] + built.stderr[-2000:]
        out["build_seconds"] = round(time.perf_counter() - start)
    model, mmproj = WHEELHOUSE / "llama" / "tiny-gemma3-Q8_0.gguf", WHEELHOUSE / "llama" / "mmproj-tiny-gemma3-f16.gguf"
    if not model.is_file():
        from models import make_tiny_gemma3
        from vision_files import gemma3_gguf

        model, mmproj = gemma3_gguf(tiny(make_tiny_gemma3), Path(tempfile.mkdtemp(prefix="gpu-check-")))
    port = app.loopback_port()
    log = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "llama-server.log"
    proc = subprocess.Popen([str(binary), "-m", str(model), "--mmproj", str(mmproj), "-c", "512", "--host", "127.0.0.1",
                             "--port", str(port), "-ngl", "all" if device == "cuda" else "0"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**env, "LLAMA_MEDIA_MARKER": "<m>"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        body = {"prompt": {"prompt_string": "<|im_start|>user\n<m>describe<|im_end|>\n<|im_start|>assistant\n",
                           "multimodal_data": [base64.b64encode(image("red")).decode()]}, "n_predict": 8, "temperature": 0}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text(errors="replace")
    offloaded = [line.strip() for line in text.splitlines() if "offloaded" in line and "layers to GPU" in line]
    out.update(tokens_evaluated=answer.get("tokens_evaluated"), predicted=answer.get("tokens_predicted"),
               offloaded=offloaded[-1] if offloaded else None)
    assert answer.get("tokens_predicted") and answer.get("tokens_evaluated", 0) > 10, answer
    if device == "cuda":
        assert offloaded and "offloaded 0/" not in offloaded[-1], text[-2000:]
    return out


def check_compiled_decoding(app, device: str) -> dict:
    raise Skip("compiled decoding (CUDA graphs in the batch engine, issue 27) has not landed")


def check_vllm(app, device: str) -> dict:
    raise Skip("vLLM's CUDA wheel (~400 MB) cannot be carried in the device's 64 MiB; run tests/test_vllm.py on a GPU box "
               "with network")


def run_one(name: str, device: str) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    start = time.perf_counter()
    try:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with --cpu for the rehearsal")
        import app

        result = {"status": "pass", "details": globals()[f"check_{name}"](app, device)}
    except Skip as why:
        result = {"status": "skip", "details": str(why)}
    except BaseException as exc:  # one failing check never stops the others
        result = {"status": "fail", "details": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"name": name, **result, "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the rehearsal: run on CPU, skip what only CUDA can do")
    ap.add_argument("--one", help="run this one check here and print its JSON")
    ap.add_argument("--only", help="comma-separated checks to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=540, help="the whole run's time (default 540: one 10-min call)")
    ap.add_argument("--json", type=Path, help="where the report goes")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if args.one:
        print(json.dumps(run_one(args.one, device)))
        return 0
    wanted = set(args.only.split(",")) if args.only else None
    if wanted and "llama_server" in wanted:  # asked for by name: it may build llama-server (minutes)
        os.environ["GPU_CHECK_BUILD_LLAMA"] = "1"
    deadline, report = time.monotonic() + args.budget_s, []
    for name, budget, what in CHECKS:
        if wanted and name not in wanted:
            continue
        timeout = min(budget, deadline - time.monotonic())
        if timeout <= 1:
            report.append({"name": name, "status": "fail", "details": "no time left in the run's budget", "seconds": 0})
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, *(["--cpu"] if args.cpu else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            entry = json.loads(lines[-1]) if lines else {
                "name": name, "status": "fail", "seconds": None,
                "details": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
        except subprocess.TimeoutExpired:
            entry = {"name": name, "status": "fail", "details": f"over its {timeout:.0f} s budget", "seconds": timeout}
        entry["proves"] = what
        report.append(entry)
        print(f"{entry['status']:4}  {name:18} {entry['seconds'] if entry['seconds'] is not None else '-':>6} s  "
              f"{json.dumps(entry['details'])[:160]}", flush=True)
    out = args.json or Path(os.environ.get("OUT") or tempfile.gettempdir()) / "gpu_check.json"
    summary = {s: [e["name"] for e in report if e["status"] == s] for s in ("pass", "fail", "skip")}
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "summary": summary,
                               "checks": report}, indent=2))
    print(f"passed {len(summary['pass'])}, failed {len(summary['fail'])}, skipped {len(summary['skip'])}"
          f"{' (on CPU: ' + ', '.join(summary['skip']) + ')' if args.cpu and summary['skip'] else ''}; report: {out}")
    return 1 if summary["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
