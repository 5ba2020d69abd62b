"""The benchmark's own arithmetic and parsing (scripts/bench.py): its figures must be right."""

from __future__ import annotations

import importlib.util
import sys

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)


def test_parses_ollama_ndjson_and_openai_sse():
    assert bench.parse_line('{"message":{"role":"assistant","content":"Hi"},"done":false}', "ollama") == ("Hi", None)
    assert bench.parse_line('{"message":{"role":"assistant","content":""},"done":true,"eval_count":7}',
                            "ollama") == ("", 7)
    assert bench.parse_line('data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}', "openai") == ("Hi", None)
    assert bench.parse_line('data: {"choices":[],"usage":{"completion_tokens":9}}', "openai") == ("", 9)
    assert bench.parse_line("data: [DONE]", "openai") is None and bench.parse_line("", "ollama") is None


def test_summary_follows_vllm_definitions():
    target = bench.Target("t", "http://x", "ollama", "m")
    samples = [bench.Sample(ttft_s=0.1, e2e_s=1.1, tokens=11, start=0.0, end=1.1),
               bench.Sample(ttft_s=0.3, e2e_s=2.3, tokens=21, start=0.5, end=2.8)]
    row = bench.summarise(target, 2, samples, errors=1, peak_rss=3 * 2**20)
    assert row["agg_tok_s"] == round(32 / 2.8, 1)  # all tokens over first start to last end
    assert row["tpot_ms"] == 100.0  # (1.1-0.1)/10 and (2.3-0.3)/20
    assert (row["ttft_p50_ms"], row["e2e_p99_s"], row["errors"], row["peak_rss_mib"]) == (300, 2.3, 1, 3)
