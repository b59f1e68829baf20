"""Compile grasp's kernels for a GPU architecture without a GPU and read their machine code.

Used by ``benchmarks/gpu_code_report.py``; every public function here runs in a worker process or is a
pure parser, so it can be tested on its own.

- Triton kernels go through ``triton.compile`` (Triton's own passes and its ptxas) with the signature,
  constants and alignment attributes that the JIT would give them at launch; registers and spills come
  from the ptxas log that Triton prints when ``TRITON_DUMP_PTXAS_LOG`` is set, shared memory from the
  compiled metadata.
- ``.cu`` files go through ``nvcc -cubin -Xptxas -v`` with the flags of ``.ci/compile_cuda.sh``, one
  architecture per call; the PTX is kept for the instruction features.
- Instruction features are read from the PTX of each entry function and the functions it calls: tensor
  core instructions (``mma`` / ``wgmma`` and their input type), 16-byte global loads (``ld.global`` of
  a 16-byte vector, 16-byte ``cp.async``, TMA), and atomics with their memory ordering and any memory
  fence (``membar``, ``fence.sc`` / ``fence.acq_rel``) in the same function.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "Features", "Resources", "compile_cuda", "compile_triton", "demangle", "find_tool", "nvcc_flags",
    "parse_ptxas_log", "ptx_features", "short_kernel_name", "worker_init",
]

# ------------------------------------------------------------------------------------------------ PTX


@dataclass
class Features:
    """Instruction features of one entry function (and the functions it calls)."""

    mma: list[str] = field(default_factory=list)  # e.g. ["mma.bf16"], ["wgmma.bf16"]; empty: none
    load16: list[str] = field(default_factory=list)  # "ld" (ld.global of 16 B), "cp.async" (16 B), "tma"
    atomics: int = 0  # atom / red instructions
    atomic_sems: list[str] = field(default_factory=list)  # their orderings: relaxed, acquire, release, acq_rel
    fences: int = 0  # membar / fence.sc / fence.acq_rel instructions

    @property
    def fenced_atomics(self) -> bool:
        """Atomics that order memory: an acquire/release semantic, or a memory fence in the same function."""
        return self.atomics > 0 and (self.fences > 0 or any(s != "relaxed" for s in self.atomic_sems))


_FUNC_HEADER = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.(entry|func)\s+(?:\([^)]*\)\s*)?([\w$.]+)")
_PREDICATE = re.compile(r"^@!?%\w+\s+")
_LABEL = re.compile(r"^[$\w]+:")
_MMA_TYPES = re.compile(r"^(f16|bf16|tf32|f32|f64|s8|u8|s4|u4|b1|e4m3|e5m2|e2m1)$")
_VECTOR = re.compile(r"^v(\d+)$")
_SCALAR = re.compile(r"^[bfsu](\d+)$")
_ATOMIC_SEMS = ("relaxed", "acquire", "release", "acq_rel")
_NON_ORDERING_FENCES = ("proxy", "mbarrier_init")


def _functions(ptx: str) -> dict[str, tuple[str, list[str]]]:
    """Name -> (kind "entry"/"func", instruction statements) of every function defined in ``ptx``.

    A statement is the text up to its ``;``: nvcc spreads a ``call`` over several lines. Line-number
    directives (``.loc``, no ``;``), labels and braces are dropped.
    """
    functions: dict[str, tuple[str, list[str]]] = {}
    current, kind, lines, depth = None, "", [], 0
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].strip()
        if current is None:
            header = _FUNC_HEADER.match(line)
            if not header:
                continue
            current, kind, lines, depth = header.group(2), header.group(1), [], 0
        if depth == 0 and "{" not in line:
            if line.endswith(";"):  # a declaration: no body
                current = None
            continue
        depth += line.count("{") - line.count("}")
        if not line.startswith((".loc", ".file")):
            lines.append(_LABEL.sub("", line).replace("{", " ").replace("}", " "))
        if depth == 0:
            statements = (" ".join(s.split()) for s in " ".join(lines).split(";"))
            functions[current] = (kind, [s for s in statements if s])
            current = None
    return functions


def _opcode(statement: str) -> tuple[str, str]:
    """(opcode, operands) of an instruction statement, ('', '') for a directive."""
    statement = _PREDICATE.sub("", statement)
    if not statement or statement.startswith("."):
        return "", ""
    opcode, _, operands = statement.partition(" ")
    return opcode, operands


def _mma_kind(opcode: str) -> str | None:
    """"mma.bf16" / "wgmma.tf32" for a tensor-core multiply, None for anything else."""
    parts = opcode.split(".")
    if parts[0] == "wgmma" and len(parts) > 1 and parts[1] == "mma_async":
        kind = "wgmma"
    elif parts[0] == "mma" or (parts[0] == "wmma" and len(parts) > 1 and parts[1] == "mma"):
        kind = "mma"
    else:
        return None
    types = [p for p in parts if _MMA_TYPES.match(p)]
    if parts[0] == "wmma" and len(types) == 2:  # f16 wmma names only d and c; a and b are f16
        return "mma.f16"
    # Types are listed output first (d, then a, b[, c]); the input type is the second.
    return f"{kind}.{types[1] if len(types) > 1 else (types[0] if types else '?')}"


def _load16(opcode: str, operands: str) -> str | None:
    """"ld" / "cp.async" / "tma" when the instruction loads 16 bytes or more from global memory at once."""
    parts = opcode.split(".")
    if parts[0] == "ld" and "global" in parts:
        lanes = next((int(m.group(1)) for p in parts if (m := _VECTOR.match(p))), 1)
        bits = next((int(m.group(1)) for p in reversed(parts) if (m := _SCALAR.match(p))), 0)
        return "ld" if lanes * bits >= 128 else None
    if opcode.startswith("cp.async.bulk.tensor"):
        return "tma"
    if parts[:2] == ["cp", "async"] and "global" in parts:
        args = [a.strip() for a in operands.split(",")]
        try:
            return "cp.async" if len(args) >= 3 and int(args[2], 0) >= 16 else None
        except ValueError:
            return None
    return None


def _own_features(body: list[str]) -> tuple[Features, set[str]]:
    """Features of one function's own instructions and the names it calls."""
    features, callees = Features(), set()
    mma, loads, sems = set(), set(), set()
    for line in body:
        opcode, operands = _opcode(line)
        if not opcode:
            continue
        parts = opcode.split(".")
        if parts[0] in ("atom", "red"):
            features.atomics += 1
            sems.add(next((p for p in parts if p in _ATOMIC_SEMS), "relaxed"))
        elif parts[0] == "membar" or (parts[0] == "fence" and parts[1:2] and parts[1] not in _NON_ORDERING_FENCES):
            features.fences += 1
        elif parts[0] == "call":
            callees.update(re.findall(r"[A-Za-z_$][\w$]*", operands))
        if (kind := _mma_kind(opcode)) is not None:
            mma.add(kind)
        if (load := _load16(opcode, operands)) is not None:
            loads.add(load)
    features.mma, features.load16, features.atomic_sems = sorted(mma), sorted(loads), sorted(sems)
    return features, callees


def ptx_features(ptx: str) -> dict[str, Features]:
    """Features of every entry function of ``ptx``, each merged with those of the functions it calls."""
    functions = _functions(ptx)
    own = {name: _own_features(body) for name, (_, body) in functions.items()}
    result = {}
    for name, (kind, _) in functions.items():
        if kind != "entry":
            continue
        seen, todo, merged = set(), [name], Features()
        while todo:
            fn = todo.pop()
            if fn in seen or fn not in own:
                continue
            seen.add(fn)
            features, callees = own[fn]
            merged.mma = sorted(set(merged.mma) | set(features.mma))
            merged.load16 = sorted(set(merged.load16) | set(features.load16))
            merged.atomic_sems = sorted(set(merged.atomic_sems) | set(features.atomic_sems))
            merged.atomics += features.atomics
            merged.fences += features.fences
            todo.extend(callees)
        result[name] = merged
    return result


def callees(ptx: str, entry: str) -> set[str]:
    """Every function that ``entry`` calls, directly or not."""
    own = {name: _own_features(body)[1] for name, (_, body) in _functions(ptx).items()}
    seen, todo = set(), list(own.get(entry, ()))
    while todo:
        fn = todo.pop()
        if fn in own and fn not in seen and fn != entry:
            seen.add(fn)
            todo.extend(own[fn])
    return seen


# ------------------------------------------------------------------------------------------ ptxas log


@dataclass
class Resources:
    """What ptxas reports for one function: registers, stack frame, spills and static shared memory."""

    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> tuple[dict[str, Resources], dict[str, Resources]]:
    """(entries, functions): the resources of each entry function and the frame of every function of a
    ``ptxas -v`` log (functions include the entries and any device function that was not inlined)."""
    entries: dict[str, Resources] = {}
    frames: dict[str, Resources] = {}
    entry = target = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            entries[entry] = Resources()
        elif m := _PROPERTIES.search(line):
            target = m.group(1)
        elif (m := _FRAME.search(line)) and target is not None:
            frames[target] = Resources(0, *map(int, m.groups()))
        elif (m := _USED.search(line)) and entry is not None:
            smem = _SMEM.search(line)
            entries[entry].registers = int(m.group(1))
            entries[entry].shared = int(smem.group(1)) if smem else 0
    for name, resources in entries.items():
        frame = frames.get(name, Resources())
        resources.stack, resources.spill_stores, resources.spill_loads = (
            frame.stack, frame.spill_stores, frame.spill_loads)
    return entries, frames


# ------------------------------------------------------------------------------------------ names


def find_tool(name: str) -> str | None:
    """Path of a CUDA tool: on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin."""
    for candidate in (shutil.which(name), *(Path(root, "bin", name) for root in
                      (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda") if root)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (unchanged where neither cu++filt nor c++filt is found)."""
    tool = find_tool("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    plain = out.splitlines()
    return dict(zip(names, plain, strict=True)) if len(plain) == len(names) else {n: n for n in names}


def short_kernel_name(demangled: str) -> tuple[str, str]:
    """(name, template arguments) of a demangled kernel: ``void ns::(anonymous namespace)::k<c10::Half, 4>(...)``
    gives ``("k", "Half, 4")``. Namespaces, the return type and the parameter list are dropped."""
    text = demangled.strip()
    if text.endswith(")"):  # drop the parameter list: the last top-level parenthesis
        depth = 0
        for i in range(len(text) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(text[i], 0)
            if depth == 0:
                text = text[:i]
                break
    text = re.sub(r"^void\s+", "", text)
    text = re.sub(r"\(anonymous namespace\)::|\b\w+::", "", text)
    name, _, args = text.partition("<")
    return name.strip(), args[:-1].strip() if args.endswith(">") else args.strip()


# ------------------------------------------------------------------------------------------ workers


def worker_init() -> None:
    """Environment of a compile worker: no interpreter, a fresh compile each time with the ptxas log
    printed (Triton's own cache would skip ptxas and its log), in a throw-away Triton cache."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set to silence its notice
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu_code_report_triton_")


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it has waited for (ptxas, nvcc)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_triton(job: dict) -> list[dict]:
    """Compile one Triton kernel configuration; returns one result row (a list, like compile_cuda).

    ``job``: module, kernel (its attribute name), signature, constexprs, attrs (list of [index path,
    attribute list]), options (num_warps, num_stages, ...), arch (80, 90, ...).
    """
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    while not isinstance(fn, triton.runtime.JITFunction):  # autotuner / heuristics wrappers
        fn = fn.fn
    attrs = {tuple(path): value for path, value in job["attrs"]}
    source = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
    log = io.StringIO()
    start = _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except Exception as error:  # noqa: BLE001 - a compile error is a result to report, not a crash
        message = " ".join(str(error).split())
        return [dict(error=f"{type(error).__name__}: {message[:300]}", cpu_seconds=_cpu_seconds() - start)]
    seconds = _cpu_seconds() - start
    name = compiled.metadata.name
    entries, frames = parse_ptxas_log(log.getvalue())
    resources = entries.get(name, Resources())
    ptx = compiled.asm["ptx"]
    for callee in callees(ptx, name):
        frame = frames.get(callee, Resources())
        resources.spill_stores += frame.spill_stores
        resources.spill_loads += frame.spill_loads
    resources.shared = compiled.metadata.shared
    features = ptx_features(ptx).get(name, Features())
    return [dict(resources=asdict(resources), features=asdict(features), cpu_seconds=seconds)]


def nvcc_flags(arch: int) -> list[str]:
    """The flags of ``.ci/compile_cuda.sh`` for one architecture (torch's include paths and C++ ABI, the
    C++ standard torch's extension builder uses, ``$CUDA_STD`` overriding it)."""
    import torch
    from torch.utils import cpp_extension

    paths = cpp_extension.include_paths()
    std = os.environ.get("CUDA_STD") or ("c++20" if "-std=c++20" in Path(cpp_extension.__file__).read_text()
                                         else "c++17")
    flags = [
        f"-std={std}", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in paths):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags + [f"-I{p}" for p in (*paths, sysconfig.get_paths()["include"])]


def compile_cuda(job: dict) -> list[dict]:
    """Compile one ``.cu`` file for one architecture; one result row per entry function.

    ``job``: path, arch, nvcc, flags. Rows carry the demangled kernel name and template arguments.
    """
    start = _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="gpu_code_report_nvcc_") as tmp:
        command = [job["nvcc"], "-cubin", *job["flags"], "-Xptxas", "-v", "--keep", "--keep-dir", tmp,
                   job["path"], "-o", str(Path(tmp, "out.cubin"))]
        run = subprocess.run(command, capture_output=True, text=True)
        seconds = _cpu_seconds() - start
        if run.returncode != 0:
            tail = " ".join(run.stderr.split())[-400:]
            return [dict(error=f"nvcc exit {run.returncode}: {tail}", cpu_seconds=seconds)]
        ptx = "\n".join(p.read_text() for p in Path(tmp).glob("*.ptx"))
    entries, frames = parse_ptxas_log(run.stderr)
    features = ptx_features(ptx)
    names = demangle(sorted(entries))
    rows = []
    for mangled, resources in sorted(entries.items()):
        for callee in callees(ptx, mangled):
            frame = frames.get(callee, Resources())
            resources.spill_stores += frame.spill_stores
            resources.spill_loads += frame.spill_loads
        name, args = short_kernel_name(names[mangled])
        rows.append(dict(name=name, template=args, resources=asdict(resources),
                         features=asdict(features.get(mangled, Features())), cpu_seconds=seconds / len(entries)))
    return rows or [dict(error="ptxas reported no entry function", cpu_seconds=seconds)]

