"""Shared test configuration.

Without a GPU, Triton kernels run on CPU tensors through the Triton interpreter,
which must be switched on before triton is first imported; that happens here.
"""

from __future__ import annotations

import os
import zlib

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from _support import HashEncoder  # noqa: E402
from openai_server import FakeOpenAIServer  # noqa: E402

import grasp.ops  # noqa: E402,F401  (loads the extension and registers the grasp ops before any test runs)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: Every run draws fresh inputs; a failure is replayed with GRASP_TEST_SEED=<seed>, which every failure
#: message starts with (and the header shows).
SEED = int(os.environ.get("GRASP_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config) -> list[str]:
    from grasp.info import backend_table

    rows = [f"{op}/{b}/{dev}: {status}" for op, b, dev, status in backend_table() if status == "available"]
    return [f"grasp test seed: GRASP_TEST_SEED={SEED}", "grasp backends available: " + ", ".join(rows)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Put the replay seed at the front of every failure message, where ``-q``'s summary line shows it."""
    outcome = yield
    report = outcome.get_result()
    replay = f"GRASP_TEST_SEED={SEED}"
    crash = getattr(report.longrepr, "reprcrash", None)
    if report.failed and crash is not None and replay not in crash.message:
        crash.message = f"[{replay}] {crash.message}"
        report.sections.append(("grasp test seed", f"replay with {replay} python -m pytest '{item.nodeid}'"))


@pytest.fixture(autouse=True)
def _grasp_cache(monkeypatch, tmp_path_factory) -> None:
    """Every test gets its own empty shared cache ($GRASP_CACHE), never the user's ~/.cache/grasp."""
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path_factory.mktemp("grasp-cache")))


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    """Seed torch per test from the run's seed and the test's id, so any failure can be replayed."""
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def key(monkeypatch) -> str:
    """A fresh fake OpenAI key in ``OPENAI_API_KEY`` (tests check it never leaks)."""
    secret = "sk-test-" + os.urandom(12).hex()
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    return secret


@pytest.fixture
def server():
    """A fake OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py)."""
    with FakeOpenAIServer(slow_seconds=0.8) as fake:
        yield fake


@pytest.fixture
def hash_encoder(monkeypatch):
    """grasp's text encoders replaced by :class:`_support.HashEncoder` (its call count reset)."""
    import grasp.embedding

    monkeypatch.setattr(grasp.embedding, "make_encoder", lambda name, **options: HashEncoder(**options))
    HashEncoder.calls = 0
    return HashEncoder
