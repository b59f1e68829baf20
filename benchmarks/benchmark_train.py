"""Training speed of every model on the same data, side by side in one process (docs/design.md section 9).

An epoch is what ``grasp train`` does in one epoch before validation: one pass over the shuffled users
(batches of left-padded sequences with sampled negatives from :class:`grasp.training.batches.TrainBatches`),
each step ``model.loss`` + backward + Adam. Models take turns epoch by epoch, so a slow spell on the
machine hits all of them alike; the table reports the median seconds per epoch, training sequences per
second, and each model's time relative to the first model of its backbone (the plain ``id`` model).

The default settings are those of the well-known pmixer/SASRec.pytorch run on ml-100k (maxlen 200,
hidden 50, 2 blocks, batch 128), whose own script takes a median 2.2 s per epoch on the 2-core CPU
machine this project is developed on. ``--pmixer-model`` times its model
side by side with ours on the same batches.

    python benchmarks/benchmark_train.py --pipeline-dir runs/ml-100k/pipeline
    python benchmarks/benchmark_train.py --models sasrec:id sasrec:grasp --epochs 5
    python benchmarks/benchmark_train.py --device cuda --synthetic 20000 5000 --models sasrec:id sasrec:grasp

Without ``--pipeline-dir`` the LLM tables are random (384-d, like MiniLM): speed does not depend on
their values. Rows are appended to ``benchmarks/results/train.csv``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import append_csv, git_commit, machine_name, markdown_table, stamp  # noqa: E402

from grasp.data import load_movielens, preprocess, synthetic  # noqa: E402
from grasp.data.download import DownloadError, fetch_movielens  # noqa: E402
from grasp.data.preprocess import Dataset  # noqa: E402
from grasp.models import build_model  # noqa: E402
from grasp.pipeline import Tables  # noqa: E402
from grasp.training.batches import TrainBatches  # noqa: E402

DEFAULT_MODELS = ["sasrec:id", "sasrec:grasp", "sasrec:llminit", "sasrec:llmesr",
                  "bert4rec:id", "bert4rec:grasp", "gru4rec:id", "gru4rec:grasp"]  # fmt: skip
def random_tables(dataset: Dataset, dim: int = 384, k: int = 10, seed: int = 0) -> Tables:
    """Unit-norm random tables of the right shapes (row 0 zeros), for timing only."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for side, n in (("user", dataset.num_users), ("item", dataset.num_items)):
        for name in (side, f"{side}_sim"):
            table = rng.standard_normal((n + 1, dim)).astype(np.float32)
            table /= np.linalg.norm(table, axis=1, keepdims=True)
            table[0] = 0
            arrays[name] = table
        ids = rng.integers(1, n + 1, (n + 1, k))
        ids[0] = 0
        arrays[f"{side}_neighbors"] = ids
    return Tables(**arrays)


class Runner:
    """One model, its optimizer and its batch stream; ``epoch()`` trains one epoch and returns its seconds."""

    def __init__(self, spec: str, dataset: Dataset, tables: Tables, args: argparse.Namespace) -> None:
        backbone, model = spec.split(":")
        torch.manual_seed(0)
        self.spec = spec
        self.model = build_model(
            backbone, model, num_users=dataset.num_users, num_items=dataset.num_items,
            tables=None if model == "id" else tables, d=args.hidden, max_len=args.max_len,
            num_blocks=args.blocks, num_heads=1, dropout=args.dropout,
        )  # fmt: skip
        self.device = torch.device(args.device)
        self.model.to(self.device)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        self.batches = TrainBatches(dataset, args.max_len, args.batch_size, seed=0)
        self.sequences = dataset.num_users

    def epoch(self) -> float:
        """Seconds of one epoch; on a GPU the clock stops once the device has finished the epoch's work."""
        self.model.train()
        _synchronize(self.device)
        start = time.perf_counter()
        for users, seqs, negatives in self.batches.epoch():
            u, s, n = (torch.from_numpy(a).to(self.device, non_blocking=True) for a in (users, seqs, negatives))
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.model.loss(u, s, n)
            loss.backward()
            self.optimizer.step()
        _synchronize(self.device)
        return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PmixerRunner:
    """pmixer/SASRec.pytorch's own SASRec model (``model.py`` of a local checkout, not part of grasp), trained
    the way its ``main.py`` does (BCE with logits on the non-padded targets, Adam betas 0.9 / 0.98), on the
    same batches as the grasp models."""

    def __init__(self, model_py: Path, dataset: Dataset, args: argparse.Namespace) -> None:
        spec = importlib.util.spec_from_file_location("pmixer_model", model_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        options = argparse.Namespace(device="cpu", norm_first=False, hidden_units=args.hidden,
                                     num_blocks=args.blocks, num_heads=1, dropout_rate=args.dropout)  # fmt: skip
        torch.manual_seed(0)
        self.spec = "pmixer SASRec (its model.py)"
        self.model = module.SASRec(dataset.num_users, dataset.num_items, options)
        for param in self.model.parameters():
            if param.dim() > 1:
                torch.nn.init.xavier_normal_(param.data)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, betas=(0.9, 0.98))
        self.criterion = torch.nn.BCEWithLogitsLoss()
        self.batches = TrainBatches(dataset, args.max_len, args.batch_size, seed=0)
        self.sequences = dataset.num_users

    def epoch(self) -> float:
        self.model.train()
        start = time.perf_counter()
        for users, seqs, negatives in self.batches.epoch():
            pos, neg = seqs[:, 1:], negatives[:, 1:]
            pos_logits, neg_logits = self.model(users, seqs[:, :-1], pos, neg)
            self.optimizer.zero_grad()
            where = np.where(pos != 0)
            loss = self.criterion(pos_logits[where], torch.ones_like(pos_logits[where]))
            loss = loss + self.criterion(neg_logits[where], torch.zeros_like(neg_logits[where]))
            loss.backward()
            self.optimizer.step()
        return time.perf_counter() - start


def load(args: argparse.Namespace) -> tuple[Dataset, Tables, str]:
    if args.synthetic is not None:
        users, items = args.synthetic
        dataset = preprocess(synthetic(num_users=users, num_items=items))
    elif args.data_dir is not None:
        dataset = preprocess(load_movielens(args.data_dir))
    else:
        try:
            folder = fetch_movielens("ml-100k")
        except DownloadError as exc:
            print(f"note: no --data-dir and ml-100k cannot be fetched ({exc}): timing on the synthetic dataset")
            dataset = preprocess(synthetic())
        else:
            dataset = preprocess(load_movielens(folder))
    if args.pipeline_dir is not None:
        tables = Tables.load(args.pipeline_dir / "embeddings", num_users=dataset.num_users, num_items=dataset.num_items)
        source = f"tables from {args.pipeline_dir}"
    else:
        tables, source = random_tables(dataset), "random 384-d tables"
    return dataset, tables, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="a MovieLens folder (default: ml-100k, downloaded once)")
    parser.add_argument("--synthetic", type=int, nargs=2, metavar=("USERS", "ITEMS"),
                        help="time on the built-in synthetic dataset of this size instead of MovieLens")
    parser.add_argument("--pipeline-dir", type=Path, help="a run directory with LLM tables for this dataset")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="backbone:model pairs")
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=7, help="timed epochs per model, after one warm-up epoch")
    parser.add_argument("--pmixer-model", type=Path,
                        help="model.py of a pmixer/SASRec.pytorch checkout: time its SASRec alongside")  # fmt: skip
    parser.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results/train.csv")
    args = parser.parse_args()
    if args.device == "cuda" and args.pmixer_model is not None:
        parser.error("--pmixer-model times pmixer's model on the CPU only; leave it out with --device cuda")

    dataset, tables, source = load(args)
    runners: list[Runner | PmixerRunner] = [Runner(spec, dataset, tables, args) for spec in args.models]
    if args.pmixer_model is not None:
        runners.insert(0, PmixerRunner(args.pmixer_model, dataset, args))
    for runner in runners:
        runner.epoch()  # warm-up: first-call allocations, lazy initialisation
    times: dict[str, list[float]] = {r.spec: [] for r in runners}
    for _ in range(args.epochs):
        for runner in runners:
            times[runner.spec].append(runner.epoch())

    when, commit, machine = stamp(), git_commit(), machine_name(args.device)
    print(f"# training speed: {dataset.name} ({dataset.num_users} users, {dataset.num_items} items), {source}")
    print(f"maxlen {args.max_len}, hidden {args.hidden}, {args.blocks} blocks, batch {args.batch_size}, "
          f"median of {args.epochs} epochs; {machine}; commit {commit}; {when}\n")  # fmt: skip
    base: dict[str, float] = {}
    rows, csv_rows = [], []
    for runner in runners:
        seconds = statistics.median(times[runner.spec])
        backbone = runner.spec.split(":")[0] if ":" in runner.spec else "sasrec"
        base.setdefault(backbone, seconds)
        rows.append(
            [runner.spec, f"{seconds:.2f}", f"{runner.sequences / seconds:.0f}", f"{seconds / base[backbone]:.2f}×"]
        )
        csv_rows.append({
            "date": when, "commit": commit, "machine": machine, "dataset": dataset.name, "model": runner.spec,
            "max_len": args.max_len, "hidden": args.hidden, "blocks": args.blocks, "batch_size": args.batch_size,
            "tables": source, "epochs_timed": args.epochs, "median_s_per_epoch": round(seconds, 4),
            "sequences_per_s": round(runner.sequences / seconds, 1),
        })  # fmt: skip
    print(markdown_table(["model", "s / epoch", "sequences / s", "time vs the backbone's id model"], rows))
    if not args.no_csv:
        print(f"\nappended to {append_csv('train', csv_rows)}")


if __name__ == "__main__":
    main()
