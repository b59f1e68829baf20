"""Benchmark of grasp.ops.holistic_attention against reference PyTorch, side by side in one process.

For every shape and every implementation available on the device (reference eager,
torch.compile(reference), and the cpu, triton and cuda backends) it times the
forward (inference), the backward, and forward+backward (a training step),
prints a markdown table of median ms, achieved GB/s (bytes the op must move) and
speed-up over eager, and appends CSV rows to benchmarks/results/holistic_attention.csv.
The options and the run are those of every op benchmark (benchmarks/_harness.py).

    python benchmarks/benchmark_holistic_attention.py                   # defaults for the device
    python benchmarks/benchmark_holistic_attention.py --shape 2048,200,64 --dtype bfloat16
    python benchmarks/benchmark_holistic_attention.py --sizes gpu       # B=2048, L=200, d=64 only
    python benchmarks/benchmark_holistic_attention.py --sizes gpu --impl eager --impl cuda
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DTYPES, Benchmark, Case, choose, dtypes, parser, pick_device, shapes  # noqa: E402
from _timing import copy_bandwidth_gbps  # noqa: E402

import grasp  # noqa: E402
from grasp.ops._holistic_attention_reference import holistic_attention_reference  # noqa: E402
from grasp.ops.holistic_attention import GPU_TARGET, backend_reason  # noqa: E402

#: The size a training step runs at on a GPU (``--sizes gpu``).
GPU_SHAPE = (GPU_TARGET["B"], GPU_TARGET["L"], GPU_TARGET["d"])
#: B, L, d.
SIZES = {"default": [(256, 200, 64), (2048, 200, 64)], "gpu": [GPU_SHAPE]}
IMPLS = ("eager", "compile", "cpu", "cuda", "triton")


def implementations(device: str, activation: str) -> dict[str, Callable]:
    """Name -> fn(user, user_sim, item, item_sim, mask) for everything runnable on ``device``."""
    ref = partial(holistic_attention_reference, activation=activation)
    impls: dict[str, Callable] = {"eager": ref, "compile": torch.compile(ref, dynamic=False)}
    for backend in ("cpu", "cuda", "triton"):
        if device == "cpu" and backend == "triton":
            continue  # the Triton interpreter is a correctness tool, not a timing target
        if not backend_reason(backend, device):
            op = partial(grasp.ops.holistic_attention, activation=activation, backend=backend)
            impls[backend] = lambda u, us, i, is_, m, op=op: op(u, us, i, is_, mask=m)
    return impls


def bytes_moved(B: int, L: int, d: int, itemsize: int) -> dict[str, int]:
    """Bytes each pass must move at minimum (inputs read once, outputs written once)."""
    user, item, mask = B * d, B * L * d, B * L
    fwd = itemsize * (2 * user + 2 * item + 4 * item) + mask
    bwd = itemsize * (4 * item + 2 * user + 2 * item + 2 * user + 2 * item) + mask
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


class HolisticAttention(Benchmark):
    name = title = "holistic_attention"
    ratio_column = "speedup_vs_eager"

    def __init__(self, device: str, impls: dict[str, Callable], activation: str) -> None:
        self.ceiling = copy_bandwidth_gbps(device)
        super().__init__(device, impls, baseline="eager",
                         note=f"activation={activation}; measured copy ceiling {self.ceiling:.1f} GB/s")

    def setup(self, case: Case):
        B, L, d = case.shape
        gen = torch.Generator(device=self.device).manual_seed(0)
        inputs = [
            torch.randn(shape, dtype=case.dtype, device=self.device, generator=gen, requires_grad=True)
            for shape in ((B, d), (B, d), (B, L, d), (B, L, d))
        ]
        mask = torch.rand(B, L, device=self.device, generator=gen) > 0.1  # about 10% padding
        grad_out = torch.randn(B, L, 4 * d, dtype=case.dtype, device=self.device, generator=gen)
        return inputs, mask, grad_out

    def passes(self, inputs, name, fn):
        inputs, mask, grad_out = inputs
        out = fn(*inputs, mask)

        def fwd():
            with torch.no_grad():
                fn(*inputs, mask)

        def bwd():
            torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

        def fwd_bwd():
            torch.autograd.grad(fn(*inputs, mask), inputs, grad_out)

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}

    def columns(self, case, inputs, rows):
        moved = bytes_moved(*case.shape, case.dtype.itemsize)
        for r in rows:
            gbps = moved[r.pass_] / (r.ms * 1e-3) / 1e9
            r.cells = {"GB/s": f"{gbps:.1f}", "% of copy": f"{100 * gbps / self.ceiling:.0f}%"}
            r.fields = {"gbps": f"{gbps:.2f}", "copy_ceiling_gbps": f"{self.ceiling:.2f}"}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, impls=IMPLS, shape="B,L,d", sizes=SIZES)
    p.add_argument("--activation", default="sigmoid", choices=["sigmoid", "softmax"])
    args = p.parse_args(argv)
    device = pick_device(args)
    impls = choose(implementations(device, args.activation), args.impl, device, p)
    cases = [Case((B, L, d), DTYPES[dtype], dict(dtype=dtype, B=B, L=L, d=d, activation=args.activation),
                  title=f"B={B} L={L} d={d} {dtype}")
             for dtype in dtypes(args, device) for B, L, d in shapes(args, SIZES, device, p)]  # fmt: skip
    return HolisticAttention(device, impls, args.activation).run(cases, args)


if __name__ == "__main__":
    sys.exit(main())
