"""NVRTC launchers of the top-k neighbour CUDA kernels (``csrc/cuda/topk_neighbor_mean_device.cuh``).

The same decisions as ``csrc/cuda/topk_neighbor_mean_kernel.cu``: the database and the queries in tiles whose
float32 score blocks come from cuBLAS (true fp32 for float32, float32 output from float16 / bfloat16, float64
where torch may route fp32 GEMMs past the TF32 switch), merged into the running top-k lists by the warp
selection kernel (k <= 256) or by a stable sort (larger k); the gather kernel averages the selected rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import torch
from torch import Tensor

from grasp.ops import _cuda_jit
from grasp.ops._cuda_jit import ACC, SCALAR, pointer, vector_width
from grasp.ops._kernel_glue import FLOAT_DTYPES

_HEADER = "topk_neighbor_mean_device.cuh"
_NS = "grasp::topk_neighbor_mean_device"
_SELECT_WARPS = 4
_MEAN_THREADS = 256
_MAX_WARP_K = 256
_QUERY_TILE = 4096
_DB_TILE_MIN = 16384
_DB_TILE_MAX = 1 << 20
_TILE_ELEMS = 1 << 26
_CONVERT_ELEMS = 1 << 26
_FALLBACK_ELEMS = 1 << 24
_EMPTY_INDEX = 2**63 - 1
_KPADS = (32, 64, 128, 256)


def _select_name(kpad: int) -> str:
    return f"{_NS}::knn_select_kernel<{kpad}>"


def _gather_name(dtype: torch.dtype, vec: int) -> str:
    return f"{_NS}::gather_mean_kernel<{SCALAR[dtype]}, {ACC[dtype]}, {vec}>"


def kernel_names() -> list[str]:
    """Every kernel instance the launchers can ask for."""
    names = [_select_name(kpad) for kpad in _KPADS]
    for dtype in FLOAT_DTYPES:
        names += [_gather_name(dtype, vector_width(dtype)), _gather_name(dtype, 1)]
    return list(dict.fromkeys(names))


KERNELS = _cuda_jit.KernelSet(_HEADER, kernel_names())


# --- search -------------------------------------------------------------------------------------------------

def _check_search(queries: Tensor, db: Tensor, k: int, query_start: int, exclude_self: bool) -> None:
    where = "topk_neighbor_mean_search (CUDA, NVRTC)"
    if not queries.is_cuda or db.device != queries.device:
        raise RuntimeError(f"{where}: queries and db must be on one CUDA device, got {queries.device} and {db.device}")
    if queries.dtype not in FLOAT_DTYPES or db.dtype != queries.dtype:
        raise RuntimeError(f"{where}: queries and db must share a float dtype, got {queries.dtype} and {db.dtype}")
    if queries.dim() != 2 or db.dim() != 2 or db.shape[1] != queries.shape[1]:
        raise RuntimeError(f"{where}: queries must be [q, D] and db [n, D], got {tuple(queries.shape)} and "
                           f"{tuple(db.shape)}")
    if not queries.is_contiguous() or not db.is_contiguous():
        raise RuntimeError(f"{where}: queries and db must be contiguous")
    if not 0 <= query_start <= 2**63 - 1 - queries.shape[0]:
        raise RuntimeError(f"{where}: query_start must be in [0, 2^63 - 1 - q], got {query_start}")
    n = db.shape[0]
    available = n - (1 if exclude_self and query_start < n else 0)
    if not 1 <= k <= available:
        raise RuntimeError(f"{where}: k must be in [1, {available}] for n = {n}"
                           f"{' with self excluded' if exclude_self else ''}, got k = {k}")


def _fp32_gemm_honours_tf32_switch() -> bool:
    """Whether a float32 GEMM is sure to run as true fp32 with TF32 switched off (the .cu's
    fp32_gemm_honours_guard): not when torch prefers cuBLASLt or TunableOp picks the kernel."""
    try:
        if torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublaslt:
            return False
        return not torch.cuda.tunable.is_enabled()
    except (AttributeError, RuntimeError):
        return False


_PRECISION_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_tf32():
    """True fp32 GEMMs inside (the .cu's at::NoTF32Guard). torch's switch is process-wide, so calls hold a lock;
    the matmul-precision API keeps torch's legacy and new TF32 settings consistent (setting one of them alone
    makes torch >= 2.9 refuse the next GEMM when the user set the other)."""
    with _PRECISION_LOCK:
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved)


#: torch.mm(..., out_dtype=float32) of float16 / bfloat16 operands exists since torch 2.8.
_HAVE_MM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)


def _gemm_mode(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16) and _HAVE_MM_OUT_DTYPE:
        return "low_to_float"
    # float32, float64 (rounded to float32 first) and 16-bit inputs on torch < 2.8 (widened: exact, slower)
    return "float32" if _fp32_gemm_honours_tf32_switch() else "float64"


def _operand(t: Tensor, mode: str) -> Tensor:
    if mode == "low_to_float":
        return t
    f = t.float()
    return f.double() if mode == "float64" else f


def _score_block(a: Tensor, b: Tensor, mode: str) -> Tensor:
    if mode == "float32":
        with _no_tf32():
            return torch.mm(a, b.t()).contiguous()
    if mode == "float64":
        return torch.mm(a, b.t()).float().contiguous()
    return torch.mm(a, b.t(), out_dtype=torch.float32).contiguous()


def _select_block(block: Tensor, col0: int, best_s: Tensor, best_i: Tensor, k: int, self0: int,
                  exclude_self: bool) -> None:
    rows, cols = block.shape
    kpad = next(p for p in _KPADS if k <= p)
    fn = KERNELS.function(_select_name(kpad), block.device)
    _cuda_jit.launch(fn, ((rows + _SELECT_WARPS - 1) // _SELECT_WARPS,), _SELECT_WARPS * 32, [
        pointer(block), ctypes.c_int(rows), ctypes.c_int(cols), ctypes.c_int64(col0), pointer(best_s),
        pointer(best_i), ctypes.c_int(k), ctypes.c_int64(self0), ctypes.c_bool(exclude_self)], block.device)


def _select_block_sorted(block: Tensor, col0: int, best_s: Tensor, best_i: Tensor, self0: int,
                         exclude_self: bool) -> None:
    rows, cols = block.shape
    k = best_s.shape[1]
    if exclude_self:  # the query's own column gets -inf, below every real score
        lo, hi = max(0, col0 - self0), min(rows, col0 + cols - self0)
        if lo < hi:
            flat = torch.arange(lo, hi, device=block.device) * (cols + 1) + (self0 - col0)
            block.view(-1).index_fill_(0, flat, float("-inf"))
    cols_idx = torch.arange(col0, col0 + cols, device=block.device).unsqueeze(0).expand(rows, cols)
    cand_s = torch.cat([best_s, block], 1)
    cand_i = torch.cat([best_i, cols_idx], 1)
    sorted_s, order = torch.sort(cand_s, dim=1, descending=True, stable=True)
    best_s.copy_(sorted_s[:, :k])
    best_i.copy_(cand_i.gather(1, order[:, :k]))


def search(queries: Tensor, db: Tensor, k: int, query_start: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """``grasp::topk_neighbor_mean_search`` on CUDA tensors, through the NVRTC-compiled selection kernel."""
    _check_search(queries, db, k, query_start, exclude_self)
    q, n, D = queries.shape[0], db.shape[0], queries.shape[1]
    scores = torch.full((q, k), float("-inf"), dtype=torch.float32, device=queries.device)
    indices = torch.full((q, k), _EMPTY_INDEX, dtype=torch.int64, device=queries.device)
    if q == 0:
        return scores, indices
    mode = _gemm_mode(queries.dtype)
    converts = mode == "float64" or (mode == "float32" and queries.dtype != torch.float32)
    warp_path = k <= _MAX_WARP_K
    if warp_path:
        qt = min(q, _QUERY_TILE)
        nt = min(max(_TILE_ELEMS // qt, _DB_TILE_MIN), _DB_TILE_MAX)
    else:
        nt = _DB_TILE_MIN
        qt = min(max(_FALLBACK_ELEMS // (k + nt), 1), q)
    if converts:
        nt = min(nt, max(256, _CONVERT_ELEMS // max(D, 1)))
    nt = min(nt, n)
    with torch.cuda.device(queries.device), torch.autocast("cuda", enabled=False):
        q_op = _operand(queries, mode)
        for c0 in range(0, n, nt):
            cols = min(nt, n - c0)
            db_op = _operand(db[c0:c0 + cols], mode)
            for r0 in range(0, q, qt):
                rows = min(qt, q - r0)
                block = _score_block(q_op[r0:r0 + rows], db_op, mode)
                if warp_path:
                    _select_block(block, c0, scores[r0:r0 + rows], indices[r0:r0 + rows], k, query_start + r0,
                                  exclude_self)
                else:
                    _select_block_sorted(block, c0, scores[r0:r0 + rows], indices[r0:r0 + rows],
                                         query_start + r0, exclude_self)
    return scores, indices


# --- gather -------------------------------------------------------------------------------------------------

def gather(x: Tensor, indices: Tensor) -> Tensor:
    """``grasp::topk_neighbor_mean_gather`` on CUDA tensors, through the NVRTC-compiled gather kernel."""
    where = "topk_neighbor_mean_gather (CUDA, NVRTC)"
    if not x.is_cuda or indices.device != x.device:
        raise RuntimeError(f"{where}: x and indices must be on one CUDA device, got {x.device} and {indices.device}")
    if x.dtype not in FLOAT_DTYPES or x.dim() != 2:
        raise RuntimeError(f"{where}: x must be a float [n, D] tensor, got {x.dtype} {tuple(x.shape)}")
    if indices.dtype != torch.int64 or indices.dim() != 2:
        raise RuntimeError(f"{where}: indices must be int64 [q, k], got {indices.dtype} {tuple(indices.shape)}")
    if not x.is_contiguous() or not indices.is_contiguous():
        raise RuntimeError(f"{where}: x and indices must be contiguous")
    (n, D), (q, k) = x.shape, indices.shape
    if q > 2**31 - 1:
        raise RuntimeError(f"{where}: q = {q} is too large")
    out = torch.empty((q, D), dtype=x.dtype, device=x.device)
    if q == 0 or D == 0:
        return out
    if indices.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(indices))
        if lo < 0 or hi >= n:
            raise RuntimeError(f"{where}: indices must lie in [0, {n}), got values in [{lo}, {hi}]")
    vec = vector_width(x.dtype)
    if D % vec != 0 or x.data_ptr() % 16 != 0 or out.data_ptr() % 16 != 0:
        vec = 1
    chunks = D // vec
    ys, row_threads, rows_per_block = 1, chunks, 1
    if chunks > _MEAN_THREADS:
        ys = min((chunks + _MEAN_THREADS - 1) // _MEAN_THREADS, 65535)
        row_threads = min((chunks + ys - 1) // ys, _MEAN_THREADS)
    else:
        rows_per_block = _MEAN_THREADS // chunks
    blocks = (q + rows_per_block - 1) // rows_per_block
    fn = KERNELS.function(_gather_name(x.dtype, vec), x.device)
    _cuda_jit.launch(fn, (blocks, ys), row_threads * rows_per_block, [
        pointer(x), pointer(indices), pointer(out), ctypes.c_int64(q), ctypes.c_int64(D), ctypes.c_int64(k),
        ctypes.c_int(row_threads), ctypes.c_int(rows_per_block)], x.device)
    return out
