"""Top-k items of a catalogue per user state, ``grasp.ops.score_topk`` (docs/design.md section 11).

For user states ``query [B, d]`` and item vectors ``table [M, d]`` the score is ``s[b, j] = <query[b], table[j]>``,
optionally plus the GRASP enhancer's user-conditioned term (:class:`Gated`)::

    s1 = <user[b], item[j]>      s2 = <user_sim[b], item_sim[j]>
    h[b, j] = σ(s1/√c) values[j,0] + σ(s2/√c) values[j,1] + σ((s1+s2)/√(2c)) values[j,2] + bias
    s[b, j] += <out_query[b], gelu(h[b, j])>

(the enhancer folded: ``values`` are the projected item vectors of
:func:`grasp.ops.holistic_attention_projected.projected_values`, ``bias`` its first layer's bias, and
``out_query[b] = W2ᵀ state[b]`` for the enhancer's last layer ``W2``; the caller leaves out ``<state, b2>``,
the same for every item of a user). The op returns each user's k best rows, without the ``[B, M]`` score
matrix: the kernels stream item tiles (their gate dot products as tile GEMMs) and keep a running top-k per
user.

Backends: ``reference`` (plain PyTorch, chunked over items, the ground truth), ``cpu`` (C++ in ``csrc/cpu/``),
``cuda`` (CUDA C++ in ``csrc/cuda/``), ``triton`` (``grasp_kernels/score_topk.py``; CUDA, or CPU under
``TRITON_INTERPRET=1``). On a GPU the default is ``triton``, then ``cuda``. No autograd: this is inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grasp import _extension
from grasp.ops import _backends, _cuda_jit, _score_topk_cuda_jit
from grasp.ops._kernel_glue import FLOAT_DTYPES, register_score_topk
from grasp.ops._score_topk_reference import Gated, score_topk_reference

__all__ = ["Gated", "score_topk", "score_topk_reference", "backend_reason", "AUTO_ORDER", "CPU_DTYPES", "CUDA_DTYPES"]

_NAME = "score_topk"

#: Preference order of ``backend=None`` per device type.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
#: Dtypes of the C++ kernels: CPU (float64 computed in float64) and CUDA (float32 accumulation).
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def backend_reason(backend: str, device_type: str, dtype: torch.dtype | None = None) -> str:
    """Why ``backend`` cannot run the op on ``device_type`` tensors of ``dtype`` ("" if it can)."""
    why = _backends.reason(_NAME, backend, device_type, dtype, kernel="dot")
    taken = {"cpu": CPU_DTYPES, "cuda": CUDA_DTYPES}.get(backend)
    if not why and taken is not None and dtype is not None and dtype not in taken:
        names = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                 torch.bfloat16: "bfloat16"}
        why = f"the {backend} kernels take {' and '.join(names[t] for t in taken)}, not {dtype}"
    return why


@_backends.constant_under_compile
def _choose_backend(requested: str | None, device_type: str, dtype: torch.dtype) -> str:
    return _backends.choose(_NAME, requested, device_type, AUTO_ORDER, lambda b, dev: backend_reason(b, dev, dtype))


def _check_tensor(name: str, t: object, dtype: torch.dtype | None, device: torch.device | None) -> None:
    """``t`` is a tensor of ``dtype`` (a float dtype of the op when None) on ``device`` (any when None)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is None and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_NAME}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{_NAME}: mixed dtypes: {name} is {t.dtype} but query is {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{_NAME}: mixed devices: {name} is on {t.device} but query is on {device}")


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{_NAME}: {name} must be {what}, got shape {tuple(t.shape)}")


def _check_gated(gated: object, query: Tensor, M: int) -> Gated:
    if not isinstance(gated, tuple) or len(gated) != len(Gated._fields):
        raise TypeError(f"{_NAME}: gated must be a Gated({', '.join(Gated._fields)}), got {type(gated).__name__}")
    gated = Gated(*gated)
    for field, t in zip(Gated._fields, gated, strict=True):
        _check_tensor(f"gated.{field}", t, query.dtype, query.device)
    B = query.shape[0]
    user, values = gated.user, gated.values
    if user.dim() != 2 or user.shape[0] != B or user.shape[1] == 0:
        raise ValueError(f"{_NAME}: gated.user must be [B, c] with B = {B} (query's rows) and c >= 1, "
                         f"got shape {tuple(user.shape)}")
    c = user.shape[1]
    _check_shape("gated.user_sim", gated.user_sim, (B, c), f"[B, c] = [{B}, {c}] (user's shape)")
    _check_shape("gated.item", gated.item, (M, c), f"[M, c] = [{M}, {c}] (table's rows, user's width)")
    _check_shape("gated.item_sim", gated.item_sim, (M, c), f"[M, c] = [{M}, {c}] (item's shape)")
    if values.dim() != 3 or values.shape[:2] != (M, 3) or values.shape[2] == 0:
        raise ValueError(f"{_NAME}: gated.values must be [M, 3, e] with M = {M} (table's rows) and e >= 1, "
                         f"got shape {tuple(values.shape)}")
    e = values.shape[2]
    _check_shape("gated.bias", gated.bias, (e,), f"[e] = [{e}] (values' width)")
    _check_shape("gated.out_query", gated.out_query, (B, e), f"[B, e] = [{B}, {e}] (query's rows, values' width)")
    return gated


def _check_values(named: dict[str, Tensor], exclude: Tensor | None, M: int) -> None:
    """The checks that read the data: finite float inputs, exclusions in range (one sync in eager mode)."""
    named = {name: t for name, t in named.items() if t.numel()}
    if torch.compiler.is_compiling():  # no data-dependent Python branch in a graph: runtime asserts
        for name, t in named.items():
            torch._assert_async(torch.isfinite(torch.stack(torch.aminmax(t))).all(), f"{_NAME}: {name} has NaN or Inf")
        if exclude is not None and exclude.numel():
            torch._assert_async(((exclude >= -1) & (exclude < M)).all(), f"{_NAME}: exclude out of range -1..{M - 1}")
        return
    parts = [torch.stack(torch.aminmax(t)).double() for t in named.values()]
    if exclude is not None and exclude.numel():
        parts.append(torch.stack(torch.aminmax(exclude)).double())
    if not parts:
        return
    ranges = torch.stack(parts).tolist()
    for name, (lo, hi) in zip(named, ranges, strict=False):
        if not (abs(lo) < float("inf") and abs(hi) < float("inf")):
            raise ValueError(f"{_NAME}: {name} has NaN or Inf values")
    if exclude is not None and exclude.numel():
        lo, hi = (int(v) for v in ranges[-1])
        if lo < -1 or hi >= M:
            raise ValueError(f"{_NAME}: exclude must hold rows of table (0..{M - 1}) or -1 for padding, "
                             f"got values in {lo}..{hi}")


def _check_inputs(query: Tensor, table: Tensor, k: int, exclude: Tensor | None, gated: object) -> Gated | None:
    """Every argument check of score_topk; returns ``gated`` as a :class:`Gated` (or None)."""
    _check_tensor("query", query, None, None)
    _check_tensor("table", table, query.dtype, query.device)
    if query.dim() != 2 or query.shape[1] == 0:
        raise ValueError(f"{_NAME}: query must be [B, d] with d >= 1, got shape {tuple(query.shape)}")
    B, d = query.shape
    if table.dim() != 2 or table.shape[1] != d or table.shape[0] == 0:
        raise ValueError(f"{_NAME}: table must be [M, d] with M >= 1 and d = {d} (query's width), "
                         f"got shape {tuple(table.shape)}")
    M = table.shape[0]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{_NAME}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= M:
        raise ValueError(f"{_NAME}: k must be in 1..M = 1..{M} (table's rows), got {k}")
    if exclude is not None:
        if not isinstance(exclude, Tensor):
            raise TypeError(f"{_NAME}: exclude must be a torch.Tensor or None, got {type(exclude).__name__}")
        if exclude.dtype != torch.int64:
            raise TypeError(f"{_NAME}: exclude must be an int64 [B, X] tensor, got {exclude.dtype}")
        if exclude.dim() != 2 or exclude.shape[0] != B:
            raise ValueError(f"{_NAME}: exclude must be [B, X] with B = {B} (query's rows), "
                             f"got shape {tuple(exclude.shape)}")
        if exclude.device != query.device:
            raise ValueError(f"{_NAME}: mixed devices: exclude is on {exclude.device} but query is on {query.device}")
    named = {"query": query, "table": table}
    if gated is not None:
        gated = _check_gated(gated, query, M)
        named.update({f"gated.{field}": t for field, t in zip(Gated._fields, gated, strict=True)})
    _check_values(named, exclude, M)
    return gated


@torch.no_grad()
def score_topk(
    query: Tensor,
    table: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    gated: Gated | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Each user's k best-scoring rows of ``table``, without the ``[B, M]`` score matrix.

    ``s[b, j] = <query[b], table[j]>``, plus ``<out_query[b], gelu(h[b, j])>`` with ``gated`` (the module
    docstring gives ``h``; gelu is the exact erf GELU).

    Args:
        query: ``[B, d]`` user states. table: ``[M, d]`` item vectors. One float dtype and device.
        k: rows per user, ``1 <= k <= M``.
        exclude: optional int64 ``[B, X]``: rows never returned for that user; -1 entries are padding, and
            duplicates are allowed.
        gated: optional :class:`Gated` ``(user [B, c], user_sim [B, c], item [M, c], item_sim [M, c],
            values [M, 3, e], bias [e], out_query [B, e])`` of the same dtype and device.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; None picks the first available of
            :data:`AUTO_ORDER` for the device and dtype (``GRASP_BACKEND`` overrides that choice).

    Scores are accumulated in float32 (float64 for float64 inputs on ``reference`` and ``cpu``). The ``cpu``
    kernels take float32 and float64, the ``triton`` and ``cuda`` ones float32, float16 and bfloat16, the
    reference every float dtype. Autocast is ignored. Bad input raises a ``ValueError`` or ``TypeError`` naming the
    argument (NaN or Inf values included; under ``torch.compile`` the value checks are runtime asserts).

    Returns:
        ``(scores float32 [B, k], indices int64 [B, k])``: each row in descending score order, equal scores
        ordered by the smaller index (float64 inputs rank by their float64 scores, two of which may round to
        one float32); when fewer than k rows remain after the exclusions, the tail holds score -inf and
        index -1. A row whose score overflows to -inf is left out like an excluded one.

    Example:
        >>> import torch, grasp
        >>> state, items = torch.randn(4, 64), torch.randn(10_000, 64)
        >>> seen = torch.tensor([[3, 17, -1], [5, -1, -1], [0, 1, 2], [-1, -1, -1]])
        >>> scores, idx = grasp.ops.score_topk(state, items, 10, exclude=seen)
        >>> scores.shape, idx.shape
        (torch.Size([4, 10]), torch.Size([4, 10]))
    """
    gated = _check_inputs(query, table, k, exclude, gated)
    name = _choose_backend(backend, query.device.type, query.dtype)
    with _backends.autocast_off(query.device.type):
        if name == "reference":
            scores, indices = score_topk_reference(query, table, k, exclude=exclude, gated=gated)
            return scores.float(), indices
        exclude = None if exclude is None else exclude.contiguous()
        rows = (query.contiguous(), table.contiguous())
        triton = name == "triton"  # choosing it imported grasp_kernels.score_topk, which defines the ops
        if gated is None:
            op = torch.ops.grasp.score_topk_dot_triton if triton else torch.ops.grasp.score_topk_dot
            return op(*rows, exclude, k)
        op = torch.ops.grasp.score_topk_gated_triton if triton else torch.ops.grasp.score_topk_gated
        return op(*rows, *(t.contiguous() for t in gated), exclude, k)


if _extension.has_op("score_topk_dot"):
    register_score_topk("grasp::score_topk_dot", "grasp::score_topk_gated")
    _cuda_jit.register("score_topk_dot", _score_topk_cuda_jit.dot)
    _cuda_jit.register("score_topk_gated", _score_topk_cuda_jit.gated)
