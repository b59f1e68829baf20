"""``grasp.nn.HolisticAttention``: the GRASP enhancer block (docs/design.md section 6)."""

from __future__ import annotations

from torch import Tensor, nn

from grasp.nn.dropout import Dropout
from grasp.ops.holistic_attention import ACTIVATIONS, holistic_attention


class Adapter(nn.Sequential):
    """Two-layer MLP that maps frozen LLM embeddings (width ``in_dim``) to the model width ``d``."""

    def __init__(self, in_dim: int, d: int, *, hidden: int | None = None, dropout: float = 0.0) -> None:
        hidden = hidden or 2 * d
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, d))


class HolisticAttention(nn.Module):
    """User and item adapters, the holistic attention op, and an MLP ``4d -> d -> d`` (the block that
    ``grasp.models`` uses as the GRASP enhancer).

    Args:
        user_dim: width of the user embeddings ``U`` and ``U_sim`` (the LLM embedding size).
        item_dim: width of the item embeddings ``I`` and ``I_sim``.
        d: model width (the backbone's hidden size).
        dropout: dropout inside the adapters.
        activation: ``"sigmoid"`` (the paper) or ``"softmax"`` (ablation).
        backend: forwarded to :func:`grasp.ops.holistic_attention` (None = automatic).

    ``forward(user, user_sim, item, item_sim, mask=None)`` takes ``[B, user_dim]`` or
    ``[B, L, user_dim]`` users and ``[B, L, item_dim]`` items and returns ``[B, L, d]``. The same
    adapter serves a vector and its neighbour mean, so both live in one space.

    Example:
        >>> import torch
        >>> from grasp.nn import HolisticAttention
        >>> hae = HolisticAttention(user_dim=384, item_dim=384, d=64)
        >>> out = hae(torch.randn(8, 384), torch.randn(8, 384), torch.randn(8, 50, 384), torch.randn(8, 50, 384))
        >>> out.shape
        torch.Size([8, 50, 64])
    """

    def __init__(
        self,
        user_dim: int,
        item_dim: int,
        d: int = 64,
        *,
        dropout: float = 0.0,
        activation: str = "sigmoid",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"HolisticAttention: activation must be 'sigmoid' or 'softmax', got {activation!r}")
        for name, value in (("user_dim", user_dim), ("item_dim", item_dim), ("d", d)):
            if value < 1:
                raise ValueError(f"HolisticAttention: {name} must be >= 1, got {value}")
        self.activation = activation
        self.backend = backend
        self.user_adapter = Adapter(user_dim, d, dropout=dropout)
        self.item_adapter = Adapter(item_dim, d, dropout=dropout)
        self.mlp = nn.Sequential(nn.Linear(4 * d, d), nn.GELU(), nn.Linear(d, d))

    def forward(
        self, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        fused = holistic_attention(
            self.user_adapter(user),
            self.user_adapter(user_sim),
            self.item_adapter(item),
            self.item_adapter(item_sim),
            mask=mask,
            activation=self.activation,
            backend=self.backend,
        )
        return self.mlp(fused)
