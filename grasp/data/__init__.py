"""Datasets of grasp: loaders for raw logs and text attributes, and preprocessing (docs/design.md section 7)."""

from grasp.data.core import DataError, RawDataset
from grasp.data.loaders import RECBOLE_TYPES, load_movielens, load_recbole
from grasp.data.preprocess import Dataset, head_threshold, preprocess, statistics, statistics_table

__all__ = [
    "DataError",
    "RawDataset",
    "load_movielens",
    "load_recbole",
    "RECBOLE_TYPES",
    "Dataset",
    "preprocess",
    "statistics",
    "statistics_table",
    "head_threshold",
]

from grasp.data.amazon import load_amazon  # noqa: E402
from grasp.data.download import DownloadError, fetch_movielens  # noqa: E402
from grasp.data.sources import DATASETS, add_dataset_arguments, load_raw, raw_from_args  # noqa: E402
from grasp.data.synthetic import synthetic  # noqa: E402
from grasp.data.table import load_table  # noqa: E402

__all__ += [
    "load_amazon",
    "load_table",
    "synthetic",
    "fetch_movielens",
    "DownloadError",
    "DATASETS",
    "load_raw",
    "add_dataset_arguments",
    "raw_from_args",
]
