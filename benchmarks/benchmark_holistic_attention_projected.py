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

    python benchmarks/benchmark_holistic_attention_projected.py       # ml-100k-like batch: 128 users, 19k pairs
    python benchmarks/benchmark_holistic_attention_projected.py --shape 128,1683,19346,64,64 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import append_csv, git_commit, machine_name, markdown_table, median_ms, stamp  # noqa: E402

import grasp  # noqa: E402
from grasp.ops.holistic_attention_projected import backend_reason, holistic_attention_projected_reference  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# (U users, M distinct items, N pairs, d, e): a training batch of ml-100k at maxlen 200 (128 users, the
# inputs plus one negative per position: about 19k pairs over the 1,683 items), and a 16x larger one.
DEFAULT_SHAPES = [(128, 1683, 19346, 50, 50), (128, 1683, 19346, 64, 64), (2048, 20000, 309536, 64, 64)]
DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16", "float32"]}


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
    for backend in ("cpu", "cuda", "triton"):
        if device == "cpu" and backend == "triton":
            continue  # the Triton interpreter is a correctness tool, not a timing target
        if not backend_reason(backend, device):
            impls[backend] = partial(fused, backend=backend)
    return impls


def bench_shape(device, dtype, shape, min_time_s, impls) -> list[dict]:
    U, M, N, d, e = shape
    gen = torch.Generator(device=device).manual_seed(0)
    floats = [
        torch.randn(s, dtype=dtype, device=device, generator=gen).requires_grad_()
        for s in ((U, d), (U, d), (M, d), (M, d), (e, 4 * d), (e,))
    ]
    ui = torch.randint(0, U, (N,), device=device, generator=gen).sort().values  # pairs come user by user
    ii = torch.randint(0, M, (N,), device=device, generator=gen)
    grad_out = torch.randn(N, e, dtype=dtype, device=device, generator=gen)
    rows = []
    for name, fn in impls.items():

        def fwd(fn=fn):
            with torch.no_grad():
                fn(*floats, ui, ii)

        def fwd_bwd(fn=fn):
            torch.autograd.grad(fn(*floats, ui, ii), floats, grad_out)

        for pass_name, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            rows.append(dict(impl=name, pass_=pass_name, ms=median_ms(f, device, min_time_s=min_time_s)))
    base = {r["pass_"]: r["ms"] for r in rows if r["impl"] == "unfused"}
    for r in rows:
        r["speedup"] = base[r["pass_"]] / r["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shape", action="append", help="U,M,N,d,e (repeatable)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeatable")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per measurement")
    parser.add_argument("--no-csv", action="store_true", help="print only; do not append to benchmarks/results")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else DEFAULT_SHAPES
    dtypes = args.dtype or DEFAULT_DTYPES[device]
    machine, commit, when = machine_name(device), git_commit(), stamp()
    impls = implementations(device)
    print(f"# holistic_attention + Linear(4d, e), unfused vs fused, on {machine} ({device}), commit {commit}, {when}")
    print(f"# impls: {', '.join(impls)}\n")
    csv_rows = []
    for dtype_name in dtypes:
        for shape in shapes:
            rows = bench_shape(device, DTYPES[dtype_name], shape, args.min_time, impls)
            print("## U={} M={} N={} d={} e={} {}".format(*shape, dtype_name))
            print(markdown_table(["impl", "pass", "median ms", "speed-up vs unfused"],
                                 [[r["impl"], r["pass_"], f"{r['ms']:.3f}", f"{r['speedup']:.2f}x"] for r in rows]))
            print()
            U, M, N, d, e = shape
            csv_rows += [
                dict(date=when, commit=commit, machine=machine, device=device, dtype=dtype_name, U=U, M=M, N=N, d=d,
                     e=e, impl=r["impl"], pass_=r["pass_"], median_ms=f"{r['ms']:.4f}",
                     speedup_vs_unfused=f"{r['speedup']:.3f}")
                for r in rows
            ]  # fmt: skip
    if not args.no_csv:
        print(f"appended {len(csv_rows)} rows to {append_csv('holistic_attention_projected', csv_rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
