"""pytest-benchmark suite of holistic attention (forward+backward), one entry per implementation.

    pytest benchmarks/test_benchmark_holistic_attention.py --benchmark-only
    GRASP_BENCH_SHAPE=2048,200,64 pytest benchmarks/ --benchmark-only --benchmark-group-by=param:shape
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_holistic_attention import implementations  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = tuple(int(x) for x in os.environ.get("GRASP_BENCH_SHAPE", "64,200,64").split(","))
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IMPLS = implementations(DEVICE, "sigmoid")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", [SHAPE], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(benchmark, impl, shape):
    B, L, d = shape
    inputs = [torch.randn(s, dtype=DTYPE, device=DEVICE, requires_grad=True)
              for s in ((B, d), (B, d), (B, L, d), (B, L, d))]
    mask = torch.rand(B, L, device=DEVICE) > 0.1
    grad_out = torch.randn(B, L, 4 * d, dtype=DTYPE, device=DEVICE)
    fn = IMPLS[impl]

    def step():
        torch.autograd.grad(fn(*inputs, mask), inputs, grad_out)
        _sync()

    step()  # warm-up and compilation outside the timed rounds
    benchmark(step)
