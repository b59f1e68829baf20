"""Controlled hallucination: swapped descriptions (grasp.generation.hallucination), the generate stage's
``--hallucination-rate``, and reports that name the rate and plot NDCG@10 against it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_report import _fake_metrics, _write_run

from grasp.cli import main
from grasp.generation.hallucination import swap_descriptions
from grasp.pipeline import Manifest
from grasp.training.report import compare_runs, group_runs, robustness_figure

USERS, ITEMS = 60, 64
SMALL = ["--dataset", "synthetic", "--synthetic-users", str(USERS), "--synthetic-items", str(ITEMS), "--no-progress"]


@pytest.mark.parametrize("n", [2, 3, 17, 100])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 1.0])
def test_swap_descriptions(n, rate):
    texts = [""] + [f"text {i}" for i in range(1, n + 1)]
    for seed in range(40):
        swapped, mapping = swap_descriptions(texts, rate, seed)
        assert len(mapping) == round(rate * n) and swapped[0] == ""
        assert all(row != source and 1 <= source <= n for row, source in mapping.items())
        assert all(swapped[row] == texts[source] for row, source in mapping.items())
        assert all(swapped[i] == texts[i] for i in range(n + 1) if i not in mapping)
        assert swap_descriptions(texts, rate, seed) == (swapped, mapping)  # the seed decides


def test_swap_sources_are_uniform_and_streams_differ():
    texts = [""] + [str(i) for i in range(1, 11)]
    counts = np.zeros(11)
    for seed in range(2000):
        _, mapping = swap_descriptions(texts, 0.1, seed)  # one row
        ((row, source),) = mapping.items()
        counts[source - row if source > row else source - row + 10] += 1  # offset 1..9 from the row
    offsets = counts[1:10]
    # 2000 draws over 9 offsets: each about 222 (binomial sd 14); 6 sd either way cannot happen by chance.
    assert offsets.sum() == 2000 and np.all(np.abs(offsets - 2000 / 9) < 6 * np.sqrt(2000 / 9 * 8 / 9))
    assert swap_descriptions(texts, 0.5, 1, stream=0)[1] != swap_descriptions(texts, 0.5, 1, stream=1)[1]


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="--hallucination-rate must be in"):
        swap_descriptions(["", "a", "b"], rate, 0)


def test_generate_with_hallucination(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path / "shared"))
    clean, wrong = tmp_path / "clean", tmp_path / "wrong"
    assert main(["generate", "--out", str(clean), *SMALL]) == 0
    assert main(["generate", "--out", str(wrong), *SMALL, "--hallucination-rate", "0.25",
                 "--hallucination-seed", "3"]) == 0  # fmt: skip
    for side, n in (("items", ITEMS), ("users", USERS)):
        right = json.loads((clean / "texts" / f"{side}.json").read_text())
        swapped = json.loads((wrong / "texts" / f"{side}.json").read_text())
        assert swapped["prompts"] == right["prompts"]
        mapping = {int(row): source for row, source in swapped["hallucinated"].items()}
        assert len(mapping) == round(0.25 * n)
        assert all(swapped["texts"][row] == right["texts"][source] for row, source in mapping.items())
        assert [i for i in range(n + 1) if swapped["texts"][i] != right["texts"][i]] == sorted(mapping)
    entry = Manifest(wrong).stage("generate")
    assert entry["config"]["hallucination"] == {"rate": 0.25, "seed": 3} and entry["items"]["hallucinated"] == 16
    assert "hallucination" not in Manifest(clean).stage("generate")["config"]
    capsys.readouterr()
    assert main(["generate", "--out", str(wrong), *SMALL]) == 0  # the recorded rate is kept: up to date
    assert "generate: up to date" in capsys.readouterr().out
    assert main(["generate", "--out", str(wrong), *SMALL, "--hallucination-rate", "0.5"]) == 0
    assert Manifest(wrong).stage("generate")["config"]["hallucination"] == {"rate": 0.5, "seed": 3}
    assert main(["generate", "--out", str(tmp_path / "bad"), *SMALL, "--hallucination-rate", "2"]) == 2
    assert "--hallucination-rate must be in [0, 1], got 2" in capsys.readouterr().err


def _run_on_texts(root: Path, name: str, model: str, rate: float, seed: int) -> Path:
    """A finished (fake) run whose pipeline directory generated texts with hallucination ``rate``."""
    pipeline = root / f"pipeline-{rate}"
    pipeline.mkdir(parents=True, exist_ok=True)
    config = {"generator": "template", "model": None, **({"hallucination": {"rate": rate, "seed": 0}} if rate else {})}
    (pipeline / "manifest.json").write_text(json.dumps({"format": 1, "stages": {"generate": {"config": config}}}))
    run = root / name
    _write_run(run / f"seed{seed}", _fake_metrics(seed, model=model))
    (run / "train.json").write_text(json.dumps({"pipeline_dir": str(pipeline), "config": {}}))
    return run


def test_reports_name_the_rate_and_plot_against_it(tmp_path):
    runs = [_run_on_texts(tmp_path, f"{model}-{rate}", model, rate, seed)
            for model in ("grasp", "llmesr") for rate in (0.0, 0.25, 0.5) for seed in (42,)]  # fmt: skip
    (group,) = group_runs(runs)
    assert group.labels[:3] == ("SASRec + GRASP (hallucination 0)", "SASRec + GRASP (hallucination 0.25)",
                                "SASRec + GRASP (hallucination 0.5)")  # fmt: skip
    assert "SASRec + LLM-ESR (hallucination 0.5)" in compare_runs(runs)
    pytest.importorskip("matplotlib")
    fig = robustness_figure([group])
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["toy: overall", "toy: tail users", "toy: tail items"]
    containers = {container.get_label(): container for container in axes[0].containers}
    assert set(containers) == {"SASRec + GRASP", "SASRec + LLM-ESR"}
    grasp_line = containers["SASRec + GRASP"].lines[0]
    assert list(grasp_line.get_xdata()) == [0.0, 0.25, 0.5]
    expected = [group.metrics[i]["test"]["overall"]["NDCG@10"] for i in range(3)]
    expected = [v["mean"] if isinstance(v, dict) else v for v in expected]
    np.testing.assert_allclose(np.asarray(grasp_line.get_ydata(), dtype=float), expected)
    compare_runs(runs, plot=tmp_path / "robustness.png")
    assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"
