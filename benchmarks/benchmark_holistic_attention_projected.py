"""Benchmark of the GRASP enhancer's first layer: holistic attention + Linear(4d, e), unfused vs fused.

The enhancer runs the op on N (user, item) pairs drawn from U users and M distinct items and feeds the
[N, 4d] result to a linear layer. Side by side in one process, on the same inputs, this times:

- ``unfused``: the pairs' rows gathered (index_select), ``grasp.ops.holistic_attention`` (its fastest
  backend) on them, then ``F.linear``: what the enhancer did before the fused op;
- ``reference`` and ``compile``: the fused op's plain-PyTorch reference, eager and ``torch.compile``d;
- ``cpu`` / ``cuda`` / ``triton``: ``grasp.ops.holistic_attention_projected`` on those backends (the fused
  backwards are deterministic segmented reductions, no atomics);

for the forward (inference) and forward + backward (a training step), and prints the median ms and the
speed-up over ``unfused``. CSV rows go to ``benchmarks/results/holistic_attention_projected.csv``.
The options and the run are those of every op benchmark (benchmarks/_harness.py).

    python benchmarks/benchmark_holistic_attention_projected.py       # ml-100k-like batch: 128 users, 19k pairs
    python benchmarks/benchmark_holistic_attention_projected.py --shape 128,1683,19346,64,64 --dtype bfloat16
    python benchmarks/benchmark_holistic_attention_projected.py --sizes gpu --impl unfused --impl triton
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DTYPES, Benchmark, Case, choose, dtypes, parser, pick_device, shapes, timed_backends  # noqa: E402
from gpu_model import PROJECTED  # noqa: E402

import grasp  # noqa: E402
from grasp.ops.holistic_attention_projected import backend_reason, holistic_attention_projected_reference  # noqa: E402

# (U users, M distinct items, N pairs, d, e): a training batch of ml-100k at maxlen 200 (128 users, the
# inputs plus one negative per position: about 19k pairs over the 1,683 items), and a 16x larger one;
# on a GPU (``--sizes gpu``) the target shapes of benchmarks/gpu_model.py.
SIZES = {
    "default": [(128, 1683, 19346, 50, 50), (128, 1683, 19346, 64, 64), (2048, 20000, 309536, 64, 64)],
    "gpu": [(PROJECTED["U"], PROJECTED["M"], PROJECTED["N"], d, e) for d, e in PROJECTED["de"]],
}
IMPLS = ("unfused", "reference", "compile", "cpu", "cuda", "triton")


def unfused(user, user_sim, item, item_sim, weight, bias, ui, ii):
    """Gather the pairs, the unfused op, then the linear layer."""
    rows = [t.index_select(0, idx)[None] for t, idx in ((user, ui), (user_sim, ui), (item, ii), (item_sim, ii))]
    return F.linear(grasp.ops.holistic_attention(*rows)[0], weight, bias)


def fused(user, user_sim, item, item_sim, weight, bias, ui, ii, *, backend):
    """``grasp.ops.holistic_attention_projected`` on ``backend``."""
    return grasp.ops.holistic_attention_projected(
        user, user_sim, item, item_sim, weight, bias, user_index=ui, item_index=ii, backend=backend
    )


def implementations(device: str) -> dict[str, Callable]:
    """Name -> fn(user, user_sim, item, item_sim, weight, bias, user_index, item_index)."""
    impls: dict[str, Callable] = {
        "unfused": unfused,
        "reference": holistic_attention_projected_reference,
        "compile": torch.compile(holistic_attention_projected_reference, dynamic=False),
    }
    impls.update({backend: partial(fused, backend=backend) for backend in timed_backends(device, backend_reason)})
    return impls


class HolisticAttentionProjected(Benchmark):
    name = "holistic_attention_projected"
    title = "holistic_attention + Linear(4d, e), unfused vs fused"
    ratio_column = "speedup_vs_unfused"

    def setup(self, case: Case):
        U, M, N, d, e = case.shape
        gen = torch.Generator(device=self.device).manual_seed(0)
        floats = [
            torch.randn(s, dtype=case.dtype, device=self.device, generator=gen).requires_grad_()
            for s in ((U, d), (U, d), (M, d), (M, d), (e, 4 * d), (e,))
        ]
        ui = torch.randint(0, U, (N,), device=self.device, generator=gen).sort().values  # pairs come user by user
        ii = torch.randint(0, M, (N,), device=self.device, generator=gen)
        grad_out = torch.randn(N, e, dtype=case.dtype, device=self.device, generator=gen)
        return floats, ui, ii, grad_out

    def passes(self, inputs, name, fn):
        floats, ui, ii, grad_out = inputs

        def fwd():
            with torch.no_grad():
                fn(*floats, ui, ii)

        def fwd_bwd():
            torch.autograd.grad(fn(*floats, ui, ii), floats, grad_out)

        return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, impls=IMPLS, shape="U,M,N,d,e", sizes=SIZES)
    args = p.parse_args(argv)
    device = pick_device(args)
    impls = choose(implementations(device), args.impl, device, p)
    cases = [Case((U, M, N, d, e), DTYPES[dtype], dict(dtype=dtype, U=U, M=M, N=N, d=d, e=e),
                  title=f"U={U} M={M} N={N} d={d} e={e} {dtype}")
             for dtype in dtypes(args, device) for U, M, N, d, e in shapes(args, SIZES, device, p)]  # fmt: skip
    return HolisticAttentionProjected(device, impls, baseline="unfused").run(cases, args)


if __name__ == "__main__":
    sys.exit(main())
