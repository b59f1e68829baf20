"""Modules built on the grasp operators."""

from grasp.nn.dropout import Dropout
from grasp.nn.holistic_attention import Adapter, HolisticAttention

__all__ = ["Adapter", "Dropout", "HolisticAttention"]
