"""What every Triton kernel module of grasp shares: the interpreter switch, op definition and launch device.

- ``INTERPRET``: ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors in Triton's NumPy interpreter
  (the tests on a machine without a GPU). There is nothing to tune then, and kernels are launched
  directly rather than through ``wrap_triton``, which only serves torch.compile's tracing.
- ``define_op``: on a GPU the ops are ``triton_op``s, so torch.compile traces into them and sees the
  kernels. Under the interpreter that tracing would run the interpreter on fake tensors, which have no
  data, so there they are opaque ``custom_op``s instead.
- ``on_device``: Triton launches a kernel on the *current* CUDA device and its current stream, not on
  the device of the tensors it is given. Every launcher enters ``on_device(tensor)`` first, so tensors
  on ``cuda:1`` run on GPU 1 (and its current stream) whichever device the caller made current.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor
from torch.library import wrap_triton

__all__ = ["INTERPRET", "define_op", "launcher", "on_device"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

define_op = torch.library.custom_op if INTERPRET else torch.library.triton_op


def launcher(kernel):
    """The callable that launches ``kernel``: the kernel itself under the interpreter, else ``wrap_triton``'s
    wrapper (which lets torch.compile trace the launch inside a ``triton_op``)."""
    return kernel if INTERPRET else wrap_triton(kernel)


def on_device(tensor: Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``tensor``'s CUDA device is current (a no-op for CPU tensors)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
