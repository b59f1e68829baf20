"""The run-directory guard: a directory holds the runs of one setup, and a run with another setup is refused.

Two levels use it: ``grasp train``'s run directory records ``train.json`` (the config without the seed, the
pipeline directory and the LLM tables' hashes), and each seed's directory records ``config.json`` (the
config and the dataset fingerprint). A later run in either directory must match its record, unless forced.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grasp.data.core import DataError
from grasp.pipeline.manifest import Manifest

__all__ = ["read_record", "check_same_setup", "refuse_overwrite", "clear_training_outputs", "table_hashes",
           "texts_source"]  # fmt: skip

#: What training writes into a seed's directory; ``--force`` removes it before starting over.
TRAINING_OUTPUTS = ("checkpoints", "metrics.json", "report.md", "epochs.csv", "eval_negatives.npz", "tensorboard",
                    "evaluations")  # fmt: skip


def read_record(path: Path, keys: Sequence[str]) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when there is no such file.

    Raises:
        DataError: the file is not JSON, not an object, or lacks one of ``keys`` (the message names the file).
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        missing = [key for key in keys if key not in record]
        problem = f"no {', '.join(missing)}" if missing else None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        problem = str(error)
    if problem is not None:
        raise DataError(path, None, f"not a grasp run record ({problem}); remove it or use another run directory")
    return record


def check_same_setup(
    run_dir: Path,
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    kind: str,
    force: bool,
    notes: Mapping[str, str] | None = None,
) -> None:
    """Refuse ``run_dir`` when the setup it recorded differs from this run's, unless ``force``.

    Args:
        run_dir: the directory, named in the message.
        recorded, current: the compared settings (name -> value), e.g. a config's run-defining fields.
        kind: what the settings are, for the message (``"a different {kind}"``).
        force: skip the check.
        notes: name -> the text that describes a difference of that setting (default ``"name: old -> new"``).

    Raises:
        ValueError: naming every setting that differs.
    """
    if force:
        return
    notes = notes or {}
    names = dict.fromkeys([*recorded, *current])
    diffs = [
        notes.get(name) or f"{name}: {recorded.get(name)!r} -> {current.get(name)!r}"
        for name in names
        if recorded.get(name) != current.get(name)
    ]
    if diffs:
        raise ValueError(
            f"{run_dir} belongs to a different {kind} ({'; '.join(diffs)}); use another run directory, or --force "
            "to start over in it"
        )


def table_hashes(pipeline_dir: Path) -> dict[str, str]:
    """sha256 of the LLM table files as the pipeline manifest recorded them: identifies the tables a run
    trained on (``train.json``'s ``tables``)."""
    manifest = Manifest(pipeline_dir)
    return dict(sorted({**manifest.output_hashes("embed"), **manifest.output_hashes("retrieve")}.items()))


def texts_source(pipeline_dir: Path) -> dict[str, Any] | None:
    """Where a pipeline's descriptions came from: ``{"generator", "model", "hallucination_rate"}`` of its
    generate stage (None when it has not run or its manifest cannot be read)."""
    try:
        entry = Manifest(pipeline_dir).stage("generate")
        config = entry["config"] if entry is not None else None
        rate = float((config.get("hallucination") or {}).get("rate", 0.0)) if config is not None else 0.0
    except (DataError, OSError, KeyError, TypeError, AttributeError, ValueError):
        return None
    if config is None:
        return None
    return {"generator": config.get("generator"), "model": config.get("model"), "hallucination_rate": rate}


def refuse_overwrite(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to start a fresh training run over the checkpoints of an earlier one in ``run_dir``.

    Repeating a command must never silently throw away hours of training: without ``resume`` (continue
    it) or ``force`` (start over), a directory holding ``checkpoints/last.pt`` is refused.

    Raises:
        ValueError: naming the directory, how far the earlier run got, ``--resume`` and ``--force``.
    """
    if resume or force or not (run_dir / "checkpoints" / "last.pt").is_file():
        return
    from grasp.training.checkpoint import saved_epoch

    epoch = saved_epoch(run_dir / "checkpoints" / "last.safetensors")
    state = "a finished run" if (run_dir / "metrics.json").is_file() else f"a run interrupted after epoch {epoch}"
    raise ValueError(
        f"{run_dir} already holds {state}; add --resume to continue it (a finished one is only re-evaluated) "
        "or --force to delete it and start over"
    )


def clear_training_outputs(run_dir: Path) -> None:
    """Delete what an earlier training run wrote into ``run_dir`` (checkpoints, metrics, logs of epochs)."""
    for name in TRAINING_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
