"""The ``faiss`` backend of the neighbour search: faiss brute-force inner-product k-NN.

CPU tensors go through ``faiss.knn`` (BLAS blocks plus heaps); CUDA tensors
through ``faiss.knn_gpu`` when the faiss build has GPU support, on the tensors'
device and that device's current stream. faiss does not promise an order among
equal scores, so the results are re-sorted by (score desc, index asc); which of
several equal scores make the top k at the boundary is faiss's choice.
"""

from __future__ import annotations

import functools
import importlib

import faiss
import numpy as np
import torch
from torch import Tensor

from grasp.ops._topk_neighbor_mean_reference import drop_own, order_by_score


def has_gpu() -> bool:
    """Whether this faiss build can search on a GPU."""
    return hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0


@functools.cache
def _gpu_resources(device: int) -> faiss.StandardGpuResources:
    """One set of faiss GPU resources per device, reused across calls and blocks."""
    return faiss.StandardGpuResources()


def _raw_search(queries: Tensor, db: Tensor, k: int) -> tuple[Tensor, Tensor]:
    if queries.is_cuda:
        if not has_gpu():
            raise RuntimeError("topk_neighbor_mean: the installed faiss has no GPU support; install a faiss "
                               "GPU build (grasp[gpu]) or move the tensors to the CPU")
        importlib.import_module("faiss.contrib.torch_utils")  # lets faiss.knn_gpu take torch tensors

        # faiss searches on the device it is told and on the current stream of the current device: both
        # must be the tensors' device, whichever device the caller made current.
        with torch.cuda.device(queries.device):
            index = torch.cuda.current_device() if queries.device.index is None else queries.device.index
            scores, idx = faiss.knn_gpu(_gpu_resources(index), queries, db, k, metric=faiss.METRIC_INNER_PRODUCT,
                                        device=index)
        return scores.float(), idx.long()
    q = np.ascontiguousarray(queries.float().numpy())
    x = np.ascontiguousarray(db.float().numpy())
    scores, idx = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(scores), torch.from_numpy(idx)


def search(queries: Tensor, db: Tensor, k: int, query_start: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Inner-product top-k with the contract of ``grasp::topk_neighbor_mean_search`` (csrc/topk_neighbor_mean.cpp)."""
    extra = 1 if exclude_self else 0
    scores, idx = _raw_search(queries, db, min(k + extra, db.shape[0]))
    if exclude_self:
        own = torch.arange(query_start, query_start + queries.shape[0], device=idx.device)
        scores, idx = drop_own(scores, idx, own, k)
    scores, idx = order_by_score(scores, idx)
    return scores.contiguous(), idx.contiguous()
