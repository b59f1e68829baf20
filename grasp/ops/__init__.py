"""Fused operators of grasp, each a torch custom op with reference, cpu, cuda and triton backends."""

from grasp.ops.hae import holistic_attention, holistic_attention_reference

__all__ = ["holistic_attention", "holistic_attention_reference"]
