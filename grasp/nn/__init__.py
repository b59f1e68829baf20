"""Modules built on the grasp operators."""

from grasp.nn.holistic_attention import Adapter, HolisticAttention

__all__ = ["Adapter", "HolisticAttention"]
