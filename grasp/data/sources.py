"""One entry point from a dataset name (and command-line flags) to a :class:`RawDataset`.

:func:`load_raw` dispatches to the loaders of :mod:`grasp.data`; :func:`add_dataset_arguments` and
:func:`raw_from_args` give every ``grasp`` command the same dataset flags.

=============  ============================================================================================
dataset        source
=============  ============================================================================================
ml-100k, ml-1m GroupLens MovieLens: ``data_dir`` (a folder holding its files, or their parent), else the
               verified download cached by :func:`~grasp.data.download.fetch_movielens`
ml-10m, ml-20m GroupLens MovieLens from ``data_dir`` (not downloaded)
movielens      any MovieLens layout in ``data_dir`` (:func:`~grasp.data.load_movielens`)
amazon         McAuley Amazon dump: ``data_dir`` is the reviews file or a folder holding one reviews file
               and its ``meta_<Category>`` file (:func:`~grasp.data.amazon.load_amazon`)
recbole        RecBole atomic files ``<name>.inter`` ... in ``data_dir`` or ``data_dir/<name>``
csv            a CSV / TSV / Parquet interactions table ``data_dir`` (:func:`~grasp.data.table.load_table`)
synthetic      the seeded synthetic product dataset (:func:`~grasp.data.synthetic.synthetic`)
=============  ============================================================================================
"""

from __future__ import annotations

import argparse
import inspect
import warnings
from pathlib import Path

from grasp.data.amazon import amazon_category, load_amazon
from grasp.data.core import RawDataset
from grasp.data.download import MOVIELENS_SHA256, fetch_movielens
from grasp.data.loaders import load_movielens, load_recbole
from grasp.data.synthetic import synthetic
from grasp.data.table import load_table

__all__ = ["DATASETS", "load_raw", "add_dataset_arguments", "raw_from_args"]

DATASETS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "movielens", "amazon", "recbole", "csv", "synthetic")
_MOVIELENS_FILES = ("u.data", "ratings.dat", "ratings.csv")
_TABLE_OPTIONS = ("user", "item", "time", "sep", "item_path", "item_key", "item_text", "user_path", "user_key",
                  "user_text")  # fmt: skip
_SYNTHETIC_OPTIONS = tuple(p for p in inspect.signature(synthetic).parameters if p != "name")
#: Options each dataset accepts besides ``domain``.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "amazon": ("reviews", "meta"),
    "csv": _TABLE_OPTIONS,
    "synthetic": _SYNTHETIC_OPTIONS,
}


def _need_data_dir(dataset: str, what: str) -> ValueError:
    return ValueError(f"dataset {dataset!r} needs data_dir (--data-dir): {what}")


def _movielens_folder(data_dir: Path, dataset: str) -> Path:
    """``data_dir`` when it holds MovieLens files, else its sub-folder named after the release, if there is one."""
    if any((data_dir / file).exists() for file in _MOVIELENS_FILES):
        return data_dir
    # The ml-10m archive unpacks to "ml-10M100K".
    names = (dataset, "ml-10M100K") if dataset == "ml-10m" else (dataset,)
    return next((data_dir / name for name in names if (data_dir / name).is_dir()), data_dir)


def _amazon_files(data_dir: Path) -> tuple[Path, Path | None]:
    """The reviews file (``data_dir`` itself, or the only one in the folder) and its metadata file, if any."""
    if data_dir.is_file():
        reviews = data_dir
    elif data_dir.is_dir():
        candidates = sorted(
            path for path in data_dir.iterdir()
            if path.name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")) and not path.name.startswith("meta_")
        )  # fmt: skip
        if len(candidates) != 1:
            found = ", ".join(path.name for path in candidates) or "none"
            raise ValueError(
                f"amazon: expected one reviews file (*.json or *.json.gz, not meta_*) in {data_dir}, found {found}; "
                "pass the reviews file itself as data_dir (--data-dir)"
            )
        reviews = candidates[0]
    else:
        raise ValueError(f"amazon: data_dir {data_dir} does not exist")
    category = amazon_category(reviews)
    metas = sorted(reviews.parent.glob(f"meta_{category}.json*"))
    if not metas:
        warnings.warn(f"amazon: no meta_{category}.json[.gz] next to {reviews}: items have no text", stacklevel=3)
    return reviews, metas[0] if metas else None


def load_raw(
    dataset: str,
    *,
    data_dir: str | Path | None = None,
    name: str | None = None,
    download: bool = True,
    **options,
) -> RawDataset:
    """Load a dataset by name; see the module docs for what each name reads.

    Args:
        dataset: one of :data:`DATASETS`.
        data_dir: the local data (a folder, or a file for ``csv`` and ``amazon``); optional for ``ml-100k``
            and ``ml-1m`` (downloaded when absent) and ``synthetic`` (ignored).
        name: dataset name; for ``recbole`` also the atomic files' base name. Defaults: the MovieLens
            release name, the folder or file name, ``synthetic``.
        download: allow downloading ``ml-100k`` / ``ml-1m`` when ``data_dir`` is None.
        **options: ``domain`` (every dataset: what the items are, for prompts); ``amazon``: ``reviews``,
            ``meta``; ``csv``: the :func:`~grasp.data.table.load_table` arguments (``user``, ``item``,
            ``time`` default to ``user_id``, ``item_id``, ``timestamp``; ``time=None`` keeps the file order);
            ``synthetic``: the :func:`~grasp.data.synthetic.synthetic` arguments (``num_users``, ``num_items``,
            ``seed``, ...).

    Raises:
        ValueError: an unknown dataset or option, or a missing ``data_dir`` where one is needed.
        DataError, DownloadError: from the loaders and the download.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    allowed = _OPTIONS.get(dataset, ()) + ("domain",)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"dataset {dataset!r} does not take option(s) {', '.join(unknown)} (it takes: {', '.join(allowed)})"
        )
    domain = options.pop("domain", None)
    folder = Path(data_dir) if data_dir is not None else None

    if dataset.startswith("ml-") or dataset == "movielens":
        if folder is not None:
            raw = load_movielens(
                _movielens_folder(folder, dataset), name or (dataset if dataset != "movielens" else None)
            )
        elif dataset == "movielens":
            raise _need_data_dir(dataset, "a folder holding a GroupLens MovieLens release")
        elif dataset not in MOVIELENS_SHA256:
            raise _need_data_dir(dataset, f"a folder holding the extracted {dataset} files (it is not downloaded)")
        elif not download:
            raise _need_data_dir(dataset, f"downloads are off: a folder holding the extracted {dataset} files")
        else:
            raw = load_movielens(fetch_movielens(dataset), name or dataset)
    elif dataset == "amazon":
        reviews, meta = options.get("reviews"), options.get("meta")
        if reviews is None:
            if folder is None:
                raise _need_data_dir(dataset, "the reviews file, or a folder holding it and its meta_ file")
            reviews, found = _amazon_files(folder)
            meta = meta if meta is not None else found
        return load_amazon(reviews, meta, name=name, domain=domain)
    elif dataset == "recbole":
        if folder is None:
            raise _need_data_dir(dataset, "a folder holding <name>.inter (and .item / .user)")
        if name and not (folder / f"{name}.inter").exists() and (folder / name / f"{name}.inter").exists():
            folder = folder / name
        raw = load_recbole(folder, name)
    elif dataset == "csv":
        if folder is None:
            raise _need_data_dir(dataset, "the interactions table (.csv, .tsv or .parquet)")
        table = {"user": "user_id", "item": "item_id", "time": "timestamp", **options}
        return load_table(folder, **table, name=name, domain=domain or "")
    else:
        raw = synthetic(**options, name=name or "synthetic")
    if domain is not None:
        raw.domain = domain
    return raw


# ----------------------------------------------------------------------------------------------- command line


def add_dataset_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add the dataset flags (``--dataset``, ``--data-dir``, ...) to ``parser``; :func:`raw_from_args` reads them."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", choices=DATASETS, required=required, help="which dataset to load")
    group.add_argument(
        "--data-dir", type=Path, default=None,
        help="local copy of the data: a MovieLens / RecBole folder (or its parent), an Amazon reviews file or "
             "folder, a CSV / TSV / Parquet file; ml-100k / ml-1m are downloaded when it is left out",
    )  # fmt: skip
    group.add_argument("--name", default=None, help="dataset name (RecBole: the atomic files' base name)")
    group.add_argument("--domain", default=None, help='what the items are, for prompts (e.g. "book")')
    group.add_argument("--user-col", default=None, help="csv: user column (default user_id)")
    group.add_argument("--item-col", default=None, help="csv: item column (default item_id)")
    group.add_argument(
        "--time-col", default=None,
        help='csv: time column, numbers or ISO-8601 dates (default timestamp; "" keeps the file order)',
    )  # fmt: skip
    group.add_argument("--sep", default=None, help=r"csv: field separator (default from the suffix; \t for tab)")
    group.add_argument("--item-file", type=Path, default=None, help="csv: table of item text attributes")
    group.add_argument("--item-key", default=None, help="csv: item column of --item-file (default --item-col)")
    group.add_argument(
        "--item-text", default=None, help="csv: comma-separated text columns of --item-file (default: all others)"
    )
    group.add_argument("--user-file", type=Path, default=None, help="csv: table of user text attributes")
    group.add_argument("--user-key", default=None, help="csv: user column of --user-file (default --user-col)")
    group.add_argument(
        "--user-text", default=None, help="csv: comma-separated text columns of --user-file (default: all others)"
    )
    group.add_argument("--synthetic-users", type=int, default=None, help="synthetic: number of users (2000)")
    group.add_argument("--synthetic-items", type=int, default=None, help="synthetic: number of items (1000)")
    group.add_argument("--synthetic-seed", type=int, default=None, help="synthetic: random seed (0)")
    group.add_argument(
        "--no-download", action="store_true", help="never download; ml-100k / ml-1m then need --data-dir"
    )


def _columns(text: str | None) -> list[str] | None:
    return None if text is None else [column.strip() for column in text.split(",") if column.strip()]


def raw_from_args(args: argparse.Namespace) -> RawDataset:
    """Load the dataset that the flags of :func:`add_dataset_arguments` describe.

    Raises:
        ValueError: no ``--dataset``, or a flag that does not apply to it (e.g. ``--user-col`` without
            ``--dataset csv``), and the errors of :func:`load_raw`.
    """
    if args.dataset is None:
        raise ValueError(f"--dataset is required (one of {', '.join(DATASETS)})")
    flags = {
        "csv": {
            "--user-col": ("user", args.user_col),
            "--item-col": ("item", args.item_col),
            "--time-col": ("time", None if args.time_col == "" else args.time_col),
            "--sep": ("sep", {"\\t": "\t", "tab": "\t"}.get(args.sep, args.sep)),
            "--item-file": ("item_path", args.item_file),
            "--item-key": ("item_key", args.item_key),
            "--item-text": ("item_text", _columns(args.item_text)),
            "--user-file": ("user_path", args.user_file),
            "--user-key": ("user_key", args.user_key),
            "--user-text": ("user_text", _columns(args.user_text)),
        },
        "synthetic": {
            "--synthetic-users": ("num_users", args.synthetic_users),
            "--synthetic-items": ("num_items", args.synthetic_items),
            "--synthetic-seed": ("seed", args.synthetic_seed),
        },
    }
    given = {"--time-col": args.time_col is not None}
    options = {} if args.domain is None else {"domain": args.domain}
    for dataset, table in flags.items():
        for flag, (option, value) in table.items():
            if not given.get(flag, value is not None):
                continue
            if dataset != args.dataset:
                raise ValueError(f"{flag} only applies to --dataset {dataset}, not {args.dataset}")
            options[option] = value
    return load_raw(args.dataset, data_dir=args.data_dir, name=args.name, download=not args.no_download, **options)
