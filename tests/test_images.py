"""Image models: a tiny random Stable Diffusion pipeline (diffusers' own test configs, built here) on the
local hub, pulled through /pull, then generated through A1111's /sdapi/v1/* (with the real `webuiapi`
client), the Unity API's /generate-image, OpenAI's /v1/images/generations (the real `openai` client) and
Ollama's /api/generate; seeds, samplers, sizes, the LRU with text models, a client that leaves."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import openai
import pytest
import webuiapi
from conftest import ServerProcess
from models import tiny_diffusion_files
from PIL import Image

SD = "tiny/sd"


@pytest.fixture(scope="module")
def image_server(hub, tmp_path_factory):
    hub.add_repo(SD, tiny_diffusion_files())
    tmp = tmp_path_factory.mktemp("images")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers",
                           MAX_CACHE_MODELS="2", MAX_IMAGE_PIXELS=str(256 * 256))
    server.start()
    server.pull_ok(SD)
    yield server
    server.stop()


def png(data: str) -> Image.Image:
    assert not data.startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return image


def a1111(server: ServerProcess, route: str = "txt2img", **body) -> httpx.Response:
    return server.client.post(f"/sdapi/v1/{route}", json={"prompt": "a red cube", "steps": 2, "width": 64,
                                                          "height": 64, **body})


def test_a_diffusers_pull_takes_one_weight_variant():
    import app

    files = ["model_index.json", "v1-5-pruned.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_flax_model.msgpack",
             "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin", "onnx/unet/model.onnx"]
    assert sorted(app.diffusers_files(files)) == ["model_index.json", "text_encoder/model.safetensors", "unet/config.json",
                                                  "unet/diffusion_pytorch_model.safetensors",
                                                  "vae/diffusion_pytorch_model.safetensors"]
    fp16_only = ["model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                 "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin"]
    assert sorted(app.diffusers_files(fp16_only)) == ["model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors",
                                                      "vae/diffusion_pytorch_model.fp16.safetensors"]


def test_pulled_pipeline_is_listed_as_an_image_model(image_server):
    tags = {m["name"]: m for m in image_server.client.get("/api/tags").json()["models"]}
    entry = tags[f"{SD}:latest"]
    assert entry["capabilities"] == ["image"]
    assert entry["details"]["format"] == "diffusers" and entry["details"]["family"] == "StableDiffusionPipeline"
    shown = image_server.client.post("/api/show", json={"model": SD}).json()
    assert shown["capabilities"] == ["image"]
    models = image_server.client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == [SD]
    chat = image_server.client.post("/api/chat", json={"model": SD, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "image model" in chat.json()["error"]


def test_a1111_client_seeds_batches_and_info(image_server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=image_server.port, sampler="Euler a", steps=2)
    first = api.txt2img(prompt="a red cube", seed=42, width=64, height=64, cfg_scale=5)
    assert first.image.size == (64, 64)
    assert first.info["seed"] == 42 and first.info["all_seeds"] == [42]
    assert "Seed: 42" in first.info["infotexts"][0] and "Sampler: Euler a" in first.info["infotexts"][0]
    again = api.txt2img(prompt="a red cube", seed=42, width=64, height=64, cfg_scale=5)
    assert again.json["images"][0] == first.json["images"][0]  # same seed: the same bytes
    other = api.txt2img(prompt="a red cube", seed=43, width=64, height=64, cfg_scale=5)
    assert other.json["images"][0] != first.json["images"][0]
    assert png(first.json["images"][0]).info["parameters"] == first.info["infotexts"][0]  # A1111's PNG text
    read = api.png_info(first.image).json  # webuiapi sends the PIL image again with its text chunks
    assert read["info"] == first.info["infotexts"][0] and read["items"] == {}
    assert {k: read["parameters"][k] for k in ("Prompt", "Seed", "Sampler", "Size-1", "Size-2")} == {
        "Prompt": "a red cube", "Seed": "42", "Sampler": "Euler a", "Size-1": "64", "Size-2": "64"}
    for junk in ("not base64!", base64.b64encode(b"GIF89a nothing").decode()):
        r = image_server.client.post("/sdapi/v1/png-info", json={"image": junk})
        assert r.status_code == 400 and "image" in r.json()["error"], r.text

    batch = a1111(image_server, seed=7, batch_size=2, n_iter=2, width=32, height=48).json()
    info = json.loads(batch["info"])  # a JSON string, as A1111 sends it
    assert info["all_seeds"] == [7, 8, 9, 10] and len(batch["images"]) == 4
    assert all(png(i).size == (32, 48) for i in batch["images"])
    single = a1111(image_server, seed=9, width=32, height=48).json()
    assert single["images"][0] == batch["images"][2]  # the third image is seed 9's, alone or in a batch
    random_seed = json.loads(a1111(image_server).json()["info"])["seed"]
    assert isinstance(random_seed, int) and random_seed >= 0  # -1: a random seed, reported back

    init = first.json["images"][0]
    edited = a1111(image_server, "img2img", init_images=[init], denoising_strength=0.5, seed=1).json()
    assert png(edited["images"][0]).size == (64, 64) and edited["images"][0] != init
    assert json.loads(edited["info"])["denoising_strength"] == 0.5


def test_every_sampler_runs_and_bad_input_is_a_400(image_server):
    samplers = image_server.client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DDIM", "LMS", "Heun", "UniPC",
            "LCM"} <= set(names)
    ran = set()
    for name in names:  # each runs, or is refused because the model's scheduler family does not include it
        r = a1111(image_server, sampler_name=name, seed=3, width=32, height=32)
        assert r.status_code == 200 or (r.status_code == 400 and "does not fit this model" in r.json()["error"]), r.text
        ran |= {name} if r.status_code == 200 else set()
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DDIM", "LMS", "Heun", "UniPC",
            "PLMS", "DPM2", "DEIS"} <= ran  # the tiny pipeline ships DDIM: its family (not LCM's)
    assert "LCM" not in ran
    own = a1111(image_server, seed=3, width=32, height=32).json()  # no sampler: the model's own (DDIM)
    ddim = a1111(image_server, seed=3, width=32, height=32, sampler_name="DDIM").json()
    assert png(own["images"][0]).tobytes() == png(ddim["images"][0]).tobytes()
    karras = a1111(image_server, sampler_name="DPM++ 2M", scheduler="karras", seed=3, width=32, height=32).json()
    legacy = a1111(image_server, sampler_name="DPM++ 2M Karras", seed=3, width=32, height=32).json()
    # A1111 1.9's scheduler field = the old " Karras" names: the same pixels (the PNGs' texts name them apart).
    assert png(karras["images"][0]).tobytes() == png(legacy["images"][0]).tobytes()

    bad = a1111(image_server, sampler_name="Euler z")
    assert bad.status_code == 400 and "DPM++ 2M Karras" in bad.json()["error"]
    assert a1111(image_server, sampler_name="DDIM", scheduler="karras").status_code == 400
    odd = a1111(image_server, width=65)
    assert odd.status_code == 400 and "multiples of 8" in odd.json()["error"]
    huge = a1111(image_server, width=512, height=512)
    assert huge.status_code == 400 and "MAX_IMAGE_PIXELS" in huge.json()["error"]
    assert a1111(image_server, steps=0).status_code == 400
    broken = a1111(image_server, "img2img", init_images=["not an image"])
    assert broken.status_code == 400 and "base64" in broken.json()["error"]
    picture = a1111(image_server, seed=1).json()["images"][0]
    wrapped = "\n".join(picture[i:i + 76] for i in range(0, len(picture), 76))  # as GNU base64 writes it
    assert a1111(image_server, "img2img", init_images=[wrapped], steps=2, denoising_strength=0.5).status_code == 200
    none = a1111(image_server, "img2img", init_images=[picture], steps=2, denoising_strength=0.2)
    assert none.status_code == 400 and "denoising_strength" in none.json()["error"]
    assert a1111(image_server, override_settings={"sd_model_checkpoint": 5}).status_code == 400
    tiny = image_server.client.post("/v1/images/generations", json={"prompt": "x", "size": "0x64"})
    assert tiny.status_code == 400 and "at least 8" in tiny.json()["error"]["message"]
    many = a1111(image_server, batch_size=16, n_iter=16, width=256, height=256)
    assert many.status_code == 400 and "fewer" in many.json()["error"]
    text_route = image_server.client.post("/tokenize", json={"model": SD, "content": "hi"})
    assert text_route.status_code == 400 and "image model" in text_route.json()["error"]["message"]


def test_unity_openai_and_ollama_routes(image_server):
    unity = image_server.client.post("/generate-image", json={"prompt": "a tree", "width": 64, "height": 64,
                                                              "steps": 2, "seed": 5}).json()
    assert png(unity["image_base64"]).size == (64, 64) and json.loads(unity["info"])["seed"] == 5

    client = openai.OpenAI(base_url=f"{image_server.url}/v1", api_key="unused")
    result = client.images.generate(model=SD, prompt="a tree", n=2, size="64x64", response_format="b64_json")
    assert len(result.data) == 2 and all(png(d.b64_json).size == (64, 64) for d in result.data)
    with pytest.raises(openai.BadRequestError) as url:
        client.images.generate(model=SD, prompt="a tree", size="64x64", response_format="url")
    assert "b64_json" in str(url.value)
    source = base64.b64decode(result.data[0].b64_json)
    edited = client.images.edit(model=SD, image=("in.png", source, "image/png"), prompt="a blue tree", n=1,
                                size="64x64", response_format="b64_json")  # multipart/form-data
    assert png(edited.data[0].b64_json).size == (64, 64) and edited.data[0].b64_json != result.data[0].b64_json
    with pytest.raises(openai.BadRequestError) as opaque:
        client.images.edit(model=SD, image=("in.png", source, "image/png"), mask=("m.png", source, "image/png"),
                           prompt="a blue tree", size="64x64", response_format="b64_json")
    assert "alpha channel" in str(opaque.value)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # OpenAI's masks: transparent where to edit (the left half)
    out = io.BytesIO()
    mask.save(out, "PNG")
    inpainted = client.images.edit(model=SD, image=("in.png", source, "image/png"), mask=("m.png", out.getvalue(),
                                   "image/png"), prompt="a blue tree", size="64x64", response_format="b64_json")
    before, after = png(result.data[0].b64_json).convert("RGB"), png(inpainted.data[0].b64_json).convert("RGB")
    assert before.crop((48, 0, 64, 64)).tobytes() == after.crop((48, 0, 64, 64)).tobytes()  # past the blur: kept
    assert before.crop((0, 0, 16, 64)).tobytes() != after.crop((0, 0, 16, 64)).tobytes()  # made anew

    lines = [json.loads(ln) for ln in image_server.client.post("/api/generate", json={
        "model": SD, "prompt": "a tree", "width": 64, "height": 64, "steps": 3, "options": {"seed": 5}}).text.splitlines()]
    progress = [ln for ln in lines if not ln["done"]]
    assert progress and all(ln["total"] == 3 for ln in progress) and progress[-1]["completed"] <= 3
    final = lines[-1]
    assert final["done"] and png(final["image"]).size == (64, 64)
    whole = image_server.client.post("/api/generate", json={"model": SD, "prompt": "a tree", "width": 64, "height": 64,
                                                            "steps": 3, "options": {"seed": 5}, "stream": False}).json()
    assert whole["image"] == final["image"]  # the same seed through Ollama's route, streamed or not


def test_options_progress_and_interrupt(image_server):
    assert image_server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == SD
    assert image_server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope/none"}).status_code == 404
    assert image_server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": SD}).status_code == 200
    picked = a1111(image_server, override_settings={"sd_model_checkpoint": SD}, width=32, height=32)
    assert json.loads(picked.json()["info"])["sd_model_name"] == SD
    missing = a1111(image_server, override_settings={"sd_model_checkpoint": "nope/none"})
    assert missing.status_code == 404 and "pull it first" in missing.json()["error"]
    idle = image_server.client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0

    replies: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: replies.append(a1111(image_server, steps=150, width=128, height=128)))
    worker.start()
    deadline = time.monotonic() + 60
    while (now := image_server.client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert 0 < now["progress"] < 1 and now["state"]["sampling_steps"] == 150
    assert image_server.client.post("/sdapi/v1/interrupt").status_code == 200
    worker.join(60)
    reply = replies[0]
    assert reply.status_code == 200 and json.loads(reply.json()["info"])["interrupted"] is True
    assert png(reply.json()["images"][0]).size == (128, 128)  # what it had, as A1111 returns it


def test_a_client_that_leaves_stops_the_run(image_server):
    with pytest.raises(httpx.ReadTimeout):
        image_server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 150, "width": 128, "height": 128},
                                 timeout=2)
    deadline = time.monotonic() + 30
    while image_server.client.get("/status").json()["image_jobs"]:
        assert time.monotonic() < deadline, "the image run went on for a client that left"
        time.sleep(0.1)
    assert "stopping the image run" in image_server.log()


def test_image_and_text_models_share_the_lru(hub, start_server):
    hub.add_repo("tiny/sd-lru", tiny_diffusion_files(1))
    s = start_server(MAX_CACHE_MODELS="1")
    s.pull_ok("tiny/sd-lru")
    s.pull_ok("tiny/llama-a")
    assert s.chat("tiny/llama-a", max_tokens=2).status_code == 200
    r = s.client.post("/generate-image", json={"model": "tiny/sd-lru", "prompt": "x", "width": 32, "height": 32,
                                               "steps": 1})
    assert r.status_code == 200, r.text
    cache = s.client.get("/status").json()["cache"]
    assert [m["name"] for m in cache] == ["tiny/sd-lru"]  # the text model was evicted to make room
    assert cache[0]["backend"] == "diffusers" and cache[0]["memory_bytes"] > 0
    assert s.chat("tiny/llama-a", max_tokens=2).status_code == 200
    assert [m["name"] for m in s.client.get("/status").json()["cache"]] == ["tiny/llama-a"]
    metrics = s.client.get("/metrics").text
    assert 'ai_server_images_generated_total{model="tiny/sd-lru"} 1.0' in metrics
    assert 'ai_server_image_steps_total{model="tiny/sd-lru"} 1.0' in metrics


def test_keys_browsers_and_a_full_queue(hub, start_server):
    hub.add_repo("tiny/sd-queue", tiny_diffusion_files(2))
    s = start_server(API_KEYS="sekrit", NUM_PARALLEL="1", MAX_QUEUE="0")
    key = {"Authorization": "Bearer sekrit"}
    s.client.headers.update(key)
    s.pull_ok("tiny/sd-queue")
    body = {"prompt": "x", "width": 32, "height": 32, "steps": 1}
    assert httpx.post(f"{s.url}/sdapi/v1/txt2img", json=body).status_code == 401  # no key
    browser = s.client.post("/sdapi/v1/txt2img", json=body, headers={"Origin": "https://evil.example"})
    assert browser.status_code == 403 and not s.client.get("/status").json()["image_jobs"]
    replies: list[httpx.Response] = []
    long_run = threading.Thread(target=lambda: replies.append(s.client.post("/sdapi/v1/txt2img", json={
        **body, "steps": 60, "width": 128, "height": 128})))
    long_run.start()
    deadline = time.monotonic() + 60
    while not s.client.get("/status").json()["image_jobs"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    busy = s.client.post("/sdapi/v1/txt2img", json=body)
    assert busy.status_code == 503 and busy.headers["Retry-After"]  # one running, no queue
    long_run.join(120)
    assert replies[0].status_code == 200


def test_hires_fix_scales_and_writes_its_infotext(image_server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=image_server.port, sampler="Euler a", steps=2)
    plain = api.txt2img(prompt="a red cube", seed=3, width=32, height=32)
    for upscaler in ("Latent", "Latent (nearest-exact)", "Lanczos"):
        r = api.txt2img(prompt="a red cube", seed=3, width=32, height=32, enable_hr=True, hr_scale=2,
                        hr_upscaler=upscaler, hr_second_pass_steps=4, denoising_strength=0.5)
        assert r.image.size == (64, 64) and r.image != plain.image.resize((64, 64))
        text = r.info["infotexts"][0]
        assert f"Denoising strength: 0.5, Hires upscale: 2, Hires steps: 4, Hires upscaler: {upscaler}" in text
        assert "Size: 32x32" in text  # A1111 writes the first pass's size
        assert api.png_info(r.image).json["parameters"]["Hires upscaler"] == upscaler
    resized = api.txt2img(prompt="a red cube", seed=3, width=32, height=48, enable_hr=True, hr_resize_x=64,
                          hr_upscaler="Nearest")
    assert resized.image.size == (64, 96) and "Hires resize: 64x96" in resized.info["infotexts"][0]
    names = [u["name"] for u in api.get_upscalers()]
    assert {"None", "Lanczos", "Latent", "Latent (bicubic antialiased)"} <= set(names)
    assert [m["name"] for m in api.get_latent_upscale_modes()][0] == "Latent"
    for bad, says in (({"hr_upscaler": "R-ESRGAN 4x+"}, "unknown hr_upscaler 'R-ESRGAN 4x+': use one of"),
                      ({"hr_scale": 8, "width": 512, "height": 512}, "above MAX_IMAGE_PIXELS")):
        r = a1111(image_server, enable_hr=True, **bad)
        assert r.status_code == 400 and says in r.json()["error"], r.text


def test_lora_tags_change_the_image_and_leave_the_base_alone(image_server, tmp_path):
    """A1111's <lora:name:weight> from SD_MODELS_DIR/Lora (here the default, AI_SERVER_HOME/sd-models/Lora): a
    diffusers-format and a Kohya-format file of the same LoRA give the same image; weight 0 and the next request
    without a tag give the base image exactly; the tag is out of the prompt the model sees, and in the infotext."""
    from models import make_tiny_sd_lora

    folder = image_server.home / "sd-models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    make_tiny_sd_lora(folder / "tiny.safetensors")
    make_tiny_sd_lora(folder / "tiny_kohya.safetensors", kohya=True)

    def image(prompt: str) -> tuple[str, str]:
        r = a1111(image_server, prompt=prompt, seed=11, width=32, height=32)
        assert r.status_code == 200, r.text
        return png(r.json()["images"][0]).tobytes(), json.loads(r.json()["info"])["infotexts"][0]  # the pixels

    base, _ = image("a red cube")
    full, text = image("a red cube <lora:tiny:1>")
    assert full != base and 'Lora hashes: "tiny: ' in text and text.startswith("a red cube <lora:tiny:1>")
    assert image("a red cube <lora:tiny_kohya:1>")[0] == full  # diffusers converts A1111/Kohya keys
    assert image("a red cube <lora:tiny:0>")[0] == base
    assert image("a red cube")[0] == base  # nothing left behind: never fused
    assert image("a red cube <lora:tiny:0.5>")[0] not in (base, full)
    assert image("<lora:tiny:1> a red cube")[0] == full  # the tag never reaches the text encoder
    hires = a1111(image_server, prompt="a red cube <lora:tiny:1>", seed=11, width=32, height=32, enable_hr=True)
    text = json.loads(hires.json()["info"])["infotexts"][0]
    assert 'Lora hashes: "tiny: ' in text and "Hires upscale: 2" in text  # both, in one infotext
    listed = {lora["name"]: lora for lora in webuiapi.WebUIApi(port=image_server.port).get_loras()}
    assert set(listed) == {"tiny", "tiny_kohya"} and listed["tiny"]["path"].endswith("tiny.safetensors")
    assert image_server.client.post("/sdapi/v1/refresh-loras").status_code == 200
    r = a1111(image_server, prompt="x <lora:nope:1>")
    assert r.status_code == 400 and "unknown LoRA 'nope'" in r.json()["error"] and "tiny_kohya" in r.json()["error"]


def test_inpainting_keeps_the_pixels_outside_the_mask(image_server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=image_server.port, sampler="Euler a", steps=4)
    source = api.txt2img(prompt="a red cube", seed=21, width=64, height=64).image
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # A1111's masks: white where to repaint
    kept = (0, 0, 64, 8)  # farther from the square than the blur reaches
    for fill in (0, 1, 2, 3):
        r = api.img2img(images=[source], mask_image=mask, mask_blur=2, inpainting_fill=fill, prompt="a blue ball",
                        seed=3, width=64, height=64, denoising_strength=0.9, inpaint_full_res=False)
        assert r.image.size == (64, 64) and "Mask blur: 2" in r.info["infotexts"][0]
        assert r.image.convert("RGB").crop(kept).tobytes() == source.convert("RGB").crop(kept).tobytes(), fill
        assert r.image.convert("RGB").crop((24, 24, 40, 40)).tobytes() != source.convert("RGB").crop(
            (24, 24, 40, 40)).tobytes()
    inverted = api.img2img(images=[source], mask_image=mask, mask_blur=0, inpainting_mask_invert=1, seed=3,
                           prompt="a blue ball", width=64, height=64, denoising_strength=0.9,
                           inpaint_full_res=False).image.convert("RGB")
    assert inverted.crop((20, 20, 44, 44)).tobytes() == source.convert("RGB").crop((20, 20, 44, 44)).tobytes()
    only = api.img2img(images=[source], mask_image=mask, inpaint_full_res=True, inpaint_full_res_padding=4, seed=3,
                       prompt="a blue ball", width=64, height=64, denoising_strength=0.9)
    assert only.image.size == (64, 64) and "Inpaint area: Only masked" in only.info["infotexts"][0]
    assert only.image.convert("RGB").crop(kept).tobytes() == source.convert("RGB").crop(kept).tobytes()
    bigger = api.img2img(images=[source.resize((96, 96))], mask_image=mask.resize((96, 96)), seed=3, prompt="x",
                         width=96, height=96, denoising_strength=0.9, inpaint_full_res=False)
    assert bigger.image.size == (96, 96)  # not the pipeline's default size
    # resize modes: crop and resize, resize and fill (a 64x32 input to 32x32)
    wide = source.resize((64, 32))
    for mode in (1, 2):
        assert api.img2img(images=[wide], resize_mode=mode, seed=1, width=32, height=32, prompt="x",
                           denoising_strength=0.5).image.size == (32, 32)
    r = image_server.client.post("/sdapi/v1/img2img", json={
        "init_images": [webuiapi.raw_b64_img(source)], "mask": webuiapi.raw_b64_img(mask.resize((32, 32))),
        "prompt": "x", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 400 and "send a mask of the image's size" in r.json()["error"], r.text


def test_sd_vae_changes_the_decode(image_server, hub, tmp_path):
    """A1111's sd_vae: a single-file VAE from SD_MODELS_DIR/VAE, a pulled diffusers VAE repo, Automatic (a file
    named as the model), None (the model's own, exactly), per request (override_settings) and as the option."""
    import shutil

    from models import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae", seed=5)
    hub.add_repo("tiny/vae", {p.name: p.read_bytes() for p in vae.iterdir()})
    image_server.pull_ok("tiny/vae")
    folder = image_server.home / "sd-models" / "VAE"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vae / "diffusion_pytorch_model.safetensors", folder / "other.safetensors")  # one flat file

    def image(**settings) -> tuple[bytes, str]:
        r = a1111(image_server, seed=4, width=32, height=32, override_settings=settings)
        assert r.status_code == 200, r.text
        return png(r.json()["images"][0]).tobytes(), json.loads(r.json()["info"])["infotexts"][0]

    base, text = image(sd_vae="None")
    assert "VAE" not in text
    other, text = image(sd_vae="other.safetensors")
    assert other != base and "VAE: other.safetensors" in text and "VAE hash: " in text
    assert image(sd_vae="tiny/vae")[0] == other  # the same weights, pulled as a diffusers folder
    from safetensors.torch import save_file
    from sd_checkpoint import ldm_vae_state_dict

    save_file(ldm_vae_state_dict(vae), folder / "ldm.safetensors")  # A1111's key layout: diffusers converts it
    assert image(sd_vae="ldm.safetensors")[0] == other
    assert image()[0] == base  # Automatic, and no VAE named as the model: its own, exactly
    shutil.copyfile(folder / "other.safetensors", folder / "sd.safetensors")  # named as the model (tiny/sd)
    assert image()[0] == other
    (folder / "sd.safetensors").unlink()
    api = webuiapi.WebUIApi(port=image_server.port)
    api.set_options({"sd_vae": "tiny/vae"})
    assert api.get_options()["sd_vae"] == "tiny/vae"
    assert image()[0] == other
    image_server.client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})
    assert image()[0] == base
    names = {v["model_name"] for v in api.get_sd_vae()}
    assert names == {"other.safetensors", "ldm.safetensors", "tiny/vae"}
    for bad in (image_server.client.post("/sdapi/v1/options", json={"sd_vae": "nope"}),
                a1111(image_server, override_settings={"sd_vae": "nope"})):
        assert bad.status_code == 400 and "unknown sd_vae 'nope'" in bad.json()["error"], bad.text
    r = image_server.client.post("/api/chat", json={"model": "tiny/vae", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "is a VAE" in r.json()["error"]


def test_a_single_file_checkpoint_pulls_with_its_configs_and_loads_offline(image_server, hub, tmp_path):
    """A repo of A1111-style single files (original key layout): the pull takes one file (the smallest, or the
    one a tag names) and the config-only snapshot of the base diffusers infers for it (here v1:
    stable-diffusion-v1-5/stable-diffusion-v1-5); it then loads with the hub unreachable, and the same seed
    gives the same image as the diffusers-format copy of the same weights (tiny/sd)."""
    import pickle
    import shutil

    import ollama
    import torch
    from models import make_tiny_diffusion
    from safetensors.torch import load_file, save_file
    from sd_checkpoint import config_only_files, make_single_file

    root = make_tiny_diffusion(tmp_path / "sd", 0)  # tiny/sd's weights
    hub.add_repo("stable-diffusion-v1-5/stable-diffusion-v1-5", config_only_files(root))
    pruned = make_single_file(root, tmp_path / "pruned.safetensors")
    full = tmp_path / "full.safetensors"
    save_file({**load_file(pruned), "model_ema.decay": torch.ones(4096)}, full)  # a bigger file of the same model
    hub.add_repo("tiny/sd-single", {"tiny-v1-pruned.safetensors": pruned.read_bytes(),
                                    "tiny-v1-full.safetensors": full.read_bytes(), "README.md": b"# tiny"})
    image_server.pull_ok("tiny/sd-single")
    entry = next(m for m in image_server.client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "tiny/sd-single")
    assert entry["filename"].endswith("tiny-v1-pruned.safetensors")  # the smallest, without a tag
    job = image_server.wait_job(image_server.pull("tiny/sd-single:nope")["job_id"])
    assert job["status"] == "failed" and "tiny-v1-full.safetensors" in job["error"], job
    image_server.pull_ok("tiny/sd-single:full")

    def pixels(server, model: str) -> bytes:
        r = a1111(server, seed=4, width=32, height=32, override_settings={"sd_model_checkpoint": model})
        assert r.status_code == 200, r.text
        return png(r.json()["images"][0]).tobytes()

    diffusers_copy = pixels(image_server, SD)
    assert pixels(image_server, "tiny/sd-single") == diffusers_copy
    assert pixels(image_server, "tiny/sd-single:full") == diffusers_copy
    # A1111's habit: a file dropped in SD_MODELS_DIR/Stable-diffusion, registered by refresh-checkpoints
    local = image_server.home / "sd-models" / "Stable-diffusion" / "mine"
    local.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pruned, local / "tiny.safetensors")
    api = webuiapi.WebUIApi(port=image_server.port)
    api.refresh_checkpoints()
    assert "mine/tiny" in {m["model_name"] for m in api.get_sd_models()}
    assert pixels(image_server, "mine/tiny") == diffusers_copy
    # Ollama's create with an uploaded checkpoint blob
    client = ollama.Client(host=image_server.url)
    client.create(model="uploaded-sd", files={"tiny.safetensors": client.create_blob(pruned)})
    assert pixels(image_server, "uploaded-sd") == diffusers_copy
    # the same home, the hub unreachable and huggingface_hub offline: it loads from what the pull fetched
    home = tmp_path / "offline-home"
    shutil.copytree(image_server.home, home)  # the registry's WAL too: its newest rows are there
    offline = ServerProcess(home, "http://127.0.0.1:9", tmp_path / "offline.log", AI_SERVER_BACKENDS="transformers",
                            HF_HUB_OFFLINE="1", MAX_IMAGE_PIXELS=str(256 * 256)).start()
    try:
        assert pixels(offline, "tiny/sd-single") == diffusers_copy
    finally:
        offline.stop()

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("unpickled!",))

    hub.add_repo("tiny/sd-pickle", {"model.ckpt": pickle.dumps({"state_dict": Payload()})})
    job = image_server.wait_job(image_server.pull("tiny/sd-pickle")["job_id"])
    assert job["status"] == "failed" and "never unpickled" in job["error"], job
    (local / "tiny.safetensors").unlink()  # gone from the folder: gone from the list at the next refresh
    image_server.client.post("/sdapi/v1/refresh-checkpoints")
    assert "mine/tiny" not in {m["model_name"] for m in image_server.client.get("/sdapi/v1/sd-models").json()}


def test_an_inpainting_checkpoint_inpaints_and_refuses_txt2img(image_server, hub):
    hub.add_repo("tiny/sd-inpaint", tiny_diffusion_files(inpainting=True))
    image_server.pull_ok("tiny/sd-inpaint")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=image_server.port, sampler="Euler a", steps=4)
    source = api.txt2img(prompt="a red cube", seed=21, width=64, height=64,
                         override_settings={"sd_model_checkpoint": SD}).image
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = image_server.client.post("/sdapi/v1/img2img", json={
        "init_images": [webuiapi.raw_b64_img(source)], "mask": webuiapi.raw_b64_img(mask), "mask_blur": 2, "seed": 3,
        "prompt": "a blue ball", "steps": 4, "width": 64, "height": 64, "denoising_strength": 0.9,
        "override_settings": {"sd_model_checkpoint": "tiny/sd-inpaint"}})
    assert r.status_code == 200, r.text
    out = png(r.json()["images"][0]).convert("RGB")
    assert out.crop((0, 0, 64, 8)).tobytes() == source.convert("RGB").crop((0, 0, 64, 8)).tobytes()
    assert out.crop((24, 24, 40, 40)).tobytes() != source.convert("RGB").crop((24, 24, 40, 40)).tobytes()
    r = a1111(image_server, override_settings={"sd_model_checkpoint": "tiny/sd-inpaint"})
    assert r.status_code == 400 and "inpainting checkpoint" in r.json()["error"], r.text
    image_server.client.request("DELETE", "/api/delete", json={"model": "tiny/sd-inpaint"})  # not the newest default
