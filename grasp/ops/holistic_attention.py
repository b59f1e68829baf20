"""Holistic sigmoid attention, ``grasp.ops.holistic_attention`` (docs/design.md section 2).

Public entry point, input validation, backend dispatch, and the autograd and
fake (meta) registrations of the C++ operators ``grasp::holistic_attention_forward`` /
``grasp::holistic_attention_backward`` (their CPU and CUDA kernels live in ``csrc/``). The
Triton kernels and their ops live in ``grasp_kernels/holistic_attention.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grasp import _extension
from grasp.ops import _backends, _cuda_jit, _holistic_attention_cuda_jit
from grasp.ops._holistic_attention_reference import holistic_attention_reference
from grasp.ops._kernel_glue import FLOAT_DTYPES, register_holistic_attention

__all__ = [
    "AUTO_ORDER", "GPU_TARGET", "backend_reason", "holistic_attention", "holistic_attention_reference", "kernel_bytes"
]

ACTIVATIONS = ("sigmoid", "softmax")

#: Where the default order on CUDA is decided: a training step on a GPU (bfloat16, a ``[B, d]`` user).
GPU_TARGET = dict(B=2048, L=200, d=64, itemsize=2)


def kernel_bytes(backend: str, B: int, L: int, d: int, itemsize: int) -> int:
    """Global-memory bytes of one forward + backward of ``backend``'s GPU kernels (``[B, d]`` user,
    sigmoid gates, no mask), counting every pass a kernel makes over a tensor.

    Both backends make one pass per kernel: the forward reads user, user_sim ``[B, d]`` and item,
    item_sim ``[B, L, d]`` and writes out ``[B, L, 4d]``; the backward reads grad_out ``[B, L, 4d]`` and
    the four inputs and writes the four gradients, summing the user's gradient over L inside the pass.
    At GPU_TARGET that is 315.1 MB + 420.5 MB = 735.6 MB for either.
    """
    if backend not in ("cuda", "triton"):
        raise ValueError(f"kernel_bytes: no GPU kernels for backend {backend!r}")
    items, users = B * L * d, B * d
    forward = 2 * users + 2 * items + 4 * items
    backward = 4 * items + 2 * users + 2 * items + 2 * items + 2 * users
    return itemsize * (forward + backward)


def _cuda_order() -> tuple[str, ...]:
    """The compiled backends by the bytes they move at GPU_TARGET, fewest first, until a GPU measurement
    says otherwise. A tie keeps ``cuda`` first: it has no autotuning pass on a new shape and takes float64."""
    moved = {backend: kernel_bytes(backend, **GPU_TARGET) for backend in ("cuda", "triton")}
    return (*sorted(moved, key=moved.__getitem__), "reference")


#: Preference order of ``backend=None`` per device type: compiled kernels first.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": _cuda_order()}


def backend_reason(backend: str, device_type: str, dtype: torch.dtype | None = None) -> str:
    """Why ``backend`` cannot run holistic attention on ``device_type`` tensors of ``dtype`` ("" if it can)."""
    return _backends.reason("holistic_attention", backend, device_type, dtype)


@_backends.constant_under_compile
def _choose_backend(requested: str | None, device_type: str, dtype: torch.dtype) -> str:
    # A constant for torch.compile: availability checks are not traceable and never change mid-graph.
    return _backends.choose(
        "holistic_attention", requested, device_type, AUTO_ORDER, lambda b, dev: backend_reason(b, dev, dtype)
    )


def _check_inputs(user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None) -> None:
    named = {"user": user, "user_sim": user_sim, "item": item, "item_sim": item_sim}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"holistic_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"holistic_attention: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
            )
    for name, t in named.items():
        if t.dtype != item.dtype:
            raise TypeError(f"holistic_attention: mixed dtypes: {name} is {t.dtype} but item is {item.dtype}")
        if t.device != item.device:
            raise ValueError(
                f"holistic_attention: mixed devices: {name} is on {t.device} but item is on {item.device}"
            )
    if item.dim() != 3:
        raise ValueError(f"holistic_attention: item must be [B, L, d], got shape {tuple(item.shape)}")
    B, L, d = item.shape
    if d == 0:
        raise ValueError("holistic_attention: the feature size d (last dim of item) must be >= 1, got 0")
    if item_sim.shape != item.shape:
        raise ValueError(
            f"holistic_attention: item_sim must have item's shape {tuple(item.shape)}, got {tuple(item_sim.shape)}"
        )
    if user.shape not in ((B, d), (B, L, d)):
        raise ValueError(
            f"holistic_attention: user must be [B, d] = {(B, d)} or [B, L, d] = {(B, L, d)} "
            f"to match item {tuple(item.shape)}, got {tuple(user.shape)}"
        )
    if user_sim.shape != user.shape:
        raise ValueError(
            f"holistic_attention: user_sim must have user's shape {tuple(user.shape)}, got {tuple(user_sim.shape)}"
        )
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"holistic_attention: mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"holistic_attention: mask must have dtype torch.bool, got {mask.dtype}")
        if mask.shape != (B, L):
            raise ValueError(f"holistic_attention: mask must be [B, L] = {(B, L)}, got {tuple(mask.shape)}")
        if mask.device != item.device:
            raise ValueError(f"holistic_attention: mask is on {mask.device} but item is on {item.device}")


def holistic_attention(
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    *,
    mask: Tensor | None = None,
    activation: str = "sigmoid",
    backend: str | None = None,
) -> Tensor:
    """Holistic attention over the self, similar and global branches (docs/design.md section 2).

    For each batch row b and position l, with ``u = user[b]`` (or ``user[b, l]``), ``i = item[b, l]``
    and likewise for the ``*_sim`` inputs, ``s1 = <u, i>``, ``s2 = <u_sim, i_sim>`` and::

        a_self = act(s1 / sqrt(d)); a_sim = act(s2 / sqrt(d)); a_glob = act((s1 + s2) / sqrt(2d))
        out[b, l] = [a_self * i | a_sim * i_sim | a_glob * i | a_glob * i_sim]      # width 4d

    Args:
        user, user_sim: ``[B, d]`` (broadcast over L) or ``[B, L, d]`` (a query per position).
        item, item_sim: ``[B, L, d]``.
        mask: optional bool ``[B, L]``; True marks a real position. Masked positions give zero
            output and zero gradient; a fully masked row gives zeros.
        activation: ``"sigmoid"`` (the paper: independent gates) or ``"softmax"`` (the ablation:
            gates normalised over the L positions of each row, per branch).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None picks the fastest
            available for the tensors' device (``GRASP_BACKEND`` overrides that choice).

    All inputs share one dtype (float32, float16, bfloat16 or float64) and device; accumulation is
    in float32 (float64 for float64) and the output has the input dtype. Non-contiguous inputs
    are accepted. Gradients flow to all four inputs (a broadcast ``user`` gets the sum over L).

    Under ``torch.autocast`` enabled for the inputs' device type, the op behaves as ``F.linear`` does:
    its float32/float16/bfloat16 inputs are cast to the autocast dtype (float64 ones stay), it runs
    with autocast off in that dtype, and returns that dtype. Outside autocast, mixed dtypes are an error.

    Returns:
        ``[B, L, 4d]`` tensor in the inputs' dtype (under autocast, the autocast dtype).

    Example:
        >>> import torch, grasp
        >>> u, us = torch.randn(2, 8), torch.randn(2, 8)
        >>> i, is_ = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        >>> grasp.ops.holistic_attention(u, us, i, is_).shape
        torch.Size([2, 5, 32])
    """
    return _backends.under_autocast_rule(
        _holistic_attention, item, (user, user_sim, item, item_sim), mask, activation, backend
    )


def _holistic_attention(
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    mask: Tensor | None,
    activation: str,
    backend: str | None,
) -> Tensor:
    """:func:`holistic_attention` outside autocast."""
    _check_inputs(user, user_sim, item, item_sim, mask)
    if activation not in ACTIVATIONS:
        raise ValueError(f"holistic_attention: activation must be 'sigmoid' or 'softmax', got {activation!r}")
    name = _choose_backend(backend, item.device.type, item.dtype)
    if name == "reference" or item.numel() == 0:
        return holistic_attention_reference(user, user_sim, item, item_sim, mask, activation)
    args = (user.contiguous(), user_sim.contiguous(), item.contiguous(), item_sim.contiguous())
    mask = None if mask is None else mask.contiguous()
    softmax = activation == "softmax"
    if name == "triton":  # choosing it imported grasp_kernels.holistic_attention, which defines the op
        return torch.ops.grasp.holistic_attention_forward_triton(*args, mask, softmax)
    return torch.ops.grasp.holistic_attention_forward(*args, mask, softmax)


if _extension.has_op("holistic_attention_forward"):
    register_holistic_attention("grasp::holistic_attention_forward", "grasp::holistic_attention_backward")
    _cuda_jit.register("holistic_attention_forward", _holistic_attention_cuda_jit.forward)
    _cuda_jit.register("holistic_attention_backward", _holistic_attention_cuda_jit.backward)
