"""The ``cuda`` backend without nvcc: the kernels' device code compiled at first use by NVRTC, through cupy.

Each CUDA kernel's device code lives in one header, ``csrc/cuda/<op>_device.cuh``, free of ATen, that nvcc
compiles into ``grasp._C`` (beside the host launchers of ``<op>_kernel.cu``) and that this module compiles
with NVRTC when ``grasp._C`` has no CUDA kernels (a torch and a GPU but no nvcc, or an nvcc that does not
match torch), or when ``GRASP_CUDA_JIT=1`` asks for this path next to the compiled one. The launchers of
``grasp/ops/_<op>_cuda_jit.py`` make the same launch decisions as the ``.cu`` host code, on torch tensors'
pointers and torch's current stream, and are registered as the ops' CUDA kernels: the ``torch.library`` op,
its fake kernel, autograd and ``torch.compile`` are the same for both paths.

Compiled images are kept in ``$GRASP_CACHE/cuda-jit`` (default ``~/.cache/grasp/cuda-jit``), keyed by the
headers' text, the kernel name, the GPU architecture, the NVRTC version and the options: a kernel is compiled
on its first use on a machine, and later processes load it from disk.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from grasp import _extension

_LOG = logging.getLogger("grasp")

#: Set to 1 to run the ``cuda`` backend on the NVRTC path even where grasp._C has CUDA kernels.
FORCE_ENV = "GRASP_CUDA_JIT"

#: NVRTC options: the C++ standard and line info of the extension's nvcc build (-O3 is NVRTC's default).
_OPTIONS = ("-std=c++17", "-lineinfo")


def forced() -> bool:
    """Whether ``GRASP_CUDA_JIT=1`` asks for the NVRTC path even where grasp._C has CUDA kernels."""
    return os.environ.get(FORCE_ENV, "").strip() == "1"


def header_dir() -> Path | None:
    """The folder of the ``*_device.cuh`` headers: ``grasp/_cuda_src`` in an installed wheel, the source tree's
    ``csrc/cuda`` in a checkout (an editable install)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_cuda_src", package.parent / "csrc" / "cuda"):
        if (candidate / "device_math.cuh").is_file():
            return candidate
    return None


def _cuda_major(version: str | None) -> int | None:
    return int(version.split(".")[0]) if version else None


@functools.cache
def unavailable_reason() -> str:
    """Why the NVRTC path cannot compile kernels here ("" if it can). It needs no GPU."""
    if header_dir() is None:
        return "the kernel headers (csrc/cuda/*_device.cuh) are not installed with grasp"
    missing = _cupy_missing()
    torch_major = _cuda_major(torch.version.cuda)
    wheel = f"cupy-cuda{torch_major or 13}x"
    if missing:
        return f"it needs cupy ({missing}): pip install {wheel}"
    import cupy

    cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    if torch_major is not None and cupy_major != torch_major:
        return (f"the installed cupy is built for CUDA {cupy_major} but torch uses CUDA {torch_major}: "
                f"pip uninstall cupy-cuda{cupy_major}x && pip install {wheel}")
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # the NVRTC library is loaded on first use
        return (f"cupy cannot load NVRTC ({type(exc).__name__}: {exc}): pip install nvidia-cuda-nvrtc "
                f"(nvidia-cuda-nvrtc-cu12 for CUDA 12) or install a CUDA toolkit")
    return ""


def _cupy_missing() -> str:
    """Why cupy cannot be imported ("" if it can)."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # not installed, or a broken install: reported, not raised
        return f"{type(exc).__name__}: {exc}"
    return ""


def nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor) version."""
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())


@dataclass(frozen=True)
class CompiledKernels:
    """What NVRTC made of one header: a cubin (or PTX, for an architecture newer than NVRTC knows) and the
    mangled name of each requested kernel."""

    image: bytes
    lowered: dict[str, str]
    ptx: bool
    seconds: float


class CompileError(RuntimeError):
    """NVRTC rejected the kernels' source."""


def _headers_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.cuh")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _target(arch: int) -> tuple[str, bool]:
    """NVRTC's --gpu-architecture for compute capability ``arch`` (e.g. 90) and whether it yields PTX: a cubin
    for an architecture NVRTC supports, else PTX of the newest one it does (the driver compiles it on load)."""
    from cupy_backends.cuda.libs import nvrtc

    supported = list(nvrtc.getSupportedArchs())
    if arch in supported:
        return f"sm_{arch}", False
    older = [a for a in supported if a <= arch]
    if not older:
        raise CompileError(f"NVRTC {nvrtc_version()} cannot compile for sm_{arch} (it supports {supported})")
    return f"compute_{max(older)}", True


def compile_kernels(header: str, names: Sequence[str], arch: int, prelude: str = "") -> CompiledKernels:
    """Compile ``names`` (name expressions such as ``grasp::ns::kernel<float, 4>``) of ``header`` for compute
    capability ``arch`` with NVRTC; ``prelude`` is appended to the source (the launchers' layout checks).
    Needs no GPU."""
    from cupy_backends.cuda.libs import nvrtc

    folder = header_dir()
    if folder is None:
        raise CompileError(unavailable_reason())
    target, ptx = _target(arch)
    source = f'#include "{header}"\n{prelude}'
    options = [*_OPTIONS, f"--gpu-architecture={target}", f"-I{folder}"]
    started = time.perf_counter()
    program = nvrtc.createProgram(source, f"{header}.cu", [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program).strip()
            first = next((line for line in log.splitlines() if "error" in line), log[:300])
            raise CompileError(f"NVRTC could not compile {folder / header} for {target} ({exc}): {first}") from None
        lowered = {name: nvrtc.getLoweredName(program, name) for name in names}
        image = nvrtc.getPTX(program) if ptx else nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    if isinstance(image, str):
        image = image.encode()
    return CompiledKernels(bytes(image), lowered, ptx, time.perf_counter() - started)


def _cache_folder() -> Path | None:
    from grasp.cache.store import _is_off, cache_dir

    if _is_off(os.environ.get("GRASP_CACHE", "")):
        return None
    return cache_dir() / "cuda-jit"


def cached_kernels(header: str, names: Sequence[str], arch: int, prelude: str = "") -> CompiledKernels:
    """:func:`compile_kernels`, through the on-disk cache (``$GRASP_CACHE/cuda-jit``)."""
    folder = header_dir()
    key_text = json.dumps([_headers_digest(folder) if folder else "", header, sorted(names), arch, prelude,
                           list(nvrtc_version()), _OPTIONS])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    cache = _cache_folder()
    if cache is not None:
        meta_path, image_path = cache / f"{key}.json", cache / f"{key}.bin"
        try:
            meta = json.loads(meta_path.read_text())
            return CompiledKernels(image_path.read_bytes(), meta["lowered"], meta["ptx"], 0.0)
        except (OSError, ValueError, KeyError):
            pass  # not compiled yet (or a partial write): compile
    compiled = compile_kernels(header, names, arch, prelude)
    _LOG.info("NVRTC compiled %d kernels of %s for sm_%d in %.1f s", len(names), header, arch, compiled.seconds)
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            for path, data in ((image_path, compiled.image),
                               (meta_path, json.dumps({"lowered": compiled.lowered, "ptx": compiled.ptx}).encode())):
                partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
                partial.write_bytes(data)
                os.replace(partial, path)  # the image first, then the names: a reader never sees half
        except OSError as exc:
            _LOG.warning("could not cache NVRTC kernels in %s: %s", cache, exc)
    return compiled


class KernelSet:
    """The kernels of one header that one launcher may use (``names``: name expressions; ``prelude`` is appended to
    the source). Each kernel is compiled on its first use, for the device's architecture (or taken from the
    cache), and loaded once per device, so a process pays only for the instances its shapes and dtypes need."""

    def __init__(self, header: str, names: Sequence[str], prelude: str = "") -> None:
        self.header = header
        self.names = tuple(dict.fromkeys(names))
        self.prelude = prelude
        self._functions: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()

    def function(self, name: str, device: torch.device) -> int:
        """The CUfunction handle of kernel ``name`` on ``device``."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        function = self._functions.get((index, name))
        if function is None:
            with self._lock:
                function = self._functions.get((index, name))
                if function is None:
                    function = self._functions[(index, name)] = self._load(index, name)
        return function.ptr

    def _load(self, index: int, name: str) -> object:
        if name not in self.names:
            raise KeyError(f"{name} is not one of the kernels of {self.header} this launcher compiles")
        why = unavailable_reason()
        if why:
            raise RuntimeError(f"grasp: the NVRTC path of the cuda backend is unavailable: {why}")
        import cupy

        major, minor = torch.cuda.get_device_capability(index)
        compiled = cached_kernels(self.header, [name], 10 * major + minor, self.prelude)
        with torch.cuda.device(index):
            torch.cuda.current_stream(index)  # makes torch's primary context current on this thread
            cupy.cuda.runtime.setDevice(index)
            module = cupy.cuda.function.Module()
            try:
                module.load(compiled.image)
            except Exception as exc:  # e.g. PTX newer than the driver
                kind = "PTX" if compiled.ptx else "cubin"
                raise RuntimeError(f"grasp: the driver could not load the NVRTC {kind} of {name} for "
                                   f"sm_{10 * major + minor} (NVRTC {nvrtc_version()}): {exc}") from None
            return module.get_function(compiled.lowered[name])  # the Function keeps its module loaded


def launch(function: int, grid: Sequence[int], block: int, args: Sequence[ctypes._SimpleCData | ctypes.Structure],
           device: torch.device, shared_bytes: int = 0) -> None:
    """Launch ``function`` with ``grid`` (up to 3 sizes) and ``block`` threads on torch's current stream of
    ``device``; ``args`` are the kernel's parameters as ctypes values of their C types, in order."""
    from cupy.cuda import driver

    gx, gy, gz = (*grid, 1, 1)[:3]
    if gx == 0 or gy == 0 or gz == 0:
        return
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        driver.launchKernel(function, gx, gy, gz, block, 1, 1, shared_bytes, stream, ctypes.addressof(params), 0)


def pointer(t: torch.Tensor | None) -> ctypes.c_void_p:
    """A tensor's data pointer as a kernel parameter (None: a null pointer)."""
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def vector_width(dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in one 16-byte access (the kernels' VEC when rows and pointers allow)."""
    return 16 // dtype.itemsize


#: The device code's type name of each dtype, and of its accumulator.
SCALAR = {torch.float32: "float", torch.float64: "double", torch.float16: "grasp::Half",
          torch.bfloat16: "grasp::BFloat16"}
ACC = {torch.float32: "float", torch.float64: "double", torch.float16: "float", torch.bfloat16: "float"}


def layout_checks(structs: dict[str, type[ctypes.Structure]]) -> str:
    """Compile-time checks that each C struct (by its device-code name) has the size, alignment and field
    offsets of the ctypes Structure the launcher passes for it; appended to the NVRTC source, so a launcher
    that disagrees with the device code fails to compile instead of passing garbage."""
    lines = []
    for c_name, struct in structs.items():
        lines.append(f"static_assert(sizeof({c_name}) == {ctypes.sizeof(struct)}, \"size of {c_name}\");")
        lines.append(f"static_assert(alignof({c_name}) == {ctypes.alignment(struct)}, \"alignment of {c_name}\");")
        for field, *_ in struct._fields_:
            offset = getattr(struct, field).offset
            lines.append(f"static_assert(__builtin_offsetof({c_name}, {field}) == {offset}, "
                         f"\"offset of {c_name}::{field}\");")
    return "\n".join(lines) + "\n"


# --- registration -------------------------------------------------------------------------------------------

_COMPILED: dict[str, bool] = {}
_REGISTERED: set[str] = set()
_LIBRARY: torch.library.Library | None = None


def has_compiled_kernel(op: str) -> bool:
    """Whether grasp._C itself has a CUDA kernel for ``grasp::op`` (whatever this module registered)."""
    if op not in _COMPILED:
        _COMPILED[op] = _extension.has_kernel(op, "CUDA")
    return _COMPILED[op]


def register(op: str, kernel: Callable) -> None:
    """Make ``kernel`` (a Python function of the op's schema) the CUDA kernel of ``grasp::op`` where grasp._C
    has none, or everywhere under ``GRASP_CUDA_JIT=1``. It imports nothing: cupy is needed at the first call."""
    global _LIBRARY
    if not _extension.has_op(op) or op in _REGISTERED:
        return
    if has_compiled_kernel(op) and not forced():
        return
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("grasp", "IMPL")
    import warnings

    with warnings.catch_warnings():  # GRASP_CUDA_JIT=1 replaces the compiled kernel on purpose
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        _LIBRARY.impl(op, kernel, "CUDA")
    _REGISTERED.add(op)


def path(op: str) -> str:
    """Which path runs ``grasp::op`` on CUDA tensors: "compiled" (grasp._C's kernels), "nvrtc" or "" (neither)."""
    if op in _REGISTERED:
        return "nvrtc" if torch.version.cuda is not None and not unavailable_reason() else ""
    return "compiled" if has_compiled_kernel(op) else ""


def reason(op: str) -> str:
    """Why the cuda backend cannot run ``grasp::op`` ("" if it can), naming what to install."""
    if path(op):
        return ""
    if op in _REGISTERED and has_compiled_kernel(op) and torch.version.cuda is not None:
        return f"{FORCE_ENV}=1 asks for the NVRTC path, which is unavailable: {unavailable_reason()}"
    compiled = _extension.missing_reason(op, "CUDA", registered_elsewhere=op in _REGISTERED)
    if op not in _REGISTERED or torch.version.cuda is None:  # a CPU-only torch: the compiled reason says so
        return compiled
    return f"{compiled}; and the NVRTC path is unavailable: {unavailable_reason()}"
