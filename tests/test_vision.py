"""Images in chat, on every wire API: a tiny random LLaVA (CLIP vision tower, Llama text model, made here)
published on the local hub, pulled through /pull and served by the transformers backend (the batch engine
prefills image rows). Real clients: `ollama`, `openai` (chat image_url, Responses input_image), `anthropic`;
llama.cpp's /completion with multimodal_data over raw HTTP. The image must reach the model: two images give
two greedy answers, and the prompt grows by the image's tokens."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import ollama
import openai
import pytest
from conftest import BareLlamaServer
from models import folder_files, make_tiny_llava
from test_gguf import BINARY, needs_binary

import app

VLM = "tiny/llava"
TEXT = "tiny/llama-a"  # a text-only model (conftest's hub)
IMAGE_TOKENS = 4  # 28 px images in 14 px patches
ASK = "describe"


def png(color: str, size: int = 64, fmt: str = "PNG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{b64(data)}"


RED, BLUE = png("red"), png("blue")


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    hub.add_repo(VLM, folder_files(make_tiny_llava))
    tmp = tmp_path_factory.mktemp("vision")
    from conftest import ServerProcess

    s = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers",
                      MAX_PROMPT_IMAGES="3").start()
    s.pull_ok(VLM)
    s.pull_ok(TEXT)
    yield s
    s.stop()


def ollama_answer(server, image: bytes | None, **extra) -> ollama.ChatResponse:
    message = {"role": "user", "content": ASK, **({"images": [b64(image)]} if image else {})}
    return ollama.Client(host=server.url).chat(model=VLM, messages=[message],
                                               options={"temperature": 0, "num_predict": 8}, **extra)


@pytest.fixture(scope="module")
def expected(server) -> dict[str, ollama.ChatResponse]:
    return {"red": ollama_answer(server, RED), "blue": ollama_answer(server, BLUE), "none": ollama_answer(server, None)}


def test_the_model_reports_vision_on_every_api(server):
    show = ollama.Client(host=server.url).show(VLM)
    assert "vision" in show.capabilities and "completion" in show.capabilities
    tags = {m["name"]: m for m in server.client.get("/api/tags").json()["models"]}
    assert "vision" in tags[f"{VLM}:latest"]["capabilities"] and "vision" not in tags[f"{TEXT}:latest"]["capabilities"]
    models = {m["id"]: m for m in server.client.get("/v1/models").json()["data"]}
    assert models[f"{VLM}:latest"]["architecture"]["input_modalities"] == ["text", "image"]
    assert models[f"{TEXT}:latest"]["architecture"]["input_modalities"] == ["text"]
    props = server.client.get("/props", params={"model": VLM}).json()
    assert props["modalities"]["vision"] is True and props["media_marker"] == "<__media__>"
    assert server.client.get("/props", params={"model": TEXT}).json()["modalities"]["vision"] is False


def test_the_image_reaches_the_model(expected):
    """Two images, two greedy answers; the prompt holds the image's tokens."""
    red, blue, none = expected["red"], expected["blue"], expected["none"]
    assert red.message.content != blue.message.content
    assert red.prompt_eval_count == blue.prompt_eval_count == none.prompt_eval_count + IMAGE_TOKENS


def test_every_api_gives_the_same_answer_for_the_same_image(server, expected):
    want = expected["blue"].message.content
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    chat = oa.chat.completions.create(model=VLM, temperature=0, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(BLUE)}}, {"type": "text", "text": ASK}]}])
    assert chat.choices[0].message.content == want
    assert chat.usage.prompt_tokens == expected["blue"].prompt_eval_count
    responses = oa.responses.create(model=VLM, temperature=0, max_output_tokens=8, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": data_uri(BLUE)}, {"type": "input_text", "text": ASK}]}])
    assert responses.output_text == want
    claude = anthropic.Anthropic(base_url=server.url, api_key="x").messages.create(
        model=VLM, max_tokens=8, extra_body={"temperature": 0}, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(BLUE)}},
            {"type": "text", "text": ASK}]}])
    assert claude.content[0].text == want
    generate = ollama.Client(host=server.url).generate(model=VLM, prompt=ASK, images=[BLUE],
                                                       options={"temperature": 0, "num_predict": 8})
    assert generate.response == want
    # llama.cpp's /completion: the template's text by hand, the media marker where the image goes
    marker = server.client.get("/props", params={"model": VLM}).json()["media_marker"]
    completion = server.client.post("/completion", json={
        "model": VLM, "n_predict": 8, "temperature": 0,
        "prompt": {"prompt_string": f"<|im_start|>user\n{marker}{ASK}<|im_end|>\n<|im_start|>assistant\n",
                   "multimodal_data": [b64(BLUE)]}})
    assert completion.status_code == 200, completion.text
    assert completion.json()["content"] == want
    # a JPEG and a WebP of the same picture are read too
    for kind, fmt in (("jpeg", "JPEG"), ("webp", "WEBP")):
        r = oa.chat.completions.create(model=VLM, temperature=0, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": data_uri(png("blue", fmt=fmt), kind)}, {"type": "text", "text": ASK}]}])
        assert r.choices[0].message.content


@pytest.mark.parametrize("case, status, says", [
    ("http_url", 400, "send the image as base64"),
    ("bad_base64", 400, "invalid image input"),
    ("not_an_image", 400, "invalid image input"),
    ("too_many", 400, "At most 3 image(s)"),
    ("text_model", 400, "has no vision"),
    ("bomb", 400, "too large"),
])
def test_bad_images_are_a_400_in_each_apis_shape(server, case, status, says):
    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")  # 81 M pixels in a few kB
    source = {"http_url": "http://example.com/cat.png", "bad_base64": "data:image/png;base64,@@@@",
              "not_an_image": data_uri(b"GIF89a not really"), "bomb": data_uri(bomb.getvalue())}.get(case, data_uri(RED))
    count = 4 if case == "too_many" else 1
    model = TEXT if case == "text_model" else VLM
    # OpenAI's shape
    r = server.client.post("/v1/chat/completions", json={"model": model, "max_tokens": 4, "messages": [{
        "role": "user", "content": [*[{"type": "image_url", "image_url": {"url": source}}] * count,
                                    {"type": "text", "text": ASK}]}]})
    assert r.status_code == status and says in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    # Ollama's
    raw = source.split(",", 1)[-1] if source.startswith("data:") else source
    r = server.client.post("/api/chat", json={"model": model, "stream": False, "messages": [
        {"role": "user", "content": ASK, "images": [raw] * count}]})
    assert r.status_code == status and says in r.json()["error"], r.text
    # Anthropic's
    r = server.client.post("/v1/messages", json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
        *[{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": raw}}] * count,
        {"type": "text", "text": ASK}]}]})
    if case != "http_url":  # a base64 block cannot hold a URL
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
        assert r.json()["type"] == "error"


def test_other_image_sources_say_what_to_send(server):
    r = server.client.post("/v1/messages", json={"model": VLM, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "f1"}}, {"type": "text", "text": ASK}]}]})
    assert r.status_code == 400 and "Only base64 images are supported" in r.json()["error"]["message"]
    r = server.client.post("/v1/responses", json={"model": VLM, "input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file-1"}]}]})
    assert r.status_code == 400 and "data:image" in r.json()["error"]["message"]
    r = server.client.post("/completion", json={"model": VLM, "prompt": {"prompt_string": "no marker here",
                                                                          "multimodal_data": [b64(RED)]}})
    assert r.status_code == 400 and "media markers" in r.json()["error"]["message"]


def test_vision_and_text_requests_batch_together(server, expected):
    """8 image and 8 text requests at once on one model: each gets its own answer; the rows are freed."""
    text_want = ollama.Client(host=server.url).chat(model=VLM, messages=[{"role": "user", "content": "hello"}],
                                                    options={"temperature": 0, "num_predict": 8}).message.content

    def one(i: int) -> tuple[str, str]:
        if i % 2:
            return "text", ollama.Client(host=server.url).chat(
                model=VLM, messages=[{"role": "user", "content": "hello"}],
                options={"temperature": 0, "num_predict": 8}).message.content
        color = "red" if i % 4 == 0 else "blue"
        return color, ollama_answer(server, RED if color == "red" else BLUE).message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    for kind, text in answers:
        assert text == (text_want if kind == "text" else expected[kind].message.content), (kind, text)
    assert running_rows(server) == 0


def running_rows(server) -> int:
    return next(m for m in server.client.get("/status").json()["cache"]
                if m["name"].startswith(VLM))["batching"]["running_rows"]


def test_a_vision_client_that_leaves_frees_its_row(server):
    with httpx.stream("POST", f"{server.url}/api/chat", timeout=60, json={
            "model": VLM, "options": {"num_predict": 2000, "temperature": 0},
            "messages": [{"role": "user", "content": ASK, "images": [b64(RED)]}]}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    for _ in range(100):
        if running_rows(server) == 0:
            break
        threading.Event().wait(0.1)
    assert running_rows(server) == 0
    assert "generation cancelled" in server.log()


class ImageHost(http.server.BaseHTTPRequestHandler):
    """Serves a PNG at /cat.png and a redirect to 127.0.0.1 at /away."""

    target = ""

    def do_GET(self):  # noqa: N802
        if self.path == "/away":
            self.send_response(302)
            self.send_header("Location", self.target)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(RED)

    def log_message(self, *args):
        pass


def test_image_urls_are_fetched_only_when_allowed_and_never_from_private_addresses(start_server):
    host = http.server.ThreadingHTTPServer(("127.0.0.2", 0), ImageHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    ImageHost.target = f"http://127.0.0.1:{host.server_address[1]}/cat.png"
    here = f"http://127.0.0.2:{host.server_address[1]}"
    try:
        # The real server, fetching on: a loopback URL is refused before any connection
        s = start_server(FETCH_IMAGE_URLS="1")
        s.pull_ok(VLM)
        r = s.client.post("/v1/chat/completions", json={"model": VLM, "max_tokens": 4, "messages": [{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{here}/cat.png"}}]}]})
        assert r.status_code == 400 and "loopback, private or link-local" in r.json()["error"]["message"]
        # The fetcher itself, with 127.0.0.2 taken as public (no public address can be reached here): the
        # image comes; a redirect to 127.0.0.1 is refused at its hop
        assert app.fetch_image(f"{here}/cat.png", public=lambda a: a == "127.0.0.2") == RED
        with pytest.raises(app.BadRequest, match="loopback, private or link-local"):
            app.fetch_image(f"{here}/away", public=lambda a: a == "127.0.0.2")
    finally:
        host.shutdown()
    for address, public in (("127.0.0.1", False), ("10.0.0.8", False), ("169.254.169.254", False),
                            ("192.168.1.1", False), ("::1", False), ("::ffff:127.0.0.1", False), ("fd00::1", False),
                            ("8.8.8.8", True), ("2606:4700::1111", True)):
        assert app.is_public_address(address) is public, address


def red_blue_none(url: str, model: str) -> list[ollama.ChatResponse]:
    """The model's greedy answers to ASK with the red image, the blue one, and none."""
    client = ollama.Client(host=url)
    return [client.chat(model=model, options={"temperature": 0, "num_predict": 8}, messages=[
        {"role": "user", "content": ASK, **({"images": [b64(image)]} if image else {})}]) for image in (RED, BLUE, None)]


def test_idefics3_sees_in_the_batch_engine(server, hub):
    """Idefics3 (SmolVLM's architecture) takes pixel_values with their pixel_attention_mask, batched."""
    from models import make_tiny_idefics3

    hub.add_repo("tiny/idefics3", folder_files(make_tiny_idefics3))
    server.pull_ok("tiny/idefics3")
    red, blue, none = red_blue_none(server.url, "tiny/idefics3")
    assert red.message.content != blue.message.content
    assert red.prompt_eval_count == none.prompt_eval_count + 4  # <fake><global-img><image><fake>
    batching = next(m for m in server.client.get("/status").json()["cache"]
                    if m["name"].startswith("tiny/idefics3"))["batching"]
    assert batching["steps"] > 0 and batching["running_rows"] == 0  # the batch engine ran them


def test_gemma3_sees_through_generate(server, hub):
    """Gemma 3 (sliding-window layers: not batched) runs its images through model.generate."""
    from models import make_tiny_gemma3

    hub.add_repo("tiny/gemma3", folder_files(make_tiny_gemma3))
    server.pull_ok("tiny/gemma3")
    red, blue, none = red_blue_none(server.url, "tiny/gemma3")
    assert red.message.content != blue.message.content
    assert red.prompt_eval_count == none.prompt_eval_count + 10  # "\n\n", <boi>, 4 image tokens, <eoi>, "\n\n"
    assert "vision" in ollama.Client(host=server.url).show("tiny/gemma3").capabilities


# --- GGUF: the tiny Gemma 3 converted by llama.cpp's convert_hf_to_gguf.py (text model + mmproj), served by
# the real llama-server with --mmproj
GGUF_REPO = "test/tiny-gemma3-GGUF"


@pytest.fixture(scope="module")
def gguf_vision(hub, tmp_path_factory):
    from models import make_tiny_gemma3
    from vision_files import gemma3_gguf

    tmp = tmp_path_factory.mktemp("gemma3-gguf")
    model, mmproj = gemma3_gguf(make_tiny_gemma3(tmp / "hf"), tmp)
    # Two projector files: the pull takes the one whose quant is nearest the model's (Q8_0), as llama.cpp's -hf
    hub.add_repo(GGUF_REPO, {model.name: model.read_bytes(), mmproj.name: mmproj.read_bytes(),
                             "mmproj-tiny-gemma3-Q8_0.gguf": mmproj.read_bytes(), "README.md": b"# test\n"})
    return model, mmproj


@needs_binary
def test_a_gguf_vision_model_runs_on_llama_server_with_its_projector(gguf_vision, hub, start_server, tmp_path):
    model, mmproj = gguf_vision
    s = start_server(AI_SERVER_BACKENDS="llamacpp", LLAMA_SERVER=str(BINARY))
    s.pull_ok(f"hf.co/{GGUF_REPO}:Q8_0")
    name = f"hf.co/{GGUF_REPO}:Q8_0"
    fetched = {p.name for p in (s.home / "hf-cache").rglob("*.gguf")}
    assert fetched == {model.name, "mmproj-tiny-gemma3-Q8_0.gguf"}, fetched
    client = ollama.Client(host=s.url)
    assert "vision" in client.show(name).capabilities
    red, blue, none = red_blue_none(s.url, name)
    assert red.message.content != blue.message.content
    assert red.prompt_eval_count == none.prompt_eval_count + 7  # <boi>, 4 image embeddings, <eoi>, the "\n" after
    assert "vision projector mmproj-tiny-gemma3-Q8_0.gguf" in s.client.get("/status").json()["cache"][0]["note"]
    # The same files on bare llama-server give the same greedy text for the same image and prompt
    text = f"<|im_start|>user\n<__media__>{ASK}<|im_end|>\n<|im_start|>assistant\n"
    ours = s.client.post("/completion", json={"model": name, "n_predict": 8, "temperature": 0, "prompt": {
        "prompt_string": text, "multimodal_data": [b64(BLUE)]}})
    assert ours.status_code == 200, ours.text
    bare = BareLlamaServer(BINARY, tmp_path / "llama-server.log", "-m", str(model), "--mmproj", str(mmproj), "-c", "512",
                           env={"LLAMA_MEDIA_MARKER": "<__media__>"})
    try:
        theirs = httpx.post(f"{bare.url}/completion", timeout=60, json={
            "n_predict": 8, "temperature": 0, "prompt": {"prompt_string": text, "multimodal_data": [b64(BLUE)]}}).json()
    finally:
        bare.stop()
    assert ours.json()["content"] == theirs["content"]
    assert ours.json()["tokens_evaluated"] == theirs["tokens_evaluated"]
    # The same model pulled from a repo without a projector has no vision: our 400, not llama-server's 500
    hub.add_repo(f"{GGUF_REPO}-text", {model.name: model.read_bytes()})
    s.pull_ok(f"hf.co/{GGUF_REPO}-text:Q8_0")
    r = s.client.post("/v1/chat/completions", json={"model": f"hf.co/{GGUF_REPO}-text:Q8_0", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": [
                                                         {"type": "image_url", "image_url": {"url": data_uri(RED)}}]}]})
    assert r.status_code == 400 and "has no vision" in r.json()["error"]["message"], r.text


def test_the_projector_is_picked_as_llama_cpp_picks_it():
    files = ["m/Q4/model-Q4_K_M.gguf", "m/mmproj-F32.gguf", "m/Q4/mmproj-BF16.gguf", "m/Q4/mmproj-Q8_0.gguf",
             "other/mmproj-F16.gguf"]
    assert app.choose_projector("m/Q4/model-Q4_K_M.gguf", files) == "m/Q4/mmproj-Q8_0.gguf"  # same folder, nearest bits
    assert app.choose_projector("m/model-F16.gguf", files) == "m/mmproj-F32.gguf"  # deepest shared folder first
    assert app.choose_projector("x/model-BF16.gguf", ["mmproj-F16.gguf", "mmproj-Q4_0.gguf"]) == "mmproj-F16.gguf"
    assert app.choose_projector("model-Q4_0.gguf", ["model-Q8_0.gguf"]) is None
    assert [m.quant for m in app.gguf_models([(f, 1) for f in files])] == ["Q4_K_M"]  # projectors are no model


# --- Sound in chat: a tiny random Qwen2-Audio (tests/models.py), on the same seam as images
HEARS = "tiny/qwen2-audio"


def tone(hz: float, seconds: float = 2.0) -> bytes:
    """A sine tone as a 16 kHz mono WAV file."""
    import math
    import struct
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * hz * i / 16000)))
                               for i in range(int(16000 * seconds))))
    return out.getvalue()


LOW, HIGH = tone(200), tone(1800)


@pytest.fixture(scope="module")
def hearing(server, hub):
    from models import make_tiny_qwen2_audio

    hub.add_repo(HEARS, folder_files(make_tiny_qwen2_audio))
    server.pull_ok(HEARS)
    return server


def test_sound_reaches_a_model_that_hears_on_every_api(hearing):
    server = hearing
    show = ollama.Client(host=server.url).show(HEARS)
    assert "audio" in show.capabilities and "vision" not in show.capabilities
    models = {m["id"]: m for m in server.client.get("/v1/models").json()["data"]}
    assert models[f"{HEARS}:latest"]["architecture"]["input_modalities"] == ["text", "audio"]
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")

    def chat(clip: bytes | None):
        parts = [{"type": "input_audio", "input_audio": {"data": b64(clip), "format": "wav"}}] if clip else []
        return oa.chat.completions.create(model=HEARS, temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": [*parts, {"type": "text", "text": ASK}]}])

    low, high, none = chat(LOW), chat(HIGH), chat(None)
    assert low.choices[0].message.content != high.choices[0].message.content
    assert low.usage.prompt_tokens == high.usage.prompt_tokens == none.usage.prompt_tokens + 2 + 50  # bos, eos, 2 s of 50 frames
    want = high.choices[0].message.content
    # Ollama sends sound in `images`; its bytes say it is audio
    r = ollama.Client(host=server.url).chat(model=HEARS, options={"temperature": 0, "num_predict": 8}, messages=[
        {"role": "user", "content": ASK, "images": [b64(HIGH)]}])
    assert r.message.content == want
    responses = oa.responses.create(model=HEARS, temperature=0, max_output_tokens=8, input=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": b64(HIGH), "format": "wav"}},
        {"type": "input_text", "text": ASK}]}])
    assert responses.output_text == want
    assert "1 sound clip(s) in the prompt" in server.log()


def test_sound_is_refused_where_it_cannot_be_heard(hearing):
    server = hearing
    r = server.client.post("/v1/chat/completions", json={"model": VLM, "max_tokens": 2, "messages": [{"role": "user",
        "content": [{"type": "input_audio", "input_audio": {"data": b64(LOW), "format": "wav"}}]}]})
    assert r.status_code == 400 and "cannot hear" in r.json()["error"]["message"], r.text
    r = server.client.post("/api/chat", json={"model": HEARS, "stream": False, "messages": [
        {"role": "user", "content": ASK, "images": [b64(RED)]}]})
    assert r.status_code == 400 and "has no vision" in r.json()["error"], r.text
    r = server.client.post("/v1/chat/completions", json={"model": HEARS, "max_tokens": 2, "messages": [{"role": "user",
        "content": [{"type": "input_audio", "input_audio": {"data": b64(b"RIFF0000WAVEnot audio at all"),
                                                              "format": "wav"}}]}]})
    assert r.status_code == 400 and "could not be decoded" in r.json()["error"]["message"], r.text


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_a_processor_that_needs_torchvision_says_so_on_load(tmp_path):
    """Qwen2-VL's processor (its video processor) needs torchvision: the load fails saying how to install it."""
    import json

    from models import VISION_TEMPLATE, make_tokenizer

    make_tokenizer(VISION_TEMPLATE).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"],
                                                      "model_type": "qwen2_vl", "vision_config": {"depth": 1}}))
    for name in ("preprocessor_config.json", "processor_config.json"):
        (tmp_path / name).write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor",
                                                 "processor_class": "Qwen2VLProcessor"}))
    assert "vision" in app.model_capabilities(str(tmp_path))
    with pytest.raises(RuntimeError, match="needs torchvision .* install the torchvision release built for torch"):
        app.load_hf_multimodal(app.LoadPlan("qwen2-vl", str(tmp_path), "no", False, "cpu", "fp32"))
