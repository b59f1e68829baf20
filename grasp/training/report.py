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
* :func:`compare_runs` puts runs (single or multi-seed) side by side in a markdown table and an optional
  PNG bar chart of head / tail NDCG@10; ``grasp report`` is :func:`add_report_arguments` +
  :func:`report_main`.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from grasp._io import write_bytes, write_json, write_text
from grasp.models.build import DEFAULT_ID_INIT
from grasp.training.metrics import GROUPS, KS

__all__ = [
    "write_report",
    "metrics_tables",
    "aggregate",
    "write_summary",
    "load_run",
    "compare_runs",
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
    """The model's name; GRASP's ID initialisation is named when it is not the default."""
    label = str(config.get("model", "?"))
    if label != "grasp":
        return label
    id_init = config.get("id_init")
    return label if id_init == DEFAULT_ID_INIT else f"{label} (id-init {id_init})"


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
    base = {k: v for k, v in first.get("config", {}).items() if k not in ("seed", "epochs", "device")}
    for m in metrics_list[1:]:
        other = {k: v for k, v in m.get("config", {}).items() if k not in ("seed", "epochs", "device")}
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


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's metrics: its ``metrics.json``, or the aggregate of its ``seed*/metrics.json`` subdirectories.

    Raises:
        FileNotFoundError: neither exists (names the directory).
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    seeds = sorted(run_dir.glob("seed*/metrics.json"))
    if not seeds:
        raise FileNotFoundError(f"{run_dir}: no metrics.json and no seed*/metrics.json (has the run finished?)")
    return aggregate([json.loads(p.read_text(encoding="utf-8")) for p in seeds])


def _ndcg10(metrics: dict[str, Any], group: str) -> Any:
    g = metrics.get("test", {}).get(group)
    return None if g is None else g.get("NDCG@10")


def compare_runs(run_dirs: list[Path], out: Path | None = None, plot: Path | None = None) -> str:
    """A markdown table of runs side by side (and optionally a PNG chart of head / tail test NDCG@10).

    One row per run directory (single run or multi-seed, mean ± std): name, model, backbone, dataset,
    overall NDCG@10 and HR@10, and NDCG@10 of tail / head users and items.

    Args:
        run_dirs: run directories (see :func:`load_run`).
        out: also write the table there (atomically).
        plot: also write a grouped bar chart there (PNG, matplotlib's Agg backend).
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    runs = []
    for d in run_dirs:
        d = Path(d)
        name = f"{d.parent.name}/{d.name}" if d.name.startswith("seed") else d.name
        runs.append((name, load_run(d)))
    header = ["run", "model", "backbone", "dataset", "seeds", "NDCG@10", "HR@10",
              "tail user NDCG@10", "head user NDCG@10", "tail item NDCG@10", "head item NDCG@10"]  # fmt: skip
    rows = []
    for name, m in runs:
        cfg, overall = m.get("config", {}), m.get("test", {}).get("overall") or {}
        rows.append([
            name, _model_label(cfg), str(cfg.get("backbone", "?")), str(m.get("dataset", {}).get("name", "?")),
            str(m.get("runs", 1)), _fmt(overall.get("NDCG@10")), _fmt(overall.get("HR@10")),
            *(_fmt(_ndcg10(m, g)) for g in GROUPS[1:]),
        ])  # fmt: skip
    table = _table(header, rows) + "\n"
    if out is not None:
        write_text(out, table)
    if plot is not None:
        _plot(runs, Path(plot))
    return table


def _plot(runs: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    groups = GROUPS[1:]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(groups) * len(runs) ** 0.5), 4.0))
    x = np.arange(len(groups))
    for i, (name, m) in enumerate(runs):
        values = [_ndcg10(m, g) for g in groups]
        heights = [np.nan if v is None else (v["mean"] if isinstance(v, dict) else v) for v in values]
        errors = [0.0 if not isinstance(v, dict) else v["std"] for v in values]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(x, [_GROUP_NAMES[g] for g in groups])
    ax.set_ylabel("test NDCG@10 (%)")
    ax.set_title("Head / tail NDCG@10")
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``grasp report RUN_DIR... [--out FILE] [--plot FILE]``."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (a finished run, or a directory of seed*/ runs)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--plot", type=Path, help="also write a PNG bar chart of head/tail NDCG@10 to this file")


def report_main(args: argparse.Namespace) -> int:
    """``grasp report``: print the comparison table (and write ``--out`` / ``--plot``); return 0."""
    print(compare_runs(args.run_dirs, out=args.out, plot=args.plot), end="")
    return 0
