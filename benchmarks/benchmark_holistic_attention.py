"""Benchmark of grasp.ops.holistic_attention against reference PyTorch, side by side in one process.

For every shape and every implementation available on the device (reference eager,
torch.compile(reference), and the cpu, triton and cuda backends) it times the
forward (inference), the backward, and forward+backward (a training step),
prints a markdown table of median ms, achieved GB/s (bytes the op must move) and
speed-up over eager, and appends CSV rows to benchmarks/results/holistic_attention.csv.

    python benchmarks/benchmark_holistic_attention.py                   # defaults for the device
    python benchmarks/benchmark_holistic_attention.py --shape 2048,200,64 --dtype bfloat16
    python benchmarks/benchmark_holistic_attention.py --gpu-size        # B=2048, L=200, d=64 only
    python benchmarks/benchmark_holistic_attention.py --gpu-size --impl eager --impl cuda
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    append_csv,
    copy_bandwidth_gbps,
    git_commit,
    machine_name,
    markdown_table,
    median_ms,
    stamp,
)

import grasp  # noqa: E402
from grasp.ops._holistic_attention_reference import holistic_attention_reference  # noqa: E402
from grasp.ops.holistic_attention import GPU_TARGET, backend_reason  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHAPES = {"cpu": [(256, 200, 64), (2048, 200, 64)], "cuda": [(256, 200, 64), (2048, 200, 64)]}
DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16", "float32"]}
#: The size a training step runs at on a GPU (``--gpu-size``).
GPU_SHAPE = (GPU_TARGET["B"], GPU_TARGET["L"], GPU_TARGET["d"])
IMPLS = ("eager", "compile", "cpu", "cuda", "triton")


def implementations(device: str, activation: str, only: list[str] | None = None) -> dict[str, Callable]:
    """Name -> fn(user, user_sim, item, item_sim, mask) for everything runnable on ``device`` (of ``only``,
    when given)."""
    ref = partial(holistic_attention_reference, activation=activation)
    impls: dict[str, Callable] = {"eager": ref, "compile": torch.compile(ref, dynamic=False)}
    for backend in ("cpu", "cuda", "triton"):
        if device == "cpu" and backend == "triton":
            continue  # the Triton interpreter is a correctness tool, not a timing target
        if not backend_reason(backend, device):
            op = partial(grasp.ops.holistic_attention, activation=activation, backend=backend)
            impls[backend] = lambda u, us, i, is_, m, op=op: op(u, us, i, is_, mask=m)
    return {name: fn for name, fn in impls.items() if only is None or name in only}


def bytes_moved(B: int, L: int, d: int, itemsize: int) -> dict[str, int]:
    """Bytes each pass must move at minimum (inputs read once, outputs written once)."""
    user, item, mask = B * d, B * L * d, B * L
    fwd = itemsize * (2 * user + 2 * item + 4 * item) + mask
    bwd = itemsize * (4 * item + 2 * user + 2 * item + 2 * user + 2 * item) + mask
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bench_shape(device, dtype, B, L, d, activation, min_time_s, impls) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = [
        torch.randn(shape, dtype=dtype, device=device, generator=gen, requires_grad=True)
        for shape in ((B, d), (B, d), (B, L, d), (B, L, d))
    ]
    mask = torch.rand(B, L, device=device, generator=gen) > 0.1  # about 10% padding
    grad_out = torch.randn(B, L, 4 * d, dtype=dtype, device=device, generator=gen)
    moved = bytes_moved(B, L, d, inputs[0].element_size())
    rows = []
    for name, fn in impls.items():
        out = fn(*inputs, mask)

        def fwd(fn=fn):
            with torch.no_grad():
                fn(*inputs, mask)

        def bwd(out=out):
            torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

        def fwd_bwd(fn=fn):
            torch.autograd.grad(fn(*inputs, mask), inputs, grad_out)

        for pass_name, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
            ms = median_ms(f, device, min_time_s=min_time_s)
            rows.append(dict(impl=name, pass_=pass_name, ms=ms, gbps=moved[pass_name] / (ms * 1e-3) / 1e9))
        del out
    eager = {r["pass_"]: r["ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        r["speedup"] = eager[r["pass_"]] / r["ms"] if eager else None  # eager not run (--impl)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shape", action="append", help="B,L,d (repeatable); default depends on the device")
    parser.add_argument("--gpu-size", action="store_true",
                        help=f"the GPU training size B,L,d = {','.join(map(str, GPU_SHAPE))} (instead of --shape)")
    parser.add_argument("--impl", action="append", choices=IMPLS,
                        help="only these implementations (repeatable; default: every one runnable here)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeatable")
    parser.add_argument("--activation", default="sigmoid", choices=["sigmoid", "softmax"])
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per measurement")
    parser.add_argument("--no-csv", action="store_true", help="print only; do not append to benchmarks/results")
    args = parser.parse_args(argv)

    if args.gpu_size and args.shape:
        parser.error("--gpu-size and --shape are exclusive")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.gpu_size:
        shapes = [GPU_SHAPE]
    elif args.shape:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    else:
        shapes = DEFAULT_SHAPES[device]
    dtypes = args.dtype or DEFAULT_DTYPES[device]
    impls = implementations(device, args.activation, args.impl)
    if not impls:
        parser.error(f"none of --impl {', '.join(args.impl)} runs on {device}")
    machine, commit, when = machine_name(device), git_commit(), stamp()
    ceiling = copy_bandwidth_gbps(device)
    print(f"# holistic_attention on {machine} ({device}), commit {commit}, {when}")
    print(f"# activation={args.activation}; measured copy ceiling {ceiling:.1f} GB/s; impls: {', '.join(impls)}\n")

    csv_rows = []
    for dtype_name in dtypes:
        for B, L, d in shapes:
            rows = bench_shape(device, DTYPES[dtype_name], B, L, d, args.activation, args.min_time, impls)
            print(f"## B={B} L={L} d={d} {dtype_name}")
            print(markdown_table(
                ["impl", "pass", "median ms", "GB/s", "% of copy", "speed-up vs eager"],
                [[r["impl"], r["pass_"], f"{r['ms']:.3f}", f"{r['gbps']:.1f}", f"{100 * r['gbps'] / ceiling:.0f}%",
                  "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"] for r in rows],
            ))
            print()
            csv_rows += [
                dict(date=when, commit=commit, machine=machine, device=device, dtype=dtype_name, B=B, L=L, d=d,
                     activation=args.activation, impl=r["impl"], pass_=r["pass_"], median_ms=f"{r['ms']:.4f}",
                     gbps=f"{r['gbps']:.2f}", copy_ceiling_gbps=f"{ceiling:.2f}",
                     speedup_vs_eager="" if r["speedup"] is None else f"{r['speedup']:.3f}")
                for r in rows
            ]
    if not args.no_csv:
        print(f"appended {len(csv_rows)} rows to {append_csv('holistic_attention', csv_rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
