"""Top-k neighbour averaging, ``grasp.ops.topk_neighbor_mean`` (docs/design.md section 4).

The public function validates its inputs, L2-normalises rows for cosine
similarity, walks the queries in blocks of bounded memory, and calls two
kernel steps of the chosen backend: ``topk_neighbor_mean_search`` (streaming exact top-k) and
``topk_neighbor_mean_gather`` (mean of the selected original rows). On GPU tensors the default
``precision="fast"`` searches bfloat16 copies on tensor cores for ``k + margin``
candidates, rescores them in float32 and proves each query's result exact
(searching again in float32 for the rare query it cannot prove);
``precision="highest"`` is a plain float32 search.

Why bfloat16 candidates rather than a tf32x3 search (three TF32 tensor-core
products per float32 product, ``tl.dot(input_precision="tf32x3")``): tf32x3 would
bound the candidate error 7 to 30 times tighter (D = 1536 to 384: its 3D-term
accumulation error remains), so fewer queries would be unproven, but it runs three
passes at the TF32 rate, half the bfloat16 rate, over float32 rows, twice the
bytes: about six times the tensor-core time. The wide candidate margin
(``fast_margin``) keeps the bfloat16 proof failures rare instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grasp import _extension
from grasp.ops import _backends, _cuda_jit, _topk_neighbor_mean_cuda_jit
from grasp.ops._kernel_glue import register_topk_neighbor_mean
from grasp.ops._topk_neighbor_mean_reference import (
    drop_own,
    order_by_score,
    topk_neighbor_mean_gather_reference,
    topk_neighbor_mean_search_reference,
)

__all__ = ["topk_neighbor_mean", "topk_neighbor_mean_distributed", "backend_reason", "AUTO_ORDER", "fast_margin"]

METRICS = ("cosine", "ip")
PRECISIONS = ("fast", "highest")
#: Preference order of ``backend=None`` per device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
#: Bytes of temporaries the blocking aims at per search call (the backend's similarity tiles, outputs).
BLOCK_BYTES = 1 << 30
#: Bytes of temporaries per chunk of the fast path's rescoring (gathered candidate rows, products).
RESCORE_BYTES = 1 << 29
#: From this D on, the Triton backend re-searches the unproven rows of the fast path with a float32
#: matmul + topk (see _research_fn).
MATMUL_RESEARCH_MIN_D = 128
#: Accumulation error of a tensor-core dot product per term, relative to the sum of the terms'
#: magnitudes: tensor cores align the products of a block to the largest and truncate, losing less
#: than one float32 ulp (2^-23) per term and one more when the block is added (Fasi et al., "Numerical
#: behavior of NVIDIA tensor cores", 2021); twice 2^-23 per term covers blocks of two or more terms.
TENSOR_CORE_ACC_UNIT = 2.0**-22

Progress = bool | Callable[[int, int], None]


def backend_reason(backend: str, device_type: str) -> str:
    """Why ``backend`` cannot run the neighbour search on ``device_type`` tensors ("" if it can)."""
    if backend == "faiss":
        why = _backends.import_error("faiss")
        if not why and device_type == "cuda":
            from grasp.ops._topk_neighbor_mean_faiss import has_gpu

            why = "" if has_gpu() else "the installed faiss has no GPU support (install a faiss GPU build)"
        return why
    return _backends.reason("topk_neighbor_mean", backend, device_type, kernel="search")


def fast_margin(k: int) -> int:
    """Extra candidates the fast pass keeps beyond k (before exact rescoring).

    The proof in _fast_search fails for a query when bfloat16 error could reorder its k-th neighbour
    and the last candidate; the wider the list, the larger that gap. The error bound is large next to
    the score gaps of high-dimensional unit vectors, so a short list would send most queries to the
    float32 re-search.
    """
    return max(64, 3 * k)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]


def _proof_bound(low_dtype: torch.dtype, D: int, q_norms: Tensor, max_norm: Tensor) -> Tensor:
    """float64 ``[q]``: a bound on |approximate - exact| + |rescored - exact| of a query's dot products.

    For a float32 query row q and database row x with exact (real) dot product s:

    - approximate score a: q and x rounded to ``low_dtype`` (unit roundoff u), exact products (16-bit
      significands multiply exactly in float32), float32 tensor-core accumulation of the D products.
      Rounding changes each product by at most (2u + u^2)|q_i x_i|, and the accumulation adds at most
      D * TENSOR_CORE_ACC_UNIT * sum|q'_i x'_i| <= D * TENSOR_CORE_ACC_UNIT * (1 + u)^2 * sum|q_i x_i|.
    - rescored score r: float32 products summed in float32 in any order, within
      gamma_(D+1) * sum|q_i x_i|, gamma_m = m 2^-24 / (1 - m 2^-24).

    With sum|q_i x_i| <= |q| |x| <= |q| max|x| (Cauchy-Schwarz) the relative part is
    ``(2u + u^2 + D * TENSOR_CORE_ACC_UNIT * (1 + u)^2 + gamma_(D+1)) * |q| * max|x|``. An absolute part
    covers underflow: a subnormal input component flushed to zero moves the dot product by less than
    2^-126 times the other row's 1-norm (<= sqrt(D) times its norm), and every product or partial sum
    that underflows in the accumulations loses less than 2^-126.

    Args:
        low_dtype: the dtype of the approximate search (bfloat16 or float16).
        D: the rows' length.
        q_norms: ``[q]`` Euclidean norms of the float32 queries (float64).
        max_norm: the largest Euclidean norm of the float32 database rows (float64 scalar tensor).
    """
    u = _unit_roundoff(low_dtype)
    m = (D + 1) * 2.0**-24
    relative = 2 * u + u * u + D * TENSOR_CORE_ACC_UNIT * (1 + u) ** 2 + m / (1 - m)
    absolute = 2.0**-126 * ((1 + u) * D**0.5 * (q_norms + max_norm) + 4 * D)
    return relative * q_norms * max_norm + absolute


def _check(x: Tensor, k: int, queries: Tensor | None, exclude_self: bool, metric: str, precision: str,
           query_start: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"topk_neighbor_mean: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"topk_neighbor_mean: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"topk_neighbor_mean: x must be [n, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"topk_neighbor_mean: x is empty (shape {tuple(x.shape)}); need n >= 1 and D >= 1")
    if metric not in METRICS:
        raise ValueError(f"topk_neighbor_mean: metric must be 'cosine' or 'ip', got {metric!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"topk_neighbor_mean: precision must be 'fast' or 'highest', got {precision!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk_neighbor_mean: k must be an int, got {type(k).__name__}")
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"topk_neighbor_mean: k must be >= 1, got {k}")
    if exclude_self and k > n - 1:
        raise ValueError(f"topk_neighbor_mean: k={k} > n - 1 = {n - 1}: with self excluded only {n - 1} "
                         "neighbours exist")
    if not exclude_self and k > n:
        raise ValueError(f"topk_neighbor_mean: k={k} > n = {n}")
    if queries is not None:
        if not isinstance(queries, Tensor):
            raise TypeError(f"topk_neighbor_mean: queries must be a torch.Tensor, got {type(queries).__name__}")
        if not queries.is_floating_point():
            raise TypeError(f"topk_neighbor_mean: queries must be a floating-point tensor, got {queries.dtype}")
        if queries.dim() != 2 or queries.shape[1] != x.shape[1]:
            raise ValueError(f"topk_neighbor_mean: D mismatch: queries must be [q, {x.shape[1]}] to match x, "
                             f"got {tuple(queries.shape)}")
        if queries.shape[0] == 0:
            raise ValueError("topk_neighbor_mean: queries is empty (q = 0)")
        if queries.device != x.device:
            raise ValueError(f"topk_neighbor_mean: queries is on {queries.device} but x is on {x.device}")
    if query_start < 0:
        raise ValueError(f"topk_neighbor_mean: query_start must be >= 0, got {query_start}")


def _validate(x: Tensor, k: int, queries: Tensor | None, exclude_self: bool, metric: str, precision: str,
              query_start: int, block_size: int | None) -> None:
    """Every argument check of topk_neighbor_mean, on the whole inputs."""
    _check(x, k, queries, exclude_self, metric, precision, query_start)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"topk_neighbor_mean: block_size must be an int >= 1 or None, got {block_size!r}")
    _finite_rows(x, "x")
    q = x.shape[0] if queries is None else queries.shape[0]
    if queries is not None and queries is not x:
        _finite_rows(queries, "queries")
    if exclude_self and query_start + q > x.shape[0]:
        raise ValueError(
            f"topk_neighbor_mean: with exclude_self, query row r is row query_start + r of x, but "
            f"query_start + q = {query_start + q} > n = {x.shape[0]}; pass exclude_self=False for queries "
            "that are not rows of x"
        )


def _finite_rows(t: Tensor, name: str) -> None:
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"topk_neighbor_mean: {name} has NaN or Inf values (first in row {row}; "
                         f"{int(bad.sum())} rows in all)")


def _normalised(t: Tensor, name: str) -> Tensor:
    """Contiguous float32 copy of ``t`` with unit rows; zero rows are an error (cosine is undefined there).

    Norms are taken in float64, so rows of very large or very small magnitude neither overflow nor
    underflow to a wrong zero.
    """
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True, dtype=torch.float64)
    zero = norms.squeeze(1) == 0
    if zero.any():
        row = int(zero.nonzero()[0, 0])
        raise ValueError(f"topk_neighbor_mean: {name} row {row} has zero norm, so its cosine similarity is "
                         f"undefined ({int(zero.sum())} zero rows in all); drop them or use metric='ip'")
    return (t / norms).to(torch.float32).contiguous()


def _search_fn(backend: str) -> Callable[..., tuple[Tensor, Tensor]]:
    if backend == "reference":
        return lambda q, db, k, start, excl: topk_neighbor_mean_search_reference(
            q, db, k, query_start=start, exclude_self=excl
        )
    if backend == "faiss":
        from grasp.ops._topk_neighbor_mean_faiss import search

        return search
    if backend == "triton":  # choosing it imported grasp_kernels.topk_neighbor_mean, which defines the op
        return torch.ops.grasp.topk_neighbor_mean_search_triton
    return torch.ops.grasp.topk_neighbor_mean_search


def _gather_fn(backend: str) -> Callable[[Tensor, Tensor], Tensor]:
    if backend in ("cpu", "cuda"):
        return torch.ops.grasp.topk_neighbor_mean_gather
    if backend == "triton":
        return torch.ops.grasp.topk_neighbor_mean_gather_triton
    return topk_neighbor_mean_gather_reference


def _fp32_matmul_is_ieee() -> bool:
    """Whether torch's float32 CUDA matmuls run in IEEE float32 now: TF32 off, and TunableOp (which may
    choose kernels outside that setting) off."""
    try:
        if torch.cuda.tunable.is_enabled():
            return False
    except AttributeError:  # a torch built without CUDA has no TunableOp
        pass
    try:
        return torch.backends.cuda.matmul.fp32_precision in ("none", "ieee")
    except AttributeError:  # a torch without the fp32_precision API
        return not torch.backends.cuda.matmul.allow_tf32


def _research_fn(backend: str, device_type: str, search: Callable[..., tuple[Tensor, Tensor]],
                 D: int) -> Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]:
    """``research(queries, db32, k)``: the float32 search, without self exclusion, of the rows whose fast
    result is not proven.

    The backend's own float32 search, except for Triton on a GPU: its float32 kernel runs on the FMA
    units, as a cuBLAS float32 matmul does, and the matmul + topk of the reference backend only adds a
    write and a read of one float32 score per (row, database row), which costs less than the 2 D flops
    of that score once D >= MATMUL_RESEARCH_MIN_D. That route is taken only while TF32 cannot reach it.
    """
    if (backend == "triton" and device_type == "cuda" and D >= MATMUL_RESEARCH_MIN_D
            and _fp32_matmul_is_ieee()):
        return lambda queries, db, k: topk_neighbor_mean_search_reference(queries, db, k, exclude_self=False)
    return lambda queries, db, k: search(queries, db, k, 0, False)


def _rescore(q32: Tensor, db32: Tensor, cand: Tensor) -> Tensor:
    """float32 ``[q, width]`` dot products of each query with its candidate rows.

    Elementwise products summed in float32, so that no TF32 matmul setting can reach them, in chunks of
    rows whose gathered ``[rows, width, D]`` temporaries stay within RESCORE_BYTES.
    """
    q, width = cand.shape
    rows = max(1, RESCORE_BYTES // (8 * width * db32.shape[1]))
    out = torch.empty(q, width, dtype=torch.float32, device=q32.device)
    for r0 in range(0, q, rows):
        out[r0 : r0 + rows] = (q32[r0 : r0 + rows].unsqueeze(1) * db32[cand[r0 : r0 + rows]]).sum(-1)
    return out


def _fast_search(search, q32: Tensor, db32: Tensor, db_low: Tensor, k: int, start: int, excl: bool,
                 q_norms: Tensor, max_norm: Tensor, research=None) -> tuple[Tensor, Tensor, int]:
    """Candidates from the reduced-precision copies, exact rescoring, and a per-query proof.

    ``search`` returns the approximate top ``width = k + fast_margin(k)`` of ``db_low``; every row outside
    that list has an approximate score a <= a_last (the last candidate's). The candidates are rescored
    in float32 (r) and ordered. With ``eps = _proof_bound(...)``, a row outside the list has
    r <= a + eps <= a_last + eps, so when the k-th rescored score beats ``a_last + eps`` the result is
    exactly the top k of the rescored scores over all n rows (ties to the smaller index). Queries without
    the proof go to ``research(queries, db32, k)`` (default: ``search`` in float32).

    Args:
        q_norms: float64 ``[q]`` norms of the queries; max_norm: float64 largest norm of the rows.

    Returns:
        (scores, indices, number of queries searched again).
    """
    n = db32.shape[0]
    width = min(k + fast_margin(k), n - (1 if excl else 0))
    approx, cand = search(q32.to(db_low.dtype), db_low, width, start, excl)
    exact, cand = order_by_score(_rescore(q32, db32, cand), cand)
    scores, indices = exact[:, :k].contiguous(), cand[:, :k].contiguous()
    if width == n - (1 if excl else 0):
        return scores, indices, 0  # every row was a candidate: nothing can be missing
    eps = _proof_bound(db_low.dtype, db32.shape[1], q_norms, max_norm)
    unproven = ~(scores[:, -1].double() > approx[:, -1].double() + eps)
    redo = unproven.nonzero().squeeze(1)
    if redo.numel():
        research = research or (lambda queries, db, kk: search(queries, db, kk, 0, False))
        # Exact search for the unproven rows (not contiguous, so their own row is dropped here).
        s, i = research(q32[redo].contiguous(), db32, min(k + 1, n) if excl else k)
        if excl:
            s, i = drop_own(s, i, redo + start, k)
        scores[redo], indices[redo] = s, i
    return scores, indices, int(redo.numel())


@torch.no_grad()
def topk_neighbor_mean(
    x: Tensor,
    k: int,
    *,
    queries: Tensor | None = None,
    exclude_self: bool | None = None,
    metric: str = "cosine",
    return_indices: bool = False,
    precision: str = "fast",
    backend: str | None = None,
    query_start: int = 0,
    block_size: int | None = None,
    progress: Progress = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Mean of each query's k most similar rows of ``x`` (docs/design.md section 4).

    Args:
        x: ``[n, D]`` database (float32, float16, bfloat16 or float64), any device.
        k: neighbours per query, ``1 <= k <= n - 1`` with self excluded (``<= n`` otherwise).
        queries: ``[q, D]``; default ``x`` itself.
        exclude_self: query row r never selects row ``query_start + r`` of x. Default: True when the
            queries are x itself (``queries`` None or ``x``), False for other queries; pass True for a
            slice of x together with its ``query_start``.
        metric: ``"cosine"`` (rows L2-normalised first; zero rows are an error) or ``"ip"``.
        return_indices: also return the neighbour indices and their similarity scores.
        precision: ``"fast"`` (default) or ``"highest"``; both return the exact top k of float32 dot
            products (up to float32 rounding of near-equal scores). On GPU tensors ``"fast"`` runs on tensor
            cores: a search of bfloat16 copies for ``k + fast_margin(k)`` candidates, their float32
            rescoring, and a per-query proof with a rigorous bound of both computations' rounding
            (``_proof_bound``) that no other row can beat the k-th; the rare query without a proof is
            searched again in float32. ``"highest"`` is a plain float32 search (float32 products on the
            FMA units, never TF32, whose peak rate is about 7% of the bfloat16 tensor-core peak on an
            H100 datasheet), kept as an option. On CPU tensors both run the float32 search (no cheaper
            pass keeps the guarantee there). Autocast is ignored: the search always runs in float32
            (bfloat16 for the fast candidates) and the mean comes back in x's dtype.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"faiss"``; None picks the
            fastest available (``GRASP_BACKEND`` overrides that choice).
        query_start: index in x of the first query row (for self exclusion when ``queries`` is a slice
            of x, e.g. in a sharded run).
        block_size: queries per search call, >= 1 (default: bounded by ``BLOCK_BYTES`` of the search's
            temporaries; the fast path's rescoring runs in its own chunks of ``RESCORE_BYTES``).
        progress: True for a progress bar, or a callable ``(done, total)`` called after each block.

    Returns:
        ``mean [q, D]`` in x's dtype, or ``(mean, indices int64 [q, k], scores float32 [q, k])`` with
        neighbours in descending order of similarity, equal scores ordered by the smaller index.

    Example:
        >>> import torch, grasp
        >>> emb = torch.randn(1000, 64)
        >>> mean, idx, scores = grasp.ops.topk_neighbor_mean(emb, 10, return_indices=True)
        >>> mean.shape, idx.shape
        (torch.Size([1000, 64]), torch.Size([1000, 10]))
    """
    if exclude_self is None:
        exclude_self = queries is None or queries is x
    _validate(x, k, queries, exclude_self, metric, precision, query_start, block_size)
    name = _backends.choose("topk_neighbor_mean", backend, x.device.type, AUTO_ORDER, backend_reason)
    with _backends.autocast_off(x.device.type):
        mean, indices, scores = _search_and_mean(x, k, queries, exclude_self, metric, precision, name,
                                                 query_start, block_size, progress)
    return (mean, indices, scores) if return_indices else mean


def _search_and_mean(x: Tensor, k: int, queries: Tensor | None, exclude_self: bool, metric: str, precision: str,
                     name: str, query_start: int, block_size: int | None,
                     progress: Progress) -> tuple[Tensor, Tensor, Tensor]:
    """The body of topk_neighbor_mean on validated arguments and a chosen backend: (mean, indices, scores)."""
    search, gather = _search_fn(name), _gather_fn(name)
    db32 = _normalised(x, "x") if metric == "cosine" else x.float().contiguous()
    if queries is None or queries is x:
        q32 = db32
    else:
        q32 = _normalised(queries, "queries") if metric == "cosine" else queries.float().contiguous()
    nq, n, D = q32.shape[0], db32.shape[0], db32.shape[1]
    fast = precision == "fast" and x.device.type == "cuda"
    width = min(k + fast_margin(k), n - (1 if exclude_self else 0)) if fast else k
    if fast:
        db_low = db32.bfloat16()
        max_norm = torch.linalg.vector_norm(db32, dim=1, dtype=torch.float64).max()
        q_norms = torch.linalg.vector_norm(q32, dim=1, dtype=torch.float64)
        research = _research_fn(name, x.device.type, search, D)

    # The search call's own temporaries: the backends' similarity tiles (up to 8192 per query) and the
    # (approximate) scores and indices of its width.
    per_query = 4 * min(n, 8192) + 16 * width
    block = block_size or max(1, min(nq, BLOCK_BYTES // per_query))
    x_rows = x.contiguous()
    mean = torch.empty(nq, D, dtype=x.dtype, device=x.device)
    scores = torch.empty(nq, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(nq, k, dtype=torch.int64, device=x.device)
    bar = _progress_bar(nq, progress)
    for start in range(0, nq, block):
        stop = min(nq, start + block)
        qb = q32[start:stop].contiguous()
        if fast:
            s, i, _ = _fast_search(search, qb, db32, db_low, k, query_start + start, exclude_self,
                                   q_norms[start:stop], max_norm, research)
        else:
            s, i = search(qb, db32, k, query_start + start, exclude_self)
        scores[start:stop], indices[start:stop] = s, i
        mean[start:stop] = gather(x_rows, i)
        bar(stop - start)
    bar(None)
    return mean, indices, scores


def _progress_bar(total: int, progress: Progress) -> Callable[[int | None], None]:
    """A function that advances the bar by a count, or closes it when given None."""
    if callable(progress):
        done = [0]

        def advance(count: int | None) -> None:
            if count is not None:
                done[0] += count
                progress(done[0], total)

        return advance
    if not progress:
        return lambda count: None
    from grasp._console import progress as progress_bar

    bar = progress_bar(total, "top-k neighbours", "query")
    return lambda count: bar.close() if count is None else bar.update(count)


def topk_neighbor_mean_distributed(
    x: Tensor,
    k: int,
    *,
    queries: Tensor | None = None,
    group=None,
    return_indices: bool = False,
    **kwargs,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """:func:`topk_neighbor_mean` sharded over the ranks of a ``torch.distributed`` process group.

    Every rank holds the whole database ``x`` and takes a contiguous slice of the queries (``x``
    itself by default); the slices' results are all-gathered, so every rank returns the full
    result, equal to the single-process one. Works with any backend of the op and any process
    group backend that supports ``all_gather`` for the tensors' device (gloo on CPU, NCCL on GPU).

    Example (``torchrun --nproc-per-node 2 script.py``)::

        torch.distributed.init_process_group("gloo")
        mean = topk_neighbor_mean_distributed(emb, 10, progress=True)
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("topk_neighbor_mean_distributed: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or use topk_neighbor_mean)")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    all_queries = x if queries is None else queries
    total = all_queries.shape[0]
    query_start = kwargs.pop("query_start", 0)
    exclude_self = kwargs.pop("exclude_self", None)
    if exclude_self is None:
        exclude_self = queries is None or queries is x
    # Validate the whole inputs on every rank, so that all ranks raise together instead of one rank
    # failing on its slice while the others wait in all_gather.
    _validate(x, k, queries, exclude_self, kwargs.get("metric", "cosine"), kwargs.get("precision", "fast"),
              query_start, kwargs.get("block_size"))
    per_rank = -(-total // world)
    lo, hi = min(total, rank * per_rank), min(total, (rank + 1) * per_rank)
    D = x.shape[1]
    if hi > lo:
        mean, indices, scores = topk_neighbor_mean(
            x, k, queries=all_queries[lo:hi], query_start=query_start + lo, exclude_self=exclude_self,
            return_indices=True, **kwargs
        )
    else:  # more ranks than queries: this rank only takes part in the gather
        mean = x.new_empty(0, D)
        indices = torch.empty(0, k, dtype=torch.int64, device=x.device)
        scores = torch.empty(0, k, dtype=torch.float32, device=x.device)

    def gather(t: Tensor) -> Tensor:
        padded = t.new_zeros(per_rank, *t.shape[1:])
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat(parts)[:total]

    mean, indices, scores = gather(mean), gather(indices), gather(scores)
    return (mean, indices, scores) if return_indices else mean


if _extension.has_op("topk_neighbor_mean_search"):
    register_topk_neighbor_mean("grasp::topk_neighbor_mean_search", "grasp::topk_neighbor_mean_gather")
    _cuda_jit.register("topk_neighbor_mean_search", _topk_neighbor_mean_cuda_jit.search)
    _cuda_jit.register("topk_neighbor_mean_gather", _topk_neighbor_mean_cuda_jit.gather)
