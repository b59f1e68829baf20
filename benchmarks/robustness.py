"""Robustness to hallucinated descriptions: test NDCG@10 as a growing share of the texts is wrong.

For every hallucination rate p, one pipeline directory whose generate stage swaps the descriptions of a
fraction p of the items and of the users for those of other random items / users (``grasp generate
--hallucination-rate p``); then each model trained on it for each seed. The runs go seed by seed (every
rate and model for the first seed before the next seed), so a partial benchmark already compares all
models; running the script again resumes (finished runs are only re-evaluated, interrupted ones continue).
At the end ``grasp report`` prints the table and draws NDCG@10 against p, one line per model.

A model is a ``grasp train --model`` name, or a name and its own flags as one word (``"grasp --adapter-init
pca"``: its runs go to ``sasrec-grasp-adapter-init-pca``).

Example (the README's robustness table; every training run alone on one core)::

    OMP_NUM_THREADS=1 python benchmarks/robustness.py --root runs/robustness/ml-100k \\
        --data "--dataset ml-100k --data-dir path/to/ml-100k" \\
        --plot benchmarks/results/robustness-ml-100k.png --out benchmarks/results/robustness-ml-100k.md
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path


def _grasp(*words: str) -> None:
    """Run ``grasp WORDS...`` (the same Python), echoing the command; stop on failure."""
    command = [sys.executable, "-m", "grasp.cli", *words]
    print("$ grasp " + shlex.join(words), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder of the pipelines and runs")
    parser.add_argument("--data", required=True, help="the dataset flags of grasp retrieve, as one string")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="hallucination rates")
    parser.add_argument("--hallucination-seed", type=int, default=0, help="which rows are swapped")
    parser.add_argument("--models", nargs="+", default=["grasp", "llminit", "llmesr"],
                        help='models to train: a --model name, or one with its flags ("grasp --adapter-init pca")')
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="training seeds")
    parser.add_argument("--train", default="", help="further grasp train flags, as one string (e.g. --max-len 50)")
    parser.add_argument("--plot", type=Path, help="write the chart (PNG) here")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    args = parser.parse_args(argv)

    pipelines = {}
    for rate in args.rates:
        pipelines[rate] = args.root / f"p{rate:g}" / "pipeline"
        _grasp("retrieve", *shlex.split(args.data), "--out", str(pipelines[rate]), "--no-progress",
               "--hallucination-rate", f"{rate:g}", "--hallucination-seed", str(args.hallucination_seed))  # fmt: skip
    runs = []
    for seed in args.seeds:
        for rate in args.rates:
            for model in args.models:
                name, *flags = shlex.split(model)
                run = args.root / f"p{rate:g}" / "-".join(["sasrec", name, *(w.lstrip("-") for w in flags)])
                _grasp("train", "--pipeline-dir", str(pipelines[rate]), "--out", str(run), "--model", name, *flags,
                       "--seeds", str(seed), "--resume", "--no-progress", *shlex.split(args.train))  # fmt: skip
                if run not in runs:
                    runs.append(run)
    report = ["report", *map(str, runs)]
    report += ["--plot", str(args.plot)] if args.plot else []
    report += ["--out", str(args.out)] if args.out else []
    _grasp(*report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
