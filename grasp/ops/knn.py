"""Top-k neighbour averaging, ``grasp.ops.topk_neighbor_mean`` (DESIGN.md section 3).

The public function validates its inputs, L2-normalises rows for cosine
similarity, walks the queries in blocks of bounded memory, and calls two
kernel steps of the chosen backend: ``knn_search`` (streaming exact top-k) and
``gather_mean`` (mean of the selected original rows). ``precision="fast"``
searches reduced-precision copies for ``k + margin`` candidates, rescores them
in float32 and proves each query's result exact (falling back to a float32
search for the rare query it cannot prove).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from grasp.ops import _backends
from grasp.ops._knn_reference import drop_own, gather_mean_reference, knn_search_reference, order_by_score

__all__ = ["topk_neighbor_mean", "topk_neighbor_mean_distributed", "backend_reason", "AUTO_ORDER", "fast_margin"]

METRICS = ("cosine", "ip")
PRECISIONS = ("highest", "fast")
_KERNEL_MODULE = "grasp_kernels.knn"
#: Preference order of ``backend=None`` per device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
#: Bytes of temporaries the blocking aims at per query block (similarity tiles, rescoring rows).
BLOCK_BYTES = 1 << 30

Progress = bool | Callable[[int, int], None]


def backend_reason(backend: str, device_type: str) -> str:
    """Why ``backend`` cannot run the neighbour search on ``device_type`` tensors ("" if it can)."""
    if backend == "reference":
        return ""
    if backend in ("cpu", "cuda"):
        return _backends.extension_reason(backend, device_type, "knn_search")
    if backend == "triton":
        return _backends.triton_reason(device_type, _KERNEL_MODULE)
    if backend == "faiss":
        why = _backends.import_error("faiss")
        if not why and device_type == "cuda":
            from grasp.ops._knn_faiss import has_gpu

            why = "" if has_gpu() else "the installed faiss has no GPU support (install a faiss GPU build)"
        return why
    return f"{backend!r} is not a backend of topk_neighbor_mean"


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
        raise ValueError(f"topk_neighbor_mean: precision must be 'highest' or 'fast', got {precision!r}")
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
        return lambda q, db, k, start, excl: knn_search_reference(q, db, k, query_start=start, exclude_self=excl)
    if backend == "faiss":
        from grasp.ops._knn_faiss import search

        return search
    if backend == "triton":
        import grasp_kernels.knn  # noqa: F401  (registers grasp::knn_search_triton)

        return torch.ops.grasp.knn_search_triton
    return torch.ops.grasp.knn_search


def _gather_mean_fn(backend: str) -> Callable[[Tensor, Tensor], Tensor]:
    if backend in ("cpu", "cuda"):
        return torch.ops.grasp.gather_mean
    if backend == "triton":
        import grasp_kernels.knn  # noqa: F401

        return torch.ops.grasp.gather_mean_triton
    return gather_mean_reference


def _fast_search(search, q32: Tensor, db32: Tensor, db_low: Tensor, k: int, start: int, excl: bool,
                 bound_scale: Tensor) -> tuple[Tensor, Tensor, int]:
    """Candidates from the reduced-precision copies, exact rescoring, and a per-query proof.

    A dot product of rows rounded to unit roundoff u (accumulated in float32 over D terms, with
    truncating tensor-core accumulation allowed for) is off by at most
    eps = (2u + u^2 + D * 2^-23 * (1 + u)^2) * |q| * max|x|. Every row outside the candidate list has an
    approximate score <= c_last, so its exact score is <= c_last + eps: when the k-th exact score
    beats c_last + eps the top-k is proven. Queries without the proof are searched again in float32.
    Returns (scores, indices, number of queries searched again).
    """
    n = db32.shape[0]
    width = min(k + fast_margin(k), n - (1 if excl else 0))
    approx, cand = search(q32.to(db_low.dtype), db_low, width, start, excl)
    # float32 rescoring, elementwise so that no TF32 matmul setting can reach it.
    exact, cand = order_by_score((q32.unsqueeze(1) * db32[cand]).sum(-1), cand)
    scores, indices = exact[:, :k].contiguous(), cand[:, :k].contiguous()
    if width == n - (1 if excl else 0):
        return scores, indices, 0  # every row was a candidate: nothing can be missing
    u = _unit_roundoff(db_low.dtype)
    eps = (2 * u + u * u + db32.shape[1] * 2.0**-23 * (1 + u) ** 2) * bound_scale
    unproven = ~(scores[:, -1] > approx[:, -1] + eps)
    redo = unproven.nonzero().squeeze(1)
    if redo.numel():
        # Exact search for the unproven rows (not contiguous, so their own row is dropped here).
        s, i = search(q32[redo].contiguous(), db32, min(k + 1, n) if excl else k, 0, False)
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
    precision: str = "highest",
    backend: str | None = None,
    query_start: int = 0,
    block_size: int | None = None,
    progress: Progress = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Mean of each query's k most similar rows of ``x`` (DESIGN.md section 3).

    Args:
        x: ``[n, D]`` database (float32, float16, bfloat16 or float64), any device.
        k: neighbours per query, ``1 <= k <= n - 1`` with self excluded (``<= n`` otherwise).
        queries: ``[q, D]``; default ``x`` itself.
        exclude_self: query row r never selects row ``query_start + r`` of x. Default: True when the
            queries are x itself (``queries`` None or ``x``), False for other queries; pass True for a
            slice of x together with its ``query_start``.
        metric: ``"cosine"`` (rows L2-normalised first; zero rows are an error) or ``"ip"``.
        return_indices: also return the neighbour indices and their similarity scores.
        precision: ``"highest"`` searches with float32 dot products. ``"fast"`` searches bfloat16
            copies (GPU) for ``k + fast_margin(k)`` candidates, rescores them exactly in float32 and
            proves the result per query, searching again in float32 where the proof fails, so the
            result equals ``"highest"`` except on exact ties. On CPU tensors there is no cheaper pass
            that keeps that guarantee, so ``"fast"`` runs the ``"highest"`` search.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"faiss"``; None picks the
            fastest available (``GRASP_BACKEND`` overrides that choice).
        query_start: index in x of the first query row (for self exclusion when ``queries`` is a slice
            of x, e.g. in a sharded run).
        block_size: queries per block, >= 1 (default: bounded by ``BLOCK_BYTES`` of temporaries).
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
    self_queries = queries is None or queries is x
    if exclude_self is None:
        exclude_self = self_queries
    _validate(x, k, queries, exclude_self, metric, precision, query_start, block_size)
    name = _backends.choose("topk_neighbor_mean", backend, x.device.type, AUTO_ORDER, backend_reason)
    search, gather_mean = _search_fn(name), _gather_mean_fn(name)

    db32 = _normalised(x, "x") if metric == "cosine" else x.float().contiguous()
    if self_queries:
        q32 = db32
    else:
        q32 = _normalised(queries, "queries") if metric == "cosine" else queries.float().contiguous()
    fast = precision == "fast" and x.device.type == "cuda"
    db_low = db32.bfloat16() if fast else None
    if fast:
        max_norm = torch.linalg.vector_norm(db32, dim=1).max()
        q_norms = torch.linalg.vector_norm(q32, dim=1)

    nq, n, D = q32.shape[0], db32.shape[0], db32.shape[1]
    per_query = 4 * (min(n, 8192) + ((k + fast_margin(k)) * D if fast else 0)) + 8 * k
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
                                   q_norms[start:stop] * max_norm)
        else:
            s, i = search(qb, db32, k, query_start + start, exclude_self)
        scores[start:stop], indices[start:stop] = s, i
        mean[start:stop] = gather_mean(x_rows, i)
        bar(stop - start)
    bar(None)
    return (mean, indices, scores) if return_indices else mean


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
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="query", desc="top-k neighbours", smoothing=0.1)
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
    _validate(x, k, queries, exclude_self, kwargs.get("metric", "cosine"), kwargs.get("precision", "highest"),
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
