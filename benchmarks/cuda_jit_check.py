"""The two paths of the ``cuda`` backend side by side on a GPU: grasp._C's nvcc-built kernels and the same device
code compiled by NVRTC at first use (``grasp/ops/_cuda_jit.py``).

For every op with both paths, dtype and a few odd shapes (masks, softmax, a broadcast user, large k), it calls
the compiled op (``torch.ops.grasp.*``) and the NVRTC launcher on the same inputs and checks that every output
is bitwise identical; it times the first-use NVRTC compile of each kernel set (into an empty cache) and a cached
load in a fresh process. Prints one table; exits non-zero on any difference. Needs a GPU, grasp._C built with
CUDA, and cupy::

    python benchmarks/cuda_jit_check.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _cases(device: torch.device) -> list[tuple[str, str, object, object]]:
    """(op, case, compiled call, NVRTC call), each call returning a tensor or a tuple of tensors."""
    import grasp.ops  # noqa: F401  (registers the ops)
    from grasp.ops import _holistic_attention_cuda_jit as hae
    from grasp.ops import _holistic_attention_projected_cuda_jit as proj
    from grasp.ops import _score_topk_cuda_jit as stk
    from grasp.ops import _topk_neighbor_mean_cuda_jit as knn

    ops = torch.ops.grasp
    g = torch.Generator(device=device).manual_seed(0)
    cases = []
    for dtype in DTYPES:
        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

        for B, L, d, per_position, masked, softmax in ((3, 7, 64, False, True, False), (5, 11, 40, True, False, True),
                                                       (4, 200, 64, False, False, True), (2, 9, 7, False, True, False)):
            user_shape = (B, L, d) if per_position else (B, d)
            args = (rand(*user_shape), rand(*user_shape), rand(B, L, d), rand(B, L, d))
            mask = (torch.rand(B, L, generator=g, device=device) > 0.3) if masked else None
            grad = rand(B, L, 4 * d)
            name = f"{dtype} B={B} L={L} d={d}{' per-position' if per_position else ''}" \
                   f"{' mask' if masked else ''}{' softmax' if softmax else ''}"
            cases.append(("holistic_attention fwd", name,
                          lambda a=args, m=mask, s=softmax: ops.holistic_attention_forward(*a, m, s),
                          lambda a=args, m=mask, s=softmax: hae.forward(*a, m, s)))
            cases.append(("holistic_attention bwd", name,
                          lambda a=args, m=mask, s=softmax, gr=grad: ops.holistic_attention_backward(gr, *a, m, s),
                          lambda a=args, m=mask, s=softmax, gr=grad: hae.backward(gr, *a, m, s)))
        U, M, N, d, e = 37, 53, 301, 24, 19
        pargs = (rand(U, d), rand(U, d), rand(M, d), rand(M, d), rand(M, 3, e),
                 torch.randint(0, U, (N,), generator=g, device=device),
                 torch.randint(0, 5, (N,), generator=g, device=device))  # skewed items: chunk-crossing segments
        grad = rand(N, e)
        cases.append(("projected fwd", f"{dtype}", lambda a=pargs: ops.holistic_attention_projected_forward(*a),
                      lambda a=pargs: proj.forward(*a)))
        cases.append(("projected bwd", f"{dtype}",
                      lambda a=pargs, gr=grad: ops.holistic_attention_projected_backward(gr, *a),
                      lambda a=pargs, gr=grad: proj.backward(gr, *a)))
        searches = ((33, 1000, 48, 10, 0, True), (7, 600, 20, 300, 5, True), (5, 70, 33, 64, 0, False))
        for q, n, D, k, start, excl in searches:
            queries, db = rand(q, D), rand(n, D)
            name = f"{dtype} q={q} n={n} D={D} k={k}"
            cases.append(("knn search", name,
                          lambda a=(queries, db, k, start, excl): ops.topk_neighbor_mean_search(*a),
                          lambda a=(queries, db, k, start, excl): knn.search(*a)))
            idx = torch.randint(0, n, (q, k), generator=g, device=device)
            cases.append(("knn gather", name, lambda a=(db, idx): ops.topk_neighbor_mean_gather(*a),
                          lambda a=(db, idx): knn.gather(*a)))
        if dtype == torch.float64:
            continue  # score_topk takes float32, float16 and bfloat16
        for B, M, d, c, e, k in ((45, 1000, 64, 32, 16, 10), (7, 900, 40, 8, 12, 300), (3, 130, 24, 16, 8, 100)):
            query, table = rand(B, d), rand(M, d)
            gated = (rand(B, c), rand(B, c), rand(M, c), rand(M, c), rand(M, 3, e), rand(e), rand(B, e))
            exclude = torch.randint(-1, M, (B, 5), generator=g, device=device)
            name = f"{dtype} B={B} M={M} d={d} k={k}"
            cases.append(("score_topk dot", name, lambda a=(query, table, exclude, k): ops.score_topk_dot(*a),
                          lambda a=(query, table, exclude, k): stk.dot(*a)))
            cases.append(("score_topk gated", name,
                          lambda a=(query, table, *gated, exclude, k): ops.score_topk_gated(*a),
                          lambda a=(query, table, *gated, exclude, k): stk.gated(*a)))
    return cases


def _identical(a, b) -> bool:
    a = a if isinstance(a, tuple | list) else (a,)
    b = b if isinstance(b, tuple | list) else (b,)
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                    for x, y in zip(a, b, strict=True))


def _kernel_sets() -> list[tuple[str, object]]:
    from grasp.ops import _holistic_attention_cuda_jit as hae
    from grasp.ops import _holistic_attention_projected_cuda_jit as proj
    from grasp.ops import _score_topk_cuda_jit as stk
    from grasp.ops import _topk_neighbor_mean_cuda_jit as knn

    sets = [(f"holistic_attention {d}", s) for d, s in hae.KERNELS.items()]
    sets += [(f"projected {d}", s) for d, s in proj.KERNELS.items()] + [("topk_neighbor_mean", knn.KERNELS)]
    return sets + [(f"score_topk {d}", s) for d, s in stk.KERNELS.items()]


def _compile_one(job: tuple[str, str, int, str]) -> float:
    from grasp.ops import _cuda_jit

    header, kernel, arch, prelude = job
    started = time.perf_counter()
    _cuda_jit.cached_kernels(header, [kernel], arch, prelude)
    return time.perf_counter() - started


def _first_use_times() -> list[tuple[str, float]]:
    """The first use of one kernel of each set, compiled (into an empty cache) and loaded in this process: what
    a user waits for on a first call; then every other kernel compiled in parallel into the cache."""
    from concurrent.futures import ProcessPoolExecutor

    from grasp.ops import _cuda_jit

    assert _cuda_jit.unavailable_reason() == ""
    device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    times, rest = [], []
    for name, kernel_set in _kernel_sets():
        started = time.perf_counter()
        kernel_set.function(kernel_set.names[0], device)
        times.append((f"{name}: {kernel_set.names[0].split('::')[-1]}", time.perf_counter() - started))
        rest += [(kernel_set.header, kernel, 10 * major + minor, kernel_set.prelude) for kernel in kernel_set.names[1:]]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        total = sum(pool.map(_compile_one, rest))
    times.append((f"the other {len(rest)} kernels, {os.cpu_count()} processes (sum {total:.0f} s)",
                  time.perf_counter() - started))
    return times


def _cached_load_time() -> float:
    """Every kernel of every set loaded from the cache (a fresh process)."""
    device = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    for _, kernel_set in _kernel_sets():
        for kernel in kernel_set.names:
            kernel_set.function(kernel, device)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached-load", action="store_true", help=argparse.SUPPRESS)  # the fresh-process timing
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_jit_check: no GPU visible", file=sys.stderr)
        return 2
    if args.cached_load:
        print(f"{_cached_load_time():.3f}")
        return 0
    from grasp.ops import _cuda_jit

    if _cuda_jit.forced():
        print("cuda_jit_check: unset GRASP_CUDA_JIT (the compiled kernels are the reference here)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as cache:
        os.environ["GRASP_CACHE"] = cache
        compile_times = _first_use_times()
        started = time.perf_counter()
        loaded = subprocess.run([sys.executable, __file__, "--cached-load"], capture_output=True, text=True,
                                env={**os.environ}, check=True).stdout.strip()
        fresh_process = time.perf_counter() - started
        device = torch.device("cuda")
        differ = 0
        print("| op | case | identical |\n|---|---|---|")
        for op, case, compiled, jit in _cases(device):
            same = _identical(compiled(), jit())
            differ += not same
            print(f"| {op} | {case} | {'yes' if same else 'NO'} |")
    print("\n| first use (NVRTC compile + load, empty cache) | s |\n|---|---|")
    for name, seconds in compile_times:
        print(f"| {name} | {seconds:.2f} |")
    print(f"\nevery kernel loaded from the cache in a fresh process: {loaded} s (the process took "
          f"{fresh_process:.1f} s with Python and torch start-up)")
    print(f"{differ} case(s) differ" if differ else "every case is bitwise identical on both paths")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
