"""Backend selection shared by the operators (docs/design.md section 5).

An explicit ``backend=`` argument wins; otherwise ``GRASP_BACKEND`` forces one;
otherwise the first available backend of the op's preference order for the
tensors' device is used. An unavailable backend is an error that says what is
missing, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from grasp import _extension
from grasp.ops import _cuda_jit
from grasp.ops._kernel_glue import TRITON_DTYPES

BACKENDS = ("reference", "cpu", "cuda", "triton", "faiss")

_F = TypeVar("_F", bound=Callable)


def constant_under_compile(fn: _F) -> _F:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does: torch.compile calls it while tracing and
    keeps its result as a constant.

    That decorator imports torch._dynamo, and Triton with it: seconds on every ``import grasp.ops``. This sets
    the same mark, which only torch.compile reads (tests/test_startup.py checks that both mark a function alike).
    """
    fn._dynamo_marked_constant = True
    return fn


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.cache
def import_error(module: str) -> str:
    """Import ``module``; return "" on success or the reason it failed."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"the package {module.split('.')[0]!r} is not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install should be reported, not crash dispatch
        return f"importing {module} failed: {type(exc).__name__}: {exc}"
    return ""


def triton_reason(device_type: str, kernel_module: str) -> str:
    """Why the Triton kernels in ``kernel_module`` cannot run on ``device_type`` ("" if they can)."""
    if device_type == "cpu" and not interpreting():
        return "Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA tensors, not {device_type}"
    return import_error(kernel_module)


def extension_reason(backend: str, device_type: str, op: str) -> str:
    """Why the ``cpu``/``cuda`` kernel of ``grasp::op`` cannot run on ``device_type`` ("" if it can). The ``cuda``
    backend runs grasp._C's CUDA kernels, or the same kernels compiled by NVRTC (``grasp.ops._cuda_jit``)."""
    if device_type != backend:
        return f"the {backend} backend runs {backend} tensors only"
    if backend == "cuda":
        return _cuda_jit.reason(op)
    return _extension.missing_reason(op, backend.upper())


def reason(
    op: str, backend: str, device_type: str, dtype: torch.dtype | None = None, *, kernel: str = "forward"
) -> str:
    """Why ``backend`` cannot run ``op`` on ``device_type`` tensors of ``dtype`` ("" if it can), for the backends
    every op has: ``reference``; ``cpu`` and ``cuda``, the C++ kernel ``grasp::<op>_<kernel>``; ``triton``, the
    module ``grasp_kernels.<op>`` (float32, float16 and bfloat16 only)."""
    if backend == "reference":
        return ""
    if backend in ("cpu", "cuda"):
        return extension_reason(backend, device_type, f"{op}_{kernel}")
    if backend == "triton":
        if dtype is not None and dtype not in TRITON_DTYPES:
            return f"the Triton kernels take float32, float16 and bfloat16, not {dtype}"
        return triton_reason(device_type, f"grasp_kernels.{op}")
    return f"{backend!r} is not a backend of {op}"


def choose(
    op: str,
    requested: str | None,
    device_type: str,
    auto_order: dict[str, Sequence[str]],
    reason: Callable[[str, str], str],
) -> str:
    """Pick the backend of ``op`` for tensors on ``device_type``.

    ``reason(backend, device_type)`` returns "" when that backend can run, else why not.
    """
    name = requested if requested is not None else (os.environ.get("GRASP_BACKEND") or None)
    if name is None:
        for candidate in auto_order.get(device_type, ("reference",)):
            if not reason(candidate, device_type):
                return candidate
        return "reference"
    if name not in BACKENDS:
        source = "backend" if requested is not None else "GRASP_BACKEND"
        raise ValueError(f"{op}: unknown {source} {name!r}; expected one of {', '.join(BACKENDS)}")
    why = reason(name, device_type)
    if why:
        raise RuntimeError(f"{op}: backend {name!r} is not available for {device_type} tensors: {why}")
    return name


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device_type``, for the ops that ignore autocast: they compute in the
    dtypes they document."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def under_autocast_rule(fn: Callable[..., Tensor], item: object, floats: Sequence[object], *rest: object) -> Tensor:
    """``fn(*floats, *rest)`` with the ops' autocast rule, that of ``F.linear``.

    Under ``torch.autocast`` enabled for ``item``'s device type, the float32/float16/bfloat16 tensors of
    ``floats`` are cast to the autocast dtype (float64 and non-tensors stay, for the op's checks to name) and
    ``fn`` runs with autocast off; otherwise ``fn`` gets the arguments as they are.
    """
    if not isinstance(item, Tensor) or not torch.amp.is_autocast_available(item.device.type):
        return fn(*floats, *rest)
    if not torch.is_autocast_enabled(item.device.type):
        return fn(*floats, *rest)
    dtype = torch.get_autocast_dtype(item.device.type)
    cast = [t.to(dtype) if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
            else t for t in floats]  # fmt: skip
    with torch.autocast(item.device.type, enabled=False):
        return fn(*cast, *rest)
