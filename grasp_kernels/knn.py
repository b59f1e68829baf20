"""Fused Triton kernels of the top-k neighbour operator (DESIGN.md section 3).

Two kernel steps, called by ``grasp.ops.topk_neighbor_mean`` (grasp/ops/knn.py):

- ``knn_search(queries [q, D], db [n, D], k, query_start, exclude_self)``: for every query row r the k
  database rows with the largest inner product, as float32 scores in descending order and int64
  indices, equal scores ordered by the smaller index; with ``exclude_self`` row r never selects
  database row ``query_start + r``.
- ``gather_mean(x [n, D], indices [q, k])``: the mean of the rows ``x[indices[r]]``, accumulated in
  float32 (float64 for float64 x), in x's dtype.

Search kernel design: one program per tile of BLOCK_Q queries streams the database in tiles of BLOCK_N
rows. Each [BLOCK_Q, BLOCK_N] score tile comes from tl.dot over D (in BLOCK_D chunks, or in one
piece with the query tile loaded once when D fits a chunk), accumulated in float32; float32 inputs
use input_precision="ieee" so they are not rounded to tf32. Nothing of size q x n exists: the only
state carried across tiles is a running top-k per query, K_PAD = next_power_of_2(k) int64 keys in
registers.

A key packs (score, index) into one int64 whose integer order is the neighbour order: the score's
float bits, remapped so that signed-integer order is float order, in the high 32 bits, and
INT32_MAX - index in the low 32 bits (indices fit 31 bits). Larger key = better neighbour, so "score
greater, or equal score and smaller index" is a single integer comparison and ties need no special
handling anywhere. The running list is unordered; its smallest key (the current k-th best) is kept
with its slot. Merging a score tile into it:

1. Gate: tiles arrive in increasing index order, so a tile element beats the k-th best only if its
   score is strictly greater (an equal score has the larger index). If no element of the tile beats
   its row's k-th best score (one float max per row), the tile is skipped. Past the first few tiles
   this is the common case.
2. Otherwise the tile's keys are taken best-first per row: while some row's best remaining key
   beats its k-th best, that key replaces the k-th best in its slot, is removed from the tile, and
   the new k-th best is found (min over K_PAD keys). A row stops taking at the first key that does
   not beat its k-th best (every later one is smaller); the loop ends when all rows have stopped,
   after at most min(k, BLOCK_N) insertions per row.

Padding slots (k..K_PAD-1) hold INT64_MAX, so they are never the k-th best. At the end they are
cleared and the k keys are written out best-first (k rounds of a row max), then decoded.

Gather-mean kernel: one program per [BLOCK_R rows, BLOCK_D columns] block of the output loops over
the k neighbours, loading one (masked) row slice of x per query row each step.

``knn_search`` and ``gather_mean`` launch the kernels; the torch.library ops
``grasp::knn_search_triton`` and ``grasp::gather_mean_triton`` wrap them (no autograd).
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["gather_mean", "knn_search"]

# TRITON_INTERPRET=1 runs the kernels on CPU tensors in Triton's NumPy interpreter (tests). There is
# nothing to tune then, and the kernels are launched directly rather than through wrap_triton, which
# only serves torch.compile's tracing of the triton_ops (see the op definitions below).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_SEARCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits; there the operands
# are upcast to float32 first (exact: products of 16-bit floats are exact in float32).
_UPCAST_DOT_OPERANDS = tl.constexpr(_INTERPRET)

_INT32_MAX = tl.constexpr(2**31 - 1)
_INT64_MIN = tl.constexpr(-(2**63))
_INT64_MAX = tl.constexpr(2**63 - 1)

# Smallest tile edge tl.dot takes on the GPU; the query and database tiles are at least this wide in D.
_MIN_DOT = 16

# Per-thread budgets of a search config, from ptxas register counts for sm_90: elements of the
# [BLOCK_Q, BLOCK_N] score tile (float32 tl.dot runs on FMA units with its operands in registers, so
# its tiles must be smaller than those of the 16-bit tensor-core tl.dot), and 32-bit words of the
# [BLOCK_Q, K_PAD] int64 running top-k. Past these, configs spill.
_MAX_TILE_PER_THREAD_FP32 = 16
_MAX_TILE_PER_THREAD_16BIT = 32
_MAX_LIST_WORDS_PER_THREAD = 64
# With fewer score-tile elements per thread than this, threads idle (only worth it for a large k).
_MIN_TILE_PER_THREAD = 8

if _INTERPRET:
    _SEARCH_CONFIGS = [triton.Config({"BLOCK_Q": 16, "BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    _GATHER_CONFIGS = [triton.Config({"BLOCK_R": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
else:
    _SEARCH_CONFIGS = [
        triton.Config({"BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": block_d}, num_warps=warps,
                      num_stages=stages)
        for block_q, block_n, warps in (
            (16, 64, 4), (32, 64, 4), (64, 64, 4), (16, 64, 8), (32, 64, 8), (64, 64, 8), (128, 64, 8), (64, 128, 8)
        )
        for block_d in (16, 32, 64)
        for stages in (2, 3)
    ]
    # num_stages is not tuned: the gather loop holds no tl.dot, so Triton does not software-pipeline
    # it and emits the same code for every num_stages. Blocks stay within 4096 accumulators (a float64
    # [64, 256] block spills).
    _GATHER_CONFIGS = [
        triton.Config({"BLOCK_R": block_r, "BLOCK_D": block_d}, num_warps=warps, num_stages=1)
        for block_r in (4, 16, 64)
        for block_d in (64, 256)
        for warps in (4, 8)
        if block_r * block_d <= 4096
    ]


def _prune_search_configs(configs, named_args, **kwargs):
    """Keep the search configs that can be the fastest for this shape and dtype.

    - Tiles larger than q or n only compute padding (16 queries and 64 rows always stay).
    - float32 takes BLOCK_D <= 32 (FMA operands live in registers), 16-bit dtypes BLOCK_D >= 32.
    - Configs whose BLOCK_D covers D_PAD all run the same kernel (the one-piece path): one stays.
    - The score tile and the running list must fit the per-thread budgets above; configs that leave
      threads idle go too, unless only they fit (a large k). If nothing fits, the config with the
      smallest list per thread runs: it spills registers, but stays correct.
    """
    args = {**named_args, **kwargs}
    q_pad, n_pad = triton.next_power_of_2(args["q"]), triton.next_power_of_2(args["n"])
    d_pad, k_pad = args["D_PAD"], args["K_PAD"]
    fp32 = args["q_ptr"].dtype == torch.float32
    max_tile = _MAX_TILE_PER_THREAD_FP32 if fp32 else _MAX_TILE_PER_THREAD_16BIT

    def per_thread(c):
        """(score-tile elements, running-list words) per thread."""
        threads = 32 * c.num_warps
        return c.kwargs["BLOCK_Q"] * c.kwargs["BLOCK_N"] / threads, 2 * c.kwargs["BLOCK_Q"] * k_pad / threads

    distinct = {}
    for c in configs:
        block_q, block_n, block_d = c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]
        if block_q > max(_MIN_DOT, q_pad) or block_n > max(64, n_pad) or (block_d > 32 if fp32 else block_d < 32):
            continue
        distinct.setdefault((block_q, block_n, min(block_d, d_pad), c.num_warps, c.num_stages), c)
    shaped = list(distinct.values())
    fitting = [c for c in shaped
               if per_thread(c)[0] <= max_tile and per_thread(c)[1] <= _MAX_LIST_WORDS_PER_THREAD]
    busy = [c for c in fitting if per_thread(c)[0] >= _MIN_TILE_PER_THREAD]
    return busy or fitting or [min(shaped, key=lambda c: per_thread(c)[::-1])]


def _prune_gather_configs(configs, named_args, **kwargs):
    """Drop gather configs whose row or column block is much larger than q or D."""
    q_pad, d_pad = triton.next_power_of_2(named_args["q"]), triton.next_power_of_2(named_args["D"])
    fitting = [c for c in configs if c.kwargs["BLOCK_R"] <= max(4, q_pad) and c.kwargs["BLOCK_D"] <= max(64, d_pad)]
    return fitting or configs[:1]


# Every shape argument and flag is in the keys (triton adds the tensors' dtypes itself).
_search_autotune = triton.autotune(
    configs=_SEARCH_CONFIGS,
    key=["q", "n", "D", "k", "EXCLUDE_SELF", "D_PAD", "K_PAD"],
    prune_configs_by={"early_config_prune": _prune_search_configs},
)
_gather_autotune = triton.autotune(
    configs=_GATHER_CONFIGS,
    key=["q", "n", "D", "k"],
    prune_configs_by={"early_config_prune": _prune_gather_configs},
)


@triton.jit
def _encode(scores, cols):
    """int64 keys ordered like neighbours: larger key = larger score, or equal score and smaller index."""
    # -0.0 and +0.0 are equal scores, so they must get the same high word.
    bits = tl.where(scores == 0.0, 0.0, scores).to(tl.int32, bitcast=True)
    # A float's bits read as a signed int grow with the value for positive floats and shrink for
    # negative ones; flipping the 31 value bits of negative floats makes the map increasing.
    ordered = bits ^ ((bits >> 31) & _INT32_MAX)
    # For 0 <= cols < 2**31, ~cols & INT32_MAX = INT32_MAX - cols.
    return (ordered.to(tl.int64) << 32) | (~cols & _INT32_MAX).to(tl.int64)


@triton.jit
def _decode(keys):
    """(float32 score, int32 index) of int64 keys made by _encode."""
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & _INT32_MAX)  # the remap of _encode is its own inverse
    return bits.to(tl.float32, bitcast=True), ~keys.to(tl.int32) & _INT32_MAX


@triton.jit
def _dot_nt(a, b, acc):
    """acc + a @ b.T, float32 products (not tf32) accumulated in float32."""
    if _UPCAST_DOT_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), acc, input_precision="ieee")


@_search_autotune
@triton.jit
def _knn_search_kernel(
    q_ptr, db_ptr, scores_ptr, indices_ptr,
    q, n, D, k, query_start,
    EXCLUDE_SELF: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < q
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * D
    slots = tl.arange(0, K_PAD)

    # Running top-k: unordered keys; empty slots hold the key of (-inf, INT32_MAX), below every real
    # neighbour, and padding slots >= k hold INT64_MAX so that they are never the k-th best.
    empty = _encode(tl.full([BLOCK_Q, K_PAD], float("-inf"), tl.float32),
                    tl.full([BLOCK_Q, K_PAD], _INT32_MAX, tl.int32))
    topk = tl.where(slots[None, :] < k, empty, _INT64_MAX)
    worst, worst_slot = tl.min(topk, axis=1, return_indices=True)  # the k-th best key and its slot
    threshold = _decode(worst)[0]  # its score

    if BLOCK_D >= D_PAD:  # the query rows fit one chunk: load them once
        offs_d = tl.arange(0, D_PAD)
        q_tile = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)

    for n0 in range(0, n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        db_rows = db_ptr + cols.to(tl.int64)[:, None] * D
        if BLOCK_D >= D_PAD:
            db_tile = tl.load(db_rows + offs_d[None, :], mask=(cols < n)[:, None] & (offs_d < D)[None, :], other=0.0)
            scores = _dot_nt(q_tile, db_tile, tl.zeros([BLOCK_Q, BLOCK_N], tl.float32))
        else:
            scores = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = (offs_d < D)[None, :]
                q_chunk = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                db_chunk = tl.load(db_rows + offs_d[None, :], mask=(cols < n)[:, None] & d_ok, other=0.0)
                scores = _dot_nt(q_chunk, db_chunk, scores)

        live = row_ok[:, None] & (cols < n)[None, :]
        if EXCLUDE_SELF:
            live = live & (cols[None, :] != (query_start + rows)[:, None])
        scores = tl.where(live, scores, float("-inf"))

        # Gate (1.): does any element of the tile beat its row's k-th best? Strictly greater, as
        # every column here has a larger index than every key in the list.
        if tl.max((tl.max(scores, axis=1) > threshold).to(tl.int32), axis=0) > 0:
            keys = tl.where(live, _encode(scores, cols[None, :]), _INT64_MIN)
            best = tl.max(keys, axis=1)
            # Best-first insertion (2.). Rows that have stopped keep best <= worst, so they take nothing.
            while tl.max((best > worst).to(tl.int32), axis=0) > 0:
                take = (best > worst)[:, None] & (slots[None, :] == worst_slot[:, None])
                topk = tl.where(take, best[:, None], topk)
                keys = tl.where(keys == best[:, None], _INT64_MIN, keys)
                best = tl.max(keys, axis=1)
                worst, worst_slot = tl.min(topk, axis=1, return_indices=True)
            threshold = _decode(worst)[0]

    # Output: clear the padding slots, then take the keys best-first, one output column per step.
    topk = tl.where(slots[None, :] < k, topk, _INT64_MIN)
    out = rows.to(tl.int64) * k
    for c in range(0, k):
        best = tl.max(topk, axis=1)
        score, index = _decode(best)
        tl.store(scores_ptr + out + c, score, mask=row_ok)
        tl.store(indices_ptr + out + c, index.to(tl.int64), mask=row_ok)
        topk = tl.where(topk == best[:, None], _INT64_MIN, topk)


@_gather_autotune
@triton.jit
def _gather_mean_kernel(
    x_ptr, indices_ptr, out_ptr,
    q, n, D, k,
    F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < q
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    if F64:
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float64)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    neighbours = indices_ptr + rows.to(tl.int64) * k
    for j in range(0, k):
        nb = tl.load(neighbours + j, mask=row_ok, other=0)
        acc += tl.load(x_ptr + nb[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(acc.dtype)
    out = out_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out, (acc / k).to(out_ptr.dtype.element_ty), mask=mask)


def knn_search(queries: Tensor, db: Tensor, k: int, query_start: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-k of every query row against ``db``.

    Args:
        queries: ``[q, D]``; db: ``[n, D]``. Contiguous, one float32/float16/bfloat16 dtype and device
            (the caller validates them; other dtypes raise TypeError).
        k: neighbours per query, ``1 <= k <= n`` (``<= n - 1`` with ``exclude_self``).
        query_start: query row r is database row ``query_start + r`` (for self exclusion).
        exclude_self: query row r never selects database row ``query_start + r``.

    Returns:
        ``scores`` float32 ``[q, k]`` in descending order and ``indices`` int64 ``[q, k]``, equal
        scores ordered by the smaller index. Scores are float32-accumulated dot products.
    """
    if queries.dtype not in _SEARCH_DTYPES:
        raise TypeError(f"knn_search Triton kernel takes float32, float16 or bfloat16, not {queries.dtype}")
    if not (queries.is_contiguous() and db.is_contiguous()):
        raise ValueError("knn_search Triton kernel: queries and db must be contiguous (rows of D values)")
    q, D = queries.shape
    n = db.shape[0]
    if n >= 2**31 - 1:
        raise ValueError(f"knn_search Triton kernel keeps indices in 31 bits: n = {n} rows is too many")
    scores = queries.new_empty((q, k), dtype=torch.float32)
    indices = queries.new_empty((q, k), dtype=torch.int64)
    kernel = _knn_search_kernel if _INTERPRET else wrap_triton(_knn_search_kernel)
    kernel[lambda meta: (triton.cdiv(q, meta["BLOCK_Q"]),)](
        queries, db, scores, indices, q, n, D, k, query_start,
        EXCLUDE_SELF=exclude_self, D_PAD=max(_MIN_DOT, triton.next_power_of_2(D)), K_PAD=triton.next_power_of_2(k),
    )
    return scores, indices


def gather_mean(x: Tensor, indices: Tensor) -> Tensor:
    """``x[indices].mean(1)``: ``[q, D]`` in x's dtype, accumulated in float32 (float64 for float64 x).

    Args:
        x: contiguous ``[n, D]``, any floating dtype.
        indices: contiguous int64 ``[q, k]`` of rows of x (the caller guarantees they are in range).
    """
    n, D = x.shape
    q, k = indices.shape
    out = x.new_empty((q, D))
    kernel = _gather_mean_kernel if _INTERPRET else wrap_triton(_gather_mean_kernel)
    kernel[lambda meta: (triton.cdiv(q, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))](
        x, indices, out, q, n, D, k, F64=x.dtype == torch.float64
    )
    return out


# On a GPU the ops are triton_ops, so torch.compile traces into them and sees the kernels. Under
# TRITON_INTERPRET=1 that tracing would run the interpreter on fake tensors, which have no data
# ("Attempted to access the data pointer on an invalid python storage"), so there they are opaque
# custom ops instead.
_define_op = torch.library.custom_op if _INTERPRET else torch.library.triton_op
# Explicit schemas: inferred ones would make k and query_start SymInt.
_knn_search_op = _define_op(
    "grasp::knn_search_triton", knn_search, mutates_args=(),
    schema="(Tensor queries, Tensor db, int k, int query_start, bool exclude_self) -> (Tensor, Tensor)",
)
_gather_mean_op = _define_op(
    "grasp::gather_mean_triton", gather_mean, mutates_args=(), schema="(Tensor x, Tensor indices) -> Tensor"
)


@_knn_search_op.register_fake
def _knn_search_fake(queries, db, k, query_start, exclude_self):
    q = queries.shape[0]
    return queries.new_empty((q, k), dtype=torch.float32), queries.new_empty((q, k), dtype=torch.int64)


@_gather_mean_op.register_fake
def _gather_mean_fake(x, indices):
    return x.new_empty((indices.shape[0], x.shape[1]))
