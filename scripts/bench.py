"""Closed-loop load generator for ai-server and its peers (asyncio + httpx, streaming).

Speaks Ollama NDJSON (/api/chat) and OpenAI SSE (/v1/chat/completions); reports vLLM's
definitions: TTFT, TPOT = (E2E - TTFT) / (n - 1), p50/p99 of E2E, aggregate output tok/s =
sum(tokens) / (last end - first start), errors, and the server's peak RSS when given its pid.
Speed is reported as measured here; compare targets only as ratios taken in one run.

    .venv/bin/python scripts/bench.py --target ai=http://127.0.0.1:8005,ollama,smollm2:135m \\
        --target seed=http://127.0.0.1:8091,openai,x --levels 1,4,16 --rounds 3 --out bench-results
    .venv/bin/python scripts/bench.py --smoke ...   (C in {1,4}, 32 tokens, 1 round: under 2 minutes)
    .venv/bin/python scripts/bench.py --chat-turns 6 ...   (one conversation per target: TTFT per turn)

--ban-tokens 0,2 suppresses EOS (OpenAI logit_bias -100 on those ids) so every reply runs to
--max-tokens: SmolLM2 otherwise stops after ~16 tokens and per-request costs dominate.
scripts/bench_peers.sh starts the peers and runs the whole comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil


@dataclasses.dataclass
class Target:
    label: str
    url: str
    api: str  # "ollama" or "openai"
    model: str
    pid: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        label, rest = text.split("=", 1)
        url, api, model, *pid = rest.split(",")
        return cls(label, url.rstrip("/"), api, model, int(pid[0]) if pid else None)


@dataclasses.dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    tokens: int
    start: float
    end: float


def prompt_of(n_words: int) -> str:
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps".split()
    return "Summarise: " + " ".join(words[i % len(words)] for i in range(n_words))


BANNED: list[int] = []  # token ids given logit_bias -100 (--ban-tokens)


async def one_request(client: httpx.AsyncClient, target: Target, prompt: str | list[dict], max_tokens: int,
                      replies: list[str] | None = None) -> Sample:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if target.api == "ollama":
        path, body = "/api/chat", {"model": target.model, "messages": messages, "stream": True,
                                   "options": {"temperature": 0, "num_predict": max_tokens}}
    else:
        path, body = "/v1/chat/completions", {"model": target.model, "messages": messages, "stream": True,
                                              "temperature": 0, "max_tokens": max_tokens,
                                              "stream_options": {"include_usage": True}}
        if BANNED:
            body["logit_bias"] = {str(t): -100.0 for t in BANNED}  # floats: transformers serve rejects ints
    start = time.perf_counter()
    first, pieces, reported = None, 0, None
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            data = parse_line(line, target.api)
            if data is None:
                continue
            text, count = data
            if text and first is None:
                first = time.perf_counter()
            pieces += bool(text)
            if replies is not None:
                replies.append(text)
            reported = count if count is not None else reported
    end = time.perf_counter()
    return Sample((first or end) - start, end - start, reported or pieces, start, end)


def parse_line(line: str, api: str) -> tuple[str, int | None] | None:
    """(text of the chunk, the token count it reports if any)."""
    if api == "ollama":
        if not line:
            return None
        obj = json.loads(line)
        return obj.get("message", {}).get("content", ""), obj.get("eval_count") if obj.get("done") else None
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    obj = json.loads(line[len("data: "):])
    usage = obj.get("usage") or {}
    text = "".join(c.get("delta", {}).get("content") or "" for c in obj.get("choices", []))
    return text, usage.get("completion_tokens")


async def run_level(target: Target, concurrency: int, requests: int, prompt: str, max_tokens: int) -> dict:
    queue = list(range(requests))
    samples: list[Sample] = []
    errors = 0
    peak_rss = [0]

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            queue.pop()
            try:
                samples.append(await one_request(client, target, prompt, max_tokens))
            except httpx.HTTPError as exc:
                errors += 1
                print(f"{target.label} C={concurrency}: {type(exc).__name__}: {exc}", file=sys.stderr)

    async def watch_rss() -> None:
        if target.pid is None:
            return
        proc = psutil.Process(target.pid)
        while True:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak_rss[0] = max(peak_rss[0], rss)
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits) as client:
        await one_request(client, target, prompt, 4)  # warm-up, discarded
        watcher = asyncio.create_task(watch_rss())
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        watcher.cancel()
    return summarise(target, concurrency, samples, errors, peak_rss[0])


def summarise(target: Target, concurrency: int, samples: list[Sample], errors: int, peak_rss: int) -> dict:
    if not samples:
        return {"target": target.label, "concurrency": concurrency, "errors": errors}
    e2e = sorted(s.e2e_s for s in samples)
    ttft = sorted(s.ttft_s for s in samples)
    tpot = [(s.e2e_s - s.ttft_s) / (s.tokens - 1) for s in samples if s.tokens > 1]
    span = max(s.end for s in samples) - min(s.start for s in samples)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"target": target.label, "concurrency": concurrency, "requests": len(samples), "errors": errors,
            "tokens": sum(s.tokens for s in samples), "agg_tok_s": round(sum(s.tokens for s in samples) / span, 1),
            "ttft_p50_ms": round(pct(ttft, 0.5) * 1000), "ttft_p99_ms": round(pct(ttft, 0.99) * 1000),
            "tpot_ms": round(statistics.mean(tpot) * 1000, 1) if tpot else None,
            "e2e_p50_s": round(pct(e2e, 0.5), 2), "e2e_p99_s": round(pct(e2e, 0.99), 2),
            "peak_rss_mib": round(peak_rss / 2**20) if peak_rss else None}


USER_TURN = ("Here is more about my garden: the roses along the south wall need pruning, the tomatoes are "
             "ripening late this year, and the old apple tree by the gate dropped half its fruit after the storm. "
             "The neighbours say the soil is too wet, but the beans are doing well and the herbs smell wonderful. ")


async def run_chat(target: Target, turns: int, words: int, max_tokens: int) -> list[dict]:
    """One conversation, each user turn about `words` words; TTFT per turn shows prefix reuse."""
    messages: list[dict] = []
    rows = []
    text = (USER_TURN * (words // len(USER_TURN.split()) + 1)).split()[:words]
    async with httpx.AsyncClient(base_url=target.url, timeout=600) as client:
        await one_request(client, target, "Hello.", 4)  # warm-up, discarded
        for turn in range(1, turns + 1):
            messages.append({"role": "user", "content": f"Turn {turn}. " + " ".join(text) + " What should I do?"})
            pieces: list[str] = []
            sample = await one_request(client, target, messages, max_tokens, pieces)
            messages.append({"role": "assistant", "content": "".join(pieces)})
            rows.append({"target": target.label, "turn": turn, "ttft_ms": round(sample.ttft_s * 1000),
                         "e2e_s": round(sample.e2e_s, 2), "tokens": sample.tokens})
    return rows


def markdown(rows: list[dict]) -> str:
    cols = ["target", "concurrency", "requests", "errors", "agg_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_ms",
            "e2e_p50_s", "e2e_p99_s", "peak_rss_mib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", default=[], type=Target.parse,
                        help="label=URL,api(ollama|openai),model[,server pid]")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds: A B A B ...")
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="C in {1,4}, 32 tokens, 1 round")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--ban-tokens", default="", help="token ids to ban (EOS), e.g. 0,2 for SmolLM2")
    parser.add_argument("--chat-turns", type=int, default=0, help="run the multi-turn chat instead")
    parser.add_argument("--chat-words", type=int, default=150, help="words per user turn (~200 tokens)")
    parser.add_argument("--round-index", type=int, default=0, help="label of this run's round (one server at a time)")
    parser.add_argument("--merge", nargs="+", type=Path, help="rounds.json files to merge into medians")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        rows = [row for path in args.merge for row in json.loads(path.read_text())["rounds"]]
        write_summary(args.out, rows)
        return
    if not args.target:
        parser.error("--target is required")
    BANNED[:] = [int(t) for t in args.ban_tokens.split(",") if t]
    if args.chat_turns:
        await chat_main(args)
        return
    levels = [1, 4] if args.smoke else [int(c) for c in args.levels.split(",")]
    rounds, max_tokens = (1, 32) if args.smoke else (args.rounds, args.max_tokens)
    prompt = prompt_of(args.prompt_words)
    rows = []
    for r in range(rounds):
        for c in levels:
            for target in args.target:  # interleaved: every target at each level, round after round
                row = await run_level(target, c, max(2 * c, 4), prompt, max_tokens)
                row["round"] = r + args.round_index
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_summary(args.out, rows)


def write_summary(out: Path, rows: list[dict]) -> None:
    """Medians over rounds per (target, concurrency), in first-seen order: results.json and .md."""
    medians = []
    cells = dict.fromkeys((x["concurrency"], x["target"]) for x in rows)
    for c, label in sorted(cells, key=lambda k: k[0]):
        cell = [x for x in rows if x["target"] == label and x["concurrency"] == c and "agg_tok_s" in x]
        if cell:
            best = dict(cell[0])
            for key in ("agg_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_ms", "e2e_p50_s", "e2e_p99_s"):
                best[key] = round(statistics.median(x[key] for x in cell if x[key] is not None), 2)
            best["errors"] = sum(x["errors"] for x in cell)
            best["rounds"] = len(cell)
            medians.append(best)
    (out / "results.json").write_text(json.dumps({"rounds": rows, "medians": medians}, indent=2))
    table = markdown(medians)
    (out / "results.md").write_text(table + "\n")
    print(table)


async def chat_main(args: argparse.Namespace) -> None:
    rows = []
    for r in range(args.rounds):
        for target in args.target:
            for row in await run_chat(target, args.chat_turns, args.chat_words, 32):
                rows.append({**row, "round": r})
                print(json.dumps(rows[-1]), flush=True)
    medians = [{"target": t.label, "turn": turn,
                "ttft_ms": statistics.median(x["ttft_ms"] for x in rows if x["target"] == t.label and x["turn"] == turn)}
               for t in args.target for turn in range(1, args.chat_turns + 1)]
    (args.out / "chat.json").write_text(json.dumps({"rounds": rows, "medians": medians}, indent=2))
    cols = ["turn", *[t.label for t in args.target]]
    lines = ["| TTFT ms, " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for turn in range(1, args.chat_turns + 1):
        lines.append(f"| {turn} | " + " | ".join(str(m["ttft_ms"]) for m in medians if m["turn"] == turn) + " |")
    (args.out / "chat.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
