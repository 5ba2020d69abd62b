"""Speech through ai-server against the same engine in-process: the real-time factor (seconds of work per second
of audio) of transcription (faster-whisper, whisper:tiny.en) and of speech (Piper, piper:en_US-joe-medium), and
how much of the in-process speed the server keeps. Rounds are interleaved (server, in-process, server, ...);
every round is printed, then the medians.

    .venv/bin/python scripts/bench_audio.py [--rounds 3] [--out bench-results/audio.json]

The audio transcribed is a story Piper speaks once (~40 s). Needs scripts/setup.sh (the embedded models).
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "She sells sea shells by the sea shore. The weather today is bright and clear, with a light wind from the "
        "west. Please remember to bring your umbrella tomorrow, because it might rain in the afternoon.")


STORY = ("Once upon a time, in a small village by the river, there lived an old clockmaker named Elias. Every "
         "morning he opened his shop before sunrise and listened to the ticking of a hundred clocks. Children "
         "pressed their noses against the window to watch him work. One winter, a traveler arrived with a broken "
         "pocket watch that had belonged to her grandmother. Elias studied it for three days and nights. He "
         "discovered a tiny note hidden behind the gears, folded many times. The note described a garden beneath "
         "the old bridge, where tulips bloomed even in the snow. The traveler thanked him, paid with a silver "
         "coin, and walked toward the bridge as the church bells rang at noon.")


def speech_clip(voice_path: Path) -> tuple[bytes, float]:
    """A story spoken once by the Piper voice (no repeats: a repeated clip sends Whisper down its temperature
    fallback, whose sampling makes every run different), as 16-bit WAV; (bytes, seconds)."""
    import wave

    from piper import PiperVoice

    voice = PiperVoice.load(voice_path)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        voice.synthesize_wav(STORY, w)
        seconds = w.getnframes() / w.getframerate()
    return out.getvalue(), seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import app

    home = Path(tempfile.mkdtemp(prefix="bench-audio-"))
    port = free_port()
    env = {**os.environ, "AI_SERVER_HOME": str(home), "AI_SERVER_PORT": str(port), "DEFAULT_MODEL": "",
           "EMBED_MODEL": "", "KEEP_ALIVE": "-1", "HF_HUB_OFFLINE": "1"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "serve"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    try:
        for _ in range(300):
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        models = home / "models"

        from faster_whisper import WhisperModel
        from piper import PiperVoice

        whisper = WhisperModel(str(models / "whisper-tiny.en"), device="cpu", compute_type="int8",
                               local_files_only=True)
        voice = PiperVoice.load(models / "piper-en_US-joe-medium" / "en_US-joe-medium.onnx")
        clip, stt_seconds = speech_clip(models / "piper-en_US-joe-medium" / "en_US-joe-medium.onnx")

        def stt_server() -> float:
            r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", clip)},
                            data={"model": "whisper:tiny.en"})
            assert r.status_code == 200, r.text
            return stt_seconds

        def stt_local() -> float:
            audio = app.decode_audio(clip, 3600)
            segments, _ = whisper.transcribe(audio, language="en", temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
            "".join(s.text for s in segments)
            return stt_seconds

        def tts_server() -> float:
            r = client.post("/v1/audio/speech", json={"model": "piper:en_US-joe-medium", "input": TEXT,
                                                      "voice": "en_US-joe-medium", "response_format": "pcm"})
            assert r.status_code == 200, r.text
            return len(r.content) / 2 / app.PCM_RATE

        def tts_local() -> float:
            encoder, samples = app.AudioEncoder("pcm", voice.config.sample_rate), 0
            for chunk in voice.synthesize(TEXT):
                encoder.add(chunk.audio_float_array)
                samples += len(chunk.audio_float_array)
            encoder.add(None)
            return samples / voice.config.sample_rate

        cells = {"stt_server": stt_server, "stt_local": stt_local, "tts_server": tts_server, "tts_local": tts_local}
        for fn in cells.values():  # warm-up: loads, first-call costs
            fn()
        rtf: dict[str, list[float]] = {k: [] for k in cells}
        for n in range(args.rounds):
            line = []
            for name, fn in cells.items():
                start = time.perf_counter()
                audio_s = fn()
                rtf[name].append((time.perf_counter() - start) / audio_s)
                line.append(f"{name} {rtf[name][-1]:.4f}")
            print(f"round {n + 1}: RTF " + ", ".join(line), flush=True)
        med = {k: statistics.median(v) for k, v in rtf.items()}
        result = {"rounds": args.rounds, "stt_audio_s": stt_seconds, "rtf": rtf, "median_rtf": med,
                  "stt_server_keeps": med["stt_local"] / med["stt_server"],
                  "tts_server_keeps": med["tts_local"] / med["tts_server"], "load": os.getloadavg()}
        print(f"median RTF: transcription server {med['stt_server']:.4f} vs in-process {med['stt_local']:.4f} "
              f"(server keeps {result['stt_server_keeps']:.3f}x); speech server {med['tts_server']:.4f} vs "
              f"in-process {med['tts_local']:.4f} (server keeps {result['tts_server_keeps']:.3f}x)")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
