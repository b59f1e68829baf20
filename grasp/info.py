"""What ``grasp info`` reports: versions, devices, and which backend of each op can run here."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from grasp import _extension
from grasp.ops.holistic_attention import backend_reason as _holistic_attention_reason
from grasp.ops.holistic_attention_projected import backend_reason as _projected_reason
from grasp.ops.score_topk import backend_reason as _score_topk_reason
from grasp.ops.topk_neighbor_mean import backend_reason as _topk_neighbor_mean_reason

# op name -> (function telling why a backend cannot run on a device type, backends it has)
OPS = {
    "holistic_attention": (_holistic_attention_reason, ("reference", "cpu", "cuda", "triton")),
    "holistic_attention_projected": (_projected_reason, ("reference", "cpu", "cuda", "triton")),
    "topk_neighbor_mean": (_topk_neighbor_mean_reason, ("reference", "cpu", "cuda", "triton", "faiss")),
    "score_topk": (_score_topk_reason, ("reference", "cpu", "cuda", "triton")),
}
PACKAGES = ("torch", "triton", "numpy", "faiss-cpu", "faiss-gpu", "openai", "cupy-cuda13x", "cupy-cuda12x")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_types() -> list[str]:
    """Device types present on this machine: always "cpu", plus "cuda" when a GPU is visible."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backend_table() -> list[tuple[str, str, str, str]]:
    """Rows (op, backend, device type, status) where status is "available" or the reason it is not."""
    rows = []
    for op, (reason, backends) in OPS.items():
        for device_type in ("cpu", "cuda"):
            for backend in backends:
                if backend in ("cpu", "cuda") and backend != device_type:
                    continue  # the cpu backend on CUDA tensors and vice versa: never a combination
                why = reason(backend, device_type)
                if device_type == "cuda" and "cuda" not in device_types() and not why:
                    why = "no CUDA device is visible"
                rows.append((op, backend, device_type, why or "available"))
    return rows


def report() -> str:
    """The text printed by ``grasp info``."""
    lines = ["grasp " + (_version("grasp") or "(not installed)"), ""]
    lines.append(f"python      {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for dist in PACKAGES:
        version = _version(dist)
        if version is not None:
            lines.append(f"{dist:<11} {version}")
    lines.append(f"torch CUDA  {torch.version.cuda or 'none (CPU-only build)'}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}  GRASP_BACKEND="
                 f"{os.environ.get('GRASP_BACKEND', '')!r}")
    lines += ["", "devices:", f"  cpu: {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("  cuda: none visible")
    if _extension.LOADED:
        kernels = [key for key in ("CPU", "CUDA") if _extension.has_kernel("holistic_attention_forward", key)]
        lines.append(f"\nextension grasp._C: loaded, kernels for {', '.join(kernels)}")
    else:
        lines.append(f"\nextension grasp._C: not loaded ({_extension.LOAD_ERROR})")
    lines += ["", "| op | backend | device | status |", "|---|---|---|---|"]
    lines += [f"| {op} | {backend} | {dev} | {status} |" for op, backend, dev, status in backend_table()]
    return "\n".join(lines)
