"""Triton kernels of the projected holistic-attention operator (``grasp.ops.holistic_attention_projected``).

For every pair n, with r = user_index[n], j = item_index[n]: s1 = <user[r], item[j]>,
s2 = <user_sim[r], item_sim[j]>, the sigmoid gates a_self = σ(s1/√d), a_sim = σ(s2/√d),
a_glob = σ((s1+s2)/√(2d)), and out[n] = a_self·values[j,0] + a_sim·values[j,1] + a_glob·values[j,2].

Kernel design: one program per BLOCK_N pairs; rows are gathered through the indices, each tile spans the
whole of d (BLOCK_D = next_power_of_2(d)) and of e (BLOCK_E); everything is accumulated in float32.

- Forward: the two dot products, three gates and the mix of three value rows per pair.
- Backward: recomputes the gates, then scatters every pair's contribution to the rows it read with
  float32 atomic adds (several pairs share a user or an item), and the gradients are cast to the inputs'
  dtype at the end. The order of the atomic adds varies between runs, so the backward is not bitwise
  deterministic on a GPU (the CPU kernel is).

``hae_gather_forward`` and ``hae_gather_backward`` launch the kernels; the torch.library ops
``grasp::hae_gather_forward_triton`` (differentiable) and ``grasp::hae_gather_backward_triton`` wrap them.
"""

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from grasp.ops.hae_projected import TRITON_DTYPES, register_op_glue

__all__ = ["hae_gather_backward", "hae_gather_forward"]

# Under TRITON_INTERPRET=1 the kernels run on CPU tensors in Triton's interpreter: nothing to tune, and
# they are launched directly (wrap_triton only serves torch.compile's tracing of the triton_ops).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Most elements of a [BLOCK_N, max(BLOCK_D, BLOCK_E)] tile per thread a config may use: the backward keeps
# about eight float32 tiles live.
_TILE_ELEMS_PER_THREAD = 16

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=1)
        for block_n in (4, 16, 32, 64)
        for warps in (4, 8)
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs within _TILE_ELEMS_PER_THREAD (the one with the smallest tile per thread if none)."""

    def per_thread(config):
        return config.kwargs["BLOCK_N"] * max(kwargs["BLOCK_D"], kwargs["BLOCK_E"]) / (32 * config.num_warps)

    fitting = [c for c in configs if per_thread(c) <= _TILE_ELEMS_PER_THREAD]
    return fitting or [min(configs, key=per_thread)]


_TUNING = dict(configs=_CONFIGS, key=["D", "E"], prune_configs_by={"early_config_prune": _prune_configs})
_autotune = triton.autotune(**_TUNING)
# The backward accumulates into zeroed buffers: every config the tuner benchmarks must start from zeros again,
# or the benchmark launches' sums would be added to the real one's.
_GRAD_BUFFERS = ["grad_user_ptr", "grad_user_sim_ptr", "grad_item_ptr", "grad_item_sim_ptr", "grad_values_ptr"]
_autotune_accumulating = triton.autotune(**_TUNING, reset_to_zero=_GRAD_BUFFERS)


@triton.jit
def _gather(ptr, rows, width, offs, ok):
    """float32 tile of the rows ``rows`` (each ``width`` wide) of a row-major table, columns ``offs``."""
    return tl.load(ptr + rows[:, None] * width + offs[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _pairs(user_index_ptr, item_index_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, N, D, scale, scale_glob,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The block's pairs: indices, their live mask, the gathered u, ū, i, ī tiles and the three gates."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * e may pass 2^31
    live = offs_n < N
    r = tl.load(user_index_ptr + offs_n, mask=live, other=0)
    j = tl.load(item_index_ptr + offs_n, mask=live, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    ok_d = live[:, None] & (offs_d < D)[None, :]
    u = _gather(user_ptr, r, D, offs_d, ok_d)
    u_sim = _gather(user_sim_ptr, r, D, offs_d, ok_d)
    i = _gather(item_ptr, j, D, offs_d, ok_d)
    i_sim = _gather(item_sim_ptr, j, D, offs_d, ok_d)
    s1 = tl.sum(u * i, axis=1)
    s2 = tl.sum(u_sim * i_sim, axis=1)
    a_self = tl.sigmoid(s1 * scale)
    a_sim = tl.sigmoid(s2 * scale)
    a_glob = tl.sigmoid((s1 + s2) * scale_glob)
    return offs_n, live, r, j, offs_d, ok_d, u, u_sim, i, i_sim, a_self, a_sim, a_glob


@triton.jit
def _values(values_ptr, j, live, E, BLOCK_E: tl.constexpr):
    """Column offsets and mask of an e-wide tile, and the three value rows (self, similar, global) of items j."""
    offs_e = tl.arange(0, BLOCK_E)
    ok_e = live[:, None] & (offs_e < E)[None, :]
    v_self = _gather(values_ptr, j * 3, E, offs_e, ok_e)
    v_sim = _gather(values_ptr, j * 3 + 1, E, offs_e, ok_e)
    v_glob = _gather(values_ptr, j * 3 + 2, E, offs_e, ok_e)
    return offs_e, ok_e, v_self, v_sim, v_glob


@_autotune
@triton.jit
def _fwd_kernel(
    user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, values_ptr, user_index_ptr, item_index_ptr, out_ptr,
    N, D, E, scale, scale_glob, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    offs_n, live, r, j, offs_d, ok_d, u, u_sim, i, i_sim, a_self, a_sim, a_glob = _pairs(
        user_index_ptr, item_index_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, N, D, scale, scale_glob,
        BLOCK_N, BLOCK_D,
    )
    offs_e, ok_e, v_self, v_sim, v_glob = _values(values_ptr, j, live, E, BLOCK_E)
    out = a_self[:, None] * v_self + a_sim[:, None] * v_sim + a_glob[:, None] * v_glob
    out_offs = offs_n[:, None] * E + offs_e[None, :]
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=ok_e)


@_autotune_accumulating
@triton.jit
def _bwd_kernel(
    grad_out_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, values_ptr, user_index_ptr, item_index_ptr,
    grad_user_ptr, grad_user_sim_ptr, grad_item_ptr, grad_item_sim_ptr, grad_values_ptr,
    N, D, E, scale, scale_glob, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Accumulates (float32 atomics) into the zero-initialised float32 gradient buffers."""
    offs_n, live, r, j, offs_d, ok_d, u, u_sim, i, i_sim, a_self, a_sim, a_glob = _pairs(
        user_index_ptr, item_index_ptr, user_ptr, user_sim_ptr, item_ptr, item_sim_ptr, N, D, scale, scale_glob,
        BLOCK_N, BLOCK_D,
    )
    offs_e, ok_e, v_self, v_sim, v_glob = _values(values_ptr, j, live, E, BLOCK_E)
    g = _gather(grad_out_ptr, offs_n, E, offs_e, ok_e)
    dz_self = tl.sum(g * v_self, axis=1) * a_self * (1.0 - a_self)
    dz_sim = tl.sum(g * v_sim, axis=1) * a_sim * (1.0 - a_sim)
    dz_glob = tl.sum(g * v_glob, axis=1) * a_glob * (1.0 - a_glob)
    ds1 = (dz_self * scale + dz_glob * scale_glob)[:, None]
    ds2 = (dz_sim * scale + dz_glob * scale_glob)[:, None]
    row_e = offs_e[None, :]
    tl.atomic_add(grad_values_ptr + (j * 3)[:, None] * E + row_e, a_self[:, None] * g, mask=ok_e)
    tl.atomic_add(grad_values_ptr + (j * 3 + 1)[:, None] * E + row_e, a_sim[:, None] * g, mask=ok_e)
    tl.atomic_add(grad_values_ptr + (j * 3 + 2)[:, None] * E + row_e, a_glob[:, None] * g, mask=ok_e)
    row_d = offs_d[None, :]
    tl.atomic_add(grad_item_ptr + j[:, None] * D + row_d, ds1 * u, mask=ok_d)
    tl.atomic_add(grad_item_sim_ptr + j[:, None] * D + row_d, ds2 * u_sim, mask=ok_d)
    tl.atomic_add(grad_user_ptr + r[:, None] * D + row_d, ds1 * i, mask=ok_d)
    tl.atomic_add(grad_user_sim_ptr + r[:, None] * D + row_d, ds2 * i_sim, mask=ok_d)


def _launch_args(item: Tensor, values: Tensor, user_index: Tensor) -> dict:
    if item.dtype not in TRITON_DTYPES:
        raise TypeError(f"projected HAE Triton kernels take float32, float16 or bfloat16, not {item.dtype}")
    D, E = item.shape[1], values.shape[2]
    return dict(N=user_index.shape[0], D=D, E=E, scale=1.0 / math.sqrt(D), scale_glob=1.0 / math.sqrt(2 * D),
                BLOCK_D=triton.next_power_of_2(D), BLOCK_E=triton.next_power_of_2(E))


def _alert_not_deterministic() -> None:
    """What torch's own atomics-based kernels do under ``torch.use_deterministic_algorithms(True)``."""
    if torch.are_deterministic_algorithms_enabled():
        message = ("hae_gather_backward_triton accumulates with atomic adds and is not deterministic; "
                   "the GRASP enhancer runs the unfused holistic_attention instead in this mode")  # fmt: skip
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=3)


def _grid(meta):
    return (triton.cdiv(meta["N"], meta["BLOCK_N"]),)


def hae_gather_forward(
    user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor, user_index: Tensor,
    item_index: Tensor,
) -> Tensor:
    """``[N, e]``: the gated mix of ``values [M, 3, e]`` for the pairs ``(user_index[n], item_index[n])``.

    ``user, user_sim``: ``[U, d]``; ``item, item_sim``: ``[M, d]``; indices int64 ``[N]`` in range. Inputs
    must be contiguous and of one float32/float16/bfloat16 dtype and device (the caller validates them).
    """
    args = _launch_args(item, values, user_index)
    out = values.new_empty((user_index.shape[0], values.shape[2]))
    if args["N"]:
        kernel = _fwd_kernel if _INTERPRET else wrap_triton(_fwd_kernel)
        kernel[_grid](user, user_sim, item, item_sim, values, user_index, item_index, out, **args)
    return out


def hae_gather_backward(
    grad_out: Tensor, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor,
    user_index: Tensor, item_index: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(user, user_sim, item, item_sim, values)`` of :func:`hae_gather_forward`, each in its
    input's shape and dtype; ``grad_out`` is the contiguous ``[N, e]`` gradient of the output."""
    _alert_not_deterministic()
    args = _launch_args(item, values, user_index)
    inputs = (user, user_sim, item, item_sim, values)
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in inputs]
    if args["N"]:
        kernel = _bwd_kernel if _INTERPRET else wrap_triton(_bwd_kernel)
        kernel[_grid](grad_out, user, user_sim, item, item_sim, values, user_index, item_index, *grads, **args)
    return tuple(g.to(t.dtype) for g, t in zip(grads, inputs, strict=True))


# On a GPU the ops are triton_ops, which torch.compile traces into; under the interpreter they are opaque
# custom ops (tracing would run the interpreter on fake tensors, which have no data).
_define_op = torch.library.custom_op if _INTERPRET else torch.library.triton_op
_define_op("grasp::hae_gather_forward_triton", hae_gather_forward, mutates_args=())
_define_op("grasp::hae_gather_backward_triton", hae_gather_backward, mutates_args=())

register_op_glue("grasp::hae_gather_forward_triton", "grasp::hae_gather_backward_triton")
