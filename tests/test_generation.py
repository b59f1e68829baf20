"""Tests of grasp.generation: prompts, the response cache, the OpenAI request machinery and the generators.

The OpenAI endpoint is a real HTTP server on 127.0.0.1 (tests/openai_server.py) with scripted faults; request
counts are taken at the server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from grasp.data import DataError, RawDataset, load_movielens, preprocess
from grasp.generation import (
    GenerationResult,
    OpenAIGenerator,
    PromptTemplates,
    ResponseCache,
    TemplateGenerator,
    item_prompts,
    make_generator,
    user_prompts,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from openai_server import FakeOpenAIServer, fake_reply  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_RETRIES = 3


def _rng() -> np.random.Generator:
    """A numpy generator drawn from torch's per-test seed (conftest), so failures replay with GRASP_TEST_SEED."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 9))) for _ in range(n))


def _prompts(rng: np.random.Generator, n: int) -> list[str]:
    return [f"prompt {i}: {_words(rng, 6)}" for i in range(n)]


def _generator(server: FakeOpenAIServer, cache: Path | None, **options) -> OpenAIGenerator:
    settings = dict(base_url=server.base_url, timeout=0.5, max_retries=MAX_RETRIES, backoff_base=0.01,
                    backoff_max=0.05, concurrency=4, cache=cache)  # fmt: skip
    return OpenAIGenerator("fake-model", **{**settings, **options})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- prompts


def _dataset(rng: np.random.Generator, domain: str = "movie"):
    """A random dataset with unique item titles and attributes that are sometimes missing or junk."""
    num_users, num_items = 12, 40
    users, items, times = [], [], []
    for u in range(num_users):
        chosen = rng.choice(num_items, size=rng.integers(5, 15), replace=False)
        for step, i in enumerate(chosen):
            users.append(f"u{u}")
            items.append(f"i{i}")
            times.append(float(step))
    item_attributes = {}
    for i in range(num_items):
        attributes = {"title": f"Title{i:03d}x {_words(rng, 2)}"}
        for name in ("brand", "price", "categories", "features", "description", "text"):
            choice = rng.integers(0, 4)
            if choice == 0:
                attributes[name] = _words(rng, 3)
            elif choice == 1:
                attributes[name] = str(rng.choice(["None", "nan", "", "  ", "NULL"]))
        if rng.random() < 0.2:
            attributes.pop("title")
        if i % 10 == 0:
            attributes = {}
        item_attributes[f"i{i}"] = attributes
    user_attributes = {f"u{u}": {"age": str(rng.integers(18, 70)), "gender": str(rng.choice(["M", "F", "None"]))}
                       for u in range(num_users) if u % 3}  # fmt: skip
    raw = RawDataset("synthetic", np.array(users, dtype=object), np.array(items, dtype=object), np.array(times),
                     item_attributes, user_attributes, domain)  # fmt: skip
    return preprocess(raw)


def _assert_clean(prompt: str) -> None:
    assert not re.search(r"\b(None|nan|NULL)\b", prompt), prompt
    for bad in ("; .", ": .", "..", "  ", " .", ";;", "{", "}"):
        assert bad not in prompt, (bad, prompt)
    assert prompt == prompt.strip() and prompt.endswith(".")


@pytest.mark.parametrize("domain", ["movie", ""])
def test_item_prompts_leave_missing_fields_out(domain):
    rng = _rng()
    dataset = _dataset(rng, domain)
    prompts = item_prompts(dataset)
    assert len(prompts) == dataset.num_items + 1 and prompts[0] == ""
    for item in range(1, dataset.num_items + 1):
        prompt, attributes = prompts[item], dataset.item_attributes.get(item, {})
        _assert_clean(prompt)
        assert prompt.startswith(f"The {domain} item has" if domain else "The item has")
        real = {k: v for k, v in attributes.items() if v.strip() and v.strip().lower() not in ("none", "nan", "null")}
        assert ("The item has the following features:" in prompt) == ("features" in real)
        assert ("The item has the following descriptions:" in prompt) == ("description" in real)
        for name in ("brand", "price", "categories", "text"):
            assert (f"{name} is {real[name]}" in prompt) if name in real else (f"{name} is" not in prompt)
        if "title" in real:
            assert f"name is {real['title']}" in prompt
        if not ("title" in real or any(name in real for name in ("brand", "price", "categories", "text"))):
            assert f"attributes: id is {dataset.item_tokens[item]}." in prompt


def test_user_prompts_use_training_items_only():
    rng = _rng()
    dataset = _dataset(rng)
    max_titles = int(rng.integers(2, 6))
    prompts = user_prompts(dataset, max_titles=max_titles)
    assert len(prompts) == dataset.num_users + 1 and prompts[0] == ""

    def marker(item: int) -> str | None:
        """A text unique to the item's title in the prompt (None when the title falls back to another field)."""
        attributes = dataset.item_attributes[item]
        if "title" in attributes:
            return attributes["title"].split()[0]
        return None if attributes else f"item {dataset.item_tokens[item]}"

    for user in range(1, dataset.num_users + 1):
        prompt, train = prompts[user], [int(i) for i in dataset.train[user]]
        _assert_clean(prompt)
        assert prompt.endswith("Please conclude the user's preferences.")
        shown, hidden = train[-max_titles:], train[:-max_titles]
        for item in shown:
            assert marker(item) is None or marker(item) in prompt
        for item in hidden + [int(dataset.valid_items[user]), int(dataset.test_items[user])]:
            if item not in shown and marker(item) is not None:
                assert marker(item) not in prompt, (item, prompt)
        token = dataset.user_tokens[user]
        assert ("The user has the following attributes: age is" in prompt) == (int(token[1:]) % 3 != 0)
        assert "gender is male" in prompt or "gender is female" in prompt or "gender" not in prompt
    with pytest.raises(ValueError, match="max_titles"):
        user_prompts(dataset, max_titles=0)


@pytest.mark.skipif(not (DATA / "ml-100k").is_dir(), reason="shared ml-100k data not present")
def test_prompts_on_ml100k():
    dataset = preprocess(load_movielens(DATA / "ml-100k"))
    items, users = item_prompts(dataset), user_prompts(dataset)
    toy_story = dataset.item_ids["1"]
    assert items[toy_story].startswith("The movie item has the following attributes: name is Toy Story; year is 1995;")
    assert "genres is Animation, Children's, Comedy" in items[toy_story]
    assert all("None" not in p for p in items + users)
    assert users[1].startswith("The user has the following attributes: age is ")
    assert "The user has interacted with the following movie items" in users[1]


def test_templates_from_file(tmp_path):
    rng = _rng()
    dataset = _dataset(rng)
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"item": ["Item {title}.", "Sold as: {attributes}."], "user": "Watched {titles}."}))
    templates = PromptTemplates.load(path)
    assert templates.user == ("Watched {titles}.",) and len(templates.item) == 2
    items, users = item_prompts(dataset, templates), user_prompts(dataset, templates, max_titles=3)
    for item in range(1, dataset.num_items + 1):
        title = dataset.item_attributes[item].get("title")
        assert items[item].startswith(f"Item {title}.") if title else items[item].startswith("Sold as:")
    assert all(u.startswith("Watched ") for u in users[1:])
    with pytest.raises(ValueError, match=r"leaves the prompt of item \d+ \('i\d+'\) empty"):
        item_prompts(dataset, PromptTemplates(item="Item {title}."))  # some items have no title
    only_item = tmp_path / "item_only.json"
    only_item.write_text('{"item": "{domain} thing {title}"}')
    assert PromptTemplates.load(only_item).user == PromptTemplates().user


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"item": "The {colour} item"}', r"templates\.json: unknown placeholder \{colour\} in the item template"),
        ('{"user": "Likes {}"}', r"unknown placeholder \{\}"),
        ('{"user": "Likes {titles!r}"}', "takes no format spec"),
        ('{"user": "Likes {titles"}', "malformed"),
        ('{"user": ["ok {titles}", ""]}', "empty"),
        ('{"user": 3}', "must be a string or a list of strings"),
        ('{"items": "x"}', "unknown key"),
        ('["x"]', "expected a JSON object"),
        ('{\n"item": "x",\n}', r"templates\.json:3: invalid JSON"),
    ],
)
def test_template_file_errors(tmp_path, text, match):
    path = tmp_path / "templates.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        PromptTemplates.load(path)


def test_template_validation_without_file():
    with pytest.raises(ValueError, match=r"unknown placeholder \{titles\} in the item template"):
        PromptTemplates(item="{titles}")
    with pytest.raises(DataError, match="cannot read"):
        PromptTemplates.load("/nonexistent/templates.json")


# ----------------------------------------------------------------------------------------------- cache


def test_cache_roundtrip_and_truncated_last_line(tmp_path, caplog):
    rng = _rng()
    path = tmp_path / "sub" / "cache.jsonl"
    cache = ResponseCache(path)
    texts = {f"p{i} {_words(rng, 3)}": _words(rng, 5) for i in range(5)}
    vector = rng.standard_normal(7).astype(np.float32)
    for prompt, text in texts.items():
        cache.put("chat", "m", prompt, text)
    cache.put("embedding", "m", "vec", vector)
    cache.put("chat", "m", next(iter(texts)), "a different answer")  # already present: no second line
    assert len(cache) == 6 and cache.contains("chat", "m", next(iter(texts)))
    assert not cache.contains("chat", "other-model", next(iter(texts)))
    cache.close()
    assert len(_lines(path)) == 6
    with open(path, "ab") as handle:  # a killed writer's partial line
        handle.write(b'{"key": "abc", "kind": "chat", "val')
    with caplog.at_level(logging.WARNING):
        reloaded = ResponseCache(path)
    assert "truncated" in caplog.text
    assert len(reloaded) == 6 and path.read_bytes().endswith(b"\n")
    assert all(reloaded.get("chat", "m", p) == t for p, t in texts.items())
    np.testing.assert_array_equal(reloaded.get("embedding", "m", "vec"), vector)
    assert reloaded.get("embedding", "m", "vec").dtype == np.float32
    reloaded.put("chat", "m", "new", "answer")
    reloaded.close()
    assert len(ResponseCache(path)) == 7 and len(_lines(path)) == 7


def test_cache_corrupt_middle_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    with ResponseCache(path) as cache:
        cache.put("chat", "m", "a", "x")
        cache.put("chat", "m", "b", "y")
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(DataError, match=r"cache\.jsonl:2: corrupt cache entry"):
        ResponseCache(path)


def test_cache_threads(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = ResponseCache(path)
    threads = [
        threading.Thread(target=lambda t=t: [cache.put("chat", "m", f"{t}-{i}", "x" * (i + 1)) for i in range(40)])
        for t in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()
    assert len(cache) == 240 and len(_lines(path)) == 240 and len(ResponseCache(path)) == 240


# ----------------------------------------------------------------------------------------------- generators


def test_template_generator():
    prompts = ["", *_prompts(_rng(), 5)]
    result = make_generator("template").generate(prompts)
    assert isinstance(result, GenerationResult) and result.texts == prompts and result.failures == {}
    assert result.stats["requests"] == 0 and result.stats["prompts"] == 5
    assert isinstance(make_generator("template"), TemplateGenerator)
    with pytest.raises(ValueError, match="takes no options, got model"):
        make_generator("template", model="x")
    with pytest.raises(ValueError, match="unknown generator 'gpt'"):
        make_generator("gpt")
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a string"):
        TemplateGenerator().generate(["a", None])


def test_generate_cache_and_free_second_run(server, key, tmp_path):
    prompts = _prompts(_rng(), 20)
    prompts = ["", *prompts, prompts[3]]  # padding row and a duplicate
    cache = tmp_path / "cache.jsonl"
    result = _generator(server, cache).generate(prompts, progress=False)
    assert result.failures == {} and result.texts[0] == ""
    assert result.texts[1:] == [fake_reply(p) for p in prompts[1:]]
    assert all(server.counts[p] == 1 for p in prompts[1:]) and server.requests == 20
    assert result.stats["requests"] == 20 and result.stats["retries"] == 0 and result.stats["completion_tokens"] > 0
    assert len(_lines(cache)) == 20  # one entry per unique prompt
    assert all(header["authorization"] == f"Bearer {key}" for header in server.headers)

    again = _generator(server, cache).generate(prompts, progress=False)
    assert again.texts == result.texts and server.requests == 20
    assert again.stats["cached"] == 20 and again.stats["requests"] == 0
    other = _generator(server, cache, system_prompt="Be brief.").generate(prompts[:3], progress=False)
    assert other.stats["requests"] == 2, "a changed system prompt must not reuse answers"


@pytest.mark.parametrize("fault", ["429", "500", "slow", "malformed", "empty_choices", "empty_content"])
def test_retries_each_fault(server, key, tmp_path, fault):
    prompts = _prompts(_rng(), 6)
    faults = 1 if fault == "slow" else 2
    server.faults_by_prompt[prompts[2]] = [fault] * faults
    cache = tmp_path / "cache.jsonl"
    result = _generator(server, cache).generate(prompts, progress=False)
    assert result.failures == {} and result.texts == [fake_reply(p) for p in prompts]
    assert server.counts[prompts[2]] == faults + 1
    assert all(server.counts[p] == 1 for i, p in enumerate(prompts) if i != 2)
    assert result.stats["retries"] == faults and result.stats["requests"] == len(prompts) + faults
    assert len(_lines(cache)) == len(prompts)


def test_concurrency_bound_and_retry_after(server, key):
    prompts = _prompts(_rng(), 12)
    server.delay = 0.05
    result = _generator(server, None, concurrency=3).generate(prompts, progress=False)
    assert result.failures == {} and 2 <= server.max_in_flight <= 3
    server.delay, server.retry_after = 0.0, 0.3
    server.faults_by_prompt[prompts[0]] = ["429"]
    started = time.perf_counter()
    result = _generator(server, None, backoff_max=1.0).generate(prompts[:1], progress=False)
    assert result.failures == {} and time.perf_counter() - started >= 0.3  # waited as the server asked
    assert server.counts[prompts[0]] == 3


def test_failures_recorded_then_resumed(server, key, tmp_path):
    prompts = _prompts(_rng(), 8)
    server.faults_by_prompt[prompts[1]] = ["500"] * (MAX_RETRIES + 1)
    server.faults_by_prompt[prompts[5]] = ["400"]
    cache = tmp_path / "cache.jsonl"
    result = _generator(server, cache).generate(prompts, progress=False)
    assert set(result.failures) == {1, 5} and result.texts[1] is None and result.texts[5] is None
    assert "HTTP 500" in result.failures[1] and f"after {MAX_RETRIES} retries" in result.failures[1]
    assert "HTTP 400" in result.failures[5]
    assert server.counts[prompts[1]] == MAX_RETRIES + 1 and server.counts[prompts[5]] == 1  # 400 is not retried
    assert result.stats["failures"] == 2 and len(_lines(cache)) == 6
    before = server.requests
    resumed = _generator(server, cache).generate(prompts, progress=False)
    assert resumed.failures == {} and server.requests == before + 2 and resumed.stats["cached"] == 6


def test_one_retry_budget_covers_client_and_malformed_retries(server, key):
    """A malformed answer (retried by grasp) then HTTP 500s (retried by the openai client) share max_retries."""
    prompts = _prompts(_rng(), 3)
    server.faults_by_prompt[prompts[1]] = ["malformed"] + ["500"] * (MAX_RETRIES + 1)
    result = _generator(server, None).generate(prompts, progress=False)
    assert set(result.failures) == {1} and "HTTP 500" in result.failures[1]
    assert f"after {MAX_RETRIES} retries" in result.failures[1]
    assert server.counts[prompts[1]] == MAX_RETRIES + 1
    assert result.stats["retries"] == MAX_RETRIES and result.stats["requests"] == len(prompts) + MAX_RETRIES


def test_key_never_leaks(server, key, tmp_path, caplog, capfd, monkeypatch):
    for name in ("", "openai", "httpx", "httpx2", "httpcore", "httpcore2", "grasp"):
        caplog.set_level(logging.DEBUG, logger=name or None)
    prompts = _prompts(_rng(), 6)
    server.faults_by_prompt[prompts[0]] = ["429", "500", "malformed"]
    server.faults_by_prompt[prompts[1]] = ["400"]  # the server echoes the key in its error message
    server.faults_by_prompt[prompts[2]] = ["500"] * (MAX_RETRIES + 1)
    generator = _generator(server, tmp_path / "cache.jsonl")
    result = generator.generate(prompts, progress=True)
    assert set(result.failures) == {1, 2} and "you sent Bearer ***" in result.failures[1]
    unreachable = OpenAIGenerator("m", base_url="http://127.0.0.1:9/v1", timeout=0.5, max_retries=1, backoff_base=0.01)
    gone = unreachable.generate(["hello"], progress=False)
    assert "connection error" in gone.failures[0]
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY is not set") as missing:
        OpenAIGenerator("m", base_url="https://api.example.com/v1")
    OpenAIGenerator("m", base_url=server.base_url)  # a local endpoint needs no key
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, repr(generator), repr(unreachable), str(missing.value)]
    texts += [str(r.args) + r.getMessage() for r in caplog.records] + list(result.failures.values())
    texts += list(gone.failures.values())
    assert "retry" in caplog.text and "failed" in caplog.text  # the logs were captured
    assert all(key not in text for text in texts)
    assert any(key in header.get("authorization", "") for header in server.headers)  # but it was sent


_CHILD = """
import json, sys
from grasp.generation import OpenAIGenerator
base_url, cache, prompt_file = sys.argv[1:]
prompts = json.load(open(prompt_file))
generator = OpenAIGenerator("fake-model", base_url=base_url, cache=cache, concurrency=2, timeout=5)
generator.generate(prompts, progress=False)
"""


def test_killed_run_resumes_without_repeats(server, key, tmp_path):
    prompts = _prompts(_rng(), 30)
    prompt_file, cache = tmp_path / "prompts.json", tmp_path / "cache.jsonl"
    prompt_file.write_text(json.dumps(prompts))
    server.delay = 0.05
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, server.base_url, str(cache), str(prompt_file)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (cache.exists() and cache.read_bytes().count(b"\n") >= 6):
            assert child.poll() is None, "the generator process ended early"
            assert time.monotonic() < deadline, "no progress from the generator process"
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    server.delay = 0.0
    finished = {json.loads(entry["value"])["answer"] for entry in _lines(cache)}
    done_before = [p for p in prompts if fake_reply(p) in finished]
    assert 6 <= len(done_before) < len(prompts)
    result = _generator(server, cache, timeout=5).generate(prompts, progress=False)
    assert result.failures == {} and result.texts == [fake_reply(p) for p in prompts]
    assert all(server.counts[p] == 1 for p in done_before), "a request finished before the kill was repeated"
    assert all(1 <= server.counts[p] <= 2 for p in prompts)  # in flight at the kill: asked again
    assert result.stats["cached"] == len(done_before)
    assert len(_lines(cache)) == len(prompts) and len(ResponseCache(cache)) == len(prompts)


def test_standalone_server(tmp_path):
    port_file = tmp_path / "port"
    process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "openai_server.py"), "--port-file",
                                str(port_file)])  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port_file.read_text()}"
        result = OpenAIGenerator("m", base_url=f"{base}/v1", timeout=5).generate(["hi", "there"], progress=False)
        assert result.texts == [fake_reply("hi"), fake_reply("there")]
        with urllib.request.urlopen(f"{base}/stats", timeout=5) as response:
            assert json.load(response) == {"requests": 2, "counts": {"hi": 1, "there": 1}}
    finally:
        process.kill()
        process.wait()
