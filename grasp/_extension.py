"""Loading of the compiled extension ``grasp._C`` and what it provides.

Importing ``grasp._C`` runs its static initialisers, which register the C++
operators (``torch.ops.grasp.*``) for the CPU and, when built, CUDA dispatch
keys. A missing or broken extension is not fatal: the reason is kept so that
``grasp info`` and backend errors can say what is missing.
"""

from __future__ import annotations

import torch

try:
    from grasp import _C  # noqa: F401  (imported for its operator registrations)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built (no compiler, GRASP_NO_EXTENSION=1) or built for another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

LOADED = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for ``grasp::op`` under ``dispatch_key`` (CPU, CUDA)."""
    if not LOADED or not has_op(op):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"grasp::{op}", dispatch_key)


def has_op(op: str) -> bool:
    """Whether the schema ``grasp::op`` is registered."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"grasp::{op}", "")
    except RuntimeError:
        return False
    return True


def missing_reason(op: str, dispatch_key: str, *, registered_elsewhere: bool = False) -> str:
    """Why ``grasp::op`` has no ``dispatch_key`` kernel of grasp._C (an empty string if it has one).
    ``registered_elsewhere``: a kernel registered from Python (the NVRTC path) sits where grasp._C's would, so
    the dispatcher cannot tell whether grasp._C has one; the caller knows it has not."""
    if not LOADED:
        return (
            f"the compiled extension grasp._C is not available ({LOAD_ERROR}); rebuild with "
            "`pip install --no-build-isolation -e .` and a C++ compiler"
        )
    if not registered_elsewhere and has_kernel(op, dispatch_key):
        return ""
    if not has_op(op):
        return f"grasp._C has no operator grasp::{op}: it was built from older sources; rebuild it"
    if dispatch_key == "CUDA":
        if torch.version.cuda is None:
            return "this torch is a CPU-only build, so grasp._C has no CUDA kernels; install a CUDA torch and rebuild"
        return (
            "grasp._C was built without its CUDA kernels (nvcc was not found at build time); set CUDA_HOME and "
            "rebuild with `pip install --no-build-isolation -e .` (GRASP_FORCE_CUDA=1 on a host without a GPU)"
        )
    return f"grasp._C has no {dispatch_key} kernel for grasp::{op}"
