"""The accuracy rule of the kernel tests: flash-style, with a rounding floor derived from the reductions.

A kernel's error against the float64 truth may be at most twice the error of the same computation done by
PyTorch in the kernel's dtype, plus a floor. The floor covers what the "twice torch" part cannot: torch's
own result can be exact by luck (always so in float64, where torch's result *is* the truth) while the
kernel, summing the same terms in another order, rounds. Its size is the standard bound on the rounding of a
floating-point sum of n terms (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 4.4):

    |fl(x_1 + ... + x_n) - (x_1 + ... + x_n)| <= gamma_{n-1} * (|x_1| + ... + |x_n|),  gamma_m = m u / (1 - m u)

with u the unit roundoff of the accumulation: the kernels sum float16 and bfloat16 inputs in float32 (and
float64 in float64), and the one rounding of a low-precision output to its dtype is already in "twice
torch", whose result is rounded the same way. A value made by a chain of reductions (a dot product over d feeding
a gate, whose gradient is summed over L positions, ...) gets n = the total length of the chain, and the
magnitude is the largest sum of absolute summands of any output of the call, so one floor bounds every
output of that call.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff u = 2^-p of the type the kernels accumulate ``dtype`` inputs in (p-bit significand)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2


def rounding_floor(dtype: torch.dtype, terms: int, magnitude: float) -> float:
    """gamma_terms * magnitude: the rounding bound of a ``terms``-long sum of absolute size ``magnitude``,
    accumulated for ``dtype`` inputs."""
    nu = terms * accumulation_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"a sum of {terms} terms has no useful error bound in {dtype}")
    return nu / (1 - nu) * max(1.0, magnitude)


def check_flash_style(
    actual: Tensor, lowp: Tensor, truth: Tensor, what: str, *, terms: int, magnitude: float, stored: int = 0
) -> None:
    """Kernel error vs the float64 truth <= 2 x the same-dtype torch error + the rounding floor of the reductions.

    Args:
        actual: the kernel's result; lowp: PyTorch's in the same dtype; truth: float64.
        terms: the length of the longest chain of sums that produces a value (see the module docstring).
        magnitude: the largest sum of absolute summands among the call's outputs (>= max |truth|).
        stored: roundings to the inputs' dtype that the op makes *inside* the computation by contract (the
            projected op rounds its projected values and the bias sum to float16 / bfloat16), each worth
            u(dtype) * magnitude on top of the floor.
    """
    truth = truth.double()
    err = (actual.double() - truth).abs().max().item()
    base = (lowp.double() - truth).abs().max().item()
    magnitude = max(magnitude, truth.abs().max().item())
    floor = rounding_floor(actual.dtype, terms, magnitude) + stored * torch.finfo(actual.dtype).eps / 2 * magnitude
    assert err <= 2 * base + floor, (
        f"{what}: error {err:.3g} > 2 x same-dtype torch error {base:.3g} + rounding floor {floor:.3g} "
        f"({terms} terms of magnitude {magnitude:.3g} in {actual.dtype})"
    )
