"""Compile the projected-HAE Triton kernels to sm_90 machine code without a GPU (run by a test, in a
subprocess without TRITON_INTERPRET, since the interpreter replaces the kernels' JIT functions).

Prints one line per kernel and dtype; exits non-zero on a compile error.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import grasp_kernels.holistic_attention_projected as kernels


def signature(kernel, dtype: str, backward: bool) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name.endswith("index_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if backward and name.startswith("grad_") and name != "grad_out_ptr" else f"*{dtype}"
        elif name in ("N", "D", "E"):
            sig[name] = "i32"
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for label, kernel in (("forward", kernels._fwd_kernel.fn), ("backward", kernels._bwd_kernel.fn)):
        for dtype in ("fp32", "fp16", "bf16"):
            source = ASTSource(
                fn=kernel,
                signature=signature(kernel, dtype, label == "backward"),
                constexprs={"BLOCK_N": 32, "BLOCK_D": 64, "BLOCK_E": 64},
            )
            compiled = triton.compile(source, target=target, options={"num_warps": 4})
            print(f"{label} {dtype}: {len(compiled.asm['cubin'])} bytes of sm_90 cubin")


if __name__ == "__main__":
    main()
