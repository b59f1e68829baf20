"""Byte and FLOP model of grasp's GPU kernels: the least each kernel must move and compute.

A GPU benchmark turns a measured time into achieved fractions of the measured ceilings with
:func:`fractions`; ``benchmarks/gpu_code_report.py`` prints the model at the target shapes.

Assumptions (the same for every kernel):

- bytes: each input is read once and each output written once, in its own dtype (float32 4 B, float16 and
  bfloat16 2 B, int64 indices 8 B); re-reads that a kernel makes (a second pass over a softmax row, a
  database tile read by every query tile, a table row gathered by many pairs) are not counted, so
  ``bytes / time`` is a lower bound of the traffic and its fraction of the copy bandwidth is the kernel's
  efficiency against an ideal one-pass kernel;
- FLOPs: a multiply or an add is one FLOP (a fused multiply-add two); per-position O(1) work (gates,
  exponentials, the top-k bookkeeping) is not counted;
- no mask (every position live), and a broadcast ``[B, d]`` user unless ``per_position``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "HAE", "KNN", "PROJECTED", "Work", "fast_width", "fractions", "holistic_attention_backward",
    "holistic_attention_forward", "projected_backward", "projected_forward", "rescore", "target_work",
    "topk_neighbor_mean", "topk_neighbor_mean_gather", "topk_neighbor_mean_search",
]

#: Bytes per element of the dtypes the kernels take.
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_INDEX_BYTES = 8
_SCORE_BYTES = 4

#: Target shapes of the holistic-attention op: a training batch of B sequences of L positions.
HAE = dict(B=2048, L=200, d=(50, 64, 128, 256), dtypes=("fp32", "fp16", "bf16"))
#: Target shapes of the projected op: N = B * L pairs of U users and M items, (d, e) widths.
PROJECTED = dict(N=2048 * 200, U=2048, M=20000, de=((64, 64), (50, 50)), dtypes=("fp32", "bf16"))
#: Target shapes of the neighbour search: n database rows of width D, k neighbours, q queries per call
#: (a full block, larger than any query tile, or the few rows a re-search proves again).
KNN = dict(n=1_000_000, D=(384, 1536), q=(32768, 5), k=10, dtypes=("fp32", "bf16"))


@dataclass(frozen=True)
class Work:
    """The least a kernel (or a sequence of kernels) must move and compute at one shape."""

    name: str
    shape: str
    bytes: int
    flops: int

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes

    def __add__(self, other: Work) -> Work:
        return Work(f"{self.name}+{other.name}", self.shape, self.bytes + other.bytes, self.flops + other.flops)


def fractions(work: Work, seconds: float, copy_bytes_per_s: float, matmul_flops_per_s: float) -> dict[str, float]:
    """Achieved rates of ``work`` done in ``seconds`` and their fractions of the measured ceilings.

    ``copy_bytes_per_s`` is the measured device copy bandwidth (bytes read + written per second);
    ``matmul_flops_per_s`` the measured matmul rate of the dtype the kernel computes in (bf16 tensor cores
    for a bf16 search, float32 FMA for an exact float32 one). ``bound`` is the larger fraction: how close
    the kernel is to the ceiling that limits it.
    """
    if seconds <= 0 or copy_bytes_per_s <= 0 or matmul_flops_per_s <= 0:
        raise ValueError("fractions: seconds and both ceilings must be > 0")
    bytes_per_s, flops_per_s = work.bytes / seconds, work.flops / seconds
    of_copy, of_matmul = bytes_per_s / copy_bytes_per_s, flops_per_s / matmul_flops_per_s
    return dict(bytes_per_s=bytes_per_s, flops_per_s=flops_per_s, of_copy=of_copy, of_matmul=of_matmul,
                bound=max(of_copy, of_matmul))


def _user_elems(B: int, L: int, d: int, per_position: bool) -> int:
    return B * (L if per_position else 1) * d


def holistic_attention_forward(B: int, L: int, d: int, dtype: str, per_position: bool = False) -> Work:
    """Reads user, user_sim, item, item_sim; writes out [B, L, 4d]. Per position: two d-wide dot
    products (4d) and four d-wide gate products (4d)."""
    size = DTYPE_BYTES[dtype]
    elems = 2 * _user_elems(B, L, d, per_position) + 2 * B * L * d + 4 * B * L * d
    shape = f"B={B} L={L} d={d} {'per-position' if per_position else 'broadcast'} {dtype}"
    return Work("holistic_attention_forward", shape, elems * size, 8 * B * L * d)


def holistic_attention_backward(B: int, L: int, d: int, dtype: str, per_position: bool = False) -> Work:
    """Reads grad_out [B, L, 4d] and the four inputs; writes the four gradients. Per position: the two
    dot products again (4d), the gate gradients <g1, i>, <g2, ī>, <g3, i> + <g4, ī> (8d), the item
    gradients a·g + a·g + ds·u (10d) and the user gradients ds·i (2d, plus 2d to sum a broadcast user's
    over L)."""
    size = DTYPE_BYTES[dtype]
    user = _user_elems(B, L, d, per_position)
    elems = 4 * B * L * d + 2 * (2 * user + 2 * B * L * d)
    flops = B * L * d * (4 + 8 + 10 + (2 if per_position else 4))
    shape = f"B={B} L={L} d={d} {'per-position' if per_position else 'broadcast'} {dtype}"
    return Work("holistic_attention_backward", shape, elems * size, flops)


def _projected_tables(U: int, M: int, d: int, e: int) -> int:
    """Elements of user, user_sim [U, d], item, item_sim [M, d] and values [M, 3, e]."""
    return 2 * U * d + 2 * M * d + 3 * M * e


def projected_forward(N: int, U: int, M: int, d: int, e: int, dtype: str) -> Work:
    """Reads the tables and both int64 indices [N]; writes out [N, e]. Per pair: two dot products (4d)
    and the mix of three value rows (5e)."""
    size = DTYPE_BYTES[dtype]
    moved = (_projected_tables(U, M, d, e) + N * e) * size + 2 * N * _INDEX_BYTES
    return Work("projected_forward", f"N={N} U={U} M={M} d={d} e={e} {dtype}", moved, N * (4 * d + 5 * e))


def projected_backward(N: int, U: int, M: int, d: int, e: int, dtype: str) -> Work:
    """Reads grad_out [N, e], the tables and the indices; writes the five gradients (the tables' shapes).
    Per pair: the dot products again (4d), the three gate gradients (6e), the value gradients
    accumulated (6e) and the four row gradients accumulated (8d)."""
    size = DTYPE_BYTES[dtype]
    moved = (2 * _projected_tables(U, M, d, e) + N * e) * size + 2 * N * _INDEX_BYTES
    return Work("projected_backward", f"N={N} U={U} M={M} d={d} e={e} {dtype}", moved, N * (12 * d + 12 * e))


def topk_neighbor_mean_search(q: int, n: int, D: int, k: int, dtype: str) -> Work:
    """Reads the queries [q, D] and the database [n, D] once; writes float32 scores and int64 indices
    [q, k]. FLOPs: the q x n inner products of length D (2qnD)."""
    size = DTYPE_BYTES[dtype]
    moved = (q + n) * D * size + q * k * (_SCORE_BYTES + _INDEX_BYTES)
    return Work("topk_neighbor_mean_search", f"q={q} n={n} D={D} k={k} {dtype}", moved, 2 * q * n * D)


def topk_neighbor_mean_gather(q: int, n: int, D: int, k: int, dtype: str) -> Work:
    """Reads the indices [q, k] and the k selected rows of x per query (at most n distinct rows);
    writes the means [q, D]. FLOPs: k adds and one scale per output element."""
    size = DTYPE_BYTES[dtype]
    moved = q * k * _INDEX_BYTES + min(n, q * k) * D * size + q * D * size
    return Work("topk_neighbor_mean_gather", f"q={q} n={n} D={D} k={k} {dtype}", moved, q * D * (k + 1))


def rescore(q: int, n: int, D: int, width: int) -> Work:
    """The fast path's exact rescoring: reads the float32 queries, the float32 database (at most n distinct
    candidate rows) and the int64 candidates [q, width]; writes float32 scores [q, width]. FLOPs: the
    q * width inner products of length D."""
    moved = q * D * 4 + min(n, q * width) * D * 4 + q * width * (_INDEX_BYTES + _SCORE_BYTES)
    return Work("rescore", f"q={q} n={n} D={D} width={width} fp32", moved, 2 * q * width * D)


def topk_neighbor_mean(n: int, D: int, k: int, dtype: str = "fp32", q: int | None = None,
                       width: int | None = None) -> Work:
    """The whole op on q queries (all n rows by default) for rows of ``dtype``.

    ``width`` None: the exact float32 search of k neighbours (``precision="highest"``). Otherwise the
    fast path: a bfloat16 search for ``width`` candidates (``k + fast_margin(k)``), their float32
    rescoring, and no re-search (each query proven). Then the gather-mean of the k neighbours.
    """
    q = n if q is None else q
    if width is None:
        total = topk_neighbor_mean_search(q, n, D, k, "fp32")
    else:
        total = topk_neighbor_mean_search(q, n, D, width, "bf16") + rescore(q, n, D, width)
    total += topk_neighbor_mean_gather(q, n, D, k, dtype)
    path = "highest" if width is None else f"fast width={width}"
    return Work("topk_neighbor_mean", f"q={q} n={n} D={D} k={k} {dtype} {path}", total.bytes, total.flops)


def target_work() -> Iterator[Work]:
    """The model of every kernel at every target shape (broadcast and per-position users for HAE)."""
    for d in HAE["d"]:
        for per_position in (False, True):
            for dtype in HAE["dtypes"]:
                yield holistic_attention_forward(HAE["B"], HAE["L"], d, dtype, per_position)
                yield holistic_attention_backward(HAE["B"], HAE["L"], d, dtype, per_position)
    for d, e in PROJECTED["de"]:
        for dtype in PROJECTED["dtypes"]:
            yield projected_forward(PROJECTED["N"], PROJECTED["U"], PROJECTED["M"], d, e, dtype)
            yield projected_backward(PROJECTED["N"], PROJECTED["U"], PROJECTED["M"], d, e, dtype)
    width = fast_width(KNN["k"])
    for D in KNN["D"]:
        for q in KNN["q"]:
            for dtype in KNN["dtypes"]:
                yield topk_neighbor_mean_search(q, KNN["n"], D, KNN["k"], dtype)
            yield topk_neighbor_mean_search(q, KNN["n"], D, width, "bf16")
            yield rescore(q, KNN["n"], D, width)
            for dtype in KNN["dtypes"]:
                yield topk_neighbor_mean_gather(q, KNN["n"], D, KNN["k"], dtype)


def fast_width(k: int) -> int:
    """Candidates of the fast path's bfloat16 search for k neighbours (``k + fast_margin(k)``)."""
    from grasp.ops.topk_neighbor_mean import fast_margin

    return k + fast_margin(k)
