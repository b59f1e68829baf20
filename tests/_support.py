"""Helpers shared by several test files (fixtures built on them live in conftest.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

#: Every float dtype the ops take.
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def run_with_grads(fn, tensors, grad_out):
    """``fn(*tensors)`` (detached) and the gradients of ``<fn(*tensors), grad_out>`` with respect to ``tensors``."""
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, grad_out)
    return out.detach(), grads


class HashEncoder:
    """A fast deterministic stand-in for a text encoder: bag-of-words vectors, so similar texts get similar
    vectors; counts its calls."""

    name = "hash"
    calls = 0

    def __init__(self, **options) -> None:
        self.dimension = 32

    def encode(self, texts, *, progress=True):
        HashEncoder.calls += 1
        out = np.zeros((len(texts), self.dimension), np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dimension] += 1.0
        return out + 1e-3  # no all-zero rows


def random_llm_tables(num_users: int, num_items: int, dim: int = 24):
    """Fresh random LLM tables (:class:`grasp.pipeline.Tables`) with zero padding rows and valid neighbour ids."""
    from grasp.pipeline.tables import Tables

    def table(n: int) -> np.ndarray:
        t = np.random.default_rng(int(torch.randint(1 << 30, ()))).standard_normal((n + 1, dim)).astype(np.float32)
        t[0] = 0
        return t

    def neighbors(n: int) -> np.ndarray:
        ids = torch.randint(1, n + 1, (n + 1, 3)).numpy()
        ids[0] = 0
        return ids

    return Tables(table(num_users), table(num_users), table(num_items), table(num_items), neighbors(num_users),
                  neighbors(num_items))  # fmt: skip
