"""Benchmark of grasp.ops.topk_neighbor_mean against reference PyTorch and faiss, side by side.

Every implementation computes the same thing on the same data: for each query (the first q of the n
rows, all of them by default), the mean of its k most cosine-similar other rows. faiss is timed with its
exact search (`faiss.knn` on CPU, `faiss.knn_gpu` on GPU) plus the gather-mean (numpy on CPU, torch on
GPU) and the row normalisation, as a user would run it. On a GPU every grasp backend runs at each
precision ("fast": tensor-core candidates + float32 proof, the default; "highest": plain float32
search). The table shows the median time, the achieved TFLOP/s of the similarity products (2·q·n·D), the
fraction of the matmul rate measured in the same run, recall@k against the float32 exact result (the
reference backend, or the first exact method when the reference is not run), how many queries got a
different neighbour set, the largest difference of the means from that result, and the speed-up over it.
The options and the run are those of every op benchmark (benchmarks/_harness.py); a call takes
seconds, so each is timed on its own (at least 3 of them) after a warm-up on 2048 rows.

    python benchmarks/benchmark_topk_neighbor_mean.py                    # device defaults
    python benchmarks/benchmark_topk_neighbor_mean.py --shape 100000,384 --k 10
    python benchmarks/benchmark_topk_neighbor_mean.py --sizes gpu        # n = 1M, D = 1536 and 384, 65536 queries
    python benchmarks/benchmark_topk_neighbor_mean.py --shape 20000,384 --impl cpu --impl faiss

Runs with a query subset (q < n: ``--shape n,D,q``, ``--queries``, or the ``gpu`` size set) append to
``results/topk_neighbor_mean_queries.csv`` (with a ``q`` column); full runs to
``results/topk_neighbor_mean.csv``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Benchmark, Case, choose, parser, pick_device, shapes  # noqa: E402
from _timing import median_ms  # noqa: E402

import grasp  # noqa: E402
from grasp.ops._topk_neighbor_mean_reference import drop_own  # noqa: E402
from grasp.ops.topk_neighbor_mean import backend_reason  # noqa: E402

#: n database rows, width D and, where given, the queries q (the first q rows; default all n).
SIZES = {
    "default": {"cpu": [(50_000, 384), (100_000, 384)], "cuda": [(1_000_000, 1536), (1_000_000, 4096)]},
    # The GPU target shapes, with a query subset so that every method (float32 ones included) fits a
    # few minutes: the rates per query hold for all n queries.
    "gpu": [(1_000_000, 1536, 65_536), (1_000_000, 384, 65_536)],
}
PRECISIONS = ("fast", "highest")
IMPLS = ("reference", "cpu", "cuda", "triton", "faiss", *(f"{b} {p}" for b in ("cuda", "triton") for p in PRECISIONS))


def faiss_baseline(x: torch.Tensor, k: int, q: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss exact inner-product search of the first q rows (default all) among the normalised rows of x,
    self excluded, + gather-mean (numpy on CPU)."""
    import faiss

    from grasp.ops._topk_neighbor_mean_faiss import _gpu_resources

    q = x.shape[0] if q is None else q
    own = torch.arange(q, device=x.device)
    if x.is_cuda:
        import importlib

        importlib.import_module("faiss.contrib.torch_utils")
        xn = torch.nn.functional.normalize(x.float(), dim=1)
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(x.device):
            scores, idx = faiss.knn_gpu(_gpu_resources(index), xn[:q], xn, k + 1, metric=faiss.METRIC_INNER_PRODUCT,
                                        device=index)
        _, idx = drop_own(scores, idx.long(), own, k)
        return x[idx].float().mean(1).to(x.dtype), idx
    xn = x.float().numpy().copy()
    faiss.normalize_L2(xn)
    scores, idx = faiss.knn(xn[:q], xn, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    _, idx = drop_own(torch.from_numpy(scores), torch.from_numpy(idx), own, k)
    return torch.from_numpy(x.numpy()[idx.numpy()].mean(1)), idx


def implementations(device: str, skip_reference: bool = False) -> dict[str, Callable]:
    """Name -> fn(x, k, q=None) returning (mean, indices) of the first q rows of x (default all) as queries."""
    out: dict[str, Callable] = {}

    def grasp_method(backend: str, precision: str) -> Callable:
        def run(x, k, q=None):
            queries = None if q is None or q == x.shape[0] else x[:q]
            mean, idx, _ = grasp.ops.topk_neighbor_mean(x, k, queries=queries, exclude_self=True, backend=backend,
                                                        precision=precision, return_indices=True)
            return mean, idx

        return run

    if not skip_reference:
        out["reference"] = grasp_method("reference", "highest")
    for backend in ("cpu", "cuda", "triton"):
        if device == "cpu" and backend == "triton":
            continue  # the interpreter is a correctness tool, not a timing target
        if backend_reason(backend, device):
            continue
        if device == "cuda":  # the precisions differ on GPU tensors only
            for precision in PRECISIONS:
                out[f"{backend} {precision}"] = grasp_method(backend, precision)
        else:
            out[backend] = grasp_method(backend, "highest")
    if not backend_reason("faiss", device):
        out["faiss"] = faiss_baseline
    return out


def matmul_tflops(device: str) -> float:
    """The machine's measured matmul rate: bf16 on GPU, float32 on CPU (the dtype the kernels use)."""
    size = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, min_time_s=1.0)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def rows_differing(idx: torch.Tensor, truth: torch.Tensor) -> int:
    """Queries whose neighbour set is not exactly the truth's."""
    return int((idx.cpu().sort(1).values != truth.cpu().sort(1).values).any(1).sum())


def recall(idx: torch.Tensor, truth: torch.Tensor) -> float:
    idx, truth = idx.cpu(), truth.cpu()
    hits = torch.zeros((), dtype=torch.int64)
    for start in range(0, idx.shape[0], 8192):
        a, b = idx[start : start + 8192], truth[start : start + 8192]
        hits += (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum()
    return hits.item() / truth.numel()


def recall_truth(names: Iterable[str]) -> str:
    """The implementation whose result the others are measured against: the reference, else the first
    exact grasp backend, else faiss (exact too), else the first one."""
    names = list(names)
    exact = [m for m in names if not m.endswith(" fast")]
    return min(exact, key=lambda m: (m != "reference", m == "faiss"), default=names[0])


class TopkNeighborMean(Benchmark):
    name = title = "topk_neighbor_mean"
    impl_column = "method"
    # A call takes seconds: each is timed on its own (passes() warms up on a few rows instead).
    timing = dict(min_reps=3, warmup=0, wall_clock=True)

    def __init__(self, device: str, impls: dict[str, Callable], k: int) -> None:
        self.k, self.rate = k, matmul_tflops(device)
        truth = recall_truth(impls)
        super().__init__(device, impls, baseline=truth,
                         note=f"k={k}; measured matmul rate {self.rate:.2f} TFLOP/s; recall against {truth}")

    def setup(self, case: Case):
        n, dim, q = case.shape
        x = torch.randn(n, dim, device=self.device, generator=torch.Generator(self.device).manual_seed(0))
        return {"x": x, "q": q, "results": {}}

    def passes(self, inputs, name, fn):
        x, q, k = inputs["x"], inputs["q"], self.k
        warm = min(x.shape[0], 2048)
        fn(x[:warm], k, min(q, warm))  # warm-up: kernels, autotuning, faiss threads

        def search():
            inputs["results"][name] = fn(x, k, q)

        return {"": search}

    def columns(self, case, inputs, rows):
        n, dim, q = case.shape
        flops = 2.0 * q * n * dim
        truth_mean, truth = inputs["results"][self.baseline]
        for r in rows:
            mean, idx = inputs["results"][r.impl]
            tflops = flops / (r.ms * 1e-3) / 1e12
            hits, differing = recall(idx, truth), rows_differing(idx, truth)
            mean_err = (mean.float().cpu() - truth_mean.float().cpu()).abs().max().item()
            r.cells = {"TFLOP/s": f"{tflops:.3f}", "% of matmul": f"{100 * tflops / self.rate:.0f}%",
                       f"recall@{self.k}": f"{hits:.5f}", "rows with another set": str(differing),
                       "max mean error": f"{mean_err:.1e}"}  # fmt: skip
            r.fields = {"tflops": f"{tflops:.4f}", "matmul_tflops": f"{self.rate:.3f}", "recall": f"{hits:.5f}",
                        "rows_differing": differing, "recall_truth": self.baseline, **({"q": q} if q < n else {})}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, impls=IMPLS, shape="n,D[,q]", sizes=SIZES, dtype=False)
    p.add_argument("--queries", type=int, help="the first q rows as queries in every case (default: the shape's q, "
                   "else all n)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--skip-reference", action="store_true", help="skip the (slow) reference backend")
    args = p.parse_args(argv)
    device = pick_device(args)
    impls = choose(implementations(device, args.skip_reference), args.impl, device, p)
    cases = []
    for n, dim, *given in shapes(args, SIZES, device, p):
        q = min(n, args.queries or (given[0] if given else n))
        cases.append(Case((n, dim, q), None, dict(n=n, D=dim, k=args.k), title=f"n={n} q={q} D={dim} k={args.k}",
                          csv="topk_neighbor_mean_queries" if q < n else None))
    return TopkNeighborMean(device, impls, args.k).run(cases, args)


if __name__ == "__main__":
    sys.exit(main())
