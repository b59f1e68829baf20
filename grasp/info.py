"""What ``grasp info`` reports: versions, devices, and which backend of each op can run here.

The versions come first and need no torch; the devices and the backend table import torch and the ops
(seconds), so :func:`report_lines` yields the versions before importing them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Callable, Iterator

#: op -> the backends it has.
OPS = {
    "holistic_attention": ("reference", "cpu", "cuda", "triton"),
    "holistic_attention_projected": ("reference", "cpu", "cuda", "triton"),
    "topk_neighbor_mean": ("reference", "cpu", "cuda", "triton", "faiss"),
    "score_topk": ("reference", "cpu", "cuda", "triton"),
}
PACKAGES = ("torch", "triton", "numpy", "faiss-cpu", "faiss-gpu", "openai", "cupy-cuda13x", "cupy-cuda12x")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _reasons() -> dict[str, Callable[[str, str], str]]:
    """op -> the function telling why a backend cannot run it on a device type ("" if it can)."""
    from grasp.ops.holistic_attention import backend_reason as holistic_attention
    from grasp.ops.holistic_attention_projected import backend_reason as holistic_attention_projected
    from grasp.ops.score_topk import backend_reason as score_topk
    from grasp.ops.topk_neighbor_mean import backend_reason as topk_neighbor_mean

    return {"holistic_attention": holistic_attention, "holistic_attention_projected": holistic_attention_projected,
            "topk_neighbor_mean": topk_neighbor_mean, "score_topk": score_topk}  # fmt: skip


def device_types() -> list[str]:
    """Device types present on this machine: always "cpu", plus "cuda" when a GPU is visible."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backend_table() -> list[tuple[str, str, str, str]]:
    """Rows (op, backend, device type, status) where status is "available" or the reason it is not."""
    reasons, rows = _reasons(), []
    for op, backends in OPS.items():
        for device_type in ("cpu", "cuda"):
            for backend in backends:
                if backend in ("cpu", "cuda") and backend != device_type:
                    continue  # the cpu backend on CUDA tensors and vice versa: never a combination
                why = reasons[op](backend, device_type)
                if device_type == "cuda" and "cuda" not in device_types() and not why:
                    why = "no CUDA device is visible"
                rows.append((op, backend, device_type, why or "available"))
    return rows


def cuda_paths() -> Iterator[str]:
    """Which path runs each op's CUDA kernels: grasp._C's, or the same device code compiled by NVRTC."""
    from grasp.ops import _cuda_jit

    forced = f" ({_cuda_jit.FORCE_ENV}=1)" if _cuda_jit.forced() else ""
    yield f"cuda kernels{forced}:"
    for op, kernel in (("holistic_attention", "holistic_attention_forward"),
                       ("holistic_attention_projected", "holistic_attention_projected_forward"),
                       ("topk_neighbor_mean", "topk_neighbor_mean_search"), ("score_topk", "score_topk_dot")):
        path = _cuda_jit.path(kernel)
        if path == "compiled":
            status = "grasp._C (nvcc)"
        elif path == "nvrtc":
            folder = _cuda_jit._cache_folder()
            status = f"NVRTC at first use, cached in {folder}" if folder else "NVRTC at first use (not cached)"
        else:
            status = "unavailable: " + _cuda_jit.reason(kernel)
        yield f"  {op}: {status}"


def report_lines() -> Iterator[str]:
    """The lines printed by ``grasp info``: the versions, then (after importing torch) devices and backends."""
    yield "grasp " + (_version("grasp") or "(not installed)")
    yield ""
    yield f"python      {platform.python_version()} ({platform.machine()}, {platform.system()})"
    for dist in PACKAGES:
        version = _version(dist)
        if version is not None:
            yield f"{dist:<11} {version}"
    import torch

    from grasp import _extension

    yield f"torch CUDA  {torch.version.cuda or 'none (CPU-only build)'}"
    yield (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}  GRASP_BACKEND="
           f"{os.environ.get('GRASP_BACKEND', '')!r}")  # fmt: skip
    yield from ["", "devices:", f"  cpu: {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            yield f"  cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"
    else:
        yield "  cuda: none visible"
    from grasp.ops import _cuda_jit

    if _extension.LOADED:
        kernels = ["CPU"] if _extension.has_kernel("holistic_attention_forward", "CPU") else []
        kernels += ["CUDA"] if _cuda_jit.has_compiled_kernel("holistic_attention_forward") else []
        yield f"\nextension grasp._C: loaded, kernels for {', '.join(kernels) or 'nothing'}"
    else:
        yield f"\nextension grasp._C: not loaded ({_extension.LOAD_ERROR})"
    yield from cuda_paths()
    yield from ["", "| op | backend | device | status |", "|---|---|---|---|"]
    yield from (f"| {op} | {backend} | {dev} | {status} |" for op, backend, dev, status in backend_table())
