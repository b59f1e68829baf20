"""Reports: one run's markdown tables, multi-seed aggregation, and side-by-side comparison of runs.

* :func:`write_report` writes ``run_dir/report.md`` (test metrics per group, thresholds, config).
* :func:`aggregate` turns the ``metrics.json`` of several seeds into one summary with ``{"mean", "std"}``
  in place of every number; :func:`write_summary` writes it as ``run_dir/metrics.json`` + ``report.md``.
  Summary shape::

      {"seeds": [42, 43, 44], "runs": 3, "config": {... without "seed"}, "dataset": {...},
       "thresholds": {...}, "test": {group: {"NDCG@10": {"mean": 41.2, "std": 0.3}, ...} or None},
       "valid": {...}, "best_epoch": {"mean", "std"}, "epochs": {"mean", "std"},
       "train_seconds": {"mean", "std"}}

  ``std`` is the sample standard deviation (``ddof=1``; 0 for a single run).
* :func:`compare_runs` puts runs (single or multi-seed) side by side in markdown tables and an optional
  PNG bar chart of overall and head / tail NDCG@10 (:func:`comparison_figure`); ``grasp report`` is
  :func:`add_report_arguments` + :func:`report_main`. Runs on different datasets or evaluated with different
  protocols are not comparable: :func:`group_runs` gives each dataset and protocol its own table and chart
  panel. :func:`run_labels` names each run by backbone, model and the settings that differ from the
  defaults (``SASRec + GRASP (softmax, branches self+similar)``), read from its recorded config.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grasp._io import write_bytes, write_json, write_text
from grasp.models.options import DEFAULT_ADAPTER_INIT, DEFAULT_ID_INIT
from grasp.training.config import RUN_DEFINING_EXCLUDED, TrainConfig, with_later_fields
from grasp.training.metrics import GROUPS, KS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "write_report",
    "metrics_tables",
    "aggregate",
    "write_summary",
    "load_run",
    "run_labels",
    "shared_settings",
    "RunGroup",
    "group_runs",
    "compare_runs",
    "comparison_figure",
    "robustness_figure",
    "add_report_arguments",
    "report_main",
]

_GROUP_NAMES = {
    "overall": "overall",
    "tail_user": "tail users",
    "head_user": "head users",
    "tail_item": "tail items",
    "head_item": "head items",
}
_METRICS = [f"NDCG@{k}" for k in KS] + [f"HR@{k}" for k in KS]
#: Config keys that seeds of one run may differ in.
_NOT_DEFINING = ("seed", "epochs", "device")


def _fmt(value: Any) -> str:
    """A number (``41.20``), a ``{"mean", "std"}`` pair (``41.20 ± 0.35``) or ``–`` for missing."""
    if value is None:
        return "–"
    if isinstance(value, dict):
        return f"{value['mean']:.2f} ± {value['std']:.2f}"
    return f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _group_table(groups: dict[str, Any], sizes: dict[str, int] | None) -> str:
    header = ["group"] + (["users"] if sizes else []) + _METRICS
    rows = []
    for g in GROUPS:
        metrics = groups.get(g)
        row = [_GROUP_NAMES[g]] + ([str(sizes.get(g, "–"))] if sizes else [])
        row += [_fmt(None if metrics is None else metrics.get(m)) for m in _METRICS]
        rows.append(row)
    return _table(header, rows)


def _model_label(config: dict[str, Any]) -> str:
    """The model's name; GRASP's ID and adapter initialisations are named when they are not the defaults."""
    label = str(config.get("model", "?"))
    if label != "grasp":
        return label
    config = with_later_fields(config)
    inits = [
        f"{flag} {value}"
        for flag, value, default in (
            ("id-init", config.get("id_init"), DEFAULT_ID_INIT),
            ("adapter-init", config["adapter_init"], DEFAULT_ADAPTER_INIT),
        )
        if value != default
    ]
    return f"{label} ({', '.join(inits)})" if inits else label


def metrics_tables(metrics: dict[str, Any]) -> str:
    """Markdown for one run (or a multi-seed summary): test table, thresholds, validation overall, config."""
    config = metrics.get("config", {})
    dataset = metrics.get("dataset", {})
    title = f"{config.get('backbone', '?')} / {_model_label(config)} on {dataset.get('name', '?')}"
    parts = [f"# {title}", ""]
    if "seeds" in metrics:
        parts.append(f"Mean ± std over {metrics['runs']} seeds ({', '.join(map(str, metrics['seeds']))}).")
    if "best_epoch" in metrics:
        best, epochs = metrics["best_epoch"], metrics["epochs"]
        if isinstance(best, dict):
            best, epochs = _fmt(best), _fmt(epochs)
        parts.append(f"Best epoch (validation NDCG@10): {best} of {epochs} trained.")
    negatives = metrics.get("eval_negatives", config.get("eval_negatives"))
    ranking = "full ranking over all items" if negatives == "all" else f"target + {negatives} sampled negatives"
    parts += ["", f"## Test metrics (%, {ranking})", ""]
    sizes = metrics.get("group_sizes", {}).get("test")
    parts.append(_group_table(metrics["test"], sizes))
    thresholds = metrics.get("thresholds", {})
    if thresholds:
        parts += [
            "",
            f"Head users: training history length ≥ {thresholds.get('head_user')}; head items: the target item's "
            f"training popularity ≥ {thresholds.get('head_item')} (the rest are tail).",
        ]
    if metrics.get("valid"):
        valid_sizes = metrics.get("group_sizes", {}).get("valid")
        parts += ["", "## Validation metrics (%)", "", _group_table(metrics["valid"], valid_sizes)]
    if config:
        parts += ["", "## Config", "", _table(["key", "value"], [[k, f"`{v}`"] for k, v in config.items()])]
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write :func:`metrics_tables` to ``run_dir/report.md`` atomically; return the path."""
    return write_text(Path(run_dir) / "report.md", metrics_tables(metrics))


# ------------------------------------------------------------------------------------------ seeds


def _mean_std(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def _aggregate_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for g in items[0]:
        present = [m[g] for m in items if m.get(g) is not None]
        if len(present) != len(items):
            out[g] = None
            continue
        out[g] = {k: _mean_std([m[k] for m in present]) for k in present[0]}
    return out


def aggregate(metrics_list: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over the ``metrics.json`` of runs that differ only in seed (shape in the module docstring).

    Raises:
        ValueError: no runs, or runs with different configs (other than the seed) or datasets.
    """
    if not metrics_list:
        raise ValueError("aggregate needs at least one metrics dict")
    first = metrics_list[0]
    base = {k: v for k, v in with_later_fields(first.get("config", {})).items() if k not in _NOT_DEFINING}
    for m in metrics_list[1:]:
        other = {k: v for k, v in with_later_fields(m.get("config", {})).items() if k not in _NOT_DEFINING}
        diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if diff:
            raise ValueError(f"aggregate: runs differ in more than the seed: {', '.join(diff)}")
        if m.get("dataset", {}).get("fingerprint") != first.get("dataset", {}).get("fingerprint"):
            raise ValueError("aggregate: runs were trained on different datasets")
    summary: dict[str, Any] = {
        "seeds": [m.get("config", {}).get("seed") for m in metrics_list],
        "runs": len(metrics_list),
        "config": base,
        "dataset": first.get("dataset", {}),
        "thresholds": first.get("thresholds", {}),
        "group_sizes": first.get("group_sizes", {}),
        "eval_negatives": first.get("config", {}).get("eval_negatives"),
    }
    for split in ("test", "valid"):
        if all(split in m for m in metrics_list):
            summary[split] = _aggregate_groups([m[split] for m in metrics_list])
    for key in ("best_epoch", "epochs", "train_seconds"):
        if all(key in m for m in metrics_list):
            summary[key] = _mean_std([m[key] for m in metrics_list])
    return summary


def write_summary(run_dir: str | Path, metrics_list: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`aggregate` the seeds and write ``run_dir/metrics.json`` and ``run_dir/report.md``; return the summary."""
    summary = aggregate(metrics_list)
    write_json(Path(run_dir) / "metrics.json", summary)
    write_report(run_dir, summary)
    return summary


# ------------------------------------------------------------------------------------------ comparison

_BACKBONE_NAMES = {"sasrec": "SASRec", "bert4rec": "BERT4Rec", "gru4rec": "GRU4Rec"}
_MODEL_NAMES = {"grasp": "GRASP", "llminit": "LLMInit", "llmesr": "LLM-ESR"}
#: Config keys a run's label leaves out: backbone and model (they open the label), the seed (a multi-seed
#: run averages over it), the evaluation protocol (it defines the comparison group) and the keys that do
#: not change what a run computes (the epoch cap, device, logging).
_UNLABELLED = frozenset({"backbone", "model", "seed", "eval_negatives", "eval_seed"}) | RUN_DEFINING_EXCLUDED
#: Options of one model or backbone (GRASP's ablations and ID initialisation, LLM-ESR's alpha, BERT4Rec's
#: masking): they say which variant of the model a run is, so a label names them whenever they are not the default.
_MODEL_SPECIFIC = frozenset(spec.name for spec in fields(TrainConfig) if spec.metadata["applies_to"])


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics: its ``metrics.json``, or the aggregate of its ``seed*/metrics.json`` subdirectories.

    When the run's pipeline directory is known (``train.json``), ``"texts"`` says where its descriptions
    came from: ``{"generator", "model", "hallucination_rate"}`` of the generate stage.

    Raises:
        FileNotFoundError: neither exists (names the directory).
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if path.is_file():
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    else:
        seeds = sorted(run_dir.glob("seed*/metrics.json"))
        if not seeds:
            raise FileNotFoundError(f"{run_dir}: no metrics.json and no seed*/metrics.json (has the run finished?)")
        metrics = aggregate([json.loads(p.read_text(encoding="utf-8")) for p in seeds])
    texts = _texts_source(run_dir)
    return {**metrics, "texts": texts} if texts is not None else metrics


def _texts_source(run_dir: Path) -> dict[str, Any] | None:
    """The source of a run's descriptions: recorded in ``train.json`` when it was trained, else read from its
    pipeline directory's manifest (runs of older versions); None if unknown."""
    from grasp.training.rundir import texts_source

    for path in (run_dir / "train.json", run_dir.parent / "train.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        if isinstance(record.get("texts"), dict):
            return record["texts"]
        if isinstance(record.get("pipeline_dir"), str):
            return texts_source(Path(record["pipeline_dir"]))
    return None


def _texts_phrases(texts: Sequence[dict[str, Any] | None]) -> list[list[str]]:
    """How labels name the runs' texts: the hallucination rate when any run has one, the text source when it
    differs between runs."""
    known = [t or {} for t in texts]
    rates = [float(t.get("hallucination_rate") or 0.0) for t in known]
    sources = [str(t.get("model") or t.get("generator") or "?") for t in known]
    phrases: list[list[str]] = [[] for _ in known]
    for words, rate, source in zip(phrases, rates, sources, strict=True):
        if len(set(sources)) > 1:
            words.append(f"{source} text" if source != "template" else "template text")
        if any(rates):
            words.append(f"hallucination {rate:g}")
    return phrases


def _phrase(name: str, value: Any) -> str:
    """One setting as a label shows it: ``softmax``, ``branches self+similar``, ``no-attention``, ``max-len 50``."""
    if name == "activation":
        return str(value)
    if name == "hae_branches":
        return "branches " + "+".join(value)
    flag = TrainConfig.flag(name).removeprefix("--")
    if isinstance(value, bool):
        return flag  # a switch's flag names its non-default state: --no-attention, --amp
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def _non_default(config: dict[str, Any]) -> dict[str, str]:
    """The settings of ``config`` that differ from its model's defaults, in config order, as :func:`_phrase` shows them.

    Keys the config lacks (a run of an older version) count as defaults; :data:`_UNLABELLED` keys are skipped.
    """
    defaults = TrainConfig(**{key: config[key] for key in ("backbone", "model") if key in config}).to_dict()
    out = {}
    for name, default in defaults.items():
        if name in _UNLABELLED or name not in config:
            continue
        value = config[name]
        # The branches are a set: their order does not change the model.
        differs = set(value) != set(default) if isinstance(value, list) else value != default
        if differs:
            out[name] = _phrase(name, value)
    return out


def run_labels(
    configs: Sequence[dict[str, Any]], names: Sequence[str], texts: Sequence[dict[str, Any] | None] | None = None
) -> list[str]:
    """How a comparison names its runs: backbone + model + the settings that differ from the defaults.

    ``SASRec`` (the id model), ``SASRec + LLMInit``, ``SASRec + GRASP (softmax, branches self+similar)``. A
    model's own options (GRASP's ablations and ID initialisation, LLM-ESR's alpha, BERT4Rec's masking) are
    named whenever they are not the default; the other settings (width, history length, learning rate, ...)
    only where they differ between the runs: those that every run shares are :func:`shared_settings`. Runs
    whose labels are still equal get their name appended (``SASRec [sasrec-id-b]``), then their position.

    Args:
        configs: the runs' ``config`` from ``metrics.json`` (one seed's, or a multi-seed summary's).
        names: the runs' names (directory names), one per config.
        texts: the runs' ``"texts"`` (see :func:`load_run`): the hallucination rate is named when a run has
            one, the text source (template or the LLM) when it differs between runs.
    """
    settings = [_non_default(config) for config in configs]
    text_words = _texts_phrases(texts if texts is not None else [None] * len(configs))
    varying = {name for name in set().union(*settings) if len({s.get(name) for s in settings}) > 1}
    labels = []
    for config, own, words in zip(configs, settings, text_words, strict=True):
        backbone, model = str(config.get("backbone", "?")), str(config.get("model", "?"))
        label = _BACKBONE_NAMES.get(backbone, backbone)
        if model != "id":
            label += " + " + _MODEL_NAMES.get(model, model)
        options = [phrase for name, phrase in own.items() if name in _MODEL_SPECIFIC or name in varying]
        options += words if model != "id" else []  # the id model reads no text
        labels.append(f"{label} ({', '.join(options)})" if options else label)
    counts = Counter(labels)
    labels = [f"{label} [{name}]" if counts[label] > 1 else label for label, name in zip(labels, names, strict=True)]
    # The same directory twice, or two directories of one name: number them.
    counts, seen = Counter(labels), Counter()
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(f"{label} #{seen[label]}" if counts[label] > 1 else label)
    return unique


def shared_settings(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The settings besides a model's own options that every run shares and that differ from the defaults.

    ``["max-len 50", "patience 10"]``: a comparison states them once, not in every :func:`run_labels` label.
    """
    settings = [_non_default(config) for config in configs]
    return [phrase for name, phrase in settings[0].items()
            if name not in _MODEL_SPECIFIC and all(s.get(name) == phrase for s in settings[1:])]  # fmt: skip


@dataclass(frozen=True)
class RunGroup:
    """Runs whose metrics can be compared: one dataset (by fingerprint) and one evaluation protocol.

    Attributes:
        dataset: the dataset's name (with the start of its fingerprint when another group's data has that name).
        protocol: the evaluation (``target + 100 sampled negatives, eval seed 2025`` or ``full ranking``).
        shared: :func:`shared_settings` of the runs.
        names: the runs' names: the directory name, ``run/seed42`` for one seed of a multi-seed run.
        labels: :func:`run_labels` of the runs, unique within the group.
        metrics: the runs' metrics (:func:`load_run`).
    """

    dataset: str
    protocol: str
    shared: tuple[str, ...]
    names: tuple[str, ...]
    labels: tuple[str, ...]
    metrics: tuple[dict[str, Any], ...]

    @property
    def title(self) -> str:
        """``ml-100k: target + 100 sampled negatives, eval seed 2025``."""
        return f"{self.dataset}: {self.protocol}"


def _protocol(config: dict[str, Any]) -> str:
    """The evaluation protocol of a run (the seed of the negatives matters only when they are sampled)."""
    negatives = config.get("eval_negatives")
    if negatives == "all":
        return "full ranking over all items"
    return f"target + {negatives} sampled negatives, eval seed {config.get('eval_seed')}"


def group_runs(run_dirs: Sequence[str | Path]) -> list[RunGroup]:
    """Load runs and group those that can be compared: same dataset (fingerprint) and evaluation protocol.

    Groups come in the order of their first run, runs in the order given.

    Raises:
        ValueError: no run directory; FileNotFoundError: see :func:`load_run`.
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    by_key: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for d in map(Path, run_dirs):
        name = f"{d.parent.name}/{d.name}" if d.name.startswith("seed") else d.name
        metrics = load_run(d)
        data = metrics.get("dataset", {})
        key = (str(data.get("fingerprint") or data.get("name")), _protocol(metrics.get("config", {})))
        by_key.setdefault(key, []).append((name, metrics))
    # A dataset name that stands for several datasets (another filtering or split) is told apart by fingerprint.
    fingerprints: dict[str, set[str]] = {}
    for (fingerprint, _), runs in by_key.items():
        fingerprints.setdefault(str(runs[0][1].get("dataset", {}).get("name", "?")), set()).add(fingerprint)
    groups = []
    for (fingerprint, protocol), runs in by_key.items():
        dataset = str(runs[0][1].get("dataset", {}).get("name", "?"))
        if len(fingerprints[dataset]) > 1:
            dataset += f" (data {fingerprint[:8]})"
        names = tuple(name for name, _ in runs)
        configs = [metrics.get("config", {}) for _, metrics in runs]
        labels = tuple(run_labels(configs, names, [metrics.get("texts") for _, metrics in runs]))
        metrics = tuple(metrics for _, metrics in runs)
        groups.append(RunGroup(dataset, protocol, tuple(shared_settings(configs)), names, labels, metrics))
    return groups


def _ndcg10(metrics: dict[str, Any], group: str) -> Any:
    g = metrics.get("test", {}).get(group)
    return None if g is None else g.get("NDCG@10")


def _split_note(groups: list[RunGroup]) -> str:
    """Why the comparison has several sections (only called for more than one group)."""
    datasets, protocols = len({g.dataset for g in groups}), len({g.protocol for g in groups})
    spread = " and ".join(
        [f"{datasets} datasets"] * (datasets > 1) + [f"{protocols} evaluation protocols"] * (protocols > 1)
    )
    return (
        f"Note: these runs cover {spread}, whose metrics are not comparable; they are split into "
        f"{len(groups)} groups below, each with its own table and chart panel."
    )


def _section(group: RunGroup) -> str:
    """The markdown of one group: a heading naming dataset and protocol, the head / tail thresholds, the table."""
    header = ["run", "model", "seeds", "NDCG@10", "HR@10",
              "tail user NDCG@10", "head user NDCG@10", "tail item NDCG@10", "head item NDCG@10"]  # fmt: skip
    rows = []
    for name, label, m in zip(group.names, group.labels, group.metrics, strict=True):
        overall = m.get("test", {}).get("overall") or {}
        rows.append([name, label, str(m.get("runs", 1)), _fmt(overall.get("NDCG@10")), _fmt(overall.get("HR@10")),
                     *(_fmt(_ndcg10(m, g)) for g in GROUPS[1:])])  # fmt: skip
    notes = []
    thresholds = group.metrics[0].get("thresholds")
    if thresholds:
        notes.append(f"Head users: training history length ≥ {thresholds.get('head_user')}; head items: "
                     f"training popularity ≥ {thresholds.get('head_item')}.")  # fmt: skip
    if group.shared:
        notes.append(f"Settings of every run that differ from the defaults: {', '.join(group.shared)}.")
    parts = [f"## {group.title}", ""] + ([" ".join(notes), ""] if notes else []) + [_table(header, rows)]
    return "\n".join(parts) + "\n"


def compare_runs(run_dirs: Sequence[str | Path], out: Path | None = None, plot: Path | None = None) -> str:
    """Markdown tables of runs side by side (and optionally a PNG chart of test NDCG@10 per head / tail group).

    Runs are grouped by :func:`group_runs`: runs on different datasets or evaluated with another protocol
    (sampled negatives or full ranking, another count or seed of negatives) get their own section and chart
    panel, and a note says so. Each section has one row per run (single run or multi-seed, mean ± std): name,
    label (:func:`run_labels`), seeds, overall NDCG@10 and HR@10, and NDCG@10 of tail / head users and items.

    Args:
        run_dirs: run directories (see :func:`load_run`).
        out: also write the markdown there (atomically).
        plot: also write :func:`comparison_figure` there (PNG), or :func:`robustness_figure` when the runs
            were trained on texts with different hallucination rates.
    """
    groups = group_runs(run_dirs)
    figure = robustness_figure if any(len(set(_rates(g))) > 1 for g in groups) else comparison_figure
    png = None if plot is None else _png(figure(groups))  # fails before any file is written
    parts = ([_split_note(groups), ""] if len(groups) > 1 else []) + [_section(g) for g in groups]
    text = "\n".join(parts)
    if out is not None:
        write_text(out, text)
    if plot is not None:
        write_bytes(plot, png)
    return text


def comparison_figure(groups: Sequence[RunGroup]) -> Figure:
    """A bar chart of test NDCG@10: overall, head / tail users and items; one panel per group, one bar per run.

    Each panel is titled with its group's dataset and protocol (and the settings its runs share), each bar
    labelled with its value; multi-seed runs get the standard deviation over seeds as error bars. A label
    has one colour in every panel. Drawn without pyplot (no global state); needs matplotlib.

    Raises:
        ImportError: matplotlib is missing (names the ``grasp[plot]`` extra).
    """
    try:
        from matplotlib import rcParams
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'grasp[plot]'") from None
    palette = rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}
    # Inches per bar cluster, so that every bar is wide enough for its (vertical) value label; plus the y
    # axis and the legend right of the panels (about 0.065 inch per character of the longest label).
    cluster = max(1.4, 0.35 * max(len(g.names) for g in groups))
    legend = 0.6 + 0.065 * max(len(label) for g in groups for label in g.labels)
    fig = Figure(figsize=(0.9 + cluster * len(GROUPS) + legend, 0.4 + 3.6 * len(groups)), layout="constrained")
    x = np.arange(len(GROUPS))
    with_std = False
    for ax, group in zip(fig.subplots(len(groups), 1, squeeze=False)[:, 0], groups, strict=True):
        width, top = 0.8 / len(group.names), 0.0
        # Value labels run horizontally on bars wide enough for them (about 0.3 inch), vertically otherwise.
        rotation = 0 if width * cluster >= 0.35 else 90
        for i, (label, m) in enumerate(zip(group.labels, group.metrics, strict=True)):
            values = [_ndcg10(m, g) for g in GROUPS]
            heights = np.array([np.nan if v is None else v["mean"] if isinstance(v, dict) else v for v in values])
            # A multi-seed summary holds {"mean", "std"}; one seed (or a summary of one) has no spread to show.
            errors = None
            if m.get("runs", 1) > 1:
                errors = np.array([v["std"] if isinstance(v, dict) else 0.0 for v in values])
                with_std = True
            colour = colours.setdefault(label, palette[len(colours) % len(palette)])
            bars = ax.bar(x + (i - (len(group.names) - 1) / 2) * width, heights, width, yerr=errors,
                          capsize=3, error_kw={"elinewidth": 1}, color=colour, label=label)  # fmt: skip
            ax.bar_label(bars, ["" if np.isnan(h) else f"{h:.1f}" for h in heights], padding=3,
                         fontsize=7, rotation=rotation)  # fmt: skip
            top = max(top, np.nanmax(heights + (0.0 if errors is None else errors), initial=0.0))
        ax.set_ylim(0, top * 1.2 or 1.0)  # headroom for the value labels
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)  # overall | the head / tail groups
        ax.set_xticks(x, [_GROUP_NAMES[g] for g in GROUPS])
        ax.set_ylabel("test NDCG@10 (%)")
        title = group.title + (f"\nevery run: {', '.join(group.shared)}" if group.shared else "")
        ax.set_title(title, fontsize="medium")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.suptitle("Test NDCG@10 overall and for head / tail users and items"
                 + (" (error bars: std over seeds)" if with_std else ""))  # fmt: skip
    return fig


def _rates(group: RunGroup) -> list[float]:
    return [float((m.get("texts") or {}).get("hallucination_rate") or 0.0) for m in group.metrics]


def robustness_figure(groups: Sequence[RunGroup]) -> Figure:
    """Test NDCG@10 against the hallucination rate of the texts: one row per group (dataset and protocol),
    panels overall / tail users / tail items, one line per model (runs that differ only in the rate).

    Multi-seed runs get the standard deviation over seeds as error bars. Needs matplotlib.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'grasp[plot]'") from None
    panels = ("overall", "tail_user", "tail_item")
    fig = Figure(figsize=(4.2 * len(panels) + 2.6, 0.6 + 3.4 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    for row, group in zip(axes, groups, strict=True):
        rates = _rates(group)
        # A run's line is its label without the rate (the rate is the x axis).
        models = [re.sub(r" \(\)$", "", re.sub(r",? ?hallucination [^,)]+", "", label).replace("(, ", "("))
                  for label in group.labels]  # fmt: skip
        lines: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        for model, rate, metrics in zip(models, rates, group.metrics, strict=True):
            lines.setdefault(model, []).append((rate, metrics))
        for ax, panel in zip(row, panels, strict=True):
            for model, points in lines.items():
                points.sort(key=lambda point: point[0])
                values = [_ndcg10(m, panel) for _, m in points]
                means = [np.nan if v is None else v["mean"] if isinstance(v, dict) else v for v in values]
                stds = [v["std"] if isinstance(v, dict) and m.get("runs", 1) > 1 else 0.0
                        for v, (_, m) in zip(values, points, strict=True)]  # fmt: skip
                ax.errorbar([r for r, _ in points], means, yerr=stds, marker="o", capsize=3, label=model)
            ax.set_xlabel("hallucination rate of the texts")
            ax.set_ylabel("test NDCG@10 (%)")
            ax.set_title(f"{group.dataset}: {_GROUP_NAMES[panel]}", fontsize="medium")
            ax.set_xticks(sorted(set(rates)))
        row[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    fig.suptitle("Robustness to hallucinated descriptions: test NDCG@10 against the share of swapped texts")
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``grasp report RUN_DIR... [--out FILE] [--plot FILE]``."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (a finished run, or a directory of seed*/ runs)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--plot", type=Path, help="also write a PNG bar chart of test NDCG@10 (overall, head/tail "
                        "users and items; one panel per dataset and evaluation protocol) to this file")  # fmt: skip


def report_main(args: argparse.Namespace) -> int:
    """``grasp report``: print the comparison tables (and write ``--out`` / ``--plot``); return 0."""
    print(compare_runs(args.run_dirs, out=args.out, plot=args.plot), end="")
    return 0
