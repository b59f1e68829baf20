"""The NVRTC path of the cuda backend (grasp/ops/_cuda_jit.py) on a machine without a GPU: every kernel its
launchers can ask for compiles from the shared device headers for sm_80 and sm_90, the launchers' argument
structs match the device code's, the cache, the errors, and what the backends report. Running the kernels needs
a GPU: benchmarks/cuda_jit_check.py (the GPU suite) compares them bit for bit with grasp._C's."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from grasp.ops import _cuda_jit
from grasp.ops import _holistic_attention_cuda_jit as hae
from grasp.ops import _holistic_attention_projected_cuda_jit as proj
from grasp.ops import _score_topk_cuda_jit as stk
from grasp.ops import _topk_neighbor_mean_cuda_jit as knn

_WHY = _cuda_jit.unavailable_reason()
if _WHY and os.environ.get("GRASP_REQUIRE_NVRTC") == "1":  # CI installs the [nvrtc] extra: never skip there
    raise RuntimeError(f"GRASP_REQUIRE_NVRTC=1 but NVRTC cannot compile here: {_WHY}")
needs_nvrtc = pytest.mark.skipif(bool(_WHY), reason=f"NVRTC unavailable: {_WHY}")

KERNEL_SETS = [pytest.param(s, id=f"holistic_attention-{d}") for d, s in hae.KERNELS.items()]
KERNEL_SETS += [pytest.param(s, id=f"projected-{d}") for d, s in proj.KERNELS.items()]
KERNEL_SETS += [pytest.param(knn.KERNELS, id="topk_neighbor_mean")]

# score_topk's kernels take about 10x longer to compile: CI (bounded) compiles each dtype once, both archs covered.
_FULL = os.environ.get("GRASP_SLOW_TESTS") == "full"
SCORE_TOPK = [pytest.param(stk.KERNELS[dtype], arch, id=f"score_topk-{dtype}-sm_{arch}")
              for dtype in stk.KERNELS for arch in (80, 90)
              if _FULL or (dtype, arch) in ((torch.bfloat16, 90), (torch.float16, 80), (torch.float32, 90))]


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("kernel_set", KERNEL_SETS)
def test_every_kernel_compiles_for_the_datacenter_gpus(kernel_set, arch):
    _compiles(kernel_set, arch)


@needs_nvrtc
@pytest.mark.slow
@pytest.mark.parametrize(("kernel_set", "arch"), SCORE_TOPK)
def test_every_score_topk_kernel_compiles(kernel_set, arch):
    _compiles(kernel_set, arch)


def _compiles(kernel_set: _cuda_jit.KernelSet, arch: int) -> None:
    compiled = _cuda_jit.compile_kernels(kernel_set.header, kernel_set.names, arch, kernel_set.prelude)
    assert not compiled.ptx  # NVRTC knows these architectures: a cubin, nothing left to the driver
    assert set(compiled.lowered) == set(kernel_set.names)
    for name, lowered in compiled.lowered.items():
        assert lowered.startswith("_Z"), name
        assert lowered.encode() in compiled.image, f"{name} ({lowered}) is not in the sm_{arch} cubin"


def test_launchers_ask_only_for_compiled_instances():
    """The names the launchers build at run time are among those compiled (a typo would fail on the GPU only)."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        names = set(hae.kernel_names(dtype))
        vec = _cuda_jit.vector_width(dtype)
        for v in (vec, 1):
            for softmax in (False, True):
                assert hae._forward_name(dtype, v, softmax) in names
                cols_options = range(1, 40)
                for cols in cols_options:  # every CH the backward's launcher can pick
                    team = hae._team_size(cols)
                    chunks = (cols + team - 1) // team
                    ch = chunks if chunks <= 2 else hae._max_user_chunks(v)
                    assert hae._backward_name(dtype, v, softmax, ch) in names
                    assert hae._backward_name(dtype, v, softmax, 0) in names
        assert set(proj._names(dtype).values()) <= set(proj.kernel_names(dtype))
        vec = _cuda_jit.vector_width(dtype)
        assert {knn._gather_name(dtype, vec), knn._gather_name(dtype, 1)} <= set(knn.KERNELS.names)
    assert {knn._select_name(p) for p in knn._KPADS} <= set(knn.KERNELS.names)
    for dtype, kernel_set in stk.KERNELS.items():
        for k in (1, 32, 33, 200, 256):
            kpad = next(p for p in stk._KPADS if k <= p)
            for gated in (False, True):
                assert stk._kernel_name(dtype, gated, kpad) in kernel_set.names
                assert stk._kernel_name(dtype, gated, 0) in kernel_set.names  # the large-k path
            assert stk._merge_name(kpad) in kernel_set.names


@needs_nvrtc
def test_a_struct_that_disagrees_with_the_device_code_does_not_compile():
    class Shifted(ctypes.Structure):  # Scales with float fields where the device code has doubles: a launcher bug
        _fields_ = [("inv_sqrt_d", ctypes.c_float), ("inv_sqrt_2d", ctypes.c_float)]

    prelude = _cuda_jit.layout_checks({f"{hae._NS}::Scales": Shifted})
    name = hae._forward_name(torch.float32, 1, False)
    with pytest.raises(_cuda_jit.CompileError, match="holistic_attention_device.cuh for sm_90.*(size|offset) of"):
        _cuda_jit.compile_kernels(hae._HEADER, [name], 90, prelude)
    # the launcher's own structs pass the same checks
    _cuda_jit.compile_kernels(hae._HEADER, [name], 90, hae._prelude(torch.float32))


@needs_nvrtc
def test_a_compile_error_is_one_line_naming_the_file():
    with pytest.raises(_cuda_jit.CompileError) as info:
        _cuda_jit.compile_kernels(hae._HEADER, [hae._forward_name(torch.float32, 1, False)], 80,
                                  "static_assert(false, \"broken on purpose\");\n")
    message = str(info.value)
    assert "\n" not in message and "holistic_attention_device.cuh" in message and "error" in message


@needs_nvrtc
def test_the_cache_compiles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path))
    names = [knn._select_name(32)]
    first = _cuda_jit.cached_kernels(knn._HEADER, names, 80)
    assert first.seconds > 0 and len(list((tmp_path / "cuda-jit").glob("*.bin"))) == 1

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the kernels")

    monkeypatch.setattr(_cuda_jit, "compile_kernels", no_compile)
    again = _cuda_jit.cached_kernels(knn._HEADER, names, 80)
    assert again.image == first.image and again.lowered == first.lowered
    with pytest.raises(AssertionError, match="compiled again"):  # another architecture is another entry
        _cuda_jit.cached_kernels(knn._HEADER, names, 90)


def test_missing_cupy_names_the_wheel(monkeypatch):
    monkeypatch.setattr(_cuda_jit, "_cupy_missing", lambda: "ModuleNotFoundError: No module named 'cupy'")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    _cuda_jit.unavailable_reason.cache_clear()
    try:
        why = _cuda_jit.unavailable_reason()
    finally:
        _cuda_jit.unavailable_reason.cache_clear()
    assert "cupy" in why and "pip install cupy-cuda12x" in why


@needs_nvrtc
def test_cupy_for_another_cuda_major_is_refused(monkeypatch):
    import cupy

    major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    monkeypatch.setattr(torch.version, "cuda", f"{major - 1}.8")
    _cuda_jit.unavailable_reason.cache_clear()
    try:
        why = _cuda_jit.unavailable_reason()
    finally:
        _cuda_jit.unavailable_reason.cache_clear()
    assert f"built for CUDA {major} but torch uses CUDA {major - 1}" in why
    assert f"pip install cupy-cuda{major - 1}x" in why


def test_the_cuda_backend_reports_its_path():
    """Here (a CPU-only torch) neither path can run; each op says why, and grasp info lists the path."""
    from grasp import info

    for op in ("holistic_attention_forward", "holistic_attention_projected_forward", "topk_neighbor_mean_search",
               "score_topk_dot"):
        if torch.version.cuda is None:
            assert _cuda_jit.path(op) == ""
            assert "CPU-only build" in _cuda_jit.reason(op)
        elif _cuda_jit.has_compiled_kernel(op) and not _cuda_jit.forced():
            assert _cuda_jit.path(op) == "compiled"
    lines = list(info.cuda_paths())
    assert lines[0].startswith("cuda kernels") and len(lines) == 5
    if torch.version.cuda is None:
        assert all("unavailable: " in line and "CPU-only build" in line for line in lines[1:])


def test_a_wheel_carries_the_device_headers(tmp_path):
    """setup.py's build_py copies csrc/cuda/*.cuh into grasp/_cuda_src, where header_dir() looks first."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=root, check=True,
                   capture_output=True, env={**os.environ, "GRASP_NO_EXTENSION": "1"})
    copied = {p.name: p.read_bytes() for p in (tmp_path / "grasp" / "_cuda_src").glob("*.cuh")}
    assert copied == {p.name: p.read_bytes() for p in (root / "csrc" / "cuda").glob("*.cuh")}
    assert {"device_math.cuh", hae._HEADER, proj._HEADER, knn._HEADER, stk._HEADER} <= set(copied)


def test_true_fp32_gemms_keep_torch_tf32_settings_consistent():
    """The float32 search turns TF32 off around its GEMMs through the matmul-precision API, which keeps torch's
    legacy and new settings in step (setting only one of them makes torch >= 2.9 refuse the next GEMM), and
    restores the user's choice."""
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with knn._no_tf32():
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cuda.matmul.allow_tf32 is False  # reading the legacy API does not raise
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.set_float32_matmul_precision(saved)
