"""``grasp recommend``: every user's top-k items from a trained run, streamed to a CSV, JSON-lines or Parquet file.

Users go through the model in batches and each batch's rows are written before the next is scored, so memory
stays bounded for any number of users. The rows go to ``OUT.partial`` and the file takes its name only when
every user is done: an interrupted run leaves no half-written output, and an existing file is replaced only
with ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grasp._console import progress

if TYPE_CHECKING:
    from grasp.inference.recommender import TrainedRecommender

__all__ = ["add_recommend_arguments", "recommend_main"]

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``grasp recommend``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory written by `grasp train`")
    parser.add_argument("--users", required=True, metavar="FILE|all",
                        help="a text file of original user ids, one per line, or 'all' for every user")  # fmt: skip
    parser.add_argument("--k", type=int, default=10, help="items per user (default: 10)")
    parser.add_argument("--out", type=Path, required=True,
                        help="a .csv, .jsonl or .parquet file: rows user_id, rank, item_id, score[, title]")
    seen = parser.add_mutually_exclusive_group()
    seen.add_argument("--exclude-seen", dest="exclude_seen", action="store_true", default=True,
                      help="leave out the items of each user's history (the default)")  # fmt: skip
    seen.add_argument("--include-seen", dest="exclude_seen", action="store_false",
                      help="rank the history's items too")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=256, help="users per batch (default: 256)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"])
    parser.add_argument("--seed", type=int, help="which seed of a multi-seed run")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def recommend_main(args: argparse.Namespace) -> int:
    """``grasp recommend``: write the rows and print one summary line."""
    out: Path = args.out
    kind = FORMATS.get(out.suffix.lower())
    if kind is None:
        raise ValueError(f"--out {out}: unknown format {out.suffix!r}; use .csv, .jsonl or .parquet")
    if out.exists() and not args.force:
        raise ValueError(f"--out {out}: exists; pass --force to replace it")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if kind == "parquet":
        _pyarrow()
    from grasp.inference.recommender import TrainedRecommender  # imports torch: not needed to build the flags

    started = time.perf_counter()
    device = None if args.device == "auto" else args.device
    rec = TrainedRecommender.load(args.run_dir, args.checkpoint, device, seed=args.seed)
    users = _read_users(args.users, rec)
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    batches = (users[lo : lo + args.batch_size] for lo in range(0, len(users), args.batch_size))
    recs = (rec.recommend(batch, args.k, exclude_seen=args.exclude_seen) for batch in batches)
    fields = ["user_id", "rank", "item_id", "score"] + (["title"] if rec.has_titles else [])
    rows = _write(partial, kind, fields, _progress(recs, len(users), not args.no_progress))
    os.replace(partial, out)
    print(f"grasp recommend: {rows} rows for {len(users)} users -> {out} ({time.perf_counter() - started:.1f} s)")
    return 0


def _read_users(spec: str, rec: TrainedRecommender) -> list[str]:
    """The original user ids of ``--users``."""
    if spec == "all":
        return rec.dataset.user_tokens[1:]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--users {spec}: no such file (give a file of user ids or 'all')")
    users = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        user = line.strip()
        if user and rec.user_index(user) == 0:
            raise ValueError(f"{path}:{n}: unknown user id {user!r} (not a user of the run's dataset)")
        users += [user] if user else []
    if not users:
        raise ValueError(f"--users {spec}: the file lists no user ids")
    return users


def _progress(recs: Iterable[Any], total: int, show: bool) -> Iterator[Any]:
    """``recs`` unchanged, counted by a progress bar (plain lines when stderr is not a terminal)."""
    with progress(total, "recommend", "user", enabled=show) as bar:
        for batch in recs:
            bar.update(len(batch.users))
            yield batch


def _write(path: Path, kind: str, fields: list[str], recs: Iterable[Any]) -> int:
    """Write every batch's rows (columns ``fields``) to ``path`` as they come; return the row count."""
    count = 0
    if kind == "parquet":
        pq, pa = _pyarrow()
        types = {"user_id": pa.string(), "rank": pa.int32(), "item_id": pa.string(), "score": pa.float32(),
                 "title": pa.string()}  # fmt: skip
        schema = pa.schema([(name, types[name]) for name in fields])
        with pq.ParquetWriter(str(path), schema) as writer:
            for batch in recs:
                rows = list(batch.rows())
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                count += len(rows)
        return count
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if kind == "csv":
            writer.writeheader()
        for batch in recs:
            for row in batch.rows():
                if kind == "jsonl":
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                else:
                    writer.writerow(row)
                count += 1
    return count


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("--out *.parquet needs pyarrow: pip install 'grasp[parquet]'") from None
    return pq, pa
