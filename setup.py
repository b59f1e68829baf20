"""Build script of grasp: the Python packages plus the compiled extension ``grasp._C``.

Install with ``pip install --no-build-isolation -e .`` against an installed torch.

* The C++ CPU kernels are always built (when a C++ compiler is present).
* The CUDA kernels are added when torch was built with CUDA and nvcc is found,
  or when ``GRASP_FORCE_CUDA=1`` (e.g. building on a GPU-less host with a CUDA
  torch; set ``TORCH_CUDA_ARCH_LIST`` to pick the architectures).
* ``GRASP_NO_EXTENSION=1`` skips the extension; without a C++ compiler it is
  skipped too. The package then runs on its reference and Triton backends.

The source list is ``csrc/sources.txt``, shared with ``CMakeLists.txt``. A wheel also carries the kernels' device
code (``csrc/cuda/*.cuh``, as ``grasp/_cuda_src``), which the NVRTC path of the ``cuda`` backend compiles at first
use where the extension has no CUDA kernels (``grasp/ops/_cuda_jit.py``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _say(msg: str) -> None:
    print(f"[grasp build] {msg}", file=sys.stderr)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_sources() -> dict[str, list[str]]:
    """Parse ``csrc/sources.txt`` into {"cpu": [...], "cuda": [...]}."""
    kinds: dict[str, list[str]] = {"cpu": [], "cuda": []}
    for n, line in enumerate((ROOT / "csrc" / "sources.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, path = line.partition(" ")
        if kind not in kinds or not path.strip():
            raise SystemExit(f"csrc/sources.txt:{n}: expected 'cpu PATH' or 'cuda PATH', got {line!r}")
        kinds[kind].append(path.strip())
    return kinds


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def _extensions() -> tuple[list, dict]:
    if _flag("GRASP_NO_EXTENSION"):
        _say("GRASP_NO_EXTENSION=1: skipping the compiled extension (reference and Triton backends only)")
        return [], {}
    if not _have_cxx():
        _say("no C++ compiler found: skipping the compiled extension (reference and Triton backends only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable: install torch first, then `pip install --no-build-isolation -e .`")
        raise

    sources = read_sources()
    force_cuda = _flag("GRASP_FORCE_CUDA")
    torch_has_cuda = torch.version.cuda is not None
    nvcc = CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists()
    if force_cuda and not torch_has_cuda:
        raise SystemExit(
            "GRASP_FORCE_CUDA=1, but this torch is a CPU-only build (torch.version.cuda is None), so the "
            "CUDA kernels cannot be linked. Install a CUDA build of torch, or unset GRASP_FORCE_CUDA."
        )
    if force_cuda and not nvcc:
        raise SystemExit("GRASP_FORCE_CUDA=1, but nvcc was not found: set CUDA_HOME to a CUDA toolkit.")
    with_cuda = torch_has_cuda and nvcc

    # The C++ standard is left to torch (C++17 up to torch 2.12, C++20 after).
    cxx_flags = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
    link_flags = ["-fopenmp"]
    kwargs = dict(
        sources=sources["cpu"],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )
    if with_cuda:
        kwargs["sources"] = sources["cpu"] + sources["cuda"]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("grasp._C", **kwargs)
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU's arch (TORCH_CUDA_ARCH_LIST unset)")
        _say(f"building grasp._C with the C++ CPU kernels and the CUDA kernels for {arch}")
    else:
        ext = CppExtension("grasp._C", **kwargs)
        why = "torch is a CPU-only build" if not torch_has_cuda else "nvcc was not found (set CUDA_HOME)"
        _say(f"building grasp._C with the C++ CPU kernels only; CUDA kernels skipped: {why}")
    return [ext], {"build_ext": BuildExtension}


class BuildPyWithKernelHeaders(build_py):
    """build_py that also copies the CUDA device headers into the package (grasp/_cuda_src)."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "grasp" / "_cuda_src"
        target.mkdir(parents=True, exist_ok=True)
        for header in sorted((ROOT / "csrc" / "cuda").glob("*.cuh")):
            shutil.copyfile(header, target / header.name)


ext_modules, cmdclass = _extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithKernelHeaders}
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
