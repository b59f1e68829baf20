"""NVRTC launchers of the score_topk CUDA kernels (``csrc/cuda/score_topk_device.cuh``).

The same decisions as ``csrc/cuda/score_topk_kernel.cu``: for k <= 256 the fused kernel over blocks of 32 users
and an item range split so that the GPU is filled (at least 4 blocks per SM), then the merge kernel; for larger k
the same kernel writes float32 score blocks that a stable sort merges into the running lists.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import torch
from torch import Tensor

from grasp.ops import _cuda_jit
from grasp.ops._cuda_jit import SCALAR, pointer, vector_width

_HEADER = "score_topk_device.cuh"
_NS = "grasp::score_topk_device"
_THREADS = 256
_USERS, _ITEMS = 32, 64
_MAX_FUSED_K = 256
_MERGE_WARPS = 4
_BLOCKS_PER_SM = 4
_MIN_SPLIT_TILES = 4
_FALLBACK_ELEMS = 1 << 22
_NO_INDEX = 2**31 - 1
_KPADS = (32, 64, 128, 256)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Params(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("query", "table", "user", "user_sim", "item", "item_sim",
                                                     "values", "bias", "out_query", "exclude")]
    _fields_ += [(name, ctypes.c_int) for name in ("d", "c", "e", "X")]
    _fields_ += [("c1", ctypes.c_float), ("c2", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_bool) for name in ("vec_dot", "vec_s1", "vec_s2", "vec_e")]
    _fields_ += [(name, ctypes.c_int) for name in ("u_base", "u_count", "j_base", "j_count", "tiles_per_split",
                                                   "k", "splits")]
    _fields_ += [("part_s", ctypes.c_void_p), ("part_i", ctypes.c_void_p), ("block", ctypes.c_void_p),
                 ("block_stride", ctypes.c_int64)]


def _kernel_name(dtype: torch.dtype, gated: bool, kpad: int) -> str:
    return f"{_NS}::score_topk_kernel<{SCALAR[dtype]}, {str(gated).lower()}, {kpad}>"


def _merge_name(kpad: int) -> str:
    return f"{_NS}::score_topk_merge_kernel<{kpad}>"


def kernel_names(dtype: torch.dtype) -> list[str]:
    """Every kernel instance the launchers can ask for with ``dtype`` inputs."""
    names = [_kernel_name(dtype, gated, kpad) for gated in (False, True) for kpad in (0, *_KPADS)]
    return names + [_merge_name(kpad) for kpad in _KPADS]


KERNELS = {dtype: _cuda_jit.KernelSet(_HEADER, kernel_names(dtype),
                                      _cuda_jit.layout_checks({f"{_NS}::Params<{SCALAR[dtype]}>": _Params}))
           for dtype in _DTYPES}  # fmt: skip


def _check(op: str, tensors: dict[str, Tensor], exclude: Tensor | None, k: int, gated: bool) -> None:
    """The .cu host code's checks, as one-line errors."""
    where = f"{op} (CUDA, NVRTC)"
    q, table = tensors["query"], tensors["table"]
    if not q.is_cuda:
        raise RuntimeError(f"{where}: query must be a CUDA tensor, got device {q.device}")
    if q.dtype not in _DTYPES:
        raise RuntimeError(f"{where}: query must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 2 or table.dim() != 2:
        raise RuntimeError(f"{where}: query must be [B, d] and table [M, d], got {tuple(q.shape)} and "
                           f"{tuple(table.shape)}")
    (B, d), M = q.shape, table.shape[0]
    shapes = {"query": (B, d), "table": (M, d)}
    if gated:
        if tensors["user"].dim() != 2 or tensors["values"].dim() != 3:
            raise RuntimeError(f"{where}: user must be [B, c] and values [M, 3, e]")
        c, e = tensors["user"].shape[1], tensors["values"].shape[2]
        shapes.update(user=(B, c), user_sim=(B, c), item=(M, c), item_sim=(M, c), values=(M, 3, e), bias=(e,),
                      out_query=(B, e))
        if not 1 <= c <= 2**31 - 1 or e > (2**31 - 1) // 3:
            raise RuntimeError(f"{where}: c = {c} or e = {e} is out of range")
    for name, shape in shapes.items():
        t = tensors[name]
        if t.device != q.device or t.dtype != q.dtype or tuple(t.shape) != shape or not t.is_contiguous():
            raise RuntimeError(f"{where}: {name} must be a contiguous {q.dtype} tensor of shape {shape} on "
                               f"{q.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if exclude is not None and (exclude.device != q.device or exclude.dtype != torch.int64 or exclude.dim() != 2
                                or exclude.shape[0] != B or not exclude.is_contiguous()):
        raise RuntimeError(f"{where}: exclude must be a contiguous int64 [B, X] tensor with B = {B} on {q.device}")
    if exclude is not None and exclude.shape[1] > 2**31 - 1:
        raise RuntimeError(f"{where}: exclude has too many columns: {exclude.shape[1]}")
    if not 1 <= k <= M:
        raise RuntimeError(f"{where}: k must be in [1, M] = [1, {M}], got {k}")
    if B > 2**31 - 1 or M >= _NO_INDEX - _ITEMS or d > 2**31 - 1:
        raise RuntimeError(f"{where}: B = {B}, M = {M} or d = {d} is too large")


def _vec_rows(t: Tensor, row_len: int) -> bool:
    return row_len % vector_width(t.dtype) == 0 and t.data_ptr() % 16 == 0


def _params(tensors: dict[str, Tensor], exclude_sorted: Tensor | None, gated: bool) -> _Params:
    q, table = tensors["query"], tensors["table"]
    p = _Params(query=q.data_ptr(), table=table.data_ptr(), d=q.shape[1])
    p.vec_dot = _vec_rows(q, p.d) and _vec_rows(table, p.d)
    if gated:
        for name in ("user", "user_sim", "item", "item_sim", "values", "bias", "out_query"):
            setattr(p, name, tensors[name].data_ptr())
        p.c, p.e = tensors["user"].shape[1], tensors["values"].shape[2]
        p.c1 = float(np.float32(1) / np.sqrt(np.float32(p.c)))  # the host code's float arithmetic
        p.c2 = float(np.float32(1) / np.sqrt(np.float32(2) * np.float32(p.c)))
        p.vec_s1 = _vec_rows(tensors["user"], p.c) and _vec_rows(tensors["item"], p.c)
        p.vec_s2 = _vec_rows(tensors["user_sim"], p.c) and _vec_rows(tensors["item_sim"], p.c)
        p.vec_e = _vec_rows(tensors["values"], p.e) and _vec_rows(tensors["out_query"], p.e)
    if exclude_sorted is not None and exclude_sorted.shape[1] > 0:
        p.exclude, p.X = exclude_sorted.data_ptr(), exclude_sorted.shape[1]
    return p


def _choose_splits(user_blocks: int, tiles: int, kpad: int, device: torch.device) -> int:
    sms = max(torch.cuda.get_device_properties(device).multi_processor_count, 1)
    wanted = (sms * _BLOCKS_PER_SM + user_blocks - 1) // user_blocks
    min_tiles = max(_MIN_SPLIT_TILES, 8 * kpad // _ITEMS)
    most = max(1, min(tiles // min_tiles, 65535))
    return min(max(wanted, 1), most)


def _run_fused(p: _Params, dtype: torch.dtype, gated: bool, B: int, M: int, k: int, scores: Tensor,
               indices: Tensor) -> None:
    device = scores.device
    kpad = next(pad for pad in _KPADS if k <= pad)
    user_blocks = (B + _USERS - 1) // _USERS
    tiles = (M + _ITEMS - 1) // _ITEMS
    splits = _choose_splits(user_blocks, tiles, kpad, device)
    tiles_per_split = (tiles + splits - 1) // splits
    splits = (tiles + tiles_per_split - 1) // tiles_per_split
    part_s = torch.empty((B, splits, kpad), dtype=torch.float32, device=device)
    part_i = torch.empty((B, splits, kpad), dtype=torch.int32, device=device)
    p.u_base, p.u_count, p.j_base, p.j_count = 0, B, 0, M
    p.tiles_per_split, p.k, p.splits = tiles_per_split, k, splits
    p.part_s, p.part_i = part_s.data_ptr(), part_i.data_ptr()
    kernels = KERNELS[dtype]
    _cuda_jit.launch(kernels.function(_kernel_name(dtype, gated, kpad), device), (user_blocks, splits), _THREADS,
                     [p], device)
    _cuda_jit.launch(kernels.function(_merge_name(kpad), device), ((B + _MERGE_WARPS - 1) // _MERGE_WARPS,),
                     _MERGE_WARPS * 32, [pointer(part_s), pointer(part_i), ctypes.c_int(B), ctypes.c_int(splits),
                                         ctypes.c_int(k), pointer(scores), pointer(indices)], device)


def _run_blocks(p: _Params, dtype: torch.dtype, gated: bool, exclude: Tensor | None, B: int, M: int, k: int,
                scores: Tensor, indices: Tensor) -> None:
    device = scores.device
    rows_tile = min(max(_FALLBACK_ELEMS // (k + 16 * _ITEMS), 1), min(B, 8 * _USERS))
    cols_tile = min(M, max(16 * _ITEMS, (_FALLBACK_ELEMS // rows_tile - k) // _ITEMS * _ITEMS))
    indices.fill_(2**63 - 1)  # empty slots rank after every real row of equal score
    p.tiles_per_split = 1
    fn = KERNELS[dtype].function(_kernel_name(dtype, gated, 0), device)
    for c0 in range(0, M, cols_tile):
        cols = min(cols_tile, M - c0)
        col_index = torch.arange(c0, c0 + cols, device=device)
        for r0 in range(0, B, rows_tile):
            rows = min(rows_tile, B - r0)
            block = torch.empty((rows, cols + 1), dtype=torch.float32, device=device)
            p.u_base, p.u_count, p.j_base, p.j_count = r0, rows, c0, cols
            p.block, p.block_stride = block.data_ptr(), cols + 1
            _cuda_jit.launch(fn, ((rows + _USERS - 1) // _USERS, (cols + _ITEMS - 1) // _ITEMS), _THREADS, [p], device)
            if exclude is not None and exclude.shape[1] > 0:  # excluded rows to -inf, the others to the spare column
                ex = exclude[r0:r0 + rows]
                col = torch.where((ex >= c0) & (ex < c0 + cols), ex - c0, torch.full_like(ex, cols))
                block.scatter_(1, col, -math.inf)
            best_s, best_i = scores[r0:r0 + rows], indices[r0:r0 + rows]
            cand_s = torch.cat([best_s, block[:, :cols]], 1)
            cand_s.masked_fill_(cand_s.isnan(), -math.inf)
            cand_i = torch.cat([best_i, col_index.unsqueeze(0).expand(rows, cols)], 1)
            sorted_s, order = torch.sort(cand_s, dim=1, descending=True, stable=True)
            best_s.copy_(sorted_s[:, :k])
            best_i.copy_(cand_i.gather(1, order[:, :k]))
    indices.masked_fill_(scores == -math.inf, -1)


def _score_topk(op: str, tensors: dict[str, Tensor], exclude: Tensor | None, k: int, gated: bool
                ) -> tuple[Tensor, Tensor]:
    _check(op, tensors, exclude, k, gated)
    q = tensors["query"]
    B, M = q.shape[0], tensors["table"].shape[0]
    fused = k <= _MAX_FUSED_K
    # The fused path's merge kernel writes every output slot; the large-k path merges into the outputs.
    scores = torch.empty((B, k), dtype=torch.float32, device=q.device)
    if not fused:
        scores.fill_(-math.inf)
    indices = torch.empty((B, k), dtype=torch.int64, device=q.device)
    if B == 0:
        return scores, indices
    if exclude is not None and exclude.shape[1] > 0:
        exclude = torch.sort(exclude, dim=1).values if fused else exclude
    else:
        exclude = None
    p = _params(tensors, exclude, gated)
    with torch.cuda.device(q.device), torch.autocast("cuda", enabled=False):
        if fused:
            _run_fused(p, q.dtype, gated, B, M, k, scores, indices)
        else:
            _run_blocks(p, q.dtype, gated, exclude, B, M, k, scores, indices)
    return scores, indices


def dot(query: Tensor, table: Tensor, exclude: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """``grasp::score_topk_dot`` on CUDA tensors, through the NVRTC-compiled kernels."""
    return _score_topk("score_topk_dot", {"query": query, "table": table}, exclude, k, gated=False)


def gated(query: Tensor, table: Tensor, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor,
          values: Tensor, bias: Tensor, out_query: Tensor, exclude: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """``grasp::score_topk_gated`` on CUDA tensors, through the NVRTC-compiled kernels."""
    tensors = dict(query=query, table=table, user=user, user_sim=user_sim, item=item, item_sim=item_sim,
                   values=values, bias=bias, out_query=out_query)
    return _score_topk("score_topk_gated", tensors, exclude, k, gated=True)
