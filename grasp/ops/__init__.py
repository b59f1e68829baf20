"""Fused operators of grasp: reference, cpu, cuda and triton backends behind one function each."""

from grasp.ops.holistic_attention import holistic_attention, holistic_attention_reference
from grasp.ops.holistic_attention_projected import holistic_attention_projected, holistic_attention_projected_reference
from grasp.ops.score_topk import Gated, score_topk
from grasp.ops.topk_neighbor_mean import topk_neighbor_mean, topk_neighbor_mean_distributed

__all__ = [
    "holistic_attention",
    "holistic_attention_reference",
    "holistic_attention_projected",
    "holistic_attention_projected_reference",
    "Gated",
    "score_topk",
    "topk_neighbor_mean",
    "topk_neighbor_mean_distributed",
]
