"""Fused operators of grasp: reference, cpu, cuda and triton backends behind one function each."""

from grasp.ops.hae import holistic_attention, holistic_attention_reference
from grasp.ops.hae_projected import holistic_attention_projected, holistic_attention_projected_reference
from grasp.ops.knn import topk_neighbor_mean, topk_neighbor_mean_distributed

__all__ = [
    "holistic_attention",
    "holistic_attention_reference",
    "holistic_attention_projected",
    "holistic_attention_projected_reference",
    "topk_neighbor_mean",
    "topk_neighbor_mean_distributed",
]
