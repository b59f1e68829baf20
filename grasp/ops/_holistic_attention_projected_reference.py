"""Plain-PyTorch reference of ``grasp.ops.holistic_attention_projected``: the ground truth of its kernels.

The pairs are gathered from the tables, passed through :func:`holistic_attention_reference` (sigmoid gates)
and then through the linear layer, exactly as the unfused GRASP enhancer computes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grasp.ops._holistic_attention_reference import holistic_attention_reference

__all__ = ["holistic_attention_projected_reference"]


def holistic_attention_projected_reference(
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    user_index: Tensor,
    item_index: Tensor,
    *,
    upcast: bool = True,
) -> Tensor:
    """Plain PyTorch: gather the pairs, :func:`holistic_attention_reference` (sigmoid), then ``@ weight.T + bias``.

    ``upcast`` computes float16/bfloat16 inputs in float32 (the op's contract); ``False`` computes in the
    input dtype, the "same-dtype torch" yardstick of the kernel tolerance tests.
    """
    out_dtype = item.dtype
    if upcast and out_dtype in (torch.float16, torch.bfloat16):
        user, user_sim, item, item_sim, weight = (t.float() for t in (user, user_sim, item, item_sim, weight))
        bias = None if bias is None else bias.float()
    hae = holistic_attention_reference(
        user[user_index][None], user_sim[user_index][None], item[item_index][None], item_sim[item_index][None],
        upcast=False,
    )[0]
    out = hae @ weight.T
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)
