"""Fused Triton kernels of the top-k neighbour operator (docs/design.md section 4).

Two kernel steps, called by ``grasp.ops.topk_neighbor_mean`` (grasp/ops/topk_neighbor_mean.py):

- ``topk_neighbor_mean_search(queries [q, D], db [n, D], k, query_start, exclude_self)``: for every query row r the k
  database rows with the largest inner product, as float32 scores in descending order and int64
  indices, equal scores ordered by the smaller index; with ``exclude_self`` row r never selects
  database row ``query_start + r``.
- ``topk_neighbor_mean_gather(x [n, D], indices [q, k])``: the mean of the rows ``x[indices[r]]``, accumulated in
  float32 (float64 for float64 x), in x's dtype.

Search grid: query tiles x database slices. One program takes a tile of BLOCK_Q queries and one slice
of the database (``slice_count`` slices of equal length), and streams that slice in tiles of BLOCK_N
rows. The number of slices is chosen so that tiles x slices is a few times the GPU's SM count, so a
search of a handful of queries (the re-search of a few unproven rows) fills the GPU as well as a
search of millions. With one slice the search kernel writes the result; with several, each program
writes its slice's k best keys and ``_knn_merge_kernel`` merges the slices of every query.

Each [BLOCK_Q, BLOCK_N] score tile comes from tl.dot over D (in BLOCK_D chunks, or in one piece with
the query tile loaded once when D fits a chunk), accumulated in float32. Precision follows the input
dtype: float32 inputs use input_precision="ieee" (true float32 products on the FMA units, never TF32),
float16 / bfloat16 inputs run on tensor cores with float32 accumulation (``precision="fast"`` of
``topk_neighbor_mean`` searches bfloat16 copies this way and proves the result exact afterwards).
Nothing of size q x n exists: the only state carried across tiles is a running top-k per query,
K_PAD = next_power_of_2(k) int64 keys in registers.

A key packs (score, index) into one int64 whose integer order is the neighbour order: the score's
float bits, remapped so that signed-integer order is float order, in the high 32 bits, and
INT32_MAX - index in the low 32 bits (indices fit 31 bits). Larger key = better neighbour, so "score
greater, or equal score and smaller index" is a single integer comparison and ties need no special
handling anywhere, in the search or in the merge of the slices. The running list is unordered; its
smallest key (the current k-th best) is kept with its slot. Merging a tile of keys into it:

1. Gate: tiles of a slice arrive in increasing index order, so a tile element beats the k-th best
   only if its score is strictly greater (an equal score has the larger index). If no element of
   the tile beats its row's k-th best score (one float max per row), the tile is skipped. Past the
   first few tiles this is the common case. (The merge gates on the keys themselves.)
2. Otherwise the tile's keys are taken best-first per row: while some row's best remaining key
   beats its k-th best, that key replaces the k-th best in its slot, is removed from the tile, and
   the new k-th best is found (min over K_PAD keys). A row stops taking at the first key that does
   not beat its k-th best (every later one is smaller); the loop ends when all rows have stopped,
   after at most min(k, BLOCK_N) insertions per row.

Padding slots (k..K_PAD-1) hold INT64_MAX, so they are never the k-th best. At the end they are
cleared and the k keys are written out best-first (k rounds of a row max), then decoded.

Gather-mean kernel: one program per [BLOCK_R rows, BLOCK_D columns] block of the output loops over
the k neighbours, loading one (masked) row slice of x per query row each step.

Autotuning: every kernel keys its tuning on what changes the best config (power-of-two buckets of
the queries and of the rows per slice, D_PAD, K_PAD, dtype, flags), never on exact sizes, so a new
last block or re-search does not benchmark again. Each kernel's configs are a module-level list and
its pruner a module-level function ``(configs, named_args, **kwargs)``; the pruners read only key
arguments (and dtypes) and drop the configs that spill registers on sm_80 / sm_90.

``topk_neighbor_mean_search`` and ``topk_neighbor_mean_gather`` launch the kernels on the inputs' device; the
torch.library ops
``grasp::topk_neighbor_mean_search_triton`` and ``grasp::topk_neighbor_mean_gather_triton`` wrap them (no autograd).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from grasp.ops._kernel_glue import register_topk_neighbor_mean
from grasp_kernels._common import INTERPRET, define_op, launcher, on_device

__all__ = ["topk_neighbor_mean_gather", "topk_neighbor_mean_search", "slice_count", "slicing"]

_SEARCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits; there the operands
# are upcast to float32 first (exact: products of 16-bit floats are exact in float32).
_UPCAST_DOT_OPERANDS = tl.constexpr(INTERPRET)

_INT32_MAX = tl.constexpr(2**31 - 1)
_INT64_MIN = tl.constexpr(-(2**63))
_INT64_MAX = tl.constexpr(2**63 - 1)

# Smallest tile edge tl.dot takes on the GPU; the query and database tiles are at least this wide in D.
_MIN_DOT = 16

# Per-thread budgets of a search config, from offline sm_80 / sm_90 compiles (ptxas -v): elements of
# the [BLOCK_Q, BLOCK_N] score tile (float32 tl.dot runs on FMA units with its operands in registers, so
# its tiles must be smaller than those of the 16-bit tensor-core tl.dot), and those elements plus the
# 32-bit words of the [BLOCK_Q, K_PAD] int64 running top-k. Past these, configs spill.
_MAX_TILE_PER_THREAD_FP32 = 8
_MAX_TILE_PER_THREAD_16BIT = 32
_MAX_STATE_PER_THREAD = 80
# With fewer score-tile elements per thread than this, threads idle (only worth it for a large k).
_MIN_TILE_PER_THREAD = 8
# Merge: 32-bit words per thread of the running list plus one [BLOCK_Q, BLOCK_M] tile of keys.
_MAX_MERGE_WORDS_PER_THREAD = 96
# D chunk of each dtype's search configs: 16-bit operands go to tensor cores in chunks of 32 (64
# spills at several tile shapes); float32 FMA operands live in registers, chunks of 16 (32 spills).
_BLOCK_D_16BIT = 32
_BLOCK_D_FP32 = 16

# Slicing of the database: programs to aim at per SM, the query tile assumed when counting programs
# (the autotuned BLOCK_Q is not known before launch), the fewest rows worth a slice, slice lengths
# rounded to the largest BLOCK_N (no tile straddles two slices), and a bound on the keys the slices
# hand to the merge. Under the interpreter a fixed small slice count exercises the merge in tests.
_PROGRAMS_PER_SM = 4
_NOMINAL_BLOCK_Q = 64
_MIN_SLICE_ROWS = 1 if INTERPRET else 2048
_SLICE_ALIGN = 1 if INTERPRET else 128
_MAX_PARTIAL_BYTES = 1 << 28
_INTERPRET_SLICES = 3
# Slices are the grid's second axis, which CUDA bounds.
_MAX_GRID_Y = 65535

if INTERPRET:
    _SEARCH_CONFIGS = [triton.Config({"BLOCK_Q": 16, "BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    _MERGE_CONFIGS = [triton.Config({"BLOCK_Q": 16, "BLOCK_M": 16}, num_warps=4, num_stages=1)]
    _GATHER_CONFIGS = [triton.Config({"BLOCK_R": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)]
else:
    # The search loop is not software-pipelined (its data-dependent insertion loop stops Triton's
    # pipeliner: num_stages 2 and 3 compile to the same code), so num_stages is not tuned. maxnreg lets
    # ptxas use all 255 registers: by default it aims at a higher occupancy and spills 8-80 bytes.
    _SEARCH_CONFIGS = [
        triton.Config({"BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": _BLOCK_D_16BIT}, num_warps=warps,
                      num_stages=2, maxnreg=255)
        for block_q, block_n, warps in (
            (16, 64, 4), (32, 64, 4), (16, 64, 8), (32, 64, 8), (64, 64, 4), (64, 64, 8), (64, 128, 8), (128, 64, 8)
        )
    ] + [
        triton.Config({"BLOCK_Q": block_q, "BLOCK_N": block_n, "BLOCK_D": _BLOCK_D_FP32}, num_warps=warps,
                      num_stages=2, maxnreg=255)
        for block_q, block_n, warps in ((16, 64, 4), (16, 64, 8), (32, 64, 8))
    ]
    # The merge and gather loops hold no tl.dot, so Triton does not software-pipeline them and emits
    # the same code for every num_stages: it is not tuned.
    _MERGE_CONFIGS = [
        triton.Config({"BLOCK_Q": block_q, "BLOCK_M": block_m}, num_warps=warps, num_stages=1)
        for block_q, block_m, warps in ((8, 64, 4), (16, 64, 4), (32, 64, 4), (32, 64, 8), (64, 64, 8))
    ]
    # Blocks stay within 4096 accumulators (a float64 [64, 256] block spills).
    _GATHER_CONFIGS = [
        triton.Config({"BLOCK_R": block_r, "BLOCK_D": block_d}, num_warps=warps, num_stages=1)
        for block_r in (4, 16, 64)
        for block_d in (64, 256)
        for warps in (4, 8)
        # 1024-element blocks on 4 warps spill 4-8 bytes on sm_80 (benchmarks/gpu_code_report.py).
        if block_r * block_d <= 4096 and not (block_r * block_d == 1024 and warps == 4)
    ]

# Tuning keys (triton appends the tensors' dtypes). Q_BUCKET and N_BUCKET are power-of-two buckets of
# the queries and of the rows per slice, passed to the kernels only to key the tuning on.
_SEARCH_KEY = ["Q_BUCKET", "N_BUCKET", "D_PAD", "K_PAD", "EXCLUDE_SELF", "SPLIT"]
_MERGE_KEY = ["Q_BUCKET", "K_PAD"]
_GATHER_KEY = ["Q_BUCKET", "D"]
# Largest query bucket: beyond one tile of the largest BLOCK_Q, more queries only add programs.
_MAX_Q_BUCKET = 128


def _bucket(size: int, cap: int | None = None) -> int:
    """The power-of-two bucket of ``size`` (at least 1), capped at ``cap``."""
    b = triton.next_power_of_2(max(1, size))
    return b if cap is None else min(b, cap)


def _prune_search_configs(configs, named_args, **kwargs):
    """Keep the search configs that can be the fastest for this shape and dtype.

    - Tiles larger than the queries or a slice's rows only compute padding (16 queries and 64 rows
      always stay).
    - float32 takes the BLOCK_D = 16 configs, 16-bit dtypes the BLOCK_D = 32 ones.
    - The score tile, and the tile and the running list together, must fit the per-thread budgets
      above; configs that leave threads idle go too, unless only they fit (a large k). If nothing
      fits, the config with the smallest list per thread runs: it spills registers, but stays correct.
    """
    args = {**named_args, **kwargs}
    q_pad, n_pad = args["Q_BUCKET"], args["N_BUCKET"]
    k_pad = args["K_PAD"]
    fp32 = args["q_ptr"].dtype == torch.float32
    max_tile = _MAX_TILE_PER_THREAD_FP32 if fp32 else _MAX_TILE_PER_THREAD_16BIT

    def per_thread(c):
        """(score-tile elements, running-list words) per thread."""
        threads = 32 * c.num_warps
        return c.kwargs["BLOCK_Q"] * c.kwargs["BLOCK_N"] / threads, 2 * c.kwargs["BLOCK_Q"] * k_pad / threads

    block_d = _BLOCK_D_FP32 if fp32 else _BLOCK_D_16BIT
    typed = [c for c in configs if c.kwargs["BLOCK_D"] == block_d] or list(configs)
    shaped = [c for c in typed
              if c.kwargs["BLOCK_Q"] <= max(_MIN_DOT, q_pad) and c.kwargs["BLOCK_N"] <= max(64, n_pad)] or typed
    fitting = [c for c in shaped
               if per_thread(c)[0] <= max_tile and sum(per_thread(c)) <= _MAX_STATE_PER_THREAD]
    busy = [c for c in fitting if per_thread(c)[0] >= _MIN_TILE_PER_THREAD]
    return busy or fitting or [min(shaped, key=lambda c: per_thread(c)[::-1])]


def _prune_merge_configs(configs, named_args, **kwargs):
    """Keep the merge configs whose row tile fits the queries and whose keys fit the thread budget.

    Among those only the ones with the most rows per program stay (the merge is cheap, its programs
    few): if nothing fits, the config with the fewest words per thread runs (it spills, but stays
    correct).
    """
    args = {**named_args, **kwargs}
    q_pad, k_pad = args["Q_BUCKET"], args["K_PAD"]

    def words(c):
        return 2 * c.kwargs["BLOCK_Q"] * (k_pad + c.kwargs["BLOCK_M"]) / (32 * c.num_warps)

    shaped = [c for c in configs if c.kwargs["BLOCK_Q"] <= max(8, q_pad)] or list(configs)
    fitting = [c for c in shaped if words(c) <= _MAX_MERGE_WORDS_PER_THREAD]
    if not fitting:
        return [min(shaped, key=words)]
    most = max(c.kwargs["BLOCK_Q"] for c in fitting)
    return [c for c in fitting if c.kwargs["BLOCK_Q"] == most]


def _prune_gather_configs(configs, named_args, **kwargs):
    """Drop gather configs whose row or column block is much larger than q or D, and float64 blocks of
    4096 accumulators on 4 warps (they spill on sm_80)."""
    args = {**named_args, **kwargs}
    q_pad, d_pad = args["Q_BUCKET"], triton.next_power_of_2(args["D"])
    fitting = [c for c in configs
               if c.kwargs["BLOCK_R"] <= max(4, q_pad) and c.kwargs["BLOCK_D"] <= max(64, d_pad)
               and not (args["F64"] and c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_D"] >= 4096 and c.num_warps < 8)]
    return fitting or configs[:1]


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
def _empty_list(k, BLOCK_Q: tl.constexpr, K_PAD: tl.constexpr):
    """A running top-k with nothing in it: the key of (-inf, INT32_MAX), below every real neighbour, in
    slots < k, and INT64_MAX in the padding slots so that they are never the k-th best."""
    slots = tl.arange(0, K_PAD)
    empty = _encode(tl.full([BLOCK_Q, K_PAD], float("-inf"), tl.float32),
                    tl.full([BLOCK_Q, K_PAD], _INT32_MAX, tl.int32))
    return tl.where(slots[None, :] < k, empty, _INT64_MAX)


@triton.jit
def _insert(topk, worst, worst_slot, keys, K_PAD: tl.constexpr):
    """Best-first insertion (2. in the module notes) of a tile of keys into the running top-k.

    Rows whose best remaining key does not beat their k-th best take nothing. Returns the list, its
    k-th best key and that key's slot.
    """
    slots = tl.arange(0, K_PAD)
    best = tl.max(keys, axis=1)
    while tl.max((best > worst).to(tl.int32), axis=0) > 0:
        take = (best > worst)[:, None] & (slots[None, :] == worst_slot[:, None])
        topk = tl.where(take, best[:, None], topk)
        keys = tl.where(keys == best[:, None], _INT64_MIN, keys)
        best = tl.max(keys, axis=1)
        worst, worst_slot = tl.min(topk, axis=1, return_indices=True)
    return topk, worst, worst_slot


@triton.jit
def _store_best_first(topk, k, rows, row_ok, scores_ptr, indices_ptr, K_PAD: tl.constexpr):
    """Clear the padding slots, then write the keys best-first, one output column per step."""
    slots = tl.arange(0, K_PAD)
    topk = tl.where(slots[None, :] < k, topk, _INT64_MIN)
    out = rows.to(tl.int64) * k
    for c in range(0, k):
        best = tl.max(topk, axis=1)
        score, index = _decode(best)
        tl.store(scores_ptr + out + c, score, mask=row_ok)
        tl.store(indices_ptr + out + c, index.to(tl.int64), mask=row_ok)
        topk = tl.where(topk == best[:, None], _INT64_MIN, topk)


@triton.jit
def _dot_nt(a, b, acc):
    """acc + a @ b.T accumulated in float32: float32 products (not tf32) for float32 operands, tensor
    cores for 16-bit ones."""
    if _UPCAST_DOT_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), acc, input_precision="ieee")


@triton.autotune(configs=_SEARCH_CONFIGS, key=_SEARCH_KEY,
                  prune_configs_by={"early_config_prune": _prune_search_configs})
@triton.jit(do_not_specialize=["Q_BUCKET", "N_BUCKET"])
def _knn_search_kernel(
    q_ptr, db_ptr, scores_ptr, indices_ptr, keys_ptr,
    q, n, D, k, query_start, slice_len, Q_BUCKET, N_BUCKET,
    EXCLUDE_SELF: tl.constexpr, SPLIT: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < q
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * D
    # This program's slice of the database: rows [col_begin, col_end).
    col_begin = tl.program_id(1) * slice_len
    col_end = col_begin + tl.minimum(slice_len, n - col_begin)

    topk = _empty_list(k, BLOCK_Q, K_PAD)
    worst, worst_slot = tl.min(topk, axis=1, return_indices=True)  # the k-th best key and its slot
    threshold = _decode(worst)[0]  # its score

    if BLOCK_D >= D_PAD:  # the query rows fit one chunk: load them once
        offs_d = tl.arange(0, D_PAD)
        q_tile = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)

    for n0 in range(col_begin, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        db_rows = db_ptr + cols.to(tl.int64)[:, None] * D
        if BLOCK_D >= D_PAD:
            db_tile = tl.load(db_rows + offs_d[None, :], mask=col_ok[:, None] & (offs_d < D)[None, :], other=0.0)
            scores = _dot_nt(q_tile, db_tile, tl.zeros([BLOCK_Q, BLOCK_N], tl.float32))
        else:
            scores = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = (offs_d < D)[None, :]
                q_chunk = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                db_chunk = tl.load(db_rows + offs_d[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                scores = _dot_nt(q_chunk, db_chunk, scores)

        live = row_ok[:, None] & col_ok[None, :]
        if EXCLUDE_SELF:
            live = live & (cols[None, :] != (query_start + rows)[:, None])
        scores = tl.where(live, scores, float("-inf"))

        # Gate (1.): does any element of the tile beat its row's k-th best? Strictly greater, as
        # every column here has a larger index than every key in the list.
        if tl.max((tl.max(scores, axis=1) > threshold).to(tl.int32), axis=0) > 0:
            keys = tl.where(live, _encode(scores, cols[None, :]), _INT64_MIN)
            topk, worst, worst_slot = _insert(topk, worst, worst_slot, keys, K_PAD)
            threshold = _decode(worst)[0]

    if SPLIT:  # this slice's k best keys, unordered, for the merge: keys[row, slice, :k]
        slots = tl.arange(0, K_PAD)
        out = (rows.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * k
        tl.store(keys_ptr + out[:, None] + slots[None, :], topk, mask=row_ok[:, None] & (slots < k)[None, :])
    else:
        _store_best_first(topk, k, rows, row_ok, scores_ptr, indices_ptr, K_PAD)


@triton.autotune(configs=_MERGE_CONFIGS, key=_MERGE_KEY,
                  prune_configs_by={"early_config_prune": _prune_merge_configs})
@triton.jit(do_not_specialize=["Q_BUCKET"])
def _knn_merge_kernel(
    keys_ptr, scores_ptr, indices_ptr,
    q, m, k, Q_BUCKET,
    K_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The k best of the m = slices * k keys of every query row, written best-first and decoded."""
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < q
    row_keys = keys_ptr + rows.to(tl.int64)[:, None] * m
    topk = _empty_list(k, BLOCK_Q, K_PAD)
    worst, worst_slot = tl.min(topk, axis=1, return_indices=True)
    for m0 in range(0, m, BLOCK_M):
        offs = m0 + tl.arange(0, BLOCK_M)
        keys = tl.load(row_keys + offs[None, :], mask=row_ok[:, None] & (offs < m)[None, :], other=_INT64_MIN)
        # Keys are distinct (one per database row), so "beats the k-th best" is a plain key compare;
        # empty keys of a slice with fewer than k rows equal the initial ones and never enter.
        if tl.max((tl.max(keys, axis=1) > worst).to(tl.int32), axis=0) > 0:
            topk, worst, worst_slot = _insert(topk, worst, worst_slot, keys, K_PAD)
    _store_best_first(topk, k, rows, row_ok, scores_ptr, indices_ptr, K_PAD)


@triton.autotune(configs=_GATHER_CONFIGS, key=_GATHER_KEY,
                  prune_configs_by={"early_config_prune": _prune_gather_configs})
@triton.jit(do_not_specialize=["Q_BUCKET"])
def _gather_mean_kernel(
    x_ptr, indices_ptr, out_ptr,
    q, D, k, Q_BUCKET,
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


@functools.cache
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int | None:
    """The SM count of a CUDA tensor's device; None under the interpreter."""
    if INTERPRET:
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def slice_count(q: int, n: int, k: int, sm_count: int | None) -> int:
    """Database slices of a search of q queries for k neighbours among n rows.

    Enough programs to fill the device: about ``_PROGRAMS_PER_SM`` per SM (query tiles of
    ``_NOMINAL_BLOCK_Q`` assumed), but at most one slice per ``_MIN_SLICE_ROWS`` rows and at most
    ``_MAX_PARTIAL_BYTES`` of per-slice keys for the merge. ``sm_count`` None (the interpreter) asks
    for ``_INTERPRET_SLICES``, so that the tests run the merge.
    """
    if sm_count is None:
        wanted = _INTERPRET_SLICES
    else:
        wanted = triton.cdiv(_PROGRAMS_PER_SM * sm_count, triton.cdiv(q, _NOMINAL_BLOCK_Q))
    most = min(triton.cdiv(n, _MIN_SLICE_ROWS), _MAX_PARTIAL_BYTES // (8 * max(1, q) * k))
    return max(1, min(wanted, most))


def slicing(q: int, n: int, k: int, device: torch.device, slices: int = 0) -> tuple[int, int]:
    """(slices, rows per slice) of a search of q queries among n rows for k neighbours on ``device``:
    ``slices`` (0: ``slice_count``'s choice), each slice but the last a multiple of _SLICE_ALIGN rows long."""
    slices = slices or slice_count(q, n, k, _device_sm_count(device))
    slice_len = triton.cdiv(triton.cdiv(n, min(slices, n)), _SLICE_ALIGN) * _SLICE_ALIGN
    return triton.cdiv(n, slice_len), slice_len


def _check_search_inputs(queries: Tensor, db: Tensor, k: int, slices: int) -> None:
    if queries.dtype not in _SEARCH_DTYPES:
        raise TypeError(f"Triton search kernel takes float32, float16 or bfloat16, not {queries.dtype}")
    if db.dtype != queries.dtype:
        raise TypeError(f"Triton search kernel: db has dtype {db.dtype} but queries has {queries.dtype}")
    if not (queries.is_contiguous() and db.is_contiguous()):
        raise ValueError("Triton search kernel: queries and db must be contiguous (rows of D values)")
    if db.shape[0] >= 2**31 - 1:
        raise ValueError(f"Triton search kernel keeps indices in 31 bits: n = {db.shape[0]} rows is too many")
    if k < 1 or k > db.shape[0]:
        raise ValueError(f"Triton search kernel: k = {k} must be in [1, n = {db.shape[0]}]")
    if not 0 <= slices <= _MAX_GRID_Y:
        raise ValueError(f"Triton search kernel: slices must be in [0, {_MAX_GRID_Y}] (0 = automatic), "
                         f"got {slices}")


def topk_neighbor_mean_search(queries: Tensor, db: Tensor, k: int, query_start: int, exclude_self: bool,
               slices: int = 0) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-k of every query row against ``db``.

    Args:
        queries: ``[q, D]``; db: ``[n, D]``. Contiguous, one float32/float16/bfloat16 dtype and device.
            float32 is searched with float32 products (never TF32), 16-bit dtypes on tensor cores;
            both accumulate in float32.
        k: neighbours per query, ``1 <= k <= n`` (``<= n - 1`` with ``exclude_self``).
        query_start: query row r is database row ``query_start + r`` (for self exclusion).
        exclude_self: query row r never selects database row ``query_start + r``.
        slices: database slices searched by separate programs and merged (0: ``slice_count``'s
            choice; tests force other counts).

    Returns:
        ``scores`` float32 ``[q, k]`` in descending order and ``indices`` int64 ``[q, k]``, equal
        scores ordered by the smaller index. Scores are float32-accumulated dot products.
    """
    _check_search_inputs(queries, db, k, slices)
    q, D = queries.shape
    n = db.shape[0]
    scores = queries.new_empty((q, k), dtype=torch.float32)
    indices = queries.new_empty((q, k), dtype=torch.int64)
    if q == 0:
        return scores, indices
    slices, slice_len = slicing(q, n, k, queries.device, slices)
    split = slices > 1
    keys = queries.new_empty((q, slices, k), dtype=torch.int64) if split else indices
    k_pad = triton.next_power_of_2(k)
    q_bucket = _bucket(q, _MAX_Q_BUCKET)
    with on_device(queries):
        launcher(_knn_search_kernel)[lambda meta: (triton.cdiv(q, meta["BLOCK_Q"]), slices)](
            queries, db, scores, indices, keys, q, n, D, k, query_start, slice_len, q_bucket, _bucket(slice_len),
            EXCLUDE_SELF=exclude_self, SPLIT=split, D_PAD=max(_MIN_DOT, triton.next_power_of_2(D)), K_PAD=k_pad,
        )
        if split:
            launcher(_knn_merge_kernel)[lambda meta: (triton.cdiv(q, meta["BLOCK_Q"]),)](
                keys, scores, indices, q, slices * k, k, q_bucket, K_PAD=k_pad,
            )
    return scores, indices


def topk_neighbor_mean_gather(x: Tensor, indices: Tensor) -> Tensor:
    """``x[indices].mean(1)``: ``[q, D]`` in x's dtype, accumulated in float32 (float64 for float64 x).

    Args:
        x: contiguous ``[n, D]``, any floating dtype.
        indices: contiguous int64 ``[q, k]`` of rows of x (the caller guarantees they are in range).
    """
    n, D = x.shape
    q, k = indices.shape
    out = x.new_empty((q, D))
    if q == 0:
        return out
    with on_device(x):
        launcher(_gather_mean_kernel)[lambda meta: (triton.cdiv(q, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))](
            x, indices, out, q, D, k, _bucket(q, 64), F64=x.dtype == torch.float64
        )
    return out


# Explicit schemas: inferred ones would make k, query_start and slices SymInt.
define_op(
    "grasp::topk_neighbor_mean_search_triton", topk_neighbor_mean_search, mutates_args=(),
    schema="(Tensor queries, Tensor db, int k, int query_start, bool exclude_self, int slices=0) -> (Tensor, Tensor)",
)
define_op(
    "grasp::topk_neighbor_mean_gather_triton", topk_neighbor_mean_gather, mutates_args=(),
    schema="(Tensor x, Tensor indices) -> Tensor",
)

# Fake kernels: shared with the C++ ops of the same schema.
register_topk_neighbor_mean("grasp::topk_neighbor_mean_search_triton", "grasp::topk_neighbor_mean_gather_triton")
