"""The offline half end to end through the CLI: prepare -> generate -> embed -> retrieve in one run directory.

Small synthetic runs use a fast deterministic stand-in encoder so the stage logic (skipping, --force,
reruns on changed inputs, interruption, errors) is exercised quickly; the ml-100k run uses the real
offline defaults (template text, MiniLM) end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _support import HashEncoder
from openai_server import FakeOpenAIServer, fake_reply

import grasp.embedding
from grasp.cli import main
from grasp.data.store import load_dataset
from grasp.pipeline import Manifest, Tables

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = ["--dataset", "synthetic", "--synthetic-users", "120", "--synthetic-items", "90", "--no-progress"]


def ran(output: str) -> list[str]:
    return [line.split(":")[0].removeprefix("[grasp] ") for line in output.splitlines() if line.endswith(": running")]


def test_stages_skip_rerun_and_force(tmp_path, capsys, hash_encoder):
    run = tmp_path / "run"
    assert main(["retrieve", "--out", str(run), *SMALL]) == 0
    assert ran(capsys.readouterr().out) == ["prepare", "generate", "embed", "retrieve"]
    manifest = Manifest(run)
    assert list(manifest.data["stages"]) == ["prepare", "generate", "embed", "retrieve"]
    assert manifest.stage("embed")["dimension"] == 32 and manifest.stage("retrieve")["k"] == 10

    dataset = load_dataset(run / "data")
    tables = Tables.load(run / "embeddings", num_users=dataset.num_users, num_items=dataset.num_items)
    texts = json.loads((run / "texts" / "items.json").read_text())
    assert len(texts["texts"]) == dataset.num_items + 1 and texts["texts"][0] == ""
    assert texts["texts"] == texts["prompts"]  # the template generator's description is its prompt
    for table, sim, ids in ((tables.item, tables.item_sim, tables.item_neighbors),
                            (tables.user, tables.user_sim, tables.user_neighbors)):  # fmt: skip
        x = table[1:] / np.linalg.norm(table[1:], axis=1, keepdims=True)
        scores = x @ x.T
        np.fill_diagonal(scores, -np.inf)
        for row in range(0, len(x), 7):
            chosen = ids[row + 1] - 1
            assert row not in chosen and len(set(chosen)) == 10
            kth = np.sort(scores[row])[-10]
            assert (scores[row, chosen] >= kth - 1e-5).all()  # truly the top 10 by cosine
            np.testing.assert_allclose(sim[row + 1], table[chosen + 1].mean(0), rtol=1e-5, atol=1e-6)

    # Nothing changed: every stage is skipped.
    assert main(["retrieve", "--out", str(run), *SMALL]) == 0
    assert ran(capsys.readouterr().out) == [] and hash_encoder.calls == 2
    # Without dataset flags the prepared dataset is reused; a new k reruns only retrieve.
    assert main(["retrieve", "--out", str(run), "--k", "3", "--no-progress"]) == 0
    assert ran(capsys.readouterr().out) == ["retrieve"]
    assert Tables.load(run / "embeddings").item_neighbors.shape[1] == 3
    # ... and the recorded k is kept by the next command that does not name it.
    assert main(["retrieve", "--out", str(run), "--no-progress"]) == 0
    assert ran(capsys.readouterr().out) == []
    # A template file changes the prompts: generate, embed and retrieve run again.
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"item": "A {domain} called {title}."}))
    assert main(["retrieve", "--out", str(run), "--templates", str(templates), "--no-progress"]) == 0
    assert ran(capsys.readouterr().out) == ["generate", "embed", "retrieve"]
    assert json.loads((run / "texts" / "items.json").read_text())["texts"][1].startswith("A product called ")
    # --force redoes the command's own stage only.
    assert main(["embed", "--out", str(run), "--force", "--no-progress"]) == 0
    assert ran(capsys.readouterr().out) == ["embed"]
    # Another dataset in the same directory: everything reruns.
    other = ["--dataset", "synthetic", "--synthetic-users", "100", "--synthetic-items", "90", "--no-progress"]
    assert main(["retrieve", "--out", str(run), *other]) == 0
    assert ran(capsys.readouterr().out) == ["prepare", "generate", "embed", "retrieve"]
    assert Tables.load(run / "embeddings").user.shape[0] == load_dataset(run / "data").num_users + 1


def test_tampered_output_is_redone(tmp_path, capsys, hash_encoder):
    run = tmp_path / "run"
    assert main(["retrieve", "--out", str(run), *SMALL]) == 0
    capsys.readouterr()
    path = run / "embeddings" / "item.npy"
    path.write_bytes(path.read_bytes()[:-8])  # a truncated file is never trusted
    assert main(["retrieve", "--out", str(run), "--no-progress"]) == 0
    # The same embeddings come back byte for byte, so retrieve's inputs are unchanged and it is skipped.
    assert ran(capsys.readouterr().out) == ["embed"]
    assert Tables.load(run / "embeddings").item.shape[1] == 32


def test_interrupted_stage_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"

    class Interrupted(HashEncoder):
        def encode(self, texts, *, progress=True):
            if len(texts) > 100:  # the users, after the items were embedded
                raise KeyboardInterrupt
            return super().encode(texts)

    monkeypatch.setattr(grasp.embedding, "make_encoder", lambda name, **options: Interrupted())
    assert main(["embed", "--out", str(run), *SMALL]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert Manifest(run).stage("embed") is None
    assert [p.name for p in (run / "embeddings").iterdir()] == ["item.npy"]  # complete, but not recorded
    monkeypatch.setattr(grasp.embedding, "make_encoder", lambda name, **options: HashEncoder())
    assert main(["embed", "--out", str(run), "--no-progress"]) == 0
    assert ran(capsys.readouterr().out) == ["embed"]
    assert Manifest(run).stage("embed") is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate"], "--dataset is required"),
        (["prepare", "--dataset", "synthetic", "--synthetic-users", "50", "--k-core", "400"], "empty after filtering"),
        (["prepare", "--dataset", "ml-100k", "--no-download"], "--data-dir"),
        (["prepare", "--dataset", "recbole"], "--data-dir"),
        (["retrieve", *SMALL, "--k", "200"], "k=200 needs 1 <= k <= "),
        (["generate", *SMALL, "--templates", "/nonexistent/t.json"], "t.json"),
    ],
)
def test_errors_are_one_line_and_write_nothing(tmp_path, capsys, hash_encoder, argv, message):
    run = tmp_path / "run"
    assert main([argv[0], "--out", str(run), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    if argv[0] != "retrieve":
        assert not (run / "manifest.json").exists() or "generate" not in Manifest(run).data["stages"]


def test_openai_generator_through_the_cli(tmp_path, capsys, monkeypatch, hash_encoder):
    secret = "sk-test-" + os.urandom(8).hex()
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    run = tmp_path / "run"
    with FakeOpenAIServer() as server:
        server.faults_by_number[2] = "500"
        args = ["generate", "--out", str(run), *SMALL, "--generator", "openai", "--base-url", server.base_url,
                "--llm-model", "fake-model", "--request-timeout", "2"]  # fmt: skip
        assert main(args) == 0
        requests = sum(server.counts.values())
        texts = json.loads((run / "texts" / "items.json").read_text())
        assert texts["texts"][1] == fake_reply(texts["prompts"][1])
        entry = Manifest(run).stage("generate")
        assert entry["config"]["model"] == "fake-model" and entry["items"]["failures"] == 0
        assert entry["items"]["stats"]["retries"] == 1  # the injected 500 was retried
        assert entry["items"]["stats"]["requests"] + entry["users"]["stats"]["requests"] == requests
        # The cache makes a forced rerun free.
        assert main([*args, "--force"]) == 0
        assert sum(server.counts.values()) == requests
    out = capsys.readouterr()
    assert secret not in out.out + out.err + (run / "manifest.json").read_text()


@pytest.mark.skipif(not (SHARED / "ml-100k").is_dir(), reason=f"shared datasets not found at {SHARED}")
def test_ml100k_offline_defaults_end_to_end(tmp_path, capsys):
    pytest.importorskip("sentence_transformers")
    run = tmp_path / "ml100k"
    assert main(["retrieve", "--out", str(run), "--dataset", "ml-100k", "--data-dir", str(SHARED / "ml-100k"),
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "| ml-100k | 943 | 1,682 | 100,000 |" in out
    dataset = load_dataset(run / "data")
    tables = Tables.load(run / "embeddings", num_users=943, num_items=1682)
    assert tables.dim == 384 and Manifest(run).stage("embed")["model"].endswith("all-MiniLM-L6-v2")
    np.testing.assert_allclose(np.linalg.norm(tables.item[1:], axis=1), 1.0, atol=1e-4)
    # The text carries meaning: Star Wars's neighbours include one of its sequels.
    star_wars = dataset.item_ids["50"]
    sequels = {dataset.item_ids["172"], dataset.item_ids["181"]}
    assert sequels & set(tables.item_neighbors[star_wars].tolist())
