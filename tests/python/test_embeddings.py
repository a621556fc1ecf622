"""The official openai SDK's embeddings.create against all-MiniLM-L6-v2 served by opta-lmx,
checked against an implementation independent of llama.cpp (tests/python/bert_reference.py:
the HF tokenizer and a numpy forward pass over the model's safetensors)."""

import base64
import pathlib

import numpy as np
import pytest
from openai import OpenAI

from bert_reference import Bert
from conftest import ROOT, _start

EMBED = "all-minilm-l6-v2-f32"
SENTENCES = [
    "The cat sits on the mat.",
    "A feline rests on a rug.",
    "Quarterly tax returns are due in April.",
    "Remind me to water the plants tomorrow morning.",
    "The kitchen light flickers when the kettle is on.",
    "Rust's borrow checker rejects two mutable references.",
    "Paris is the capital of France.",
    "Bananas are rich in potassium.",
    "The bot remembered that Sam prefers tea over coffee.",
    "Heavy rain is expected over the weekend.",
    "git rebase rewrites the commits of a branch.",
    "Three hundred and twelve!",
]


@pytest.fixture(scope="module")
def embed_server():
    yield from _start(["--parallel", "4"], model_id=EMBED, context="512")


@pytest.fixture(scope="module")
def reference():
    return Bert(ROOT / "target/test-model/all-minilm-l6-v2")


def cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_vectors_agree_with_an_independent_forward_pass(embed_server, reference):
    client = OpenAI(base_url=embed_server + "/v1", api_key="x")
    expected = [reference.embed(s) for s in SENTENCES]
    # Batched, with floats asked for explicitly.
    batched = client.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float")
    assert [d.index for d in batched.data] == list(range(len(SENTENCES)))
    assert batched.usage.prompt_tokens == sum(len(reference.tokens(s)) for s in SENTENCES)
    for d, e in zip(batched.data, expected):
        assert len(d.embedding) == 384
        assert cos(d.embedding, e) >= 0.999
    # One at a time, in the SDK's default form (it asks for base64 and decodes it).
    for s, d, e in zip(SENTENCES, batched.data, expected):
        single = client.embeddings.create(model=EMBED, input=s)
        assert cos(single.data[0].embedding, e) >= 0.999
        # Batched or alone: the same vector up to float rounding in the larger matrices.
        assert cos(single.data[0].embedding, d.embedding) >= 0.9999
    # Related sentences are closer than unrelated ones, as in the reference.
    v = [d.embedding for d in batched.data]
    assert cos(v[0], v[1]) > cos(v[0], v[2])


def test_base64_is_the_same_floats(embed_server):
    client = OpenAI(base_url=embed_server + "/v1", api_key="x")
    floats = client.embeddings.create(model=EMBED, input=SENTENCES[:3], encoding_format="float")
    raw = client.embeddings.with_raw_response.create(
        model=EMBED, input=SENTENCES[:3], encoding_format="base64").http_response.json()
    for f, b in zip(floats.data, raw["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        # The same float32 values (JSON prints each float32 in its shortest form).
        assert np.array_equal(decoded, np.asarray(f.embedding, dtype=np.float32))


def test_dimensions_and_token_input(embed_server, reference):
    client = OpenAI(base_url=embed_server + "/v1", api_key="x")
    short = client.embeddings.create(model=EMBED, input=SENTENCES[0], dimensions=64,
                                     encoding_format="float").data[0].embedding
    assert len(short) == 64
    assert abs(np.linalg.norm(short) - 1) < 1e-4
    full = reference.embed(SENTENCES[0])
    assert cos(short, full[:64]) >= 0.999
    ids = reference.tokens(SENTENCES[6])
    by_ids = client.embeddings.create(model=EMBED, input=[ids], encoding_format="float")
    assert by_ids.usage.prompt_tokens == len(ids)
    assert cos(by_ids.data[0].embedding, reference.embed(SENTENCES[6])) >= 0.999


def test_too_long_is_a_400_with_the_numbers(embed_server):
    import openai
    client = OpenAI(base_url=embed_server + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED, input="word " * 600)
    assert e.value.code == "context_length_exceeded"
    assert "602 tokens" in str(e.value) and "512" in str(e.value)


# A decoder embedder (Qwen3-Embedding's layout: causal attention, last-token pooling after an
# appended <|endoftext|>) and a cross-encoder reranker (rank pooling), both tiny random-weight
# models made by scripts/fetch-embed-model.sh, each checked against its own numpy forward pass.
DECODER = "tiny-qwen3-embedding"
CROSS = "minilm-cross-encoder"


@pytest.fixture(scope="module")
def decoder_server():
    yield from _start(["--parallel", "4"], model_id=DECODER, context="512")


@pytest.fixture(scope="module")
def cross_server():
    yield from _start(["--parallel", "4"], model_id=CROSS, context="512")


def test_a_decoder_embedder_agrees_with_an_independent_forward_pass(decoder_server):
    from qwen3_reference import Qwen3
    reference = Qwen3(ROOT / f"target/test-model/{DECODER}")
    client = OpenAI(base_url=decoder_server + "/v1", api_key="x")
    listed = {m.id: m for m in client.models.list().data}
    assert listed[DECODER].model_extra["type"] == "embedding"
    batched = client.embeddings.create(model=DECODER, input=SENTENCES, encoding_format="float")
    # The appended end-of-text token is counted, as the reference counts it.
    assert batched.usage.prompt_tokens == sum(len(reference.tokens(s)) for s in SENTENCES)
    for s, d in zip(SENTENCES, batched.data):
        assert len(d.embedding) == 64
        assert cos(d.embedding, reference.embed(s)) >= 0.999
    # Alone, each sequence attends only to itself: the same vector as in the shared batch.
    for s, d in zip(SENTENCES[:4], batched.data):
        single = client.embeddings.create(model=DECODER, input=s).data[0].embedding
        assert cos(single, d.embedding) >= 0.9999
    # An embedder cannot chat.
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DECODER, messages=[{"role": "user", "content": "hi"}])
    assert DECODER in str(e.value) and "embedding" in str(e.value)


def _json(url, body=None):
    """GET (or POST `body`) and decode the answer; rerank is not in the openai SDK."""
    import json
    import urllib.request
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        return json.load(r)


def test_a_cross_encoder_scores_pairs_as_its_reference(cross_server):
    reference = Bert(ROOT / f"target/test-model/{CROSS}")
    query = "Where is the Eiffel tower?"
    docs = SENTENCES[:8]
    models = _json(cross_server + "/v1/models")["data"]
    assert {m["id"]: m["type"] for m in models}[CROSS] == "reranker"
    body = _json(cross_server + "/v1/rerank", {
        "model": CROSS, "query": query, "documents": docs, "return_documents": True})
    expected = [reference.score(query, d) for d in docs]
    got = {x["index"]: x["relevance_score"] for x in body["results"]}
    assert sorted(got) == list(range(len(docs)))
    for i, e in enumerate(expected):
        assert abs(got[i] - e) < 1e-3, (i, got[i], e)
    # Sorted by score, the reference's order, each with its document.
    assert [x["index"] for x in body["results"]] == sorted(range(len(docs)), key=lambda i: -expected[i])
    assert all(x["document"]["text"] == docs[x["index"]] for x in body["results"])
    # Each pair is [CLS] query [SEP] document [SEP], as the HF tokenizer frames it.
    assert body["usage"]["prompt_tokens"] == sum(len(reference.pair_tokens(query, d)) for d in docs)
    # llama-server's path and top_n.
    top = _json(cross_server + "/rerank", {
        "model": CROSS, "query": query, "documents": docs, "top_n": 3})
    assert [x["index"] for x in top["results"]] == [x["index"] for x in body["results"][:3]]
