"""Sequence encoders: SASRec, BERT4Rec and GRU4Rec (docs/design.md section 6).

Every backbone maps the item representations of a left-padded window to one hidden state per position::

    backbone(x: [B, L, d], mask: [B, L] bool, True = real position) -> [B, L, d]

The backbone owns everything position-related (positional embeddings, attention masks, recurrence); how an
item becomes a vector is the item encoder's business (:mod:`grasp.models.item_encoders`). Windows may be
shorter than ``max_len``: positions are counted from the right end, so a window behaves exactly like the
same window left-padded to ``max_len``. Padded positions never influence real ones, and their outputs are
zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from grasp.nn import Dropout

__all__ = ["Transformer", "GRU4Rec", "sasrec", "bert4rec", "attention_mask", "rotate_padding"]


def rotate_padding(x: Tensor, lengths: Tensor, *, to_right: bool) -> Tensor:
    """Rotate each row of ``x [B, L, ...]`` between left padding and right padding.

    ``to_right=True`` moves the ``lengths[b]`` real items of a left-padded row to the front (positions
    ``0..len-1``); ``to_right=False`` undoes it.
    """
    length = x.shape[1]
    offset = (length - lengths).unsqueeze(1)
    steps = torch.arange(length, device=x.device)
    index = (steps + offset if to_right else steps - offset) % length
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


def attention_mask(mask: Tensor, causal: bool) -> Tensor:
    """``[B, 1, L, L]`` bool mask for :func:`torch.nn.functional.scaled_dot_product_attention` (True = attend).

    A query attends to the real keys (and, if ``causal``, only to those at or before it). Every query may
    also attend to itself, so the rows of padded queries are never empty (no NaN); with left padding a real
    query's own key is real anyway, so this changes nothing for real positions.
    """
    length = mask.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=mask.device)
    allowed = mask[:, None, :] | eye
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return allowed.unsqueeze(1)


class TransformerBlock(nn.Module):
    """Multi-head self-attention and a position-wise feed-forward network, pre-LN or post-LN.

    Pre-LN (``norm_first=True``): ``x + MHA(LN(x))`` then ``x + FFN(LN(x))``. Post-LN: ``LN(x + MHA(x))``
    then ``LN(x + FFN(x))``. Dropout on the attention output and inside the FFN; not on the attention
    weights (the reference SASRec has it there too, but on CPU it forces the unfused attention path and
    triples the attention time).
    """

    def __init__(
        self, d: int, num_heads: int, dropout: float, *, ffn_dim: int, activation: str, norm_first: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_first = norm_first
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), act, Dropout(dropout), nn.Linear(ffn_dim, d), Dropout(dropout))
        self.out_dropout = Dropout(dropout)

    def _attention(self, x: Tensor, mask: Tensor | None) -> Tensor:
        batch, length, d = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out_dropout(self.proj(out.transpose(1, 2).reshape(batch, length, d)))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x``: ``[B, L, d]``; ``mask``: the ``[B, 1, L, L]`` mask of :func:`attention_mask`, or None for
        plain causal attention."""
        if self.norm_first:
            x = x + self._attention(self.attn_norm(x), mask)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self._attention(x, mask))
        return self.ffn_norm(x + self.ffn(x))


class Transformer(nn.Module):
    """Learned positional embeddings + a stack of :class:`TransformerBlock` (SASRec and BERT4Rec).

    Args:
        d: hidden size.
        max_len: longest window (number of positional embeddings).
        num_blocks, num_heads, dropout: the usual; ``d`` must be divisible by ``num_heads``.
        causal: mask future positions (SASRec) or not (BERT4Rec).
        norm_first: pre-LN blocks (then a final LayerNorm) or post-LN blocks.
        ffn_dim, activation: feed-forward width and ``"relu"`` or ``"gelu"``.
        input_scale: the item vectors are multiplied by it before the positional embedding is added
            (SASRec uses ``sqrt(d)``).
        embed_norm: LayerNorm after adding positions (BERT).
        head: a ``Linear -> GELU -> LayerNorm`` output transform (BERT4Rec's prediction head).
    """

    def __init__(
        self,
        d: int,
        max_len: int,
        *,
        num_blocks: int,
        num_heads: int,
        dropout: float,
        causal: bool,
        norm_first: bool,
        ffn_dim: int,
        activation: str,
        input_scale: float = 1.0,
        embed_norm: bool = False,
        head: bool = False,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.causal = causal
        self.input_scale = input_scale
        self.position = nn.Embedding(max_len, d)
        nn.init.normal_(self.position.weight, std=d**-0.5)
        self.embed_norm = nn.LayerNorm(d, eps=1e-8) if embed_norm else nn.Identity()
        self.dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, num_heads, dropout, ffn_dim=ffn_dim, activation=activation, norm_first=norm_first)
            for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(d, eps=1e-8) if norm_first else nn.Identity()
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=1e-8)) if head else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: ``[B, L, d]`` item vectors, ``mask``: ``[B, L]`` bool; returns ``[B, L, d]``."""
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        if self.input_scale != 1.0:
            x = x * self.input_scale
        x = self.dropout(self.embed_norm(x + self.position.weight[self.max_len - length :]))
        if self.causal:
            # Right-aligned, a causal query never sees padding, so the fused causal kernel needs no mask.
            lengths = mask.sum(1)
            x = rotate_padding(x, lengths, to_right=True)
            for block in self.blocks:
                x = block(x, None)
            x = rotate_padding(x, lengths, to_right=False)
        else:
            attn = attention_mask(mask, causal=False)
            for block in self.blocks:
                x = block(x, attn)
        return self.head(self.final_norm(x)) * mask.unsqueeze(-1)


def sasrec(d: int, max_len: int, *, num_blocks: int, num_heads: int, dropout: float) -> Transformer:
    """SASRec (Kang & McAuley 2018): causal pre-LN blocks, ReLU FFN of width d, inputs scaled by ``sqrt(d)``."""
    return Transformer(
        d,
        max_len,
        num_blocks=num_blocks,
        num_heads=num_heads,
        dropout=dropout,
        causal=True,
        norm_first=True,
        ffn_dim=d,
        activation="relu",
        input_scale=math.sqrt(d),
    )


def bert4rec(d: int, max_len: int, *, num_blocks: int, num_heads: int, dropout: float) -> Transformer:
    """BERT4Rec (Sun et al. 2019): bidirectional post-LN blocks, GELU FFN of width 4d, BERT prediction head."""
    return Transformer(
        d,
        max_len,
        num_blocks=num_blocks,
        num_heads=num_heads,
        dropout=dropout,
        causal=False,
        norm_first=False,
        ffn_dim=4 * d,
        activation="gelu",
        embed_norm=True,
        head=True,
    )


class GRU4Rec(nn.Module):
    """GRU4Rec (Hidasi et al. 2016): dropout, a ``num_layers`` GRU and a dense output layer.

    The GRU runs over packed sequences, so padding is never fed through the recurrence and the state at a
    position depends only on the real items up to it. The window must be left-padded (real items
    contiguous at the right end), as everywhere in grasp.
    """

    def __init__(self, d: int, *, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.dense = nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: ``[B, L, d]`` item vectors, ``mask``: ``[B, L]`` bool; returns ``[B, L, d]``."""
        length = x.shape[1]
        lengths = mask.sum(1)
        right = rotate_padding(self.dropout(x), lengths, to_right=True)  # packing wants right padding
        packed = pack_padded_sequence(right, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        return self.dense(rotate_padding(out, lengths, to_right=False)) * mask.unsqueeze(-1)
