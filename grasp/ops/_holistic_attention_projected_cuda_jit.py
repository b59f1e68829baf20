"""NVRTC launchers of the projected holistic-attention CUDA kernels
(``csrc/cuda/holistic_attention_projected_device.cuh``).

The same decisions as ``csrc/cuda/holistic_attention_projected_kernel.cu``: a warp per pair (a capped grid),
and a deterministic backward: per-pair gates and logit gradients, the pairs grouped by item and by user with a
stable sort, chunked segmented sums and a combine of the segments that cross a chunk boundary.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import Tensor

from grasp.ops import _cuda_jit
from grasp.ops._cuda_jit import ACC, SCALAR, pointer
from grasp.ops._kernel_glue import FLOAT_DTYPES

_HEADER = "holistic_attention_projected_device.cuh"
_NS = "grasp::holistic_attention_projected_device"
_THREADS = 256
_WARPS = _THREADS // 32
_MAX_BLOCKS = 8192
_PAIR_STRIDE, _GATES, _LOGITS = 5, 0, 3
_TARGET_CHUNKS, _MIN_CHUNK = 4096, 16


class _Inputs(ctypes.Structure):
    _fields_ = [("user", ctypes.c_void_p), ("user_sim", ctypes.c_void_p), ("item", ctypes.c_void_p),
                ("item_sim", ctypes.c_void_p), ("values", ctypes.c_void_p), ("user_index", ctypes.c_void_p),
                ("item_index", ctypes.c_void_p), ("U", ctypes.c_int64), ("M", ctypes.c_int64),
                ("N", ctypes.c_int64), ("d", ctypes.c_int64), ("e", ctypes.c_int64)]


class _Groups(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("order", ctypes.c_void_p), ("starts", ctypes.c_void_p)]


def _segment_sum(k: int) -> type[ctypes.Structure]:
    class SegmentSum(ctypes.Structure):
        _fields_ = [("groups", _Groups), ("gather", ctypes.c_void_p), ("pair", ctypes.c_void_p),
                    ("coef", ctypes.c_int), ("table", ctypes.c_void_p * k), ("out", ctypes.c_void_p * k),
                    ("out_row_stride", ctypes.c_int64), ("partial", ctypes.c_void_p), ("N", ctypes.c_int64),
                    ("W", ctypes.c_int64), ("chunk", ctypes.c_int64)]

    return SegmentSum


_SEGMENT_SUM = {2: _segment_sum(2), 3: _segment_sum(3)}


def _names(dtype: torch.dtype) -> dict[str, str]:
    t, acc = SCALAR[dtype], ACC[dtype]
    names = {"forward": f"{_NS}::gather_forward_kernel<{t}, {acc}>",
             "pairs": f"{_NS}::gather_pairs_kernel<{t}, {acc}>"}
    for k in (2, 3):
        names[f"sum{k}"] = f"{_NS}::segment_sum_kernel<{t}, {acc}, {k}>"
        names[f"combine{k}"] = f"{_NS}::segment_combine_kernel<{t}, {acc}, {k}>"
    return names


def kernel_names(dtype: torch.dtype) -> list[str]:
    """Every kernel instance the launchers can ask for with ``dtype`` inputs."""
    return list(_names(dtype).values())


def _prelude(dtype: torch.dtype) -> str:
    t, acc = SCALAR[dtype], ACC[dtype]
    structs = {f"{_NS}::Inputs<{t}>": _Inputs, f"{_NS}::Groups": _Groups}
    structs.update({f"{_NS}::SegmentSum<{t}, {acc}, {k}>": cls for k, cls in _SEGMENT_SUM.items()})
    return _cuda_jit.layout_checks(structs)


KERNELS = {dtype: _cuda_jit.KernelSet(_HEADER, kernel_names(dtype), _prelude(dtype)) for dtype in FLOAT_DTYPES}


def _acc(dtype: torch.dtype, x: float) -> ctypes._SimpleCData:
    return ctypes.c_double(x) if dtype == torch.float64 else ctypes.c_float(x)


def _scales(dtype: torch.dtype, d: int) -> tuple[ctypes._SimpleCData, ctypes._SimpleCData]:
    """1 / sqrt(d) and 1 / sqrt(2d), rounded as the host code computes them in the accumulator type."""
    np_acc = np.float64 if dtype == torch.float64 else np.float32
    one = np_acc(1)
    return _acc(dtype, float(one / np.sqrt(np_acc(d)))), _acc(dtype, float(one / np.sqrt(np_acc(2 * d))))


def _check(user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor, user_index: Tensor,
           item_index: Tensor) -> None:
    where = "holistic_attention_projected (CUDA, NVRTC)"
    if user.dim() != 2 or item.dim() != 2 or user.shape[1] != item.shape[1]:
        raise RuntimeError(f"{where}: user [U, d] and item [M, d] must share d, got {tuple(user.shape)} and "
                           f"{tuple(item.shape)}")
    if user_sim.shape != user.shape or item_sim.shape != item.shape:
        raise RuntimeError(f"{where}: user_sim / item_sim must match user / item")
    if values.dim() != 3 or values.shape[0] != item.shape[0] or values.shape[1] != 3:
        raise RuntimeError(f"{where}: values must be [M, 3, e] with M = {item.shape[0]}, got {tuple(values.shape)}")
    if user_index.dim() != 1 or item_index.shape != user_index.shape:
        raise RuntimeError(f"{where}: user_index and item_index must be 1-d of one length")
    for t in (user, user_sim, item, item_sim, values):
        if not (t.is_cuda and t.device == item.device and t.is_contiguous() and t.dtype == item.dtype
                and t.dtype in FLOAT_DTYPES):
            raise RuntimeError(f"{where}: inputs must be contiguous float tensors of one dtype on one CUDA device")
    for t in (user_index, item_index):
        if not (t.device == item.device and t.is_contiguous() and t.dtype == torch.int64):
            raise RuntimeError(f"{where}: indices must be contiguous int64 tensors on the inputs' device")


def _inputs(user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor, user_index: Tensor,
            item_index: Tensor) -> _Inputs:
    return _Inputs(user.data_ptr(), user_sim.data_ptr(), item.data_ptr(), item_sim.data_ptr(), values.data_ptr(),
                   user_index.data_ptr(), item_index.data_ptr(), user.shape[0], item.shape[0], user_index.shape[0],
                   item.shape[1], values.shape[2])


def _blocks_for(pairs: int) -> int:
    return min((pairs + _WARPS - 1) // _WARPS, _MAX_BLOCKS)


def forward(user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor, user_index: Tensor,
            item_index: Tensor) -> Tensor:
    """``grasp::holistic_attention_projected_forward`` on CUDA tensors, through the NVRTC-compiled kernels."""
    _check(user, user_sim, item, item_sim, values, user_index, item_index)
    N, d, e = user_index.shape[0], item.shape[1], values.shape[2]
    out = torch.empty((N, e), dtype=item.dtype, device=item.device)
    if N == 0:
        return out
    c1, c2 = _scales(item.dtype, d)
    fn = KERNELS[item.dtype].function(_names(item.dtype)["forward"], item.device)
    _cuda_jit.launch(fn, (_blocks_for(N),), _THREADS, [
        _inputs(user, user_sim, item, item_sim, values, user_index, item_index), pointer(out), c1, c2], item.device)
    return out


def _chunk_length(N: int) -> int:
    chunk = _MIN_CHUNK
    while chunk * _TARGET_CHUNKS < N:
        chunk *= 2
    return chunk


def _group_by(index: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    keys, order = torch.sort(index, stable=True)
    starts = torch.searchsorted(keys, torch.arange(rows + 1, device=index.device))
    return keys, order, starts


def _segment_sum_launch(dtype: torch.dtype, k: int, groups: tuple[Tensor, Tensor, Tensor], gather: Tensor | None,
                        pair: Tensor, coef: int, tables: list[Tensor], outs: list[int], out_row_stride: int,
                        partial: Tensor, N: int, W: int, chunk: int, device: torch.device) -> None:
    args = _SEGMENT_SUM[k](_Groups(*(g.data_ptr() for g in groups)), None if gather is None else gather.data_ptr(),
                           pair.data_ptr(), coef, (ctypes.c_void_p * k)(*(t.data_ptr() for t in tables)),
                           (ctypes.c_void_p * k)(*outs), out_row_stride, partial.data_ptr(), N, W, chunk)
    chunks = (N + chunk - 1) // chunk
    column_tiles = (W + 31) // 32
    names = _names(dtype)
    _cuda_jit.launch(KERNELS[dtype].function(names[f"sum{k}"], device), ((chunks + _WARPS - 1) // _WARPS, column_tiles),
                     _THREADS, [args], device)
    _cuda_jit.launch(KERNELS[dtype].function(names[f"combine{k}"], device), (chunks, column_tiles), _THREADS, [args],
                     device)


def backward(grad_out: Tensor, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, values: Tensor,
             user_index: Tensor, item_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``grasp::holistic_attention_projected_backward`` on CUDA tensors, through the NVRTC-compiled kernels."""
    _check(user, user_sim, item, item_sim, values, user_index, item_index)
    N, d, e = user_index.shape[0], item.shape[1], values.shape[2]
    if not (grad_out.device == item.device and grad_out.dtype == item.dtype and grad_out.is_contiguous()
            and grad_out.shape == (N, e)):
        raise RuntimeError(f"holistic_attention_projected (CUDA, NVRTC): grad_out must be a contiguous [N, e] = "
                           f"{(N, e)} tensor of the inputs' dtype and device, got {tuple(grad_out.shape)}")
    gu, gus, gi, gis, gv = (torch.zeros_like(t) for t in (user, user_sim, item, item_sim, values))
    if N == 0:
        return gu, gus, gi, gis, gv
    dtype, device = item.dtype, item.device
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    pair = torch.empty((N, _PAIR_STRIDE), dtype=acc_dtype, device=device)
    chunk = _chunk_length(N)
    chunks = (N + chunk - 1) // chunk
    by_item, by_user = _group_by(item_index, item.shape[0]), _group_by(user_index, user.shape[0])
    partial3 = torch.empty((chunks, 2, 3, e), dtype=acc_dtype, device=device)
    partial2 = torch.empty((chunks, 2, 2, d), dtype=acc_dtype, device=device)
    c1, c2 = _scales(dtype, d)
    fn = KERNELS[dtype].function(_names(dtype)["pairs"], device)
    _cuda_jit.launch(fn, (_blocks_for(N),), _THREADS, [
        pointer(grad_out), _inputs(user, user_sim, item, item_sim, values, user_index, item_index), pointer(pair),
        c1, c2], device)
    size = gv.element_size()
    # grad values[j, x] = sum a_x[n] grad_out[n] over the pairs of item j.
    _segment_sum_launch(dtype, 3, by_item, None, pair, _GATES, [grad_out] * 3,
                        [gv.data_ptr() + x * e * size for x in range(3)], 3 * e, partial3, N, e, chunk, device)
    # grad item[j] = sum ds1[n] user[r_n], grad item_sim[j] = sum ds2[n] user_sim[r_n].
    _segment_sum_launch(dtype, 2, by_item, user_index, pair, _LOGITS, [user, user_sim], [gi.data_ptr(), gis.data_ptr()],
                        d, partial2, N, d, chunk, device)
    # grad user[r] = sum ds1[n] item[j_n], grad user_sim[r] = sum ds2[n] item_sim[j_n] (after the item sums on the
    # stream, which read partial2 first).
    _segment_sum_launch(dtype, 2, by_user, item_index, pair, _LOGITS, [item, item_sim], [gu.data_ptr(), gus.data_ptr()],
                        d, partial2, N, d, chunk, device)
    return gu, gus, gi, gis, gv
