"""Triton kernels of grasp: pure kernel code and launch helpers, no model code."""
