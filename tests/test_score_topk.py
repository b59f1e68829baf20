"""grasp.ops.score_topk on every backend that runs here, against float64 scores with derived rounding bounds."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from _kernel_launches import CurrentDevice, record_launches
from _support import ALL_DTYPES
from _tolerance import accumulation_roundoff, check_flash_style
from conftest import DEVICES

import grasp
from grasp.ops._kernel_glue import TRITON_DTYPES
from grasp.ops._score_topk_reference import Gated, block_scores, score_topk_reference

op = grasp.ops.score_topk
#: The dispatch module (the package attribute of the same name is the public function).
op_module = importlib.import_module("grasp.ops.score_topk")


def runnable(device: str) -> list[str]:
    return [b for b in ("reference", "cpu", "cuda", "triton") if not op_module.backend_reason(b, device)]


BACKEND_CASES = [(dev, b) for dev in DEVICES for b in runnable(dev)]
KERNEL_CASES = [(dev, b) for dev, b in BACKEND_CASES if b != "reference"]
INTERPRETED = {("cpu", "triton")}  # the Triton interpreter is slow: smaller data
FORMS = ("plain", "gated")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtypes_of(backend: str) -> tuple[torch.dtype, ...]:
    """The input dtypes a backend takes."""
    taken = {"reference": ALL_DTYPES, "cpu": op_module.CPU_DTYPES, "cuda": op_module.CUDA_DTYPES}
    return taken.get(backend, TRITON_DTYPES)


# ---- inputs ----


def make_exclude(B: int, M: int, distinct: int, *, pad: int = 0, dup: int = 0, device="cpu") -> torch.Tensor:
    """int64 ``[B, distinct + dup + pad]``: ``distinct`` different rows per user, ``dup`` repeats of them and
    ``pad`` entries of -1, in a random column order."""
    rows = torch.stack([torch.randperm(M)[:distinct] for _ in range(B)]) if distinct else torch.empty(B, 0).long()
    parts = [rows]
    if dup:
        parts.append(rows[:, torch.randint(0, distinct, (dup,))])
    parts.append(torch.full((B, pad), -1))
    ex = torch.cat(parts, 1)
    ex = ex.gather(1, torch.stack([torch.randperm(ex.shape[1]) for _ in range(B)])) if ex.shape[1] else ex
    return ex.to(device)


def make_inputs(B, M, d, c, e, *, form: str, dtype=torch.float32, device="cpu", integers: bool = False):
    """``(query, table, gated or None)``: normal values, or small integers (every product and sum exact)."""

    def draw(*shape, scale=1.0):
        if integers:
            return torch.randint(-2, 3, shape).to(dtype).to(device)
        return (torch.randn(shape) * scale).to(dtype).to(device)

    query, table = draw(B, d), draw(M, d)
    if form == "plain":
        return query, table, None
    gated = Gated(draw(B, c), draw(B, c), draw(M, c), draw(M, c), draw(M, 3, e, scale=c**-0.5), draw(e),
                  (torch.randn(B, e) * e**-0.5).to(dtype).to(device))  # out_query: floats even then
    return query, table, gated


def call(backend, query, table, k, exclude=None, gated=None):
    return op(query, table, k, exclude=exclude, gated=gated, backend=backend)


# ---- the rounding bound of a score, and the check of a result ----

#: Errors of the elementwise functions, in units of the accumulation's unit roundoff u: torch's float32
#: GELU (vectorised erf) is within 12 u of |x|/2 (measured over [-12, 12]), its sigmoid within 2 u.
GELU_UNITS = 32
SIGMOID_UNITS = 8
#: Tensor cores accumulate 16-bit products with less than one float32 ulp lost per term; 2^-22 per term
#: covers two (as in grasp.ops.topk_neighbor_mean's proof bound).
TENSOR_CORE_UNIT = 2.0**-22
#: The largest slope of the exact GELU (about 1.129, near x = 1.4) and of the sigmoid.
GELU_SLOPE, SIGMOID_SLOPE = 1.13, 0.25


def gamma(n: int, unit: float) -> float:
    return n * unit / (1 - n * unit)


def score_bound(query, table, gated, dtype) -> tuple[torch.Tensor, float]:
    """float64 ``[B, M]``: a bound on |computed - exact| of every score, and the largest sum of the absolute
    summands of a score (the magnitude of tests/_tolerance.py).

    First-order propagation through the computation, every step rounded in float32 (float64 for float64):
    the dot products over d and c (gamma_n times the sum of |terms|; tensor-core accumulation for 16-bit
    inputs), the gate arguments (scaled, rounded), the sigmoid (slope 1/4 plus its own error), the mix of
    three products and the bias (gamma_6), the GELU (slope 1.13 plus its erf's error on |h|/2 and the
    rounding of its formula), the dot with out_query over e, and the final sum. The total is doubled for
    the second-order terms; the rounding of the float32 result is added.
    """
    u = accumulation_roundoff(dtype)
    dot_unit = TENSOR_CORE_UNIT if dtype in LOW_PRECISION else u
    q, t = query.double().cpu(), table.double().cpu()
    a0 = q.abs() @ t.abs().T
    dot = q @ t.T
    bound = gamma(q.shape[1], dot_unit) * a0
    magnitude = a0
    if gated is not None:
        g = Gated(*(x.double().cpu() for x in gated))
        c, e = g.user.shape[1], g.values.shape[2]
        c1, c2 = 1 / math.sqrt(c), 1 / math.sqrt(2 * c)
        s1, s2 = g.user @ g.item.T, g.user_sim @ g.item_sim.T
        d1 = gamma(c, dot_unit) * (g.user.abs() @ g.item.abs().T)
        d2 = gamma(c, dot_unit) * (g.user_sim.abs() @ g.item_sim.abs().T)
        z = torch.stack([s1 * c1, s2 * c1, (s1 + s2) * c2], -1)
        dz = torch.stack([d1 * c1, d2 * c1, (d1 + d2 + u * (s1 + s2).abs()) * c2], -1) + 2 * u * z.abs()
        gates = torch.sigmoid(z)
        dg = SIGMOID_SLOPE * dz + SIGMOID_UNITS * u
        h = torch.einsum("bjx,jxe->bje", gates, g.values) + g.bias
        h_abs = torch.einsum("bjx,jxe->bje", gates, g.values.abs()) + g.bias.abs()
        dh = torch.einsum("bjx,jxe->bje", dg, g.values.abs()) + gamma(6, u) * h_abs
        gelu = F.gelu(h)
        dgelu = GELU_SLOPE * dh + (GELU_UNITS / 2 + 4) * u * h.abs()
        oq = g.out_query.abs().unsqueeze(1)
        term_abs = (oq * gelu.abs()).sum(-1)
        term = (g.out_query.unsqueeze(1) * gelu).sum(-1)
        bound = bound + (oq * dgelu).sum(-1) + gamma(e, u) * term_abs + u * (dot + term).abs()
        magnitude = magnitude + term_abs
        dot = dot + term
    # Doubled for second-order terms; plus the rounding of the returned float32 score (float64 inputs).
    return 2 * bound + 2.0**-24 * dot.abs(), magnitude.max().item()


def truth_scores(query, table, gated) -> torch.Tensor:
    """float64 ``[B, M]`` scores of every pair (small inputs)."""
    gated64 = None if gated is None else Gated(*(x.double().cpu() for x in gated))
    return block_scores(query.double().cpu(), table.double().cpu(), gated64, slice(None), slice(None))


def excluded_mask(exclude, B: int, M: int) -> torch.Tensor:
    mask = torch.zeros(B, M + 1, dtype=torch.bool)
    if exclude is not None and exclude.shape[1]:
        mask.scatter_(1, torch.where(exclude >= 0, exclude, M).cpu(), True)
    return mask[:, :M]


def assert_valid_result(scores, idx, query, table, k, *, exclude=None, gated=None, what=""):
    """The result's contract, against float64 scores and their rounding bounds (score_bound):

    shapes and dtypes; the first min(k, remaining) slots filled with distinct rows that are not excluded,
    the rest (-inf, -1); descending scores, equal scores by ascending index (float64 inputs rank by their
    float64 scores, which the float32 result may not tell apart); every returned score within
    its bound of the exact score of its row; and the returned set equal to the exact top k in every row
    whose exact k-th and (k+1)-th scores are further apart than twice the row's largest bound (every
    remaining row where fewer than k remain). For 16-bit inputs also the flash-style rule of
    tests/_tolerance.py against the same-dtype PyTorch scores of the returned rows.
    """
    B, M = query.shape[0], table.shape[0]
    dtype = query.dtype
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64, what
    assert scores.shape == idx.shape == (B, k), what
    assert scores.device == query.device and idx.device == query.device, what
    scores, idx = scores.cpu(), idx.cpu()
    truth = truth_scores(query, table, gated)
    bound, magnitude = score_bound(query, table, gated, dtype)
    excluded = excluded_mask(exclude, B, M)
    remaining = (~excluded).sum(1)
    filled = idx >= 0
    expect = torch.arange(k) < remaining.clamp(max=k).unsqueeze(1)
    assert torch.equal(filled, expect), f"{what}: {filled.sum(1).tolist()} slots filled, not {expect.sum(1).tolist()}"
    assert (scores[~filled] == float("-inf")).all(), what
    j = idx.clamp(min=0)
    assert (idx < M).all() and not excluded.gather(1, j)[filled].any(), f"{what}: an excluded row was returned"
    ordered = idx.masked_fill(~filled, M).sort(1).values
    assert ((ordered[:, 1:] > ordered[:, :-1]) | (ordered[:, 1:] == M)).all(), f"{what}: a row returned twice"
    later = filled[:, 1:]
    assert (scores[:, 1:] <= scores[:, :-1])[later].all(), f"{what}: scores not descending"
    if dtype != torch.float64:  # float64 scores rank in float64: two of them may round to one float32
        same = (scores[:, 1:] == scores[:, :-1]) & later
        assert (idx[:, 1:] > idx[:, :-1])[same].all(), f"{what}: equal scores not ordered by index"
    exact, allowed = truth.gather(1, j), bound.gather(1, j)
    err = (scores.double() - exact).abs()
    bad = (err > allowed) & filled
    assert not bad.any(), (f"{what}: {int(bad.sum())} scores beyond their rounding bound of the float64 score, "
                           f"by up to {(err / allowed)[bad].max().item():.3g} times")
    sorted_truth, order = truth.masked_fill(excluded, float("-inf")).sort(dim=1, descending=True, stable=True)
    for b in range(B):
        n = int(remaining[b])
        if n <= k:
            assert set(idx[b, :n].tolist()) == set(order[b, :n].tolist()), f"{what}: row {b} misses a remaining row"
        elif sorted_truth[b, k - 1] - sorted_truth[b, k] > 2 * bound[b].max():
            assert set(idx[b].tolist()) == set(order[b, :k].tolist()), f"{what}: row {b}: another top-{k} set"
    if dtype in LOW_PRECISION and filled.any():
        lowp = block_scores(query.cpu(), table.cpu(), None if gated is None else Gated(*(x.cpu() for x in gated)),
                            slice(None), slice(None)).gather(1, j)
        terms = query.shape[1] + (0 if gated is None else gated.user.shape[1] + gated.values.shape[2] + 12)
        check_flash_style(scores[filled], lowp[filled], exact[filled], f"{what} scores", terms=terms,
                          magnitude=magnitude)


# ---- random inputs against float64 ----

# (B, M, d, c, e, excluded rows per user, duplicates, padding, k): one row, B = 1, k = 1, odd sizes that are
# no multiple of any tile, more users than one user tile, more items than one item tile.
CASES = [
    (1, 1, 1, 1, 1, 0, 0, 0, 1),
    (1, 37, 5, 3, 7, 4, 2, 3, 1),
    (5, 33, 17, 9, 13, 6, 3, 2, 7),
    (3, 70, 8, 16, 5, 0, 0, 4, 12),
    (70, 300, 24, 10, 33, 9, 4, 5, 10),
    (2, 1500, 40, 20, 16, 30, 10, 10, 40),
    (1, 2500, 16, 8, 12, 5, 1, 1, 10),
]
INTERPRETED_CASES = CASES[:4] + [(20, 100, 24, 10, 20, 9, 4, 5, 10)]


def cases_for(device, backend):
    return INTERPRETED_CASES if (device, backend) in INTERPRETED else CASES


def assert_random_case(device, backend, form, case, dtype=torch.float32):
    B, M, d, c, e, distinct, dup, pad, k = case
    query, table, gated = make_inputs(B, M, d, c, e, form=form, dtype=dtype, device=device)
    exclude = make_exclude(B, M, min(distinct, M - 1), pad=pad, dup=dup if distinct else 0, device=device)
    scores, idx = call(backend, query, table, k, exclude, gated)
    assert_valid_result(scores, idx, query, table, k, exclude=exclude, gated=gated,
                        what=f"{backend} {form} {dtype} {case}")
    scores, idx = call(backend, query, table, k, None, gated)
    assert_valid_result(scores, idx, query, table, k, gated=gated, what=f"{backend} {form} {dtype} {case} no exclude")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_random_inputs_match_float64(device, backend, form):
    for case in cases_for(device, backend):
        assert_random_case(device, backend, form, case)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_every_dtype(device, backend, form):
    case = (9, 60, 17, 9, 13, 5, 2, 2, 6) if (device, backend) in INTERPRETED else (30, 700, 33, 17, 21, 5, 2, 2, 6)
    for dtype in dtypes_of(backend):
        assert_random_case(device, backend, form, case, dtype)


def assert_wide_gelu_inputs(device, backend):
    """GELU inputs far from zero on both sides (|h| up to about 40): erf near +-1, and past the point where
    the cpu kernel's erf clamps its argument (|h| / sqrt(2) = 4)."""
    B, M = (6, 40) if (device, backend) in INTERPRETED else (20, 300)
    query, table, gated = make_inputs(B, M, 8, 6, 16, form="gated", device=device)
    gated = gated._replace(values=gated.values * 12, bias=gated.bias * 6)
    exclude = make_exclude(B, M, 3, pad=1, device=device)
    scores, idx = call(backend, query, table, 5, exclude, gated)
    assert_valid_result(scores, idx, query, table, 5, exclude=exclude, gated=gated, what=f"{backend} wide h")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_wide_gelu_inputs(device, backend):
    assert_wide_gelu_inputs(device, backend)


def assert_exclusion_edges(device, backend, form):
    """k = M - |excluded| (every remaining row returned, no empty slot), k beyond what remains (an empty tail),
    every row excluded but one, and a user with nothing excluded next to one with everything padded."""
    B, M, d, c, e = (4, 40, 9, 5, 7) if (device, backend) in INTERPRETED else (6, 300, 9, 5, 7)
    query, table, gated = make_inputs(B, M, d, c, e, form=form, device=device)
    for distinct, extra_k in ((11, 0), (11, 3), (M - 1, 0), (M - 1, 5), (0, 0)):
        exclude = make_exclude(B, M, distinct, pad=3, dup=2 if distinct else 0, device=device)
        k = min(M, M - distinct + extra_k)
        scores, idx = call(backend, query, table, k, exclude, gated)
        what = f"{backend} {form} distinct={distinct} k={k}"
        assert_valid_result(scores, idx, query, table, k, exclude=exclude, gated=gated, what=what)
        assert (idx[:, : M - distinct] >= 0).all() and (idx[:, M - distinct :] == -1).all(), what
    exclude = torch.full((B, 5), -1, device=device)  # padding only
    scores, idx = call(backend, query, table, M, exclude, gated)
    assert (idx >= 0).all() and torch.equal(idx.sort(1).values.cpu(), torch.arange(M).expand(B, M))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_exclusion_edges(device, backend, form):
    assert_exclusion_edges(device, backend, form)


def assert_exact_ties(device, backend, form, dtype):
    """Repeated rows with small-integer dot products (exact in any summation order): every copy of a row scores
    the same. Plain scores are then exact integers, so the result must equal the reference's bit for bit; in
    the gated form a user must get the earliest copies it has not excluded, in index order."""
    B, M = (5, 50) if (device, backend) in INTERPRETED else (40, 600)
    query, table, gated = make_inputs(B, M, 8, 8, 32, form=form, dtype=dtype, device=device, integers=True)
    source = torch.randint(0, M, (M // 3,))
    copies = torch.randint(0, M, (M // 3,))
    table[copies] = table[source]  # ties within and across tiles and slices
    if gated is not None:
        for t in (gated.item, gated.item_sim, gated.values):
            t[copies] = t[source]
    exclude = make_exclude(B, M, 3, pad=2, dup=1, device=device)
    for k in (1, 7, M // 2):
        scores, idx = call(backend, query, table, k, exclude, gated)
        what = f"{backend} {form} {dtype} k={k}"
        assert_valid_result(scores, idx, query, table, k, exclude=exclude, gated=gated, what=what)
        if gated is None:  # integer scores: the reference is exact, and so is every backend
            want_s, want_i = score_topk_reference(query, table, k, exclude=exclude)
            assert torch.equal(idx.cpu(), want_i.cpu()), what
            assert torch.equal(scores.cpu(), want_s.float().cpu()), what
        else:  # the copies of a row score alike: a user gets the earliest copies it has not excluded, in order
            assert_copies_in_order(idx.cpu(), copy_groups(table, gated), excluded_mask(exclude, B, M), what)


def copy_groups(table, gated) -> list[int]:
    """The group of every item: items with the same table, item, item_sim and values rows share one."""
    rows = torch.cat([table, gated.item, gated.item_sim, gated.values.flatten(1)], 1).cpu()
    return torch.unique(rows, dim=0, return_inverse=True)[1].tolist()


def assert_copies_in_order(idx, group, excluded, what):
    for b in range(idx.shape[0]):
        returned = [j for j in idx[b].tolist() if j >= 0]
        members: dict[int, list[int]] = {}
        for j in range(len(group)):
            if not excluded[b, j]:
                members.setdefault(group[j], []).append(j)
        for g in {group[j] for j in returned}:
            got = [j for j in returned if group[j] == g]
            assert got == members[g][: len(got)], f"{what}: row {b} returns copies {got} of {members[g]}"


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_exact_ties_by_smaller_index(device, backend, form):
    for dtype in dtypes_of(backend):
        assert_exact_ties(device, backend, form, dtype)


def test_tie_rule_is_the_stable_sort():
    """The definition: equal scores come out as torch.sort(stable=True) of -score orders them."""
    table = torch.tensor([[1.0], [3.0], [3.0], [2.0], [3.0], [1.0]])
    for backend in runnable("cpu"):
        scores, idx = call(backend, torch.ones(1, 1), table, 5)
        assert idx.tolist() == [[1, 2, 4, 3, 0]] and scores.tolist() == [[3.0, 3.0, 3.0, 2.0, 1.0]]
        scores, idx = call(backend, torch.ones(1, 1), table, 6, torch.tensor([[2, -1, 2, 0]]))
        assert idx.tolist() == [[1, 4, 3, 5, -1, -1]], backend
        assert scores[0, 4:].tolist() == [float("-inf")] * 2


# ---- the Triton kernel's item slices and launches ----

TRITON_CPU = not op_module.backend_reason("triton", "cpu")
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason=op_module.backend_reason("triton", "cpu") or "")


def assert_triton_slices(slices: int, form: str):
    """One slice (no merge), and slices shorter than k, whose unfilled keys the merge must leave out."""
    import grasp_kernels.topk_neighbor_mean as knn

    default, knn._INTERPRET_SLICES = knn._INTERPRET_SLICES, slices  # the slice count under the interpreter
    try:
        B, M = 18, 40
        query, table, gated = make_inputs(B, M, 7, 5, 6, form=form)
        exclude = make_exclude(B, M, 35, pad=1, dup=1)
        for k in (9, M):
            scores, idx = call("triton", query, table, k, exclude, gated)
            assert_valid_result(scores, idx, query, table, k, exclude=exclude, gated=gated, what=f"slices={slices}")
    finally:
        knn._INTERPRET_SLICES = default


@needs_triton
@pytest.mark.parametrize("slices", [1, 2, 7])
@pytest.mark.parametrize("form", FORMS)
def test_triton_slices_and_merge(slices, form):
    assert_triton_slices(slices, form)


@needs_triton
def test_triton_launches_on_the_tensors_device(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    import grasp_kernels.score_topk as kernels

    launches = record_launches(monkeypatch, kernels, ["_score_topk_kernel", "_knn_merge_kernel"])
    with FakeTensorMode():
        q, t = torch.empty(10, 16, device="cuda:1"), torch.empty(100, 16, device="cuda:1")
        kernels.score_topk_dot(q, t, torch.zeros(10, 3, dtype=torch.int64, device="cuda:1"), 5)
    assert [(launch.name, launch.current) for launch in launches] == [
        ("_score_topk_kernel", "cuda:1"), ("_knn_merge_kernel", "cuda:1")
    ]
    assert CurrentDevice.current == "cuda:0"


# ---- the fold of the GRASP enhancer ----


def assert_folded_enhancer():
    """<state, id(j) + enhancer(u, j)> = score_topk's gated score + <state, b2>, with the enhancer's layers
    folded as docs/design.md section 11 derives (the block's unfused op and MLP on every pair)."""
    from grasp.nn import HolisticAttention
    from grasp.ops.holistic_attention_projected import projected_values

    B, M, d = 6, 40, 16
    block = HolisticAttention(24, 24, d).double().eval()
    state, ids = torch.randn(B, d, dtype=torch.float64), torch.randn(M, d, dtype=torch.float64)
    with torch.no_grad():
        u, u_sim = block.adapt_users(torch.randn(B, 24, dtype=torch.float64), torch.randn(B, 24, dtype=torch.float64))
        i, i_sim = block.adapt_items(torch.randn(M, 24, dtype=torch.float64), torch.randn(M, 24, dtype=torch.float64))
        rep = block.combine(u, u_sim, i.expand(B, M, d), i_sim.expand(B, M, d), None)  # [B, M, d]
        full = state @ ids.T + (rep @ state.unsqueeze(-1)).squeeze(-1)
        first, last = block.mlp[0], block.mlp[2]
        gated = Gated(u, u_sim, i, i_sim, projected_values(i, i_sim, first.weight), first.bias, state @ last.weight)
        folded = block_scores(state, ids, gated, slice(None), slice(None)) + (state @ last.bias).unsqueeze(1)
        torch.testing.assert_close(folded, full, rtol=1e-10, atol=1e-10)
        for backend in runnable("cpu"):
            if torch.float64 not in dtypes_of(backend):
                continue
            scores, idx = call(backend, state, ids, 5, None, gated)
            assert torch.equal(idx, full.sort(dim=1, descending=True, stable=True).indices[:, :5]), backend


def test_gated_score_is_the_folded_grasp_enhancer():
    assert_folded_enhancer()


# ---- torch.library and torch.compile ----


def _kernel_op(backend: str, form: str):
    suffix = "_triton" if backend == "triton" else ""
    if backend == "triton":
        import grasp_kernels.score_topk  # noqa: F401

    return getattr(torch.ops.grasp, f"score_topk_{'dot' if form == 'plain' else 'gated'}{suffix}").default


def assert_opcheck(device, backend, form):
    query, table, gated = make_inputs(7, 29, 9, 5, 6, form=form, device=device)
    rows = (query, table) if gated is None else (query, table, *gated)
    for exclude in (None, make_exclude(7, 29, 3, pad=1, dup=1, device=device)):
        torch.library.opcheck(_kernel_op(backend, form), (*rows, exclude, 4))


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_kernel_ops_pass_opcheck(device, backend, form):
    assert_opcheck(device, backend, form)


def eager_and_compiled(backend):
    """A function that calls the op between other operations, and its torch.compile(fullgraph=True)."""

    def fn(state, items, seen, gated):
        scores, idx = op(state * 2.0, items, 6, exclude=seen, gated=gated, backend=backend)
        return scores + 1.0, idx

    return fn, torch.compile(fn, fullgraph=True)


def assert_compiled_matches_eager(device, form, functions):
    fn, compiled = functions
    query, table, gated = make_inputs(5, 37, 8, 4, 6, form=form, device=device)
    exclude = make_exclude(5, 37, 4, pad=1, dup=1, device=device)
    want_s, want_i = fn(query, table, exclude, gated)
    got_s, got_i = compiled(query, table, exclude, gated)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)  # the compiled reference may round otherwise


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_torch_compile_fullgraph(device, backend, form):
    torch._dynamo.reset()
    assert_compiled_matches_eager(device, form, eager_and_compiled(backend))


def test_bad_exclude_under_torch_compile_is_a_runtime_assert():
    query, table, _ = make_inputs(3, 10, 4, 1, 1, form="plain")
    fn = torch.compile(lambda q, t, ex: op(q, t, 2, exclude=ex), fullgraph=True)
    torch._dynamo.reset()
    assert fn(query, table, torch.tensor([[1], [2], [-1]]))[1].shape == (3, 2)
    with pytest.raises(RuntimeError, match=r"exclude out of range -1..9"):
        fn(query, table, torch.tensor([[1], [10], [-1]]))


def assert_autocast_ignored(device, backend):
    query, table, gated = make_inputs(6, 50, 16, 8, 8, form="gated", device=device)
    want = call(backend, query, table, 5, None, gated)
    with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
        got = call(backend, query, table, 5, None, gated)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_autocast_is_ignored(device, backend):
    assert_autocast_ignored(device, backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_no_users(device, backend):
    query, table, gated = make_inputs(0, 20, 4, 3, 5, form="gated", device=device)
    scores, idx = call(backend, query, table, 3, torch.zeros(0, 2, dtype=torch.int64, device=device), gated)
    assert scores.shape == idx.shape == (0, 3)


def assert_views(device, backend):
    base = torch.randn(16, 90, device=device)
    query, table = base[:, :7].t(), base[:, 7:].t()  # [7, 16] and [83, 16] views with strides (1, 90)
    exclude = make_exclude(7, 83, 3, pad=1, device=device).t().contiguous().t()
    assert not (query.is_contiguous() or table.is_contiguous() or exclude.is_contiguous())
    scores, idx = call(backend, query, table, 4, exclude)
    assert_valid_result(scores, idx, query, table, 4, exclude=exclude, what=f"{backend} views")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_non_contiguous_inputs(device, backend):
    assert_views(device, backend)


def test_expected_backends_are_present(monkeypatch):
    monkeypatch.delenv("GRASP_BACKEND", raising=False)
    if os.environ.get("GRASP_NO_EXTENSION") != "1":
        assert not op_module.backend_reason("cpu", "cpu"), op_module.backend_reason("cpu", "cpu")
        assert op_module._choose_backend(None, "cpu", torch.float32) == "cpu"
    assert op_module._choose_backend(None, "cpu", torch.bfloat16) == "reference"  # no 16-bit cpu kernel
    assert "take float32 and float64, not torch.float16" in op_module.backend_reason("cpu", "cpu", torch.float16)
    assert "the cuda backend runs cuda tensors only" in op_module.backend_reason("cuda", "cpu")
    if torch.cuda.is_available():
        assert op_module._choose_backend(None, "cuda", torch.bfloat16) == "triton"


# ---- bad input: one line naming the argument ----


def _good():
    query, table, gated = make_inputs(3, 10, 4, 5, 6, form="gated")
    return [query, table, 2], {"exclude": torch.tensor([[1, -1], [2, 2], [-1, -1]]), "gated": gated}


def _replace(field, value):
    return lambda a, kw: kw.__setitem__("gated", kw["gated"]._replace(**{field: value}))


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a, kw: a.__setitem__(0, torch.randn(3, 4, 1)), ValueError, r"query must be \[B, d\] with d >= 1"),
        (lambda a, kw: a.__setitem__(0, [1.0]), TypeError, r"query must be a torch.Tensor, got list"),
        (lambda a, kw: a.__setitem__(0, torch.ones(3, 4, dtype=torch.int64)), TypeError,
         r"query must be float32, float16, bfloat16 or float64, got torch.int64"),
        (lambda a, kw: a.__setitem__(1, torch.randn(10, 5)), ValueError,
         r"table must be \[M, d\] with M >= 1 and d = 4 \(query's width\), got shape \(10, 5\)"),
        (lambda a, kw: a.__setitem__(1, torch.randn(0, 4)), ValueError, r"table must be \[M, d\] with M >= 1"),
        (lambda a, kw: a.__setitem__(1, torch.randn(10, 4, dtype=torch.float64)), TypeError,
         r"mixed dtypes: table is torch.float64 but query is torch.float32"),
        (lambda a, kw: a.__setitem__(2, 0), ValueError, r"k must be in 1..M = 1..10 \(table's rows\), got 0"),
        (lambda a, kw: a.__setitem__(2, 11), ValueError, r"k must be in 1..M = 1..10 \(table's rows\), got 11"),
        (lambda a, kw: a.__setitem__(2, 2.0), TypeError, r"k must be an int, got float"),
        (lambda a, kw: kw.__setitem__("exclude", torch.tensor([[10], [0], [0]])), ValueError,
         r"exclude must hold rows of table \(0..9\) or -1 for padding, got values in 0..10"),
        (lambda a, kw: kw.__setitem__("exclude", torch.tensor([[-2], [0], [0]])), ValueError, r"got values in -2..0"),
        (lambda a, kw: kw.__setitem__("exclude", torch.zeros(3, 2, dtype=torch.int32)), TypeError,
         r"exclude must be an int64 \[B, X\] tensor, got torch.int32"),
        (lambda a, kw: kw.__setitem__("exclude", torch.zeros(2, 2, dtype=torch.int64)), ValueError,
         r"exclude must be \[B, X\] with B = 3 \(query's rows\), got shape \(2, 2\)"),
        (lambda a, kw: kw.__setitem__("gated", (torch.ones(1),)), TypeError, r"gated must be a Gated\(user, user_sim"),
        (_replace("user", torch.randn(2, 5)), ValueError, r"gated.user must be \[B, c\] with B = 3"),
        (_replace("user_sim", torch.randn(3, 4)), ValueError, r"gated.user_sim must be \[B, c\] = \[3, 5\]"),
        (_replace("item", torch.randn(9, 5)), ValueError, r"gated.item must be \[M, c\] = \[10, 5\]"),
        (_replace("item_sim", torch.randn(10, 6)), ValueError, r"gated.item_sim must be \[M, c\] = \[10, 5\]"),
        (_replace("values", torch.randn(10, 2, 6)), ValueError, r"gated.values must be \[M, 3, e\] with M = 10"),
        (_replace("bias", torch.randn(5)), ValueError, r"gated.bias must be \[e\] = \[6\]"),
        (_replace("out_query", torch.randn(3, 5)), ValueError, r"gated.out_query must be \[B, e\] = \[3, 6\]"),
        (_replace("values", torch.randn(10, 3, 6).half()), TypeError,
         r"mixed dtypes: gated.values is torch.float16 but query is torch.float32"),
        (_replace("bias", "zero"), TypeError, r"gated.bias must be a torch.Tensor, got str"),
        (_replace("item", torch.full((10, 5), float("nan"))), ValueError, r"gated.item has NaN or Inf values"),
        (lambda a, kw: a[1].__setitem__((3, 2), float("inf")), ValueError, r"table has NaN or Inf values"),
        (lambda a, kw: kw.__setitem__("backend", "tpu"), ValueError, r"unknown backend 'tpu'"),
        (lambda a, kw: kw.__setitem__("exclude", kw["exclude"].to("meta")), ValueError,
         r"mixed devices: exclude is on meta but query is on cpu"),
    ],
    ids=["query_rank", "query_type", "query_int", "table_width", "table_empty", "mixed_dtype", "k0", "k_gt_M",
         "k_float", "exclude_high", "exclude_low", "exclude_dtype", "exclude_rows", "gated_tuple", "user_rows",
         "user_sim_shape", "item_rows", "item_sim_width", "values_shape", "bias_shape", "out_query_shape",
         "gated_dtype", "gated_type", "nan", "inf", "backend", "exclude_device"],
)
def test_bad_input_is_named(mutate, exc, pattern):
    args, kwargs = _good()
    mutate(args, kwargs)
    with pytest.raises(exc, match=pattern):
        op(*args, **kwargs)


def test_unavailable_backend_is_explained():
    args, kwargs = _good()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        op(*args, **kwargs, backend="cuda")
    if not op_module.backend_reason("cpu", "cpu"):
        with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available .*not torch.bfloat16"):
            op(args[0].bfloat16(), args[1].bfloat16(), 2, backend="cpu")


def test_cpu_kernels_check_their_inputs():
    """Direct calls of the kernel ops (no Python validation): errors, not wild reads."""
    if op_module.backend_reason("cpu", "cpu"):
        pytest.skip(op_module.backend_reason("cpu", "cpu"))
    query, table, gated = make_inputs(3, 10, 4, 5, 6, form="gated")
    dot, gated_op = torch.ops.grasp.score_topk_dot, torch.ops.grasp.score_topk_gated
    with pytest.raises(RuntimeError, match=r"exclude\[1, 0\] = 10 is neither a row of table \(0..9\) nor -1"):
        dot(query, table, torch.tensor([[0], [10], [1]]), 2)
    with pytest.raises(RuntimeError, match=r"k = 11 must be in 1..M = 10"):
        dot(query, table, None, 11)
    with pytest.raises(RuntimeError, match=r"the cpu kernels take float32 and float64, not Half"):
        dot(query.half(), table.half(), None, 2)
    with pytest.raises(RuntimeError, match=r"values must be \[M, 3, e\] with M = 10"):
        gated_op(query, table, *gated._replace(values=torch.randn(9, 3, 6)), None, 2)
    with pytest.raises(RuntimeError, match=r"table must be a contiguous CPU tensor"):
        dot(query, table.t().contiguous().t(), None, 2)


# ---- memory: the B x M score matrix never exists ----

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, grasp
    from grasp.ops.score_topk import Gated
    B, M, form, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    d = c = e = 16
    query, table = torch.randn(B, d), torch.randn(M, d)
    gated = None
    if form == "gated":
        gated = Gated(torch.randn(B, c), torch.randn(B, c), torch.randn(M, c), torch.randn(M, c),
                      torch.randn(M, 3, e), torch.randn(e), torch.randn(B, e))
    small = None if gated is None else Gated(*(t[:1000] if t.shape[0] == M else t for t in gated))
    grasp.ops.score_topk(query, table[:1000], 10, gated=small, backend=backend)  # warm up allocators, threads
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grasp.ops.score_topk(query, table, 10, gated=gated, backend=backend)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": after - before}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_cpu_memory_does_not_grow_with_the_catalogue(form, tmp_path):
    if op_module.backend_reason("cpu", "cpu"):
        pytest.skip(op_module.backend_reason("cpu", "cpu"))
    B, M = 512, (2_000_000 if form == "plain" else 200_000)
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(B), str(M), form, "cpu"], capture_output=True, text=True,
                          check=True, timeout=1200)
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth_kib"] * 1024
    scores = 4 * B * M / 2**20
    assert growth < 64 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB (the [B, M] scores: {scores:.0f} MiB)"
