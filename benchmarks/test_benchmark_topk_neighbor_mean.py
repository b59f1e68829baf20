"""pytest-benchmark suite of topk_neighbor_mean, one entry per implementation (grasp backends and faiss).

    pytest benchmarks/test_benchmark_topk_neighbor_mean.py --benchmark-only
    GRASP_BENCH_KNN=100000,384 pytest benchmarks/test_benchmark_topk_neighbor_mean.py --benchmark-only
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_topk_neighbor_mean import implementations  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, DIM = (int(v) for v in os.environ.get("GRASP_BENCH_KNN", "20000,384").split(","))
METHODS = implementations(DEVICE, skip_reference=False)


@pytest.mark.parametrize("method", list(METHODS))
def test_topk_neighbor_mean(benchmark, method):
    x = torch.randn(N, DIM, device=DEVICE)
    fn = METHODS[method]
    fn(x[:2048], 10)  # warm-up outside the timed rounds

    def run():
        fn(x, 10)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, iterations=1)
