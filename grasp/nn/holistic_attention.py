"""``grasp.nn.HolisticAttention``: the GRASP enhancer block (docs/design.md section 6).

The one implementation of the block: the models' GRASP item encoder (:mod:`grasp.models.item_encoders`) holds
one, feeds it the frozen LLM tables, and calls :meth:`HolisticAttention.pairs` and
:meth:`HolisticAttention.combine` on the adapted vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from grasp.nn.dropout import Dropout
from grasp.ops._holistic_attention_reference import gate_logits
from grasp.ops.holistic_attention import ACTIVATIONS, holistic_attention
from grasp.ops.holistic_attention_projected import has_kernel, holistic_attention_projected, projected_values
from grasp.ops.score_topk import Gated

__all__ = ["ACTIVATIONS", "BRANCHES", "Adapter", "HolisticAttention", "check_combination", "check_options"]

#: The op's output slices per branch, in units of d: self = [0:d], similar = [d:2d], global = [2d:4d].
BRANCHES = {"self": (0, 1), "similar": (1, 2), "global": (2, 4)}


class Adapter(nn.Sequential):
    """Two-layer MLP that maps frozen LLM embeddings (width ``in_dim``) to the model width ``d``."""

    def __init__(self, in_dim: int, d: int, *, hidden: int | None = None, dropout: float = 0.0) -> None:
        hidden = hidden or 2 * d
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, d))

    @torch.no_grad()
    def init_linear(self, weight: Tensor, bias: Tensor) -> None:
        """Set the parameters so that the adapter computes exactly ``x @ weight.T + bias`` (until trained).

        ``weight`` is ``[d, in_dim]``, ``bias`` ``[d]``; the hidden width must be ``2 d``. It uses
        ``gelu(z) - gelu(-z) = z``: the first layer computes ``z`` and ``-z``, the second takes the difference.
        """
        first, last = self[0], self[3]
        d = last.out_features
        if first.out_features != 2 * d or weight.shape != (d, first.in_features) or bias.shape != (d,):
            raise ValueError(
                f"Adapter.init_linear: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} must be "
                f"({d}, {first.in_features}) / ({d},) with hidden width {2 * d}, got hidden {first.out_features}"
            )
        first.weight.copy_(torch.cat([weight, -weight]))
        first.bias.copy_(torch.cat([bias, -bias]))
        eye = torch.eye(d, dtype=last.weight.dtype, device=last.weight.device)
        last.weight.copy_(torch.cat([eye, -eye], 1))
        last.bias.zero_()


class HolisticAttention(nn.Module):
    """User and item adapters, the holistic attention op, and an MLP ``4d -> d -> d``: the GRASP enhancer.

    Args:
        user_dim: width of the user embeddings ``U`` and ``Ū`` (the LLM embedding size).
        item_dim: width of the item embeddings ``I`` and ``Ī``.
        d: model width (the backbone's hidden size).
        dropout: dropout inside the adapters (the MLP runs once per position and has none).
        activation: ``"sigmoid"`` (the paper) or ``"softmax"`` (ablation: the gates are normalised over the
            L positions of a row, so a position's output depends on the whole row).
        branches: the subset of ``("self", "similar", "global")`` whose output slices (``[0:d]``, ``[d:2d]``,
            ``[2d:4d]``) reach the MLP; its first layer is sized to match.
        attention: ``False`` drops the op and feeds the ungated ``[u, ū, i, ī]`` (4d) to the MLP (needs all
            branches and the sigmoid activation).
        backend: forwarded to the ops (None = automatic).

    ``forward(user, user_sim, item, item_sim, mask=None)`` takes ``[B, user_dim]`` or ``[B, L, user_dim]`` users
    and ``[B, L, item_dim]`` items and returns ``[B, L, d]``, zero at masked positions. The same adapter serves
    a vector and its neighbour mean, so both live in one space.

    With sigmoid gates the op and the MLP's first layer run fused, as
    :func:`grasp.ops.holistic_attention_projected` (the same function, the layer's projection applied once per
    distinct item instead of once per position) wherever that op has a kernel (see :meth:`fused`).

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
        branches: tuple[str, ...] = tuple(BRANCHES),
        attention: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        for arg, value in (("user_dim", user_dim), ("item_dim", item_dim), ("d", d)):
            if value < 1:
                raise ValueError(f"HolisticAttention: {arg} must be >= 1, got {value}")
        check_options(branches, activation, attention, name=lambda arg: f"HolisticAttention: {arg}")
        check_combination(branches, activation, attention)
        self.d = d
        self.activation = activation
        self.attention = attention
        self.backend = backend
        self.user_adapter = Adapter(user_dim, d, dropout=dropout)
        self.item_adapter = Adapter(item_dim, d, dropout=dropout)
        columns = [c for name in BRANCHES if name in branches for c in range(*(d * end for end in BRANCHES[name]))]
        keep_all = not attention or len(columns) == 4 * d
        self.register_buffer("keep", None if keep_all else torch.tensor(columns), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(4 * d if keep_all else len(columns), d), nn.GELU(), nn.Linear(d, d))

    @property
    def pointwise(self) -> bool:
        """Whether a position's output depends on its own (user, item) pair alone (not with softmax gates)."""
        return not (self.attention and self.activation == "softmax")

    def adapt_users(self, user: Tensor, user_sim: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted ``(u, ū)`` of LLM user vectors of any leading shape (one adapter run over both)."""
        return tuple(self.user_adapter(torch.stack([user, user_sim])).unbind(0))

    def adapt_items(self, item: Tensor, item_sim: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted ``(i, ī)`` of LLM item vectors of any leading shape (one adapter run over both)."""
        return tuple(self.item_adapter(torch.stack([item, item_sim])).unbind(0))

    def forward(
        self, user: Tensor, user_sim: Tensor, item: Tensor, item_sim: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        return self.combine(*self.adapt_users(user, user_sim), *self.adapt_items(item, item_sim), mask)

    def combine(
        self,
        u: Tensor,
        u_sim: Tensor,
        i: Tensor,
        i_sim: Tensor,
        mask: Tensor | None,
        row_lse: Tensor | None = None,
    ) -> Tensor:
        """Enhancement ``[B, L, d]`` of adapted users ``[B, d]`` (or one per position, ``[B, L, d]``) and items
        ``[B, L, d]``, through the unfused op; zero where ``mask`` is False.

        ``row_lse`` (softmax only, ``[B, 3]``): log-sum-exp of each branch's logits over a longer row that
        ``i`` is a chunk of; the gates are then renormalised from the chunk to that row.
        """
        if not self.attention:
            if u.dim() == 2:
                u, u_sim = (t.unsqueeze(1).expand(-1, i.shape[1], -1) for t in (u, u_sim))
            gated = torch.cat([u, u_sim, i, i_sim], -1)
        else:
            gated = holistic_attention(u, u_sim, i, i_sim, mask=mask, activation=self.activation, backend=self.backend)
            if row_lse is not None:
                gated = gated * self._renormalise(u, u_sim, i, i_sim, row_lse)
            if self.keep is not None:
                gated = gated.index_select(-1, self.keep)
        out = self.mlp(gated)
        return out if mask is None else out * mask.unsqueeze(-1)

    def row_lse(self, u: Tensor, u_sim: Tensor, i: Tensor, i_sim: Tensor) -> Tensor:
        """``[B, 3]``: log-sum-exp of each branch's logits of adapted users ``[B, d]`` over all items ``[M, d]``
        (the softmax normaliser of a row holding every item; see :meth:`combine`)."""
        return gate_logits(u @ i.T, u_sim @ i_sim.T, self.d).logsumexp(1)

    def _renormalise(self, u: Tensor, u_sim: Tensor, i: Tensor, i_sim: Tensor, row_lse: Tensor) -> Tensor:
        """Per-branch factor ``[B, 1, 4d]`` turning softmax gates over the chunk ``i`` into gates over the row."""
        logits = gate_logits((i * u.unsqueeze(1)).sum(-1), (i_sim * u_sim.unsqueeze(1)).sum(-1), self.d)
        factor = torch.exp(logits.logsumexp(1) - row_lse)  # [B, 3]
        return factor[:, [0, 1, 2, 2]].repeat_interleave(self.d, dim=1).unsqueeze(1)

    def fused(self, device: torch.device) -> bool:
        """Whether :meth:`pairs` runs the op and the MLP's first layer as
        :func:`grasp.ops.holistic_attention_projected`: with sigmoid gates, when that op has a kernel (not only its
        reference) for ``device`` and the chosen backend; otherwise the unfused op runs (on its own kernel where
        it has one)."""
        return self.attention and self.activation == "sigmoid" and has_kernel(self.backend, device.type)

    def pairs(self, u: Tensor, u_sim: Tensor, i: Tensor, i_sim: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """The enhancement ``[N, d]`` of the pairs ``(u[rows[n]], i[cols[n]])`` of adapted users ``[U, d]`` and
        items ``[M, d]`` (pointwise gates only: each pair is a row of its own)."""
        if not self.fused(i.device):
            i, i_sim = (t.index_select(0, cols)[None] for t in (i, i_sim))
            return self.combine(u[rows][None], u_sim[rows][None], i, i_sim, None)[0]
        # Under autocast the op casts the adapters' outputs and the layer's parameters to the autocast dtype,
        # as nn.Linear would.
        hidden = holistic_attention_projected(
            u, u_sim, i, i_sim, self._first_weight(), self.mlp[0].bias, user_index=rows, item_index=cols,
            backend=self.backend,
        )
        return self.mlp[1:](hidden)

    def _first_weight(self) -> Tensor:
        """The MLP's first weight over the op's whole ``4d`` output: a dropped branch is a zero block."""
        weight = self.mlp[0].weight
        if self.keep is None:
            return weight
        return weight.new_zeros(weight.shape[0], 4 * self.d).index_copy(1, self.keep, weight)

    def score_terms(self, u: Tensor, u_sim: Tensor, i: Tensor, i_sim: Tensor, state: Tensor) -> tuple[Gated, Tensor]:
        """The block folded for scoring every item against user states (sigmoid gates): ``<state[b], out(b, j)>
        = <out_query[b], gelu(h[b, j])> + offset[b]``, with the MLP ``W2 gelu(W1 x + b1) + b2`` and
        ``h = W1 x + b1`` mixed from the projected item values as in :func:`grasp.ops.holistic_attention_projected`.

        Args:
            u, u_sim: ``[B, d]`` adapted users; i, i_sim: ``[M, d]`` adapted items; state: ``[B, d]``.

        Returns:
            ``(gated, offset)``: the gated terms of :func:`grasp.ops.score_topk` (``out_query = state W2``) and
            ``offset = <state, b2>`` ``[B]``.
        """
        if not (self.attention and self.activation == "sigmoid"):
            raise ValueError("HolisticAttention.score_terms: the fold needs attention with sigmoid gates")
        last = self.mlp[2]
        values = projected_values(i, i_sim, self._first_weight())
        gated = Gated(u, u_sim, i, i_sim, values, self.mlp[0].bias, state @ last.weight)
        return gated, state @ last.bias


def check_options(
    branches: tuple[str, ...], activation: str, attention: bool, name: Callable[[str], str] = str
) -> None:
    """Check the block's options, each on its own (:func:`check_combination` checks them together); a message
    names an argument with ``name`` (the training config passes its command-line flag).

    Raises:
        ValueError: the first bad option.
    """
    if isinstance(branches, str):
        raise ValueError(f"{name('branches')} must be a sequence of branch names, got the string {branches!r}")
    branches = tuple(branches)
    if not branches:
        raise ValueError(f"{name('branches')} must name at least one of {', '.join(BRANCHES)}")
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown:
        raise ValueError(f"{name('branches')}: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(BRANCHES)}")
    if len(set(branches)) != len(branches):
        raise ValueError(f"{name('branches')} has duplicates: {branches}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name('activation')}: unknown {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if not isinstance(attention, bool):
        raise ValueError(f"{name('attention')} must be True or False, got {attention!r}")


def check_combination(
    branches: tuple[str, ...], activation: str, attention: bool, name: Callable[[str], str] = str
) -> None:
    """Refuse valid options that do not go together (``attention=False`` has no gates: the sigmoid activation
    and every branch only)."""
    if not attention and activation != "sigmoid":
        raise ValueError("incompatible flags: attention=False (--no-attention) has no gates, so no activation")
    if not attention and set(branches) != set(BRANCHES):
        raise ValueError(
            f"incompatible flags: attention=False (--no-attention) uses all inputs; drop {name('branches')}"
        )
