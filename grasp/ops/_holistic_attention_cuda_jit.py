"""NVRTC launchers of the holistic-attention CUDA kernels (``csrc/cuda/holistic_attention_device.cuh``).

The same launch decisions as ``csrc/cuda/holistic_attention_kernel.cu``: 16-byte vectors when d and every
pointer allow, a team of lanes per position, one block per row for softmax (and for the backward of a
``[B, d]`` user, with as few register chunks per lane as the row needs), a capped grid otherwise.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from grasp.ops import _cuda_jit
from grasp.ops._cuda_jit import ACC, SCALAR, pointer, vector_width
from grasp.ops._kernel_glue import FLOAT_DTYPES

_HEADER = "holistic_attention_device.cuh"
_NS = "grasp::holistic_attention_device"
_THREADS = 256
_WARPS = _THREADS // 32
_MAX_FLAT_BLOCKS = 8192


class _Inputs(ctypes.Structure):
    _fields_ = [("user", ctypes.c_void_p), ("user_sim", ctypes.c_void_p), ("item", ctypes.c_void_p),
                ("item_sim", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("L", ctypes.c_int64),
                ("d", ctypes.c_int64), ("user_per_position", ctypes.c_bool)]


class _Grads(ctypes.Structure):
    _fields_ = [("user", ctypes.c_void_p), ("user_sim", ctypes.c_void_p), ("item", ctypes.c_void_p),
                ("item_sim", ctypes.c_void_p)]


class _Scales(ctypes.Structure):
    _fields_ = [("inv_sqrt_d", ctypes.c_double), ("inv_sqrt_2d", ctypes.c_double)]


def _max_user_chunks(vec: int) -> int:
    return 16 // vec


def _forward_name(dtype: torch.dtype, vec: int, softmax: bool) -> str:
    return f"{_NS}::holistic_attention_forward_kernel<{SCALAR[dtype]}, {ACC[dtype]}, {vec}, {str(softmax).lower()}>"


def _backward_name(dtype: torch.dtype, vec: int, softmax: bool, ch: int) -> str:
    return (f"{_NS}::holistic_attention_backward_kernel<{SCALAR[dtype]}, {ACC[dtype]}, {vec}, "
            f"{str(softmax).lower()}, {ch}>")


def kernel_names(dtype: torch.dtype) -> list[str]:
    """Every kernel instance the launchers can ask for with ``dtype`` inputs."""
    names = []
    for vec in (vector_width(dtype), 1):
        for softmax in (False, True):
            names.append(_forward_name(dtype, vec, softmax))
            for ch in (0, 1, 2, _max_user_chunks(vec)):
                names.append(_backward_name(dtype, vec, softmax, ch))
    return list(dict.fromkeys(names))


def _prelude(dtype: torch.dtype) -> str:
    t = SCALAR[dtype]
    return _cuda_jit.layout_checks({f"{_NS}::Inputs<{t}>": _Inputs, f"{_NS}::Grads<{t}>": _Grads,
                                    f"{_NS}::Scales": _Scales})


KERNELS = {dtype: _cuda_jit.KernelSet(_HEADER, kernel_names(dtype), _prelude(dtype)) for dtype in FLOAT_DTYPES}


def _check(name: str, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None,
           grad_out: Tensor | None = None) -> None:
    """The checks of the .cu host code's check_inputs, as one-line errors."""
    where = f"{name} (CUDA, NVRTC)"
    if not item.is_cuda:
        raise RuntimeError(f"{where}: item must be a CUDA tensor, got device {item.device}")
    if item.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{where}: item must be float32, float64, float16 or bfloat16, got {item.dtype}")
    named = {"user": user, "user_sim": user_sim, "item": item, "item_sim": item_sim}
    if grad_out is not None:
        named["grad_out"] = grad_out
    for arg, t in named.items():
        if t.device != item.device or t.dtype != item.dtype:
            raise RuntimeError(f"{where}: {arg} is {t.dtype} on {t.device} but item is {item.dtype} on {item.device}")
        if not t.is_contiguous():
            raise RuntimeError(f"{where}: {arg} must be contiguous")
    if item.dim() != 3 or item_sim.shape != item.shape:
        raise RuntimeError(f"{where}: item and item_sim must be [B, L, d] alike, got {tuple(item.shape)} and "
                           f"{tuple(item_sim.shape)}")
    B, L, d = item.shape
    if user.shape not in ((B, d), (B, L, d)) or user_sim.shape != user.shape:
        raise RuntimeError(f"{where}: user and user_sim must be [B, d] or [B, L, d] for item {tuple(item.shape)}, "
                           f"got {tuple(user.shape)} and {tuple(user_sim.shape)}")
    if mask is not None and (mask.device != item.device or mask.dtype not in (torch.bool, torch.uint8)
                             or mask.shape != (B, L) or not mask.is_contiguous()):
        raise RuntimeError(f"{where}: mask must be a contiguous bool [B, L] = {(B, L)} on {item.device}, got "
                           f"{mask.dtype} {tuple(mask.shape)} on {mask.device}")
    if grad_out is not None and grad_out.shape != (B, L, 4 * d):
        raise RuntimeError(f"{where}: grad_out must be [B, L, 4d] = {(B, L, 4 * d)}, got {tuple(grad_out.shape)}")
    if B > 2**31 - 1:
        raise RuntimeError(f"{where}: batch size {B} is too large")


def _can_vectorise(d: int, vec: int, tensors: list[Tensor]) -> bool:
    return d % vec == 0 and all(t.data_ptr() % 16 == 0 for t in tensors)


def _team_size(cols: int) -> int:
    team = 1
    while team < 32 and team < cols:
        team <<= 1
    return team


def _flat_blocks(positions: int, team: int) -> int:
    per_block = _WARPS * (32 // team)
    return min((positions + per_block - 1) // per_block, _MAX_FLAT_BLOCKS)


def _scales(d: int) -> _Scales:
    return _Scales(1.0 / math.sqrt(d), 1.0 / math.sqrt(2.0 * d))


def _inputs(user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None) -> _Inputs:
    return _Inputs(user.data_ptr(), user_sim.data_ptr(), item.data_ptr(), item_sim.data_ptr(),
                   None if mask is None else mask.data_ptr(), item.shape[1], item.shape[2], user.dim() == 3)


def forward(user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None,
            softmax: bool) -> Tensor:
    """``grasp::holistic_attention_forward`` on CUDA tensors, through the NVRTC-compiled kernels."""
    _check("holistic_attention_forward", user, user_sim, item, item_sim, mask)
    B, L, d = item.shape
    out = torch.empty((B, L, 4 * d), dtype=item.dtype, device=item.device)
    if out.numel() == 0:
        return out
    vec = vector_width(item.dtype)
    if not _can_vectorise(d, vec, [user, user_sim, item, item_sim, out]):
        vec = 1
    team = _team_size(d // vec)
    positions = B * L
    blocks = B if softmax else _flat_blocks(positions, team)
    fn = KERNELS[item.dtype].function(_forward_name(item.dtype, vec, softmax), item.device)
    _cuda_jit.launch(fn, (blocks,), _THREADS, [
        _inputs(user, user_sim, item, item_sim, mask), pointer(out), ctypes.c_int64(positions),
        ctypes.c_int(team), _scales(d)], item.device)
    return out


def backward(grad_out: Tensor, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None,
             softmax: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``grasp::holistic_attention_backward`` on CUDA tensors, through the NVRTC-compiled kernels."""
    _check("holistic_attention_backward", user, user_sim, item, item_sim, mask, grad_out)
    B, L, d = item.shape
    if B * L == 0 or d == 0:  # nothing flows; a [B, d] user gets an empty sum
        return tuple(torch.zeros_like(t) for t in (user, user_sim, item, item_sim))
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (user, user_sim, item, item_sim)]
    vec = vector_width(item.dtype)
    if not _can_vectorise(d, vec, [user, user_sim, item, item_sim, grad_out, *grads]):
        vec = 1
    cols = d // vec
    team = _team_size(cols)
    positions = B * L
    if user.dim() == 3:
        ch, blocks = 0, (B if softmax else _flat_blocks(positions, team))
    else:
        chunks = (cols + team - 1) // team  # per lane, to cover the row in one pass
        ch, blocks = (chunks if chunks <= 2 else _max_user_chunks(vec)), B
    fn = KERNELS[item.dtype].function(_backward_name(item.dtype, vec, softmax, ch), item.device)
    _cuda_jit.launch(fn, (blocks,), _THREADS, [
        pointer(grad_out), _inputs(user, user_sim, item, item_sim, mask), _Grads(*(g.data_ptr() for g in grads)),
        ctypes.c_int64(positions), ctypes.c_int(team), _scales(d)], item.device)
    return tuple(grads)
