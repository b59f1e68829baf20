"""Datasets of grasp: loaders for raw logs and text attributes, and preprocessing (DESIGN.md section 6)."""

from grasp.data.loaders import RECBOLE_TYPES, DataError, RawDataset, load_movielens, load_recbole
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
