"""Compile the projected-HAE Triton kernels to sm_90 (and sm_80) machine code without a GPU, and check it.

Run by a test in a subprocess without TRITON_INTERPRET (the interpreter replaces the kernels' JIT functions).
Every kernel is compiled for every dtype and every config that its module-level pruner (forward) or picker
(backward) keeps for the given widths d = e, as a GPU launch would specialise it (16-byte aligned pointers;
widths that are multiples of 16 marked so). ptxas -v (the one Triton itself uses for that arch) reports
registers and spills. One line per compile; exits non-zero on a compile error, on any spill, or on an atomic
instruction in a backward kernel (the backward is a deterministic segmented reduction).

    python tests/_triton_sm90.py                      # sm_90, d = e = 64
    python tests/_triton_sm90.py --arch 80 90 --widths 16 32 64 128 256
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

import grasp_kernels.holistic_attention_projected as kernels

DTYPES = ("fp32", "fp16", "bf16")
# Arguments that are int64 index arrays and float32 scratch buffers; every other pointer has the inputs' dtype.
INDEX_POINTERS = {"user_index_ptr", "item_index_ptr", "key_ptr", "order_ptr", "starts_ptr", "gather_index_ptr"}
FLOAT32_POINTERS = {"pair_ptr", "partial_ptr"}
# Integer arguments that hold a width or a multiple of one (divisible by 16 when the width is).
WIDTH_INTS = {"D", "E", "W", "out_row_stride", "out_k_stride"}


def signature(fn, dtype: str, constexprs: dict, width: int) -> tuple[dict[str, str], dict]:
    """Triton signature and divisibility attributes of ``fn`` for inputs of ``dtype`` and d = e = ``width``."""
    sig, aligned = {}, []
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in INDEX_POINTERS else "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
            aligned.append(index)
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name == "chunk" or (name in WIDTH_INTS and width % 16 == 0):
                aligned.append(index)
    return sig, {(index,): [["tt.divisibility", 16]] for index in aligned}


def cases(width: int):
    """(kernel name, JIT function, constexprs, num_warps) of every config a launch at d = e = ``width`` may use."""
    block = triton.next_power_of_2(width)
    shape = {"BLOCK_D": block, "BLOCK_E": block}
    for config in kernels._prune_fwd_configs(kernels._FWD_CONFIGS, {}, D=width, E=width, **shape):
        yield "_fwd_kernel", kernels._fwd_kernel.fn, {**config.kwargs, **shape}, config.num_warps
    (config,) = kernels._pick_pairs_config(kernels._PAIRS_CONFIGS, {}, D=width, E=width, **shape)
    yield "_bwd_pairs_kernel", kernels._bwd_pairs_kernel, {**config.kwargs, **shape}, config.num_warps
    (config,) = kernels._pick_by_width(kernels._REDUCE_CONFIGS, {}, W=width)
    yield "_bwd_rows_kernel", kernels._bwd_rows_kernel, dict(config.kwargs), config.num_warps
    yield "_bwd_values_kernel", kernels._bwd_values_kernel, dict(config.kwargs), config.num_warps
    (config,) = kernels._pick_by_width(kernels._COMBINE_CONFIGS, {}, W=width)
    for k in (2, 3):
        yield f"_bwd_combine_kernel[K={k}]", kernels._bwd_combine_kernel, {**config.kwargs, "K": k}, config.num_warps


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes stored) of ``ptx`` as Triton's own ptxas for ``arch`` assembles it."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp, "kernel.cubin"))],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return registers, spills


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--widths", type=int, nargs="+", default=[64])
    parser.add_argument("--kernels", nargs="+", help="only the kernels whose names contain one of these")
    args = parser.parse_args(argv)
    problems = []
    print("kernel                  arch  d=e  dtype  config                                     regs  spill  smem")
    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for width in args.widths:
            for name, fn, constexprs, warps in cases(width):
                if args.kernels and not any(part in name for part in args.kernels):
                    continue
                for dtype in DTYPES:
                    sig, attrs = signature(fn, dtype, constexprs, width)
                    source = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
                    compiled = triton.compile(source, target=target, options={"num_warps": warps})
                    ptx = compiled.asm["ptx"]
                    registers, spills = ptxas_report(ptx, arch)
                    config = f"{constexprs} w{warps}"
                    print(f"{name:23} sm_{arch} {width:4} {dtype:6} {config:42} {registers:4} {spills:6} "
                          f"{compiled.metadata.shared:5}")  # fmt: skip
                    if spills:
                        problems.append(f"{name} sm_{arch} d={width} {dtype} {config}: {spills} bytes spilled")
                    if name.startswith("_bwd") and re.search(r"\b(atom|red)\.", ptx):
                        problems.append(f"{name} sm_{arch} {dtype}: atomic instruction in a backward kernel")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
