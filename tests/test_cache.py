"""The shared cache (grasp.cache): a text embedded or a prompt answered once is never sent again, in any run.

Through the CLI: a second run directory embeds nothing and asks nothing, and gets identical tables; a
damaged cache file is started afresh with one warning. Through the API: only missing texts reach the
encoder, namespaces keep models apart, a killed run keeps its finished chunks, concurrent writers do not
corrupt the file, ``grasp cache info`` and ``clear``, and ``GRASP_CACHE=off``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _support import HashEncoder

import grasp.embedding
from grasp.cache import CACHE_FILE, EMBEDDING, CachedEncoder, SharedCache, cache_dir, encoder_namespace
from grasp.cache.cli import add_cache_arguments, cache_main
from grasp.cli import main
from grasp.data.download import default_cache_dir
from grasp.pipeline import Manifest

USERS, ITEMS = 60, 64
SMALL = ["--dataset", "synthetic", "--synthetic-users", str(USERS), "--synthetic-items", str(ITEMS), "--no-progress"]
TABLES = ("user.npy", "item.npy", "user_sim.npy", "item_sim.npy", "user_neighbors.npy", "item_neighbors.npy")


class Counting(HashEncoder):
    """The hash encoder, recording every text it is asked to embed."""

    seen: list[str] = []

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.model = options.get("model")

    def encode(self, texts, *, progress=True):
        Counting.seen.extend(texts)
        return super().encode(texts, progress=progress)


@pytest.fixture(autouse=True)
def shared(tmp_path, monkeypatch) -> Path:
    """A fresh shared cache folder in ``$GRASP_CACHE``."""
    folder = tmp_path / "shared"
    monkeypatch.setenv("GRASP_CACHE", str(folder))
    return folder


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(grasp.embedding, "make_encoder", lambda name, **options: Counting(**options))
    Counting.seen = []
    return Counting


def cache_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="grasp cache")
    add_cache_arguments(parser)
    return cache_main(parser.parse_args(list(argv)))


def texts_of(run: Path, sides: tuple[str, ...] = ("items", "users")) -> list[str]:
    """The descriptions the run embedded (padding row left out)."""
    return [text for side in sides for text in json.loads((run / "texts" / f"{side}.json").read_text())["texts"][1:]]


# ------------------------------------------------------------------------------------------------ the CLI


def test_second_run_embeds_nothing_and_gives_identical_tables(tmp_path, capsys, counting, shared):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["retrieve", "--out", str(first), *SMALL]) == 0
    assert sorted(counting.seen) == sorted(set(texts_of(first)))  # every distinct text once
    assert (shared / CACHE_FILE).is_file()
    counting.seen = []
    # Another run directory, another batch size (not part of the key): nothing is embedded.
    assert main(["retrieve", "--out", str(second), *SMALL, "--embedding-batch-size", "3"]) == 0
    assert counting.seen == []
    out = capsys.readouterr().out
    assert f"embed: items: {ITEMS} texts from the shared cache, 0 embedded" in out
    for name in TABLES:
        assert (first / "embeddings" / name).read_bytes() == (second / "embeddings" / name).read_bytes()
    assert Manifest(second).stage("embed")["users"]["cache"] == {"cached": USERS, "embedded": 0}
    # Another model is another namespace: everything is embedded again.
    assert main(["embed", "--out", str(second), "--embedding-model", "other", "--no-progress"]) == 0
    assert sorted(counting.seen) == sorted(set(texts_of(second)))


def test_interrupted_embed_keeps_what_finished(tmp_path, capsys, counting, monkeypatch):
    class Interrupted(Counting):
        def encode(self, texts, *, progress=True):
            if len(texts) == USERS:  # the users, after the items were embedded and cached
                raise KeyboardInterrupt
            return super().encode(texts, progress=progress)

    monkeypatch.setattr(grasp.embedding, "make_encoder", lambda name, **options: Interrupted(**options))
    assert main(["embed", "--out", str(tmp_path / "killed"), *SMALL]) == 130
    item_texts = texts_of(tmp_path / "killed", ("items",))
    assert sorted(counting.seen) == sorted(item_texts)
    counting.seen = []
    monkeypatch.setattr(grasp.embedding, "make_encoder", lambda name, **options: Counting(**options))
    assert main(["embed", "--out", str(tmp_path / "again"), *SMALL]) == 0
    assert len(counting.seen) == USERS and not set(counting.seen) & set(item_texts)  # only the users


@pytest.mark.parametrize(
    "damage, reason", [("garbage", "file is not a database"), ("truncated", "database disk image is malformed")]
)
def test_damaged_cache_file_is_started_afresh_with_one_warning(tmp_path, capsys, caplog, counting, shared, damage,
                                                                reason):  # fmt: skip
    assert main(["embed", "--out", str(tmp_path / "first"), *SMALL]) == 0
    path = shared / CACHE_FILE
    data = path.read_bytes()
    path.write_bytes(b"not a database " * 1000 if damage == "garbage" else data[: len(data) // 2])
    counting.seen = []
    with caplog.at_level(logging.WARNING, logger="grasp.cache"):
        assert main(["embed", "--out", str(tmp_path / "second"), *SMALL]) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"shared cache {path} is damaged ({reason}): starting an empty one"]
    assert len(counting.seen) == USERS + ITEMS  # embedded again, into the new file
    for name in ("user.npy", "item.npy"):
        first, second = (tmp_path / run / "embeddings" / name for run in ("first", "second"))
        assert first.read_bytes() == second.read_bytes()
    counting.seen = []
    assert main(["embed", "--out", str(tmp_path / "third"), *SMALL]) == 0
    assert counting.seen == []


def test_unusable_cache_folder_is_skipped_with_one_warning(tmp_path, capsys, caplog, counting, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path / "a-file"))  # not a folder
    with caplog.at_level(logging.WARNING, logger="grasp.cache"):
        assert main(["embed", "--out", str(tmp_path / "run"), *SMALL]) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is unavailable" in warnings[0] and warnings[0].endswith("continuing without it")
    assert len(counting.seen) == USERS + ITEMS


def test_generations_and_openai_embeddings_shared_across_run_dirs(tmp_path, capsys, server, key, shared):
    openai = ["--generator", "openai", "--base-url", server.base_url, "--llm-model", "fake-model",
              "--encoder", "openai", "--embedding-base-url", server.base_url, "--embedding-model", "fake-embed",
              "--request-timeout", "5"]  # fmt: skip
    assert main(["embed", "--out", str(tmp_path / "first"), *SMALL, *openai]) == 0
    requests, embedded = server.requests, sum(server.batch_sizes)
    assert embedded == USERS + ITEMS and requests > USERS + ITEMS
    assert main(["embed", "--out", str(tmp_path / "second"), *SMALL, *openai]) == 0
    assert server.requests == requests  # no chat and no embeddings request
    for path in ("texts/items.json", "texts/users.json", "embeddings/item.npy", "embeddings/user.npy"):
        assert (tmp_path / "first" / path).read_bytes() == (tmp_path / "second" / path).read_bytes()
    assert not (tmp_path / "second" / "cache").exists()  # nothing per run
    # The key is never stored, nor printed.
    out = capsys.readouterr()
    assert key not in out.out + out.err
    assert all(key.encode() not in path.read_bytes() for path in shared.rglob("*") if path.is_file())


def test_per_run_generation_cache_of_older_versions_is_read(tmp_path, capsys, server, key, monkeypatch, shared):
    run = tmp_path / "run"
    args = ["generate", "--out", str(run), *SMALL, "--generator", "openai", "--base-url", server.base_url,
            "--llm-model", "fake-model"]  # fmt: skip
    monkeypatch.setenv("GRASP_CACHE", "off")  # as before the shared cache: answers in RUN_DIR/cache
    assert main(args) == 0
    requests = server.requests
    assert (run / "cache" / "generation.jsonl").is_file() and not shared.exists()
    monkeypatch.setenv("GRASP_CACHE", str(shared))
    assert main([*args, "--force"]) == 0
    assert server.requests == requests  # answered from the run's own file ...
    assert main(["generate", "--out", str(tmp_path / "other"), *SMALL, "--generator", "openai", "--base-url",
                 server.base_url, "--llm-model", "fake-model"]) == 0  # fmt: skip
    assert server.requests == requests  # ... which was copied into the shared cache as it was used


def test_cache_off(tmp_path, capsys, counting, monkeypatch):
    monkeypatch.setenv("GRASP_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    for run in ("first", "second"):
        assert main(["embed", "--out", str(tmp_path / run), *SMALL]) == 0
    assert len(counting.seen) == 2 * (USERS + ITEMS)  # every text, in both runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "second"]  # no cache folder anywhere
    assert cache_cli("info") == 0
    assert "the shared cache is off" in capsys.readouterr().out
    assert default_cache_dir() == tmp_path / "xdg" / "grasp"  # downloads still have a folder


def test_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("GRASP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "grasp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "grasp"


# ------------------------------------------------------------------------------------------------ the API


def test_only_missing_texts_are_embedded_bit_for_bit(tmp_path):
    class Random:
        name = "random"
        seen: list[str] = []

        def encode(self, texts, *, progress=True):
            self.seen.extend(texts)
            rng = np.random.default_rng(len(self.seen))
            return (rng.standard_normal((len(texts), 7)) * 10.0 ** rng.integers(-40, 30, (len(texts), 7))).astype(
                np.float32
            )

    encoder = Random()
    with SharedCache(tmp_path / "c.sqlite3") as cache:
        cached = CachedEncoder(encoder, cache, {"encoder": "random"}, chunk_size=4)
        texts = [f"text {i}" for i in range(10)] + ["text 3", ""]
        first = cached.encode(texts, progress=False)
        assert first.dtype == np.float32 and first.shape == (12, 7)
        assert encoder.seen == list(dict.fromkeys(texts))  # a repeated text is embedded once
        assert np.array_equal(first[3], first[10]) and cached.stats["embedded"] == 11
        encoder.seen.clear()
        changed = [*texts[:5], "a new text", *texts[6:]]
        again = CachedEncoder(encoder, cache, {"encoder": "random"}).encode(changed, progress=False)
        assert encoder.seen == ["a new text"]
        keep = [i for i in range(12) if i != 5]
        assert again[keep].tobytes() == first[keep].tobytes()  # bit for bit, subnormals and all
        assert CachedEncoder(encoder, cache, {"encoder": "random"}).encode([], progress=False).shape[0] == 0


def test_namespaces_keep_encoders_apart(tmp_path):
    class Named(HashEncoder):
        def __init__(self, name: str, model: str | None) -> None:
            super().__init__()
            self.name, self.model = name, model

    folder = tmp_path / "local-model"
    folder.mkdir()
    spaces = [
        encoder_namespace(Named("a", "m1")),
        encoder_namespace(Named("a", "m2")),
        encoder_namespace(Named("b", "m1")),
        encoder_namespace(Named("a", "m1"), "http://127.0.0.1:1/v1"),
        encoder_namespace(Named("a", str(folder))),
    ]
    assert spaces[-1]["model"] == str(folder.resolve())
    HashEncoder.calls = 0
    with SharedCache(tmp_path / "c.sqlite3") as cache:
        for space in spaces + spaces:
            CachedEncoder(HashEncoder(), cache, space).encode(["one text", "another"], progress=False)
        assert HashEncoder.calls == len(spaces)  # each namespace embedded once
        assert [info.entries for info in cache.namespaces()] == [2] * len(spaces)


def test_failed_chunk_names_the_texts_and_a_rerun_resumes(tmp_path, server, key):
    from grasp.embedding import EmbeddingError, OpenAIEmbeddingEncoder

    def encoder() -> OpenAIEmbeddingEncoder:
        return OpenAIEmbeddingEncoder("fake-embed", base_url=server.base_url, batch_size=4, max_retries=0, timeout=5)

    texts = [f"text {i}" for i in range(20)]
    server.faults_by_prompt[texts[10]] = ["400"]  # not retried: its batch (texts 8..11) fails
    space = encoder_namespace(encoder(), server.base_url)
    with SharedCache(tmp_path / "c.sqlite3") as cache:
        message = r"4 of 20 texts could not be embedded \(first: text 8: HTTP 400.*the 8 embedded before them are in"
        with pytest.raises(EmbeddingError, match=message) as caught:
            CachedEncoder(encoder(), cache, space, chunk_size=8).encode(texts, progress=False)
        assert sorted(caught.value.failures) == [8, 9, 10, 11] and key not in str(caught.value)
        server.batches.clear()
        vectors = CachedEncoder(encoder(), cache, space, chunk_size=8).encode(texts, progress=False)
    assert sorted(t for batch in server.batches for t in batch) == sorted(texts[8:])  # the first chunk was kept
    assert vectors.shape == (20, 8)


_KILLED = """
import os, signal, sys
import numpy as np
from grasp.cache import CachedEncoder, SharedCache

class Dies:
    name = "dies"
    calls = 0

    def encode(self, texts, *, progress=True):
        Dies.calls += 1
        if Dies.calls == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return np.ones((len(texts), 4), np.float32)

CachedEncoder(Dies(), SharedCache(sys.argv[1]), {"encoder": "dies"}, chunk_size=10).encode(
    [f"text {i}" for i in range(50)], progress=False)
"""


def test_killed_run_keeps_finished_chunks(tmp_path):
    path = tmp_path / "c.sqlite3"
    child = subprocess.run([sys.executable, "-c", _KILLED, str(path)], capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    texts = [f"text {i}" for i in range(50)]
    HashEncoder.calls = 0
    with SharedCache(path) as cache:
        assert sorted(cache.get_many(EMBEDDING, json.dumps({"encoder": "dies"}), texts)) == sorted(texts[:20])
        seen = []

        class Rest(HashEncoder):
            def encode(self, texts, *, progress=True):
                seen.extend(texts)
                return np.ones((len(texts), 4), np.float32)

        CachedEncoder(Rest(), cache, {"encoder": "dies"}).encode(texts, progress=False)
        assert seen == texts[20:]


_WRITER = """
import pathlib, sys, time
import numpy as np
from grasp.cache import SharedCache

path, worker, folder = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
(folder / f"ready-{worker}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
with SharedCache(path) as cache:
    for batch in range(20):
        shared = [f"text {batch * 10 + i}" for i in range(10)]  # written by every worker
        own = [f"worker {worker} text {batch * 10 + i}" for i in range(10)]
        cache.put_many("embedding", "ns", [(t, np.float32(len(t)).tobytes()) for t in shared + own])
"""


def test_concurrent_writers_do_not_corrupt_the_file(tmp_path):
    path = tmp_path / "c.sqlite3"
    workers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(w), str(tmp_path)],
                                stderr=subprocess.PIPE, text=True) for w in range(3)]  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for worker in workers:
        assert worker.wait(timeout=120) == 0 and worker.stderr.read() == ""
    texts = [f"text {i}" for i in range(200)] + [f"worker {w} text {i}" for w in range(3) for i in range(200)]
    with SharedCache(path) as cache:
        found = cache.get_many("embedding", "ns", texts)
    assert len(found) == 800 and all(np.frombuffer(found[t], np.float32)[0] == len(t) for t in texts)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_credentials_in_a_server_address_are_not_stored(tmp_path):
    label = '{"base_url": "https://user:sk-secret@host/v1"}'
    with SharedCache(tmp_path / "c.sqlite3") as cache:
        cache.put_many("chat", label, [("prompt", "answer")])
        assert cache.get_many("chat", label, ["prompt"]) == {"prompt": "answer"}
        assert [info.label for info in cache.namespaces()] == ['{"base_url": "https://***@host/v1"}']
    assert all(b"sk-secret" not in path.read_bytes() for path in tmp_path.iterdir())


def test_cache_info_and_clear(tmp_path, capsys, shared):
    assert cache_cli("info") == 0
    assert capsys.readouterr().out.splitlines() == [f"shared cache: {shared / CACHE_FILE} (0 B)", "empty"]
    with SharedCache(shared / CACHE_FILE) as cache:
        label = json.dumps(encoder_namespace(Counting(model="mini")), sort_keys=True)
        cache.put_many(EMBEDDING, label, [(f"text {i}", np.ones(384, np.float32).tobytes()) for i in range(300)])
        chat = json.dumps({"base_url": "http://h/v1", "model": "gpt", "system_prompt": "Be brief. " * 20})
        cache.put_many("chat", chat, [(f"prompt {i}", f"answer {i}") for i in range(7)])
    assert cache_cli("info") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"shared cache: {shared / CACHE_FILE} (") and lines[0].endswith(" KB)")
    assert lines[2].split()[:3] == ["chat", "7", "56"]
    described = lines[2].split("  ")[-1]  # one line of at most 100 characters, model and server first
    assert described.startswith("model=gpt, base_url=http://h/v1, system_prompt=Be brief. Be brief.")
    assert len(described) == 100 and described.endswith("…")
    assert lines[3].split() == ["embedding", "300", "460.8", "KB", "encoder=hash,", "model=mini"]
    assert cache_cli("clear", "--generations") == 0
    assert capsys.readouterr().out.startswith(f"removed 7 generation entries from {shared / CACHE_FILE} (")
    assert [info.kind for info in SharedCache(shared / CACHE_FILE).namespaces()] == [EMBEDDING]
    size = SharedCache(shared / CACHE_FILE).size()
    assert cache_cli("clear") == 0
    assert capsys.readouterr().out.startswith("removed 300 entries")
    assert SharedCache(shared / CACHE_FILE).namespaces() == [] and SharedCache(shared / CACHE_FILE).size() < size / 10


def test_grasp_cache_command_is_light():
    import grasp.cache

    assert all(getattr(grasp.cache, name) is not None for name in grasp.cache.__all__)
    heavy = ("numpy", "torch", "grasp.embedding")
    probe = f"import sys, grasp.cache.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # `grasp cache` needs only sqlite3
