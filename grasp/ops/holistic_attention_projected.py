"""Holistic attention with its output projection folded in, ``grasp.ops.holistic_attention_projected``.

The GRASP enhancer feeds the ``[.., 4d]`` output of :func:`grasp.ops.holistic_attention` straight into a
linear layer. That layer's four ``d``-wide column blocks act on ``a_self i``, ``a_sim ī``, ``a_glob i`` and
``a_glob ī``, and the gates are scalars, so::

    W · HAE(u, ū, i, ī) = a_self (W0 i) + a_sim (W1 ī) + a_glob (W2 i + W3 ī)

The three projected vectors depend on the item alone. This op takes the user and item tables with one
``(user, item)`` index pair per output row: the projections run once per table row (a plain matmul), and
the kernels only compute the two dot products and three gates of every pair and mix three ``e``-wide
vectors. Per pair that replaces a ``4d x e`` matrix product and a ``4d``-wide intermediate with ``O(d + e)``
work. Sigmoid gates only: the softmax ablation couples the positions of a row and keeps the unfused op.

Backends: ``reference`` (plain PyTorch, the ground truth), ``cpu`` (C++ in ``csrc/cpu/``), ``cuda`` (CUDA C++
in ``csrc/cuda/``), ``triton`` (``grasp_kernels/holistic_attention_projected.py``; CUDA, or CPU under
``TRITON_INTERPRET=1``). On a GPU the default is ``triton``, then ``cuda``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from grasp import _extension
from grasp.ops import _backends, _cuda_jit, _holistic_attention_projected_cuda_jit
from grasp.ops._holistic_attention_projected_reference import holistic_attention_projected_reference
from grasp.ops._kernel_glue import FLOAT_DTYPES, TRITON_DTYPES, register_holistic_attention_projected

__all__ = [
    "holistic_attention_projected",
    "holistic_attention_projected_reference",
    "backend_reason",
    "AUTO_ORDER",
    "TRITON_DTYPES",
    "has_kernel",
]

_NAME = "holistic_attention_projected"

#: Preference order of ``backend=None`` per device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def backend_reason(backend: str, device_type: str, dtype: torch.dtype | None = None) -> str:
    """Why ``backend`` cannot run the op on ``device_type`` tensors of ``dtype`` ("" if it can)."""
    return _backends.reason(_NAME, backend, device_type, dtype)


@_backends.constant_under_compile
def _choose_backend(requested: str | None, device_type: str, dtype: torch.dtype) -> str:
    return _backends.choose(_NAME, requested, device_type, AUTO_ORDER, lambda b, dev: backend_reason(b, dev, dtype))


@_backends.constant_under_compile
def has_kernel(requested: str | None, device_type: str) -> bool:
    """Whether the op runs on a kernel here: the ``requested`` backend (else ``GRASP_BACKEND``) if one is
    forced and available, else any available non-reference backend. Callers with an unfused alternative
    (the GRASP enhancer) use it to choose between the two. The kernels' backwards are deterministic (segmented
    reductions without atomics), so ``torch.use_deterministic_algorithms`` changes nothing here."""
    name = requested if requested is not None else (os.environ.get("GRASP_BACKEND") or None)
    if name is not None:
        return not backend_reason(name, device_type)
    return any(not backend_reason(b, device_type) for b in AUTO_ORDER.get(device_type, ()) if b != "reference")


def projected_values(item: Tensor, item_sim: Tensor, weight: Tensor) -> Tensor:
    """``[M, 3, e]``: ``[W0 i, W1 ī, W2 i + W3 ī]`` for every row, with ``weight = [W0 | W1 | W2 | W3]``."""
    e, d = weight.shape[0], item.shape[1]
    w = weight.view(e, 4, d)
    both = torch.cat([item, item_sim], 1)  # [M, 2d]
    w_glob = torch.cat([w[:, 2], w[:, 3]], 1)  # [e, 2d]
    return torch.stack([item @ w[:, 0].T, item_sim @ w[:, 1].T, both @ w_glob.T], 1)


def _check_inputs(
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    user_index: Tensor,
    item_index: Tensor,
) -> None:
    named = {"user": user, "user_sim": user_sim, "item": item, "item_sim": item_sim, "weight": weight}
    if bias is not None:
        named["bias"] = bias
    for name, t in {**named, "user_index": user_index, "item_index": item_index}.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in named.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_NAME}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dtype != item.dtype:
            raise TypeError(f"{_NAME}: mixed dtypes: {name} is {t.dtype} but item is {item.dtype}")
    for name, t in {**named, "user_index": user_index, "item_index": item_index}.items():
        if t.device != item.device:
            raise ValueError(f"{_NAME}: mixed devices: {name} is on {t.device} but item is on {item.device}")
    if item.dim() != 2 or item.shape[1] == 0:
        raise ValueError(f"{_NAME}: item must be [M, d] with d >= 1, got shape {tuple(item.shape)}")
    d = item.shape[1]
    if item_sim.shape != item.shape:
        raise ValueError(f"{_NAME}: item_sim must have item's shape {tuple(item.shape)}, got {tuple(item_sim.shape)}")
    if user.dim() != 2 or user.shape[1] != d:
        raise ValueError(f"{_NAME}: user must be [U, d] with d = {d} (item's width), got {tuple(user.shape)}")
    if user_sim.shape != user.shape:
        raise ValueError(f"{_NAME}: user_sim must have user's shape {tuple(user.shape)}, got {tuple(user_sim.shape)}")
    if weight.dim() != 2 or weight.shape[1] != 4 * d or weight.shape[0] == 0:
        raise ValueError(f"{_NAME}: weight must be [e, 4d] = [e, {4 * d}] with e >= 1, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{_NAME}: bias must be [e] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    indices = (("user_index", user_index, len(user), "user"), ("item_index", item_index, len(item), "item"))
    for name, index, _, _ in indices:
        if index.dtype != torch.int64 or index.dim() != 1:
            raise TypeError(f"{_NAME}: {name} must be a 1-d int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if item_index.shape != user_index.shape:
        raise ValueError(
            f"{_NAME}: user_index and item_index must have one length, got {len(user_index)} and {len(item_index)}"
        )
    if torch.compiler.is_compiling():  # no data-dependent Python branch in a graph: runtime asserts
        for name, index, rows, _ in indices:
            torch._assert_async(((index >= 0) & (index < rows)).all(), f"{_NAME}: {name} out of range 0..{rows - 1}")
        return
    if user_index.numel() == 0:
        return
    ranges = torch.stack([user_index.min(), user_index.max(), item_index.min(), item_index.max()]).tolist()  # one sync
    for (name, _, rows, table), (lo, hi) in zip(indices, (ranges[:2], ranges[2:]), strict=True):
        if lo < 0 or hi >= rows:
            raise ValueError(
                f"{_NAME}: {name} must lie in 0..{rows - 1} ({table} has {rows} rows), got values in {lo}..{hi}"
            )


def holistic_attention_projected(
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    user_index: Tensor,
    item_index: Tensor,
    backend: str | None = None,
) -> Tensor:
    """Sigmoid holistic attention of ``(user, item)`` pairs followed by a linear layer, fused.

    Row ``n`` of the result, with ``r = user_index[n]`` and ``j = item_index[n]``, is::

        holistic_attention(user[r], user_sim[r], item[j], item_sim[j]) @ weight.T + bias
        = a_self (W0 item[j]) + a_sim (W1 item_sim[j]) + a_glob (W2 item[j] + W3 item_sim[j]) + bias

    with ``weight = [W0 | W1 | W2 | W3]`` (four ``[e, d]`` blocks) and the gates of
    :func:`grasp.ops.holistic_attention` (``a_self = sigmoid(<u, i>/sqrt(d))``, ...).

    Args:
        user, user_sim: ``[U, d]`` user table (e.g. the adapted users of a batch).
        item, item_sim: ``[M, d]`` item table (e.g. the adapted distinct items of a batch).
        weight: ``[e, 4d]``, bias: ``[e]`` or None: the linear layer (``nn.Linear(4d, e)``'s parameters).
        user_index, item_index: int64 ``[N]``, the pairs.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None picks the first available of
            :data:`AUTO_ORDER` for the device (``GRASP_BACKEND`` overrides that choice).

    All float inputs share one dtype (float32, float16, bfloat16; float64 on all but ``triton``)
    and device. The kernels compute the gates and the mix in float32 (float64 for float64); for float16 and
    bfloat16 the projected values, the output and the bias addition are rounded to the input dtype (the
    accuracy tests hold them to 2x the error of the same-dtype PyTorch computation). Gradients reach every
    float input; the indices get none. The kernels' backwards are deterministic: segmented reductions by item
    and by user, without atomics, give bitwise identical gradients run to run.

    Under ``torch.autocast`` enabled for the inputs' device type, the op behaves as ``F.linear`` does: its
    float32/float16/bfloat16 inputs are cast to the autocast dtype (float64 ones stay), it runs with autocast
    off in that dtype, and returns that dtype. Outside autocast, mixed dtypes are an error.

    Returns:
        ``[N, e]`` in the inputs' dtype (under autocast, the autocast dtype, unless the inputs are float64).
    """
    return _backends.under_autocast_rule(
        _projected, item, (user, user_sim, item, item_sim, weight, bias), user_index, item_index, backend
    )


def _projected(
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    user_index: Tensor,
    item_index: Tensor,
    backend: str | None,
) -> Tensor:
    """:func:`holistic_attention_projected` outside autocast."""
    _check_inputs(user, user_sim, item, item_sim, weight, bias, user_index, item_index)
    name = _choose_backend(backend, item.device.type, item.dtype)
    if name == "reference" or user_index.numel() == 0:
        return holistic_attention_projected_reference(
            user, user_sim, item, item_sim, weight, bias, user_index, item_index
        )
    values = projected_values(item, item_sim, weight)
    args = (user.contiguous(), user_sim.contiguous(), item.contiguous(), item_sim.contiguous(), values.contiguous())
    indices = (user_index.contiguous(), item_index.contiguous())
    if name == "triton":  # choosing it imported grasp_kernels.holistic_attention_projected, which defines the op
        out = torch.ops.grasp.holistic_attention_projected_forward_triton(*args, *indices)
    else:
        out = torch.ops.grasp.holistic_attention_projected_forward(*args, *indices)
    return out if bias is None else out + bias


if _extension.has_op("holistic_attention_projected_forward"):
    register_holistic_attention_projected(
        "grasp::holistic_attention_projected_forward", "grasp::holistic_attention_projected_backward"
    )
    _cuda_jit.register("holistic_attention_projected_forward", _holistic_attention_projected_cuda_jit.forward)
    _cuda_jit.register("holistic_attention_projected_backward", _holistic_attention_projected_cuda_jit.backward)
