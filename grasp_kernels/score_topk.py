"""Fused Triton kernels of the score-and-select operator (``grasp.ops.score_topk``, docs/design.md section 11).

Two torch.library ops, ``grasp::score_topk_dot_triton`` and ``grasp::score_topk_gated_triton`` (the schemas of
``csrc/score_topk.cpp``): for every user b the k rows j of the item table with the largest score

    s[b, j] = <query[b], table[j]>                                              (plain)
            + <out_query[b], gelu(h[b, j])>,  h[b, j] = Σ_x gate_x[b, j] values[j, x] + bias        (gated)

with the gates σ(s1/√c), σ(s2/√c), σ((s1+s2)/√(2c)) of s1 = <user[b], item[j]>, s2 = <user_sim[b], item_sim[j]>,
as float32 scores in descending order and int64 indices (equal scores: smaller index first), leaving out each
user's excluded rows; slots beyond the rows that remain hold (-inf, -1).

Grid: user tiles x item slices, as the kNN search of ``grasp_kernels/topk_neighbor_mean.py``. A program takes
BLOCK_B users and one slice of the items and streams it in tiles of BLOCK_N items:

1. The tile's scores come from tl.dot over d (chunks of BLOCK_K, float32 accumulation: float32 operands as
   true float32 products, 16-bit ones on tensor cores). The gated form adds the two gate GEMMs over c the same
   way, the gates (float32), and then, in chunks of BLOCK_E of the e columns, the mix h as a
   [BLOCK_B, BLOCK_N, BLOCK_E] tile, its exact-erf GELU, and the dot with out_query (a sum over the chunk).
2. Exclusions arrive sorted per user (the launcher sorts them, padding last); a per-user cursor walks them
   along the tiles, so a tile costs one gathered load per user plus one step per excluded row it holds.
   Excluded rows, and scores not above -inf (NaN or an overflow), are dead.
3. The running top-k of the kNN search: int64 keys packing (score, index) so that a larger key is the better
   row, K_PAD = next_power_of_2(k) of them per user in registers, a tile skipped when no live score beats
   its user's k-th best, otherwise best-first insertion (``_insert``).

With one slice the kernel writes the result; with several, each program writes its slice's k keys and the
kNN merge kernel picks every user's best k of them. Nothing of size B x M exists.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from grasp.ops._kernel_glue import TRITON_DTYPES, register_score_topk
from grasp_kernels._common import INTERPRET, define_op, launcher, on_device
from grasp_kernels.topk_neighbor_mean import (
    _INT32_MAX,
    _INT64_MIN,
    _MAX_Q_BUCKET,
    _MIN_DOT,
    _bucket,
    _decode,
    _dot_nt,
    _empty_list,
    _encode,
    _insert,
    _knn_merge_kernel,
    _store_best_first,
    slicing,
)

__all__ = ["score_topk_dot", "score_topk_gated"]

# Sorted exclusions: padding (-1) becomes this, after every row index.
_NO_ROW = tl.constexpr(2**62)
_INV_SQRT2 = tl.constexpr(1 / math.sqrt(2))
# K chunk of the tile GEMMs per dtype (as the kNN search: 16-bit operands in chunks of 32, float32 of 16).
_BLOCK_K_16BIT = 32
_BLOCK_K_FP32 = 16
# Per-thread budgets: elements of one [BLOCK_B, BLOCK_N] score tile (the gated form keeps about six of them
# live: scores, the two gate dot products, three gates), and of the gated form's [BLOCK_B, BLOCK_N, BLOCK_E]
# mix tile (h, its GELU and the product with out_query), plus the 32-bit words of the running top-k. The
# gated form keeps two configs, 16 x 32 x 8 on 4 warps and 32 x 32 x 8 on 8, the tiles that compiled without
# spills for sm_90 at d = c = e = 64 (Triton 3.9; 16 x 64 x 8 and 32 x 64 x 4 tiles on 8 warps spilled 16 to
# 350 bytes within these budgets, and the 4-warp one spills 8 bytes on sm_80 in 16-bit with exclusions).
_MAX_TILE_PER_THREAD = 16
_MAX_GATED_TILE_PER_THREAD = 8
_MAX_MIX_PER_THREAD = 32
_MAX_STATE_PER_THREAD = 80

if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_B": 16, "BLOCK_N": 32, "BLOCK_E": 16}, num_warps=4, num_stages=1)]
else:
    # num_stages is not tuned: the data-dependent exclusion and insertion loops stop Triton's pipeliner.
    _CONFIGS = [
        triton.Config({"BLOCK_B": block_b, "BLOCK_N": block_n, "BLOCK_E": block_e}, num_warps=warps, num_stages=1,
                      maxnreg=255)
        for block_b, block_n, block_e, warps in (
            (16, 32, 8, 4), (16, 64, 8, 4), (32, 32, 8, 4), (32, 32, 8, 8), (16, 64, 16, 8), (32, 64, 8, 8),
            (64, 64, 8, 8), (64, 128, 4, 8), (128, 64, 4, 8),
        )
    ]

# Tuning keys (triton appends the tensors' dtypes): power-of-two buckets of the users and of the items per
# slice, passed to the kernel only to key the tuning on, and the widths and flags.
_KEY = ["B_BUCKET", "N_BUCKET", "D", "C", "E", "K_PAD", "GATED", "EXCLUDE", "SPLIT"]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs within the per-thread budgets whose tiles are not much larger than the users or a
    slice's items (16 users and 32 items always stay); if none fits, the one with the least per thread."""
    args = {**named_args, **kwargs}
    b_pad, n_pad, k_pad, gated = args["B_BUCKET"], args["N_BUCKET"], args["K_PAD"], args["GATED"]

    def per_thread(c):
        """(score-tile elements, mix-tile elements, top-k words) per thread."""
        threads = 32 * c.num_warps
        tile = c.kwargs["BLOCK_B"] * c.kwargs["BLOCK_N"] / threads
        return tile, tile * c.kwargs["BLOCK_E"] if gated else 0, 2 * c.kwargs["BLOCK_B"] * k_pad / threads

    shaped = [c for c in configs
              if c.kwargs["BLOCK_B"] <= max(_MIN_DOT, b_pad) and c.kwargs["BLOCK_N"] <= max(32, n_pad)] or configs
    tile_budget = _MAX_GATED_TILE_PER_THREAD if gated else _MAX_TILE_PER_THREAD
    fitting = [c for c in shaped
               if per_thread(c)[0] <= tile_budget and per_thread(c)[1] <= _MAX_MIX_PER_THREAD
               and per_thread(c)[0] + per_thread(c)[2] <= _MAX_STATE_PER_THREAD]
    if gated:  # 4 warps spill a few bytes on sm_80 (16-bit, with exclusions): 8 where the users fill them
        fitting = [c for c in fitting if c.num_warps == 8] or fitting
    return fitting or [min(shaped, key=lambda c: sum(per_thread(c)))]


@triton.jit
def _tile_dot(a_ptr, b_ptr, rows, cols, row_ok, col_ok, K,
              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``[BLOCK_B, BLOCK_N]``: rows ``rows`` of a by rows ``cols`` of b (both row-major, K wide), over
    K in chunks of BLOCK_K."""
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        k_ok = (offs < K)[None, :]
        a = tl.load(a_ptr + rows[:, None] * K + offs[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        b = tl.load(b_ptr + cols[:, None] * K + offs[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        acc = _dot_nt(a, b, acc)
    return acc


@triton.jit
def _gated_term(scores, rows, cols, row_ok, col_ok, u_ptr, us_ptr, i_ptr, is_ptr, v_ptr, bias_ptr, oq_ptr,
                C, E, scale, scale_glob,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """``scores + <out_query[b], gelu(h[b, j])>`` of the tile (1. in the module notes)."""
    s1 = _tile_dot(u_ptr, i_ptr, rows, cols, row_ok, col_ok, C, BLOCK_B, BLOCK_N, BLOCK_K)
    s2 = _tile_dot(us_ptr, is_ptr, rows, cols, row_ok, col_ok, C, BLOCK_B, BLOCK_N, BLOCK_K)
    g_self = tl.sigmoid(s1 * scale)[:, :, None]
    g_sim = tl.sigmoid(s2 * scale)[:, :, None]
    g_glob = tl.sigmoid((s1 + s2) * scale_glob)[:, :, None]
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_ok = offs_e < E
        v_rows = v_ptr + cols[:, None] * (3 * E) + offs_e[None, :]
        v_ok = col_ok[:, None] & e_ok[None, :]
        v_self = tl.load(v_rows, mask=v_ok, other=0.0).to(tl.float32)[None, :, :]
        v_sim = tl.load(v_rows + E, mask=v_ok, other=0.0).to(tl.float32)[None, :, :]
        v_glob = tl.load(v_rows + 2 * E, mask=v_ok, other=0.0).to(tl.float32)[None, :, :]
        bias = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, None, :]
        oq = tl.load(oq_ptr + rows[:, None] * E + offs_e[None, :], mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        h = g_self * v_self + g_sim * v_sim + g_glob * v_glob + bias
        gelu = 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))
        scores += tl.sum(gelu * oq.to(tl.float32)[:, None, :], axis=2)
    return scores


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["B_BUCKET", "N_BUCKET"])
def _score_topk_kernel(
    q_ptr, t_ptr, u_ptr, us_ptr, i_ptr, is_ptr, v_ptr, bias_ptr, oq_ptr, ex_ptr, scores_ptr, indices_ptr, keys_ptr,
    B, M, D, C, E, X, k, slice_len, scale, scale_glob, B_BUCKET, N_BUCKET,
    GATED: tl.constexpr, EXCLUDE: tl.constexpr, SPLIT: tl.constexpr, K_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows = rows.to(tl.int64)
    # This program's slice of the items: rows [col_begin, col_end) of the table.
    col_begin = tl.program_id(1) * slice_len
    col_end = col_begin + tl.minimum(slice_len, M - col_begin)

    topk = _empty_list(k, BLOCK_B, K_PAD)
    worst, worst_slot = tl.min(topk, axis=1, return_indices=True)  # the k-th best key and its slot
    threshold = _decode(worst)[0]  # its score
    if EXCLUDE:  # the cursor into each user's sorted exclusions, and the entry it points at
        cursor = tl.zeros([BLOCK_B], tl.int64)
        excluded = tl.load(ex_ptr + rows * X, mask=row_ok, other=_NO_ROW)

    for n0 in range(col_begin, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        cols = cols.to(tl.int64)
        scores = _tile_dot(q_ptr, t_ptr, rows, cols, row_ok, col_ok, D, BLOCK_B, BLOCK_N, BLOCK_K)
        if GATED:
            scores = _gated_term(scores, rows, cols, row_ok, col_ok, u_ptr, us_ptr, i_ptr, is_ptr, v_ptr, bias_ptr,
                                 oq_ptr, C, E, scale, scale_glob, BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_E)
        live = row_ok[:, None] & col_ok[None, :] & (scores > float("-inf"))
        if EXCLUDE:  # every entry below the tile's end is consumed; those inside it are dead
            while tl.max((excluded < n0 + BLOCK_N).to(tl.int32), axis=0) > 0:
                hit = excluded < n0 + BLOCK_N
                live = live & ~(hit[:, None] & (cols[None, :] == excluded[:, None]))
                cursor += hit.to(tl.int64)
                excluded = tl.load(ex_ptr + rows * X + cursor, mask=row_ok & (cursor < X), other=_NO_ROW)
        scores = tl.where(live, scores, float("-inf"))

        # Skip the tile unless a live score beats its user's k-th best: strictly, as every column here has a
        # larger index than every key in the list.
        if tl.max((tl.max(scores, axis=1) > threshold).to(tl.int32), axis=0) > 0:
            keys = tl.where(live, _encode(scores, cols.to(tl.int32)[None, :]), _INT64_MIN)
            topk, worst, worst_slot = _insert(topk, worst, worst_slot, keys, K_PAD)
            threshold = _decode(worst)[0]

    if SPLIT:  # this slice's k best keys, unordered, for the merge: keys[row, slice, :k]
        slots = tl.arange(0, K_PAD)
        out = (rows * tl.num_programs(1) + tl.program_id(1)) * k
        tl.store(keys_ptr + out[:, None] + slots[None, :], topk, mask=row_ok[:, None] & (slots < k)[None, :])
    else:
        _store_best_first(topk, k, rows, row_ok, scores_ptr, indices_ptr, K_PAD)


def _check_inputs(tensors: dict[str, Tensor], exclude: Tensor | None, k: int) -> None:
    """The launch contract (the public op checks the rest): one Triton dtype, contiguous, k and M in range."""
    query, table = tensors["query"], tensors["table"]
    for name, t in tensors.items():
        if t.dtype not in TRITON_DTYPES:
            raise TypeError(f"score_topk (triton): {name} must be float32, float16 or bfloat16, not {t.dtype}")
        if t.dtype != query.dtype:
            raise TypeError(f"score_topk (triton): {name} has dtype {t.dtype} but query has {query.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"score_topk (triton): {name} must be contiguous")
    if exclude is not None and (exclude.dtype != torch.int64 or exclude.dim() != 2 or exclude.shape[0] != len(query)):
        raise TypeError(f"score_topk (triton): exclude must be an int64 [B, X] tensor, got {exclude.dtype} "
                        f"{tuple(exclude.shape)}")
    if table.shape[0] >= 2**31 - 1:
        raise ValueError(f"score_topk (triton) keeps indices in 31 bits: M = {table.shape[0]} rows is too many")
    if not 1 <= k <= table.shape[0]:
        raise ValueError(f"score_topk (triton): k = {k} must be in [1, M = {table.shape[0]}]")


def _score_topk(query: Tensor, table: Tensor, gated: tuple[Tensor, ...] | None, exclude: Tensor | None,
                k: int) -> tuple[Tensor, Tensor]:
    """Launch the search (and the merge of its slices) for the plain or the gated form."""
    names = ("user", "user_sim", "item", "item_sim", "values", "bias", "out_query")
    _check_inputs({"query": query, "table": table, **dict(zip(names, gated or (), strict=False))}, exclude, k)
    excluded = None
    if exclude is not None and exclude.shape[1]:
        # Sorted per user, padding (-1) last as _NO_ROW; the kernel walks them in item order.
        excluded = torch.where(exclude >= 0, exclude, _NO_ROW.value).sort(dim=1).values.contiguous()
    (B, D), M = query.shape, table.shape[0]
    scores = query.new_empty((B, k), dtype=torch.float32)
    indices = query.new_empty((B, k), dtype=torch.int64)
    if B == 0:
        return scores, indices
    slices, slice_len = slicing(B, M, k, query.device)
    split = slices > 1
    keys = query.new_empty((B, slices, k), dtype=torch.int64) if split else indices
    k_pad = triton.next_power_of_2(k)
    b_bucket = _bucket(B, _MAX_Q_BUCKET)
    user, user_sim, item, item_sim, values, bias, out_query = gated or (query,) * 7  # unread in the plain form
    C, E = (user.shape[1], values.shape[2]) if gated else (1, 1)
    block_k = _BLOCK_K_FP32 if query.dtype == torch.float32 else _BLOCK_K_16BIT
    with on_device(query):
        launcher(_score_topk_kernel)[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), slices)](
            query, table, user, user_sim, item, item_sim, values, bias, out_query,
            indices if excluded is None else excluded, scores, indices, keys,
            B, M, D, C, E, 0 if excluded is None else excluded.shape[1], k, slice_len, 1 / math.sqrt(C),
            1 / math.sqrt(2 * C), b_bucket, _bucket(slice_len),
            GATED=gated is not None, EXCLUDE=excluded is not None, SPLIT=split, K_PAD=k_pad, BLOCK_K=block_k,
        )
        if split:
            launcher(_knn_merge_kernel)[lambda meta: (triton.cdiv(B, meta["BLOCK_Q"]),)](
                keys, scores, indices, B, slices * k, k, b_bucket, K_PAD=k_pad,
            )
    # Slots that no row filled hold copies of the empty key, which the best-first store takes all at once:
    # they decode to index INT32_MAX and a score of -inf or NaN; the contract's empty slot is (-inf, -1).
    empty = indices == _INT32_MAX.value
    return scores.masked_fill_(empty, float("-inf")), indices.masked_fill_(empty, -1)


def score_topk_dot(query: Tensor, table: Tensor, exclude: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Each user's k best rows of ``table`` by ``<query[b], table[j]>`` (contiguous inputs, one Triton dtype)."""
    return _score_topk(query, table, None, exclude, k)


def score_topk_gated(query: Tensor, table: Tensor, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor,
                     values: Tensor, bias: Tensor, out_query: Tensor, exclude: Tensor | None,
                     k: int) -> tuple[Tensor, Tensor]:
    """Each user's k best rows of ``table`` by the gated score (the module notes)."""
    return _score_topk(query, table, (user, user_sim, item, item_sim, values, bias, out_query), exclude, k)


# Explicit schemas (csrc/score_topk.cpp's): inferred ones would make k a SymInt.
define_op("grasp::score_topk_dot_triton", score_topk_dot, mutates_args=(),
          schema="(Tensor query, Tensor table, Tensor? exclude, int k) -> (Tensor, Tensor)")
define_op(
    "grasp::score_topk_gated_triton", score_topk_gated, mutates_args=(),
    schema="(Tensor query, Tensor table, Tensor user, Tensor user_sim, Tensor item, Tensor item_sim, Tensor values, "
           "Tensor bias, Tensor out_query, Tensor? exclude, int k) -> (Tensor, Tensor)",
)

# Fake kernels: shared with the C++ ops of the same schema.
register_score_topk("grasp::score_topk_dot_triton", "grasp::score_topk_gated_triton")
