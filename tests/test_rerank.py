"""Rerank (issue 13): a cross-encoder pulled from the (local) Hub, served on /v1/rerank and /rerank in the
shape vLLM and llama.cpp serve, its scores those of sentence-transformers' CrossEncoder on the same files."""
from __future__ import annotations

import pytest

from conftest import ServerProcess
from models import tiny_cross_encoder_files

RERANKER = "tiny/reranker"
QUERY = "what is the capital of france"
DOCS = ["cats sleep a lot", "paris is the capital of france", "berlin is in germany", "the quick brown fox"]


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    files = tiny_cross_encoder_files()
    hub.add_repo(RERANKER, files)
    tmp = tmp_path_factory.mktemp("rerank")
    server = ServerProcess(tmp / "home", hub.url, tmp / "server.log", AI_SERVER_BACKENDS="transformers,pipeline")
    server.start()
    server.pull_ok(RERANKER)
    server.pull_ok("tiny/llama-a")
    folder = tmp / "local"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    server.local_copy = folder
    yield server
    server.stop()


def expected_scores(folder) -> list[float]:
    from sentence_transformers import CrossEncoder

    return [float(x) for x in CrossEncoder(str(folder), local_files_only=True).predict([(QUERY, d) for d in DOCS])]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_documents_come_back_best_first(server, path):
    r = server.client.post(path, json={"model": RERANKER, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    out = r.json()
    scores = expected_scores(server.local_copy)
    assert [x["index"] for x in out["results"]] == sorted(range(len(DOCS)), key=lambda i: scores[i], reverse=True)
    for x in out["results"]:
        assert x["relevance_score"] == pytest.approx(scores[x["index"]], abs=1e-5)
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert out["model"] == RERANKER and out["usage"]["total_tokens"] > len(DOCS) * 4
    top = server.client.post(path, json={"model": RERANKER, "query": QUERY, "top_n": 2, "return_documents": False,
                                         "documents": [{"text": d} for d in DOCS]}).json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in out["results"][:2]] and "document" not in top[0]


def test_rerank_is_a_capability_and_other_models_refuse_it(server):
    caps = {m["name"]: m.get("capabilities") for m in server.client.get("/api/tags").json()["models"]}
    assert caps["tiny/reranker:latest"] == ["rerank"], caps
    r = server.client.post("/v1/rerank", json={"model": "tiny/llama-a", "query": QUERY, "documents": DOCS})
    assert r.status_code == 400 and "does not support rerank" in r.json()["error"]["message"]
    r = server.client.post("/api/chat", json={"model": RERANKER, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"] == '"tiny/reranker" does not support chat'
    r = server.client.post("/rerank", json={"model": "nope/x", "query": QUERY, "documents": DOCS})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = server.client.post("/v1/rerank", json={"model": RERANKER, "query": QUERY, "documents": []})
    assert r.status_code == 400
