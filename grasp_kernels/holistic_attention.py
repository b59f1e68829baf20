"""Fused Triton kernels of the holistic-attention (HAE) operator (docs/design.md section 2).

For every (b, l), with u = user[b], ū = user_sim[b] (or [b, l] each), i = item[b, l], ī = item_sim[b, l]:
s1 = <u, i>, s2 = <ū, ī>, gates a_self = act(s1/√d), a_sim = act(s2/√d), a_glob = act((s1+s2)/√(2d))
and out[b, l] = [a_self·i | a_sim·ī | a_glob·i | a_glob·ī]. ``act`` is a sigmoid, or a softmax over
the L positions of a row (one per branch, masked positions excluded).

Kernel design: one program per batch row b walks L in tiles of BLOCK_L positions that span the whole
of d (BLOCK_D = next_power_of_2(d)); everything is accumulated in float32.

- Forward: loads u, ū, i, ī once per tile, computes the three gates and writes the tile's [., 4d]
  output. The softmax first makes a pass over the row for each branch's max and sum of exponentials.
- Backward: recomputes the gates from the inputs (the forward saves nothing) and writes the four
  gradients in the same pass. A broadcast user's gradient is summed over L in registers, so nothing
  is accumulated across programs (no atomics). The softmax first makes a pass for the row statistics
  and for sum_l a·da of each branch.

Autotuning: BLOCK_L and num_warps are tuned per key (BLOCK_D, a power-of-two bucket of L, the flags
and the dtypes), never per exact B or L, so new batch sizes and sequence lengths within a bucket reuse
the choice without benchmarking again.

``holistic_attention_forward`` and ``holistic_attention_backward`` launch the kernels, on the inputs' device; the
torch.library ops ``grasp::holistic_attention_forward_triton`` (differentiable) and
``grasp::holistic_attention_backward_triton`` wrap them.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from grasp.ops._kernel_glue import register_holistic_attention
from grasp_kernels._common import INTERPRET, define_op, launcher, on_device

__all__ = [
    "AUTOTUNE_KEY", "L_BUCKET_MAX", "autotuner", "holistic_attention_backward", "holistic_attention_forward", "l_bucket"
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Most elements of a [BLOCK_L, BLOCK_D] tile per thread a config may use, so that wide rows get fewer
# positions per tile rather than spilling registers. The backward keeps about eight float32 tiles live:
# at 16 elements per thread it needs 125-255 registers and spills (sm_90, float32, d = 50), at 8 at most
# 144; the forward stays within 204 at 16 (every config compiled for sm_80 and sm_90 at the target shapes
# of benchmarks/gpu_model.py, with and without a mask; benchmarks/gpu_code_report.py checks it).
_FWD_TILE_ELEMS_PER_THREAD = 16
_BWD_TILE_ELEMS_PER_THREAD = 8

# Forward tiles, as (BLOCK_D, BLOCK_L, num_warps), that ptxas compiles with 4 bytes of spills in some
# variant although they fit (it trades registers for occupancy there: sm_90, the float32 softmax or the
# float16 sigmoid of a [B, d] user, found by the same compiles).
_FWD_SPILLS = {(64, 16, 4), (256, 4, 8), (256, 16, 8)}

# See _rounded.
_INTERPRETED_BF16_TRUNCATES = tl.constexpr(INTERPRET)

# Starting value of a running softmax max: finite, so exp(m_old - m_new) is never exp(-inf + inf).
_FP32_MIN = tl.constexpr(-3.4028234663852886e38)

# Rows longer than this share one autotuning bucket: a row of this many positions spans many tiles of
# every config, so a longer one does not change which config is fastest.
L_BUCKET_MAX = 1024

if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_L": 16}, num_warps=4, num_stages=1)]
else:
    # num_stages is not tuned: the loops hold no tl.dot, so Triton does not software-pipeline them and
    # emits the same code for every num_stages.
    _CONFIGS = [
        triton.Config({"BLOCK_L": block_l}, num_warps=warps, num_stages=1)
        for block_l in (1, 4, 16, 64)
        for warps in (4, 8)
    ]


def l_bucket(L: int) -> int:
    """The autotuning bucket of a row of L positions: the next power of two, at most L_BUCKET_MAX."""
    return min(triton.next_power_of_2(max(L, 1)), L_BUCKET_MAX)


def _prune(configs, args: dict, max_per_thread: int, spills: set) -> list:
    """The configs worth benchmarking for a launch, from its key arguments alone (BLOCK_D, L_BUCKET).

    A config is kept when its tile is no longer than the row's bucket (a longer tile only computes
    masked-out positions), holds at most ``max_per_thread`` elements per thread and its
    (BLOCK_D, BLOCK_L, num_warps) is not in ``spills``. If none is kept, the one with the smallest tile
    per thread among the short enough ones.
    """
    block_d, bucket = args["BLOCK_D"], args["L_BUCKET"]

    def per_thread(config):
        return config.kwargs["BLOCK_L"] * block_d / (32 * config.num_warps)

    short = [c for c in configs if c.kwargs["BLOCK_L"] <= bucket] or [min(configs, key=lambda c: c.kwargs["BLOCK_L"])]
    fitting = [
        c for c in short
        if per_thread(c) <= max_per_thread and (block_d, c.kwargs["BLOCK_L"], c.num_warps) not in spills
    ]
    return fitting or [min(short, key=per_thread)]


def _prune_forward_configs(configs, named_args, **kwargs):
    """The forward's configs for a launch (see _prune): named_args and kwargs are the launch's arguments."""
    return _prune(configs, {**named_args, **kwargs}, _FWD_TILE_ELEMS_PER_THREAD, _FWD_SPILLS)


def _prune_backward_configs(configs, named_args, **kwargs):
    """The backward's configs for a launch (see _prune): named_args and kwargs are the launch's arguments."""
    return _prune(configs, {**named_args, **kwargs}, _BWD_TILE_ELEMS_PER_THREAD, set())


#: The autotuning key: the tile width, the row's length bucket and the flags (Triton adds the tensors'
#: dtypes). Never the exact B or L, so a new batch size or sequence length in the same bucket reuses the
#: benchmarked choice.
AUTOTUNE_KEY = ["BLOCK_D", "L_BUCKET", "SOFTMAX", "HAS_MASK", "USER_PER_POSITION"]


def autotuner(configs: list[triton.Config], *, backward: bool):
    """``triton.autotune`` over ``configs`` with the HAE key and the forward's or the backward's pruner."""
    prune = _prune_backward_configs if backward else _prune_forward_configs
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune})


# L and L_BUCKET are not specialised: only D fixes the alignment of the rows, so every length shares
# one compiled kernel per config.
_jit = triton.jit(do_not_specialize=["L", "L_BUCKET"])


@triton.jit
def _tile(b, l0, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flat b*L + l indices and column offsets of the tile of row b starting at l0, with their bounds."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    return b * L + offs_l, offs_d, offs_l < L, (offs_d < D)[None, :]


@triton.jit
def _tile_masks(mask_ptr, rows, in_row, d_ok, HAS_MASK: tl.constexpr):
    """(live, load_mask, store_mask): live marks positions inside the row and not masked out.

    Loads use load_mask, so dead positions read as 0; stores use store_mask, so they are written as 0.
    (Kept apart from _tile so that no store address depends on mask_ptr: torch.compile's mutation
    analysis would otherwise think the mask is written.)
    """
    live = in_row
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + rows, mask=in_row, other=0) != 0)
    return live, live[:, None] & d_ok, in_row[:, None] & d_ok


@triton.jit
def _rounded(x, ty: tl.constexpr):
    """float32 x converted to the store type ty, rounding to nearest even as a GPU does.

    Triton's interpreter truncates float32 -> bfloat16 conversions instead (whatever the rounding
    mode asked for), so there x is first rounded to the nearest bfloat16 value by integer arithmetic
    on its bits (NaN kept), and the truncating conversion is then exact.
    """
    if _INTERPRETED_BF16_TRUNCATES and ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, nearest.to(tl.float32, bitcast=True), x)
    return x.to(ty)


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_inputs(
    user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, b, offs, offs_d, load_mask, D,
    USER_PER_POSITION: tl.constexpr,
):
    """float32 tiles u, ū, i, ī; a broadcast user comes back as one [1, BLOCK_D] row."""
    if USER_PER_POSITION:
        u = _load(user_ptr, offs, load_mask)
        u_sim = _load(user_sim_ptr, offs, load_mask)
    else:
        offs_u = (b * D + offs_d)[None, :]
        d_ok = (offs_d < D)[None, :]
        u = _load(user_ptr, offs_u, d_ok)
        u_sim = _load(user_sim_ptr, offs_u, d_ok)
    return u, u_sim, _load(item_ptr, offs, load_mask), _load(item_sim_ptr, offs, load_mask)


@triton.jit
def _logits(u, u_sim, i, i_sim, scale, scale_glob):
    """z_self, z_sim, z_glob of each position of the tile."""
    s1 = tl.sum(u * i, axis=1)
    s2 = tl.sum(u_sim * i_sim, axis=1)
    return s1 * scale, s2 * scale, (s1 + s2) * scale_glob


@triton.jit
def _load_grad_out(grad_out_ptr, rows, offs_d, load_mask, D):
    """The four d-wide slices g1, g2, g3, g4 of grad_out for the tile."""
    offs = rows[:, None] * (4 * D) + offs_d[None, :]
    g1 = _load(grad_out_ptr, offs, load_mask)
    g2 = _load(grad_out_ptr, offs + D, load_mask)
    g3 = _load(grad_out_ptr, offs + 2 * D, load_mask)
    g4 = _load(grad_out_ptr, offs + 3 * D, load_mask)
    return g1, g2, g3, g4


@triton.jit
def _gate_grads(g1, g2, g3, g4, i, i_sim):
    """da_self, da_sim, da_glob: the gradient reaching each gate."""
    return tl.sum(g1 * i, axis=1), tl.sum(g2 * i_sim, axis=1), tl.sum(g3 * i + g4 * i_sim, axis=1)


@triton.jit
def _online_softmax(m, s, z, live):
    """Fold a tile of logits into a row's running max m and sum s of exp(z - m).

    Returns the new (m, s), the factor alpha = exp(m_old - m_new) that rescales any other sum kept
    relative to the max, and p = exp(z - m_new) of the tile (0 at dead positions).
    """
    z = tl.where(live, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(z - m_new)
    return m_new, s * alpha + tl.sum(p, axis=0), alpha, p


@triton.jit
def _inv_sum(s):
    # The row's largest term is exp(0) = 1, so s >= 1 unless no position is live; then s = 0, every
    # weight is exp(-inf) = 0 and any finite inverse will do.
    return 1.0 / tl.maximum(s, 1.0)


@triton.jit
def _gate(z, m, inv_s, live, SOFTMAX: tl.constexpr):
    """Weight of each position as a [BLOCK_L, 1] column: exp(z - m) / s or sigmoid(z); 0 if dead."""
    if SOFTMAX:
        a = tl.exp(tl.where(live, z, float("-inf")) - m) * inv_s
    else:
        a = tl.where(live, tl.sigmoid(z), 0.0)
    return a[:, None]


@triton.jit
def _logit_grad(a, da, c, SOFTMAX: tl.constexpr):
    """dz from a gate and its gradient; c = sum_l a·da over the row (softmax only)."""
    if SOFTMAX:
        return a * (da - c)
    return da * a * (1.0 - a)


@triton.jit
def _softmax_stats(
    user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, mask_ptr, grad_out_ptr, b, L, D, scale, scale_glob,
    SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr, USER_PER_POSITION: tl.constexpr, WITH_DA: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """The softmax's first pass over row b: (m_self, m_sim, m_glob, s_self, s_sim, s_glob, t_self, t_sim,
    t_glob), each branch's running max m, sum s of exp(z - m) and, with WITH_DA, t = sum exp(z - m)·da
    (da from grad_out_ptr), rescaled like s whenever the max moves.

    Without SOFTMAX the row is not read and m = _FP32_MIN, s = 0; without WITH_DA t = 0 and
    grad_out_ptr is never read (it may be None).
    """
    m_self = tl.full([], _FP32_MIN, tl.float32)
    m_sim = tl.full([], _FP32_MIN, tl.float32)
    m_glob = tl.full([], _FP32_MIN, tl.float32)
    s_self = tl.zeros([], tl.float32)
    s_sim = tl.zeros([], tl.float32)
    s_glob = tl.zeros([], tl.float32)
    t_self = tl.zeros([], tl.float32)
    t_sim = tl.zeros([], tl.float32)
    t_glob = tl.zeros([], tl.float32)
    if SOFTMAX:
        for l0 in range(0, L, BLOCK_L):
            rows, offs_d, in_row, d_ok = _tile(b, l0, L, D, BLOCK_L, BLOCK_D)
            live, load_mask, _ = _tile_masks(mask_ptr, rows, in_row, d_ok, HAS_MASK)
            offs = rows[:, None] * D + offs_d[None, :]
            u, u_sim, i, i_sim = _load_inputs(
                user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, b, offs, offs_d, load_mask, D,
                USER_PER_POSITION,
            )
            z_self, z_sim, z_glob = _logits(u, u_sim, i, i_sim, scale, scale_glob)
            if WITH_DA:
                g1, g2, g3, g4 = _load_grad_out(grad_out_ptr, rows, offs_d, load_mask, D)
                da_self, da_sim, da_glob = _gate_grads(g1, g2, g3, g4, i, i_sim)
            m_self, s_self, alpha, p = _online_softmax(m_self, s_self, z_self, live)
            if WITH_DA:
                t_self = t_self * alpha + tl.sum(p * da_self, axis=0)
            m_sim, s_sim, alpha, p = _online_softmax(m_sim, s_sim, z_sim, live)
            if WITH_DA:
                t_sim = t_sim * alpha + tl.sum(p * da_sim, axis=0)
            m_glob, s_glob, alpha, p = _online_softmax(m_glob, s_glob, z_glob, live)
            if WITH_DA:
                t_glob = t_glob * alpha + tl.sum(p * da_glob, axis=0)
    return m_self, m_sim, m_glob, s_self, s_sim, s_glob, t_self, t_sim, t_glob


@autotuner(_CONFIGS, backward=False)
@_jit
def _hae_fwd_kernel(
    user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, mask_ptr, out_ptr,
    L, D, L_BUCKET, scale, scale_glob,
    SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr, USER_PER_POSITION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)

    # Softmax only: per-branch max and sum of exponentials over the row (online softmax).
    m_self, m_sim, m_glob, s_self, s_sim, s_glob, _, _, _ = _softmax_stats(
        user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, mask_ptr, None, b, L, D, scale, scale_glob,
        SOFTMAX, HAS_MASK, USER_PER_POSITION, False, BLOCK_D, BLOCK_L,
    )
    inv_self, inv_sim, inv_glob = _inv_sum(s_self), _inv_sum(s_sim), _inv_sum(s_glob)

    # Gates, then out = [a_self*i | a_sim*ī | a_glob*i | a_glob*ī].
    out_ty = out_ptr.dtype.element_ty
    for l0 in range(0, L, BLOCK_L):
        rows, offs_d, in_row, d_ok = _tile(b, l0, L, D, BLOCK_L, BLOCK_D)
        live, load_mask, store_mask = _tile_masks(mask_ptr, rows, in_row, d_ok, HAS_MASK)
        offs = rows[:, None] * D + offs_d[None, :]
        u, u_sim, i, i_sim = _load_inputs(
            user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, b, offs, offs_d, load_mask, D, USER_PER_POSITION
        )
        z_self, z_sim, z_glob = _logits(u, u_sim, i, i_sim, scale, scale_glob)
        a_self = _gate(z_self, m_self, inv_self, live, SOFTMAX)
        a_sim = _gate(z_sim, m_sim, inv_sim, live, SOFTMAX)
        a_glob = _gate(z_glob, m_glob, inv_glob, live, SOFTMAX)
        out = out_ptr + rows[:, None] * (4 * D) + offs_d[None, :]
        tl.store(out, _rounded(a_self * i, out_ty), mask=store_mask)
        tl.store(out + D, _rounded(a_sim * i_sim, out_ty), mask=store_mask)
        tl.store(out + 2 * D, _rounded(a_glob * i, out_ty), mask=store_mask)
        tl.store(out + 3 * D, _rounded(a_glob * i_sim, out_ty), mask=store_mask)


@autotuner(_CONFIGS, backward=True)
@_jit
def _hae_bwd_kernel(
    grad_out_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, mask_ptr,
    grad_user_ptr, grad_user_sim_ptr, grad_item_ptr, grad_item_sim_ptr,
    L, D, L_BUCKET, scale, scale_glob,
    SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr, USER_PER_POSITION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)

    # Softmax only: the row statistics of the forward plus t = sum_l exp(z - m)·da of each branch,
    # rescaled like s whenever the max moves, so that t / s = sum_l a·da.
    m_self, m_sim, m_glob, s_self, s_sim, s_glob, t_self, t_sim, t_glob = _softmax_stats(
        user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, mask_ptr, grad_out_ptr, b, L, D, scale, scale_glob,
        SOFTMAX, HAS_MASK, USER_PER_POSITION, True, BLOCK_D, BLOCK_L,
    )
    inv_self, inv_sim, inv_glob = _inv_sum(s_self), _inv_sum(s_sim), _inv_sum(s_glob)
    c_self, c_sim, c_glob = t_self * inv_self, t_sim * inv_sim, t_glob * inv_glob

    # Gradients. ds1, ds2 are the gradients of s1 = <u, i> and s2 = <ū, ī>.
    grad_u_row = tl.zeros([BLOCK_D], tl.float32)
    grad_u_sim_row = tl.zeros([BLOCK_D], tl.float32)
    grad_ty = grad_item_ptr.dtype.element_ty
    for l0 in range(0, L, BLOCK_L):
        rows, offs_d, in_row, d_ok = _tile(b, l0, L, D, BLOCK_L, BLOCK_D)
        live, load_mask, store_mask = _tile_masks(mask_ptr, rows, in_row, d_ok, HAS_MASK)
        offs = rows[:, None] * D + offs_d[None, :]
        u, u_sim, i, i_sim = _load_inputs(
            user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, b, offs, offs_d, load_mask, D, USER_PER_POSITION
        )
        z_self, z_sim, z_glob = _logits(u, u_sim, i, i_sim, scale, scale_glob)
        g1, g2, g3, g4 = _load_grad_out(grad_out_ptr, rows, offs_d, load_mask, D)
        da_self, da_sim, da_glob = _gate_grads(g1, g2, g3, g4, i, i_sim)
        a_self = _gate(z_self, m_self, inv_self, live, SOFTMAX)
        a_sim = _gate(z_sim, m_sim, inv_sim, live, SOFTMAX)
        a_glob = _gate(z_glob, m_glob, inv_glob, live, SOFTMAX)
        dz_self = _logit_grad(a_self, da_self[:, None], c_self, SOFTMAX)
        dz_sim = _logit_grad(a_sim, da_sim[:, None], c_sim, SOFTMAX)
        dz_glob = _logit_grad(a_glob, da_glob[:, None], c_glob, SOFTMAX)
        ds1 = dz_self * scale + dz_glob * scale_glob
        ds2 = dz_sim * scale + dz_glob * scale_glob
        grad_item = a_self * g1 + a_glob * g3 + ds1 * u
        grad_item_sim = a_sim * g2 + a_glob * g4 + ds2 * u_sim
        tl.store(grad_item_ptr + offs, _rounded(grad_item, grad_ty), mask=store_mask)
        tl.store(grad_item_sim_ptr + offs, _rounded(grad_item_sim, grad_ty), mask=store_mask)
        if USER_PER_POSITION:
            tl.store(grad_user_ptr + offs, _rounded(ds1 * i, grad_ty), mask=store_mask)
            tl.store(grad_user_sim_ptr + offs, _rounded(ds2 * i_sim, grad_ty), mask=store_mask)
        else:
            grad_u_row += tl.sum(ds1 * i, axis=0)
            grad_u_sim_row += tl.sum(ds2 * i_sim, axis=0)
    if not USER_PER_POSITION:
        offs_d = tl.arange(0, BLOCK_D)
        offs_u = b * D + offs_d
        tl.store(grad_user_ptr + offs_u, _rounded(grad_u_row, grad_ty), mask=offs_d < D)
        tl.store(grad_user_sim_ptr + offs_u, _rounded(grad_u_sim_row, grad_ty), mask=offs_d < D)


def _launch_args(user: Tensor, item: Tensor, mask: Tensor | None, softmax: bool) -> dict:
    """Shape, scale and flag arguments shared by both kernels (L_BUCKET only keys the autotuning)."""
    if item.dtype not in _DTYPES:
        raise TypeError(f"HAE Triton kernels take float32, float16 or bfloat16, not {item.dtype}")
    _, L, D = item.shape
    return dict(
        L=L, D=D, L_BUCKET=l_bucket(L), scale=1.0 / math.sqrt(D), scale_glob=1.0 / math.sqrt(2 * D),
        SOFTMAX=softmax, HAS_MASK=mask is not None, USER_PER_POSITION=user.dim() == 3,
        BLOCK_D=triton.next_power_of_2(D),
    )


def holistic_attention_forward(
    user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None, softmax: bool
) -> Tensor:
    """Holistic attention forward: ``[B, L, 4d]`` output in the dtype of the inputs.

    Args:
        user, user_sim: ``[B, d]`` (broadcast over L) or ``[B, L, d]``.
        item, item_sim: ``[B, L, d]``.
        mask: None or bool ``[B, L]``, True marks a real position.
        softmax: softmax gates over each row's positions instead of sigmoid gates.

    Inputs must be contiguous and of one float32/float16/bfloat16 dtype and device (the caller
    validates them); other dtypes raise TypeError.
    """
    args = _launch_args(user, item, mask, softmax)
    B, L, D = item.shape
    out = item.new_empty((B, L, 4 * D))
    # With no mask, item stands in for the mask pointer; HAS_MASK=False means it is never read.
    with on_device(item):
        launcher(_hae_fwd_kernel)[(B,)](
            user, user_sim, item, item_sim, item if mask is None else mask, out, **args
        )
    return out


def holistic_attention_backward(
    grad_out: Tensor,
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    mask: Tensor | None,
    softmax: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(grad_user, grad_user_sim, grad_item, grad_item_sim)`` of ``holistic_attention_forward``.

    ``grad_out`` is the contiguous ``[B, L, 4d]`` gradient of the output; the other arguments are
    those of the forward. Each gradient has the shape and dtype of its input (a broadcast user's
    gradient is summed over L). Masked positions get zero gradients.
    """
    args = _launch_args(user, item, mask, softmax)
    grads = tuple(t.new_empty(t.shape) for t in (user, user_sim, item, item_sim))
    with on_device(item):
        launcher(_hae_bwd_kernel)[(item.shape[0],)](
            grad_out, user, user_sim, item, item_sim, item if mask is None else mask, *grads, **args
        )
    return grads


define_op("grasp::holistic_attention_forward_triton", holistic_attention_forward, mutates_args=())
define_op("grasp::holistic_attention_backward_triton", holistic_attention_backward, mutates_args=())


# Fake kernels and autograd: shared with the C++ ops of the same schema.
register_holistic_attention("grasp::holistic_attention_forward_triton", "grasp::holistic_attention_backward_triton")
