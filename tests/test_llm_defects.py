"""What a real LLM server showed, against the fake server (failure modes a real one cannot make on demand).

The LLM settings reach the server and key the cache; Ctrl-C stops at once with one line and keeps the
answers that arrived; 401 / 404 stop the run at the first answer with the server's message; the same
server under another address answers from the cache; per-token embeddings stop with the fix named;
embedding batches are sized by tokens; the manifest keeps the job's totals over invocations; the item
task reaches an LLM but not the template text; the echo and invented-year rates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from openai_server import FakeOpenAIServer

from grasp.cli import main
from grasp.data import load_movielens, preprocess
from grasp.embedding import OpenAIEmbeddingEncoder
from grasp.generation import (
    DEFAULT_SYSTEM_PROMPT,
    OpenAIGenerator,
    PromptTemplates,
    echo_rate,
    invented_year_rate,
    item_prompts,
    latest_year,
)
from grasp.generation.quality import echoes
from grasp.llm import ServerError
from grasp.pipeline import Manifest

REPO = Path(__file__).resolve().parents[1]
USERS, ITEMS = 60, 64
SMALL = ["--dataset", "synthetic", "--synthetic-users", str(USERS), "--synthetic-items", str(ITEMS), "--no-progress"]


@pytest.fixture(autouse=True)
def shared(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "shared"
    monkeypatch.setenv("GRASP_CACHE", str(folder))
    return folder


def _openai(server: FakeOpenAIServer, *extra: str, host: str = "127.0.0.1") -> list[str]:
    url = server.base_url.replace("127.0.0.1", host)
    return ["--generator", "openai", "--base-url", url, "--llm-model", "fake-model", "--request-timeout", "5", *extra]


def _chat_bodies(server: FakeOpenAIServer) -> list[dict]:
    return [body for body in server.bodies if "messages" in body]


def test_llm_settings_reach_the_server_and_key_the_cache(tmp_path, server, key):
    run = tmp_path / "run"
    settings = ["--llm-max-tokens", "77", "--llm-temperature", "0.5", "--system-prompt", "Be brief."]
    assert main(["generate", "--out", str(run), *SMALL, *_openai(server, *settings)]) == 0
    bodies = _chat_bodies(server)
    assert len(bodies) == USERS + ITEMS
    assert all(b["max_tokens"] == 77 and b["temperature"] == 0.5 for b in bodies)
    assert all(b["messages"][0] == {"role": "system", "content": "Be brief."} for b in bodies)
    config = Manifest(run).stage("generate")["config"]
    assert (config["max_tokens"], config["temperature"], config["system_prompt"]) == (77, 0.5, "Be brief.")
    # The same settings in another run directory: all from the cache. Another max_tokens: asked again.
    assert main(["generate", "--out", str(tmp_path / "again"), *SMALL, *_openai(server, *settings)]) == 0
    assert len(_chat_bodies(server)) == USERS + ITEMS
    assert main(["generate", "--out", str(tmp_path / "longer"), *SMALL,
                 *_openai(server, "--llm-max-tokens", "78", "--llm-temperature", "0.5", "--system-prompt",
                          "Be brief.")]) == 0  # fmt: skip
    assert len(_chat_bodies(server)) == 2 * (USERS + ITEMS)
    # The built-in system prompt by default, none with "".
    assert main(["generate", "--out", str(tmp_path / "plain"), *SMALL, *_openai(server, "--system-prompt", "")]) == 0
    assert all(len(b["messages"]) == 1 for b in _chat_bodies(server)[-(USERS + ITEMS):])
    assert main(["generate", "--out", str(tmp_path / "default"), *SMALL, *_openai(server)]) == 0
    assert all(b["messages"][0]["content"] == DEFAULT_SYSTEM_PROMPT and b["max_tokens"] == 300
               for b in _chat_bodies(server)[-(USERS + ITEMS):])  # fmt: skip


def test_same_server_under_another_address_answers_from_the_cache(tmp_path, server, key, shared):
    assert main(["generate", "--out", str(tmp_path / "a"), *SMALL, *_openai(server)]) == 0
    asked = server.requests
    assert main(["generate", "--out", str(tmp_path / "b"), *SMALL, *_openai(server, host="localhost")]) == 0
    assert server.requests == asked
    # Every entry records the server that answered.
    import sqlite3

    with sqlite3.connect(shared / "cache.sqlite3") as connection:
        values = [json.loads(v) for (v,) in connection.execute("SELECT value FROM entries")]
    assert len(values) == USERS + ITEMS and all(v["server"] == server.base_url for v in values)


@pytest.mark.parametrize("status", ["401", "404"])
def test_refusal_stops_at_the_first_answer_with_the_servers_message(tmp_path, server, key, capsys, status):
    server.fault_all = status
    code = main(["generate", "--out", str(tmp_path / "run"), *SMALL, *_openai(server, "--concurrency", "2")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = "Invalid API key" if status == "401" else "The model `fake-model` does not exist"
    assert len(err) == 1 and f"HTTP {status}" in err[0] and message in err[0] and key not in err[0]
    assert server.requests <= 2  # the requests in flight when the first answer came; nothing after


def test_refusal_through_the_api(server, key):
    server.fault_all = "401"
    generator = OpenAIGenerator("m", base_url=server.base_url, concurrency=1)
    with pytest.raises(ServerError, match="Invalid API key"):
        generator.generate([f"prompt {i}" for i in range(20)], progress=False)
    assert server.requests == 1 and generator.totals.requests == 1


def test_per_token_embeddings_stop_and_name_pooling(server, key):
    server.fault_all = "per_token"
    encoder = OpenAIEmbeddingEncoder("fake-embed", base_url=server.base_url, concurrency=1, timeout=5)
    with pytest.raises(ServerError, match="one embedding per token.*pooling"):
        encoder.encode([f"text number {i}" for i in range(40)], progress=False)
    assert server.requests == 1  # not retried, no other batch sent


def test_per_token_embeddings_in_the_cli(tmp_path, server, key, capsys):
    server.fault_all = "per_token"
    args = ["embed", "--out", str(tmp_path / "run"), *SMALL, "--encoder", "openai", "--embedding-base-url",
            server.base_url, "--embedding-model", "fake-embed", "--concurrency", "1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pooling" in err[0]


_INTERRUPTED = """
import sys
from grasp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_stops_at_once_with_one_line_and_keeps_what_arrived(tmp_path, server, key, shared):
    server.delay = 0.3
    run = tmp_path / "run"
    args = ["generate", "--out", str(run), *SMALL, *_openai(server, "--concurrency", "4", "--request-timeout", "60")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _INTERRUPTED, *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while server.requests < 12:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        server.delay = 30.0  # the requests in flight now would keep a waiting process alive for 30 s
        time.sleep(0.5)
        interrupted = time.monotonic()
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=20)
        seconds = time.monotonic() - interrupted
        err = child.stderr.read()
    finally:
        child.kill()
        child.wait()
    assert code == 130 and seconds < 5, (code, seconds)
    assert err.strip().splitlines() == ["grasp generate: interrupted; finished stages and cached requests are kept"]
    server.delay = 0.0
    answered = server.requests
    assert main(args) == 0
    # What arrived before Ctrl-C is not asked again: at most the 4 in flight plus the rest.
    assert server.requests - answered <= USERS + ITEMS - (answered - 8)


def test_manifest_keeps_the_job_totals_over_invocations(tmp_path, server, key):
    run = tmp_path / "run"
    dataset_args = ["generate", "--out", str(run), *SMALL]
    server.fault_all = "500"
    assert main([*dataset_args, *_openai(server, "--max-retries", "1", "--concurrency", "1")]) == 2
    failed = server.requests  # every item prompt tried twice, then the stage stopped
    assert failed == 2 * ITEMS
    server.fault_all = None
    assert main([*dataset_args, *_openai(server, "--concurrency", "1")]) == 0
    entry = Manifest(run).stage("generate")
    job = entry["job"]
    assert job["invocations"] == 2 and job["requests"] == server.requests == failed + USERS + ITEMS
    assert job["retries"] == ITEMS and job["failures"] == ITEMS and job["seconds"] > 0
    assert job["prompt_tokens"] > 0 and job["completion_tokens"] > 0
    assert entry["items"]["stats"]["requests"] == ITEMS  # the last invocation alone


def test_item_task_reaches_the_llm_but_not_the_template_text(tmp_path, server, key):
    assert main(["generate", "--out", str(tmp_path / "llm"), *SMALL, *_openai(server)]) == 0
    assert main(["generate", "--out", str(tmp_path / "template"), *SMALL]) == 0
    task = "Please describe this product item in about 100 words"
    item_bodies = [b for b in _chat_bodies(server) if "item has the following" in b["messages"][-1]["content"]]
    assert item_bodies and all(task in b["messages"][-1]["content"] for b in item_bodies)
    template = json.loads((tmp_path / "template" / "texts" / "items.json").read_text())
    assert not any(task in text for text in template["texts"])
    custom = tmp_path / "t.json"
    custom.write_text(json.dumps({"item_task": "Describe the {domain} item in one line."}))
    assert PromptTemplates.load(custom).item_task == ("Describe the {domain} item in one line.",)


ML100K = REPO.parent / "shared" / "data" / "ml-100k"


@pytest.mark.skipif(not ML100K.is_dir(), reason="shared ml-100k data not present")
def test_echo_and_invented_year_rates_on_ml100k_prompts():
    data = preprocess(load_movielens(ML100K))
    prompts = item_prompts(data)
    assert latest_year(data.item_attributes) == 1998
    echoed = [p.replace("The movie item has", "This movie has") for p in prompts]  # a near copy
    described = ["" if not p else f"A film to watch on a quiet evening, loved by many since {1990 + i % 12}."
                 for i, p in enumerate(prompts)]  # fmt: skip
    assert echo_rate(prompts, echoed) == 1.0 and echo_rate(prompts, described) == 0.0
    assert echo_rate(prompts, prompts) == 1.0 and echo_rate(["", "a b c d"], ["x", ""]) == 0.0
    years = np.array([1990 + i % 12 for i in range(1, len(prompts))])
    assert invented_year_rate(described, 1998) == pytest.approx(np.mean(years > 1998))
    assert not echoes("name is Toy Story; year is 1995; genres is Animation", "Toy Story is a 1995 animated film")


def test_local_generator_without_its_model_file_says_so(tmp_path, capsys):
    missing = tmp_path / "nothere.gguf"
    args = ["generate", "--out", str(tmp_path / "run"), *SMALL, "--generator", "local",
            "--llm-model-path", str(missing)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (f"--llm-model-path {missing}: no such file" in err[0] or "[llm] extra" in err[0])


def test_echo_and_year_rules_without_data():
    prompt = "The movie item has the following attributes: name is Heat; year is 1995; genres is Action, Crime."
    assert echoes(prompt, "Sure! " + prompt.replace("following", ""))
    assert not echoes(prompt, "Heat is a 1995 crime film.")
    assert echo_rate([prompt, ""], ["Heat (1995) is a crime drama.", "ignored"]) == 0.0
    assert invented_year_rate(["made in 2003", "made in 1995", "", "no year", "in 19999"], 1998) == 0.25
    assert latest_year({1: {"year": "1995"}, 2: {"release date": "01-Jan-1998"}, 3: {"name": "x 2020"}}) == 1998
    assert latest_year({1: {"name": "x"}}) is None
