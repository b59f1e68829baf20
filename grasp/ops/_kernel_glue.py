"""Fake (meta) kernels and autograd of the kernel ops, shared by their C++ and Triton definitions.

A leaf module: it imports only torch, so the Triton kernel modules in ``grasp_kernels`` and the dispatch
modules of ``grasp.ops`` both import it without importing each other. Each function takes the qualified
names of one op's kernel pair (``grasp::<op>_forward`` and ``grasp::<op>_backward`` for the C++ kernels,
the same with ``_triton`` for the Triton ones); both pairs share the schemas of ``csrc/<op>.cpp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "TRITON_DTYPES",
    "register_holistic_attention",
    "register_holistic_attention_projected",
    "register_score_topk",
    "register_topk_neighbor_mean",
]

#: Dtypes of the float inputs the ops take, and the subset the Triton kernels take.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _op(qualname: str):
    return getattr(torch.ops.grasp, qualname.split("::")[1])


def register_holistic_attention(forward: str, backward: str) -> None:
    """Fake kernels of a ``holistic_attention`` forward/backward pair and autograd on the forward (the backward
    saves only the inputs and recomputes the gates)."""
    backward_op = _op(backward)

    @torch.library.register_fake(forward)
    def _forward_fake(user, user_sim, item, item_sim, mask, softmax):
        B, L, d = item.shape
        return item.new_empty((B, L, 4 * d))

    @torch.library.register_fake(backward)
    def _backward_fake(grad_out, user, user_sim, item, item_sim, mask, softmax):
        return tuple(t.new_empty(t.shape) for t in (user, user_sim, item, item_sim))

    def setup_context(ctx, inputs, output) -> None:
        user, user_sim, item, item_sim, mask, softmax = inputs
        ctx.save_for_backward(user, user_sim, item, item_sim, mask)
        ctx.softmax = softmax

    def backward_fn(ctx, grad_out: Tensor):
        grads = backward_op(grad_out.contiguous(), *ctx.saved_tensors, ctx.softmax)
        return (*grads, None, None)  # no gradient for mask and softmax

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_holistic_attention_projected(forward: str, backward: str) -> None:
    """Fake kernels of a ``holistic_attention_projected`` forward/backward pair and autograd on the forward
    (the backward saves only the inputs and recomputes the gates)."""
    backward_op = _op(backward)

    @torch.library.register_fake(forward)
    def _forward_fake(user, user_sim, item, item_sim, values, user_index, item_index):
        return values.new_empty((user_index.shape[0], values.shape[2]))

    @torch.library.register_fake(backward)
    def _backward_fake(grad_out, user, user_sim, item, item_sim, values, user_index, item_index):
        return tuple(t.new_empty(t.shape) for t in (user, user_sim, item, item_sim, values))

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def backward_fn(ctx, grad_out: Tensor):
        grads = backward_op(grad_out.contiguous(), *ctx.saved_tensors)
        return (*grads, None, None)  # no gradient for the indices

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_topk_neighbor_mean(search: str, gather: str) -> None:
    """Fake kernels of a ``topk_neighbor_mean`` search/gather pair (no autograd: the search is an offline step)."""

    @torch.library.register_fake(search)
    def _search_fake(queries, db, k, query_start, exclude_self, slices=0):  # slices: the Triton schema only
        q = queries.shape[0]
        return queries.new_empty((q, k), dtype=torch.float32), queries.new_empty((q, k), dtype=torch.int64)

    @torch.library.register_fake(gather)
    def _gather_fake(x, indices):
        return x.new_empty((indices.shape[0], x.shape[1]))


def register_score_topk(dot: str, gated: str) -> None:
    """Fake kernels of a ``score_topk`` plain/gated pair (no autograd: scoring for retrieval is inference)."""

    def outputs(query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        B = query.shape[0]
        return query.new_empty((B, k), dtype=torch.float32), query.new_empty((B, k), dtype=torch.int64)

    @torch.library.register_fake(dot)
    def _dot_fake(query, table, exclude, k):
        return outputs(query, k)

    @torch.library.register_fake(gated)
    def _gated_fake(query, table, user, user_sim, item, item_sim, values, bias, out_query, exclude, k):
        return outputs(query, k)
