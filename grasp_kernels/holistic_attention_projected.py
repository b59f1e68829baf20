"""Triton kernels of the projected holistic-attention operator (``grasp.ops.holistic_attention_projected``).

For every pair n, with r = user_index[n], j = item_index[n]: s1 = <user[r], item[j]>,
s2 = <user_sim[r], item_sim[j]>, the sigmoid gates a_self = σ(s1/√d), a_sim = σ(s2/√d),
a_glob = σ((s1+s2)/√(2d)), and out[n] = a_self·values[j,0] + a_sim·values[j,1] + a_glob·values[j,2].
Rows are gathered through the indices; everything is accumulated in float32.

- Forward (``_fwd_kernel``): one program per BLOCK_N pairs, each tile spanning the whole of d
  (BLOCK_D = next_power_of_2(d)) and of e (BLOCK_E): the two dot products, three gates and the mix of
  three value rows per pair. Autotuned on (D, E) only.
- Backward, deterministic and free of atomics (a segmented reduction, as the CPU kernel does):
  1. ``_bwd_pairs_kernel``: per pair, the gates and the gradients ds1, ds2 of the two logits' dot
     products, into a float32 ``[N, 5]`` buffer.
  2. The pairs are grouped by item and by user with a stable sort on the device (torch ops in the
     launcher): ``order`` lists the pairs segment by segment, ``starts`` is each segment's offset.
  3. ``_bwd_values_kernel`` (grad values, grouped by item) and ``_bwd_rows_kernel`` (grad item and
     item_sim grouped by item; grad user and user_sim grouped by user) split the sorted pairs into
     chunks of equal length, so one item or user holding most of the pairs is spread over many
     programs. A program sums each segment of its chunk over ROWS-row tiles; a segment that lies
     wholly in the chunk is written to the gradient, one that crosses a chunk boundary leaves a
     float32 partial sum (at most two per chunk: the chunk's first and last segment).
  4. ``_bwd_combine_kernel`` adds up a crossing segment's partial sums (PARTS per tile, the tiles in chunk
     order), as many as the chunks it spans: at most about _TARGET_CHUNKS, whatever N.
  Every sum runs in an order fixed by the inputs' shapes and the chosen configs, and the backward's
  configs are a function of (d, e) that is not benchmarked (a timing-based choice could differ from
  one process to the next and change the order): the gradients are bitwise identical run to run.

``holistic_attention_projected_forward`` and ``holistic_attention_projected_backward`` launch the kernels; the
torch.library ops ``grasp::holistic_attention_projected_forward_triton`` (differentiable) and
``grasp::holistic_attention_projected_backward_triton`` wrap them.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from grasp.ops._kernel_glue import TRITON_DTYPES, register_holistic_attention_projected
from grasp_kernels._common import INTERPRET, define_op, launcher, on_device

__all__ = ["holistic_attention_projected_backward", "holistic_attention_projected_forward"]

# ---- configs: module-level lists, chosen by module-level functions (configs, named_args, **kwargs) ----

# Most elements of a [BLOCK_N, max(BLOCK_D, BLOCK_E)] tile per thread a forward config may use: 16 when d and
# e are multiples of 16 (rows load as 16-byte vectors), 8 otherwise (every element then has its own 64-bit
# address: at 16 per thread, d = e = 200 used 142 registers and spilled on sm_90).
_FWD_TILE_ELEMS_PER_THREAD = 16
_FWD_TILE_ELEMS_PER_THREAD_UNALIGNED = 8
# The pairs kernel keeps about eight such float32 tiles live (four gathered d-wide rows, three value rows
# and the output gradient): half the forward's budgets keep it clear of spills (at 8 with d = e = 9 or 17,
# Triton 3.6 spilled 16 bytes on sm_80).
_PAIRS_TILE_ELEMS_PER_THREAD = 8
_PAIRS_TILE_ELEMS_PER_THREAD_UNALIGNED = 4

# Pairs per tile of the segment reductions. It fixes their summation order, so it is not tuned.
_ROWS = 16

# num_stages is not tuned: the loops hold no tl.dot, so Triton does not software-pipeline them.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=1)
    for block_n in (4, 16, 32, 64)
    for warps in (4, 8)
]
_PAIRS_CONFIGS = [
    triton.Config({"BLOCK_N": block_n}, num_warps=4, num_stages=1) for block_n in (1, 2, 4, 8, 16, 32, 64)
]
# Segment reductions: ROWS pairs per tile; columns split in BLOCK_W-wide programs. Eight to sixteen elements
# of a tile per thread: with fewer (a 16 x 32 tile over two or four warps), ptxas held some kernels to 32-48
# registers and spilled 4-8 bytes on sm_80 or sm_90.
_REDUCE_CONFIGS = [
    triton.Config({"ROWS": _ROWS, "BLOCK_W": block_w}, num_warps=warps, num_stages=1)
    for block_w, warps in ((16, 1), (32, 1), (64, 4), (128, 8))
]
# Combine: PARTS partial sums per tile, eight elements per thread (for the K outputs in turn).
_COMBINE_CONFIGS = [
    triton.Config({"PARTS": parts, "BLOCK_W": block_w}, num_warps=warps, num_stages=1)
    for parts, block_w, warps in ((64, 16, 4), (32, 32, 4), (32, 64, 8), (16, 128, 8))
]
# About this many chunks of sorted pairs per reduction launch: programs enough to fill a large GPU several
# times over, and a bound on the partial sums that the combine adds for one segment.
_TARGET_CHUNKS = 2048


def _tile_per_thread(config, width: int) -> float:
    """Elements of a config's [BLOCK_N, width] tile per thread."""
    return config.kwargs["BLOCK_N"] * width / (32 * config.num_warps)


def _aligned(kwargs: dict) -> bool:
    """Whether d and e are multiples of 16 (Triton then loads the rows as 16-byte vectors)."""
    return kwargs["D"] % 16 == 0 and kwargs["E"] % 16 == 0


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Forward: the configs within the tile budget per thread (the one with the smallest tile per thread if none)."""
    width = max(kwargs["BLOCK_D"], kwargs["BLOCK_E"])
    budget = _FWD_TILE_ELEMS_PER_THREAD if _aligned(kwargs) else _FWD_TILE_ELEMS_PER_THREAD_UNALIGNED
    fitting = [c for c in configs if _tile_per_thread(c, width) <= budget]
    return fitting or [min(configs, key=lambda c: _tile_per_thread(c, width))]


def _pick_pairs_config(configs, named_args, **kwargs):
    """Pairs kernel: the one config with the most pairs per tile within the tile budget per thread."""
    width = max(kwargs["BLOCK_D"], kwargs["BLOCK_E"])
    budget = _PAIRS_TILE_ELEMS_PER_THREAD if _aligned(kwargs) else _PAIRS_TILE_ELEMS_PER_THREAD_UNALIGNED
    fitting = [c for c in configs if _tile_per_thread(c, width) <= budget]
    if not fitting:
        return [min(configs, key=lambda c: _tile_per_thread(c, width))]
    return [max(fitting, key=lambda c: c.kwargs["BLOCK_N"])]


def _pick_by_width(configs, named_args, **kwargs):
    """Reductions and combine: the one config whose BLOCK_W covers ``kwargs["W"]`` columns, or the widest."""
    wide_enough = [c for c in configs if c.kwargs["BLOCK_W"] >= kwargs["W"]]
    if wide_enough:
        return [min(wide_enough, key=lambda c: c.kwargs["BLOCK_W"])]
    return [max(configs, key=lambda c: c.kwargs["BLOCK_W"])]


# The forward is tuned on (D, E) only: the number of pairs changes from call to call without changing the
# best config, and a key on it would re-benchmark every new N (triton adds the tensors' dtypes itself).
_FWD_KEY = ["D", "E"]
_FWD_TUNING = dict(key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd_configs})
# Under the interpreter there is nothing to tune: one config.
_INTERPRET_FWD_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
_fwd_autotune = triton.autotune(configs=_INTERPRET_FWD_CONFIGS if INTERPRET else _FWD_CONFIGS, **_FWD_TUNING)


# ---- kernels ----


@triton.jit
def _gather(ptr, rows, width, offs, ok):
    """float32 tile of the rows ``rows`` (each ``width`` wide) of a row-major table, columns ``offs``."""
    return tl.load(ptr + rows[:, None] * width + offs[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _pairs(user_index_ptr, item_index_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, N, D, scale, scale_glob,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The block's pairs: indices, their live mask, and the three gates."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * e may pass 2^31
    live = offs_n < N
    r = tl.load(user_index_ptr + offs_n, mask=live, other=0)
    j = tl.load(item_index_ptr + offs_n, mask=live, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    ok_d = live[:, None] & (offs_d < D)[None, :]
    s1 = tl.sum(_gather(user_ptr, r, D, offs_d, ok_d) * _gather(item_ptr, j, D, offs_d, ok_d), axis=1)
    s2 = tl.sum(_gather(user_sim_ptr, r, D, offs_d, ok_d) * _gather(item_sim_ptr, j, D, offs_d, ok_d), axis=1)
    a_self = tl.sigmoid(s1 * scale)
    a_sim = tl.sigmoid(s2 * scale)
    a_glob = tl.sigmoid((s1 + s2) * scale_glob)
    return offs_n, live, j, a_self, a_sim, a_glob


@triton.jit
def _values(values_ptr, j, live, E, BLOCK_E: tl.constexpr):
    """Column offsets and mask of an e-wide tile, and the three value rows (self, similar, global) of items j."""
    offs_e = tl.arange(0, BLOCK_E)
    ok_e = live[:, None] & (offs_e < E)[None, :]
    v_self = _gather(values_ptr, j * 3, E, offs_e, ok_e)
    v_sim = _gather(values_ptr, j * 3 + 1, E, offs_e, ok_e)
    v_glob = _gather(values_ptr, j * 3 + 2, E, offs_e, ok_e)
    return offs_e, ok_e, v_self, v_sim, v_glob


@_fwd_autotune
@triton.jit
def _fwd_kernel(
    user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, values_ptr, user_index_ptr, item_index_ptr, out_ptr,
    N, D, E, scale, scale_glob, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    offs_n, live, j, a_self, a_sim, a_glob = _pairs(
        user_index_ptr, item_index_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, N, D, scale, scale_glob,
        BLOCK_N, BLOCK_D,
    )
    offs_e, ok_e, v_self, v_sim, v_glob = _values(values_ptr, j, live, E, BLOCK_E)
    out = a_self[:, None] * v_self + a_sim[:, None] * v_sim + a_glob[:, None] * v_glob
    out_offs = offs_n[:, None] * E + offs_e[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=ok_e)


@triton.jit
def _bwd_pairs_kernel(
    grad_out_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, values_ptr, user_index_ptr, item_index_ptr,
    pair_ptr, N, D, E, scale, scale_glob, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Row n of the float32 ``[N, 5]`` buffer ``pair``: a_self, a_sim, a_glob, ds1 = dL/ds1, ds2 = dL/ds2."""
    offs_n, live, j, a_self, a_sim, a_glob = _pairs(
        user_index_ptr, item_index_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, N, D, scale, scale_glob,
        BLOCK_N, BLOCK_D,
    )
    offs_e, ok_e, v_self, v_sim, v_glob = _values(values_ptr, j, live, E, BLOCK_E)
    g = _gather(grad_out_ptr, offs_n, E, offs_e, ok_e)
    dz_self = tl.sum(g * v_self, axis=1) * a_self * (1.0 - a_self)
    dz_sim = tl.sum(g * v_sim, axis=1) * a_sim * (1.0 - a_sim)
    dz_glob = tl.sum(g * v_glob, axis=1) * a_glob * (1.0 - a_glob)
    row = pair_ptr + offs_n * 5
    tl.store(row, a_self, mask=live)
    tl.store(row + 1, a_sim, mask=live)
    tl.store(row + 2, a_glob, mask=live)
    tl.store(row + 3, dz_self * scale + dz_glob * scale_glob, mask=live)
    tl.store(row + 4, dz_sim * scale + dz_glob * scale_glob, mask=live)


@triton.jit
def _chunk(N, chunk):
    """This program's chunk of sorted pairs (grid axis 0): its index and its [lo, hi) positions."""
    c = tl.program_id(0).to(tl.int64)
    lo = c * chunk
    return c, lo, tl.minimum(lo + chunk, N)


@triton.jit
def _segment(key_ptr, starts_ptr, pos):
    """The segment (item or user) at sorted position ``pos`` and its [first, end) positions."""
    seg = tl.load(key_ptr + pos)
    return seg, tl.load(starts_ptr + seg), tl.load(starts_ptr + seg + 1)


@triton.jit
def _step(order_ptr, q, end, ROWS: tl.constexpr):
    """ROWS sorted positions from ``q``: their pair ids and live mask."""
    offs_q = q + tl.arange(0, ROWS)
    live = offs_q < end
    return tl.load(order_ptr + offs_q, mask=live, other=0), live


@triton.jit
def _bwd_rows_kernel(
    key_ptr, order_ptr, starts_ptr, gather_index_ptr, pair_ptr, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, partial_ptr,
    N, W, chunk, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """grad_a[s] = Σ ds1[n] a[gather_index[n]] and grad_b[s] = Σ ds2[n] b[gather_index[n]] over the pairs n of
    segment s (W-wide rows). Item side: a, b = user, user_sim and gather_index = user_index; user side:
    a, b = item, item_sim and item_index. Partial sums go to ``partial [chunks, 2 slots, 2, W]``."""
    c, lo, hi = _chunk(N, chunk)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok_w = offs_w < W
    pos = lo
    while pos < hi:
        seg, first, end_seg = _segment(key_ptr, starts_ptr, pos)
        end = tl.minimum(end_seg, hi)
        acc_a = tl.zeros([ROWS, BLOCK_W], tl.float32)
        acc_b = tl.zeros([ROWS, BLOCK_W], tl.float32)
        for q in range(pos, end, ROWS):
            n, live = _step(order_ptr, q, end, ROWS)
            ds1 = tl.load(pair_ptr + n * 5 + 3, mask=live, other=0.0)
            ds2 = tl.load(pair_ptr + n * 5 + 4, mask=live, other=0.0)
            rows = tl.load(gather_index_ptr + n, mask=live, other=0)
            ok = live[:, None] & ok_w[None, :]
            acc_a += ds1[:, None] * _gather(a_ptr, rows, W, offs_w, ok)
            acc_b += ds2[:, None] * _gather(b_ptr, rows, W, offs_w, ok)
        sum_a = tl.sum(acc_a, axis=0)
        sum_b = tl.sum(acc_b, axis=0)
        if (first >= lo) & (end_seg <= hi):
            tl.store(grad_a_ptr + seg * W + offs_w, sum_a.to(grad_a_ptr.dtype.element_ty), mask=ok_w)
            tl.store(grad_b_ptr + seg * W + offs_w, sum_b.to(grad_b_ptr.dtype.element_ty), mask=ok_w)
        else:
            slot = (c * 2 + (pos > lo).to(tl.int64)) * 2  # slot 0: the chunk's first segment, 1: its last
            tl.store(partial_ptr + slot * W + offs_w, sum_a, mask=ok_w)
            tl.store(partial_ptr + (slot + 1) * W + offs_w, sum_b, mask=ok_w)
        pos = end


@triton.jit
def _bwd_values_kernel(
    key_ptr, order_ptr, starts_ptr, pair_ptr, grad_out_ptr, grad_values_ptr, partial_ptr,
    N, W, chunk, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """grad_values[j, x] = Σ a_x[n] grad_out[n] (x = self, similar, global; W = e) over the pairs n of item j.
    Partial sums go to ``partial [chunks, 2 slots, 3, W]``."""
    c, lo, hi = _chunk(N, chunk)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok_w = offs_w < W
    pos = lo
    while pos < hi:
        seg, first, end_seg = _segment(key_ptr, starts_ptr, pos)
        end = tl.minimum(end_seg, hi)
        acc_self = tl.zeros([ROWS, BLOCK_W], tl.float32)
        acc_sim = tl.zeros([ROWS, BLOCK_W], tl.float32)
        acc_glob = tl.zeros([ROWS, BLOCK_W], tl.float32)
        for q in range(pos, end, ROWS):
            n, live = _step(order_ptr, q, end, ROWS)
            a_self = tl.load(pair_ptr + n * 5, mask=live, other=0.0)
            a_sim = tl.load(pair_ptr + n * 5 + 1, mask=live, other=0.0)
            a_glob = tl.load(pair_ptr + n * 5 + 2, mask=live, other=0.0)
            g = _gather(grad_out_ptr, n, W, offs_w, live[:, None] & ok_w[None, :])
            acc_self += a_self[:, None] * g
            acc_sim += a_sim[:, None] * g
            acc_glob += a_glob[:, None] * g
        sum_self = tl.sum(acc_self, axis=0)
        sum_sim = tl.sum(acc_sim, axis=0)
        sum_glob = tl.sum(acc_glob, axis=0)
        if (first >= lo) & (end_seg <= hi):
            out = grad_values_ptr + seg * 3 * W + offs_w
            tl.store(out, sum_self.to(grad_values_ptr.dtype.element_ty), mask=ok_w)
            tl.store(out + W, sum_sim.to(grad_values_ptr.dtype.element_ty), mask=ok_w)
            tl.store(out + 2 * W, sum_glob.to(grad_values_ptr.dtype.element_ty), mask=ok_w)
        else:
            slot = (c * 2 + (pos > lo).to(tl.int64)) * 3
            tl.store(partial_ptr + slot * W + offs_w, sum_self, mask=ok_w)
            tl.store(partial_ptr + (slot + 1) * W + offs_w, sum_sim, mask=ok_w)
            tl.store(partial_ptr + (slot + 2) * W + offs_w, sum_glob, mask=ok_w)
        pos = end


@triton.jit
def _bwd_combine_kernel(
    key_ptr, starts_ptr, partial_ptr, out0_ptr, out1_ptr, out2_ptr, N, W, chunk, out_row_stride, out_k_stride,
    K: tl.constexpr, PARTS: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """The segment that starts in this program's chunk and runs past its end, if any: the sum of its partial
    sums ``partial [chunks, 2, K, W]`` over the chunks it spans into row ``seg`` of each output k
    (``out_k + seg * out_row_stride + k * out_k_stride``)."""
    c, lo, hi = _chunk(N, chunk)
    seg, first, end_seg = _segment(key_ptr, starts_ptr, hi - 1)  # the chunk's last segment
    if (first >= lo) & (end_seg > hi):
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        ok_w = offs_w < W
        last = (end_seg - 1) // chunk
        first_slot = (first > lo).to(tl.int64)  # its slot in chunk c; it is the first segment of the later ones
        for k in tl.static_range(K):
            acc = tl.zeros([PARTS, BLOCK_W], tl.float32)
            for p0 in range(c, last + 1, PARTS):
                p = p0 + tl.arange(0, PARTS)
                slot = p * 2 + tl.where(p == c, first_slot, 0)
                ok = (p <= last)[:, None] & ok_w[None, :]
                acc += tl.load(partial_ptr + (slot * K + k)[:, None] * W + offs_w[None, :], mask=ok, other=0.0)
            total = tl.sum(acc, axis=0)
            if k == 0:
                out_ptr = out0_ptr
            elif k == 1:
                out_ptr = out1_ptr
            else:
                out_ptr = out2_ptr
            dest = out_ptr + seg * out_row_stride + k * out_k_stride + offs_w
            tl.store(dest, total.to(out_ptr.dtype.element_ty), mask=ok_w)


# ---- launchers ----


def _launch_args(item: Tensor, values: Tensor, user_index: Tensor) -> dict:
    if item.dtype not in TRITON_DTYPES:
        raise TypeError(f"projected HAE Triton kernels take float32, float16 or bfloat16, not {item.dtype}")
    D, E = item.shape[1], values.shape[2]
    return dict(N=user_index.shape[0], D=D, E=E, scale=1.0 / math.sqrt(D), scale_glob=1.0 / math.sqrt(2 * D),
                BLOCK_D=triton.next_power_of_2(D), BLOCK_E=triton.next_power_of_2(E))


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels write a ``dtype`` result in. A GPU rounds float32 to bfloat16 to nearest, the
    interpreter truncates: under it, bfloat16 results are written in float32 and rounded by torch."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype


def _grid(meta):
    return (triton.cdiv(meta["N"], meta["BLOCK_N"]),)


def _meta(config) -> dict:
    """A config's launch arguments (constexprs and num_warps / num_stages)."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def holistic_attention_projected_forward(
    user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor, user_index: Tensor,
    item_index: Tensor,
) -> Tensor:
    """``[N, e]``: the gated mix of ``values [M, 3, e]`` for the pairs ``(user_index[n], item_index[n])``.

    ``user, user_sim``: ``[U, d]``; ``item, item_sim``: ``[M, d]``; indices int64 ``[N]`` in range. Inputs
    must be contiguous and of one float32/float16/bfloat16 dtype and device (the caller validates them).
    """
    args = _launch_args(item, values, user_index)
    out = values.new_empty((user_index.shape[0], values.shape[2]), dtype=_store_dtype(values.dtype))
    if args["N"]:
        with on_device(item):
            launcher(_fwd_kernel)[_grid](user, user_sim, item, item_sim, values, user_index, item_index, out, **args)
    return out.to(values.dtype)


def _chunk_length(N: int) -> int:
    """Sorted pairs per reduction program: a power of two of at least one tile, about _TARGET_CHUNKS chunks."""
    return max(_ROWS, triton.next_power_of_2(triton.cdiv(N, _TARGET_CHUNKS)))


def _group(index: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs grouped by ``index`` (values in 0..rows-1): the sorted keys, the pair ids in that order (stable:
    increasing within a segment) and the ``[rows + 1]`` segment offsets."""
    keys, order = torch.sort(index, stable=True)
    starts = torch.searchsorted(keys, torch.arange(rows + 1, dtype=keys.dtype, device=keys.device))
    return keys, order, starts


def _reduce(kernel, group: tuple[Tensor, Tensor, Tensor], inputs: tuple, outputs: tuple[Tensor, ...], K: int,
            N: int, W: int, chunk: int) -> None:
    """Launch a segment reduction of K sums per segment (``kernel``: the rows kernel, K = 2, or the values
    kernel, K = 3), then the combine of the segments that cross a chunk boundary."""
    keys, order, starts = group
    chunks = triton.cdiv(N, chunk)
    partial = torch.empty((chunks, 2, K, W), dtype=torch.float32, device=keys.device)
    meta = _meta(_pick_by_width(_REDUCE_CONFIGS, {}, W=W)[0])
    launcher(kernel)[(chunks, triton.cdiv(W, meta["BLOCK_W"]))](
        keys, order, starts, *inputs, *outputs, partial, N, W, chunk, **meta
    )
    if K == 2:  # two [rows, W] gradients
        out, row_stride, k_stride = (outputs[0], outputs[1], outputs[1]), W, 0
    else:  # one [rows, 3, W] gradient
        out, row_stride, k_stride = (outputs[0],) * 3, 3 * W, W
    meta = _meta(_pick_by_width(_COMBINE_CONFIGS, {}, W=W)[0])
    launcher(_bwd_combine_kernel)[(chunks, triton.cdiv(W, meta["BLOCK_W"]))](
        keys, starts, partial, *out, N, W, chunk, row_stride, k_stride, K=K, **meta
    )


def holistic_attention_projected_backward(
    grad_out: Tensor, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor,
    user_index: Tensor, item_index: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(user, user_sim, item, item_sim, values)`` of :func:`holistic_attention_projected_forward`, each in
    its
    input's shape and dtype; ``grad_out`` is the contiguous ``[N, e]`` gradient of the output. Deterministic:
    no atomics, and every sum runs in an order that depends only on the inputs."""
    args = _launch_args(item, values, user_index)
    inputs = (user, user_sim, item, item_sim, values)
    grads = tuple(torch.zeros(t.shape, dtype=_store_dtype(t.dtype), device=t.device) for t in inputs)
    N, D, E = args["N"], args["D"], args["E"]
    if not N:
        return tuple(g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))
    grad_user, grad_user_sim, grad_item, grad_item_sim, grad_values = grads
    with on_device(item):
        pair = torch.empty((N, 5), dtype=torch.float32, device=item.device)
        pairs_meta = _meta(_pick_pairs_config(_PAIRS_CONFIGS, {}, **args)[0])
        launcher(_bwd_pairs_kernel)[(triton.cdiv(N, pairs_meta["BLOCK_N"]),)](
            grad_out, user, user_sim, item, item_sim, values, user_index, item_index, pair, **args, **pairs_meta
        )
        chunk = _chunk_length(N)
        by_item = _group(item_index, item.shape[0])
        _reduce(_bwd_values_kernel, by_item, (pair, grad_out), (grad_values,), 3, N, E, chunk)
        item_rows = (user_index, pair, user, user_sim), (grad_item, grad_item_sim)
        _reduce(_bwd_rows_kernel, by_item, *item_rows, 2, N, D, chunk)
        by_user = _group(user_index, user.shape[0])
        user_rows = (item_index, pair, item, item_sim), (grad_user, grad_user_sim)
        _reduce(_bwd_rows_kernel, by_user, *user_rows, 2, N, D, chunk)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))


define_op("grasp::holistic_attention_projected_forward_triton", holistic_attention_projected_forward, mutates_args=())
define_op("grasp::holistic_attention_projected_backward_triton", holistic_attention_projected_backward, mutates_args=())

# Fake kernels and autograd: shared with the C++ ops of the same schema.
register_holistic_attention_projected(
    "grasp::holistic_attention_projected_forward_triton", "grasp::holistic_attention_projected_backward_triton"
)
