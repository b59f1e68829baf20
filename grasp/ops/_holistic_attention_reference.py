"""Plain-PyTorch reference of the holistic-attention operator (docs/design.md section 2).

This is the ground truth every kernel is tested against. It uses ordinary
autograd, so it is also the ``reference`` backend and the fallback.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def gate_logits(s1: Tensor, s2: Tensor, d: int) -> Tensor:
    """The three gates' logits ``[..., 3]`` (self, similar, global) from ``s1 = <u, i>`` and ``s2 = <ū, ī>``
    of ``d``-wide vectors: ``s1/sqrt(d)``, ``s2/sqrt(d)``, ``(s1 + s2)/sqrt(2d)``."""
    return torch.stack((s1 / math.sqrt(d), s2 / math.sqrt(d), (s1 + s2) / math.sqrt(2 * d)), dim=-1)


def holistic_attention_reference(
    user: Tensor,
    user_sim: Tensor,
    item: Tensor,
    item_sim: Tensor,
    mask: Tensor | None = None,
    activation: str = "sigmoid",
    *,
    upcast: bool = True,
) -> Tensor:
    """Holistic sigmoid (or softmax) attention in plain PyTorch.

    Args:
        user, user_sim: ``[B, d]`` (broadcast over L) or ``[B, L, d]``.
        item, item_sim: ``[B, L, d]``.
        mask: optional bool ``[B, L]``, True marks a real position.
        activation: ``"sigmoid"`` (independent gates) or ``"softmax"`` (gates
            normalised over the L positions of each row and branch).
        upcast: compute in float32 for float16/bfloat16 inputs (the op's
            contract). ``False`` computes in the input dtype; tests use it as
            the "same-dtype torch" yardstick for kernel error.

    Returns:
        ``[B, L, 4d]`` in the dtype of ``item``:
        ``[a_self*i | a_sim*i_sim | a_glob*i | a_glob*i_sim]``.
    """
    out_dtype = item.dtype
    if upcast and out_dtype in _LOW_PRECISION:
        user, user_sim, item, item_sim = (t.float() for t in (user, user_sim, item, item_sim))
    d = item.shape[-1]
    keep = None if mask is None else mask.unsqueeze(-1)
    if keep is not None:
        # Masked positions are never read: padding may hold anything, NaN included.
        item, item_sim = item.masked_fill(~keep, 0), item_sim.masked_fill(~keep, 0)
        if user.dim() == 3:
            user, user_sim = user.masked_fill(~keep, 0), user_sim.masked_fill(~keep, 0)
    if user.dim() == 2:
        user, user_sim = user.unsqueeze(1), user_sim.unsqueeze(1)
    s1 = (user * item).sum(-1)
    s2 = (user_sim * item_sim).sum(-1)
    z = gate_logits(s1, s2, d)
    if activation == "sigmoid":
        gates = torch.sigmoid(z)
    elif activation == "softmax":
        if keep is not None:
            # A very negative finite logit (not -inf) keeps fully masked rows NaN-free;
            # their uniform weights are zeroed by the mask just below.
            z = z.masked_fill(~keep, torch.finfo(z.dtype).min)
        gates = torch.softmax(z, dim=1)
    else:
        raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
    if keep is not None:
        gates = gates * keep
    a_self, a_sim, a_glob = (g.unsqueeze(-1) for g in gates.unbind(-1))
    out = torch.cat((a_self * item, a_sim * item_sim, a_glob * item, a_glob * item_sim), dim=-1)
    return out.to(out_dtype)
