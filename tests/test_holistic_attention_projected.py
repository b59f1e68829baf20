"""grasp.ops.holistic_attention_projected on every backend that can run here, against the reference
(holistic_attention of the gathered pairs, then the linear layer)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _kernel_launches import CurrentDevice, record_launches
from _support import ALL_DTYPES, run_with_grads
from _tolerance import check_flash_style
from conftest import DEVICES

import grasp
from grasp.ops._backends import interpreting
from grasp.ops._holistic_attention_projected_reference import holistic_attention_projected_reference
from grasp.ops._holistic_attention_reference import holistic_attention_reference
from grasp.ops.holistic_attention_projected import projected_values

op = grasp.ops.holistic_attention_projected
#: The dispatch module (the package attribute of the same name is the public function).
op_module = importlib.import_module("grasp.ops.holistic_attention_projected")


def runnable(device: str) -> list[str]:
    return [b for b in ("reference", "cpu", "cuda", "triton") if not op_module.backend_reason(b, device)]


BACKEND_CASES = [(dev, b) for dev in DEVICES for b in runnable(dev)]
KERNEL_CASES = [(dev, b) for dev, b in BACKEND_CASES if b != "reference"]
# (U, M, N, d, e): one pair, odd sizes, more pairs than rows (shared rows), the widths of real models.
SHAPES = [(1, 1, 1, 1, 1), (3, 7, 40, 17, 9), (5, 50, 300, 64, 64), (2, 3, 33, 50, 50), (4, 9, 17, 8, 130)]
INDEXINGS = ["random", "one_item", "one_user", "sorted"]


def make_inputs(U, M, N, d, e, *, dtype, device, indexing="random", bias=True, requires_grad=True):
    """Float inputs (user, user_sim, item, item_sim, weight[, bias]) and the indices."""
    shapes = [(U, d), (U, d), (M, d), (M, d), (e, 4 * d)] + ([(e,)] if bias else [])
    tensors = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    tensors[4] = tensors[4] / (4 * d) ** 0.5  # nn.Linear-like scale
    tensors = [t.requires_grad_(requires_grad) for t in tensors]
    user_index = torch.randint(0, U, (N,), device=device)
    item_index = torch.randint(0, M, (N,), device=device)
    if indexing == "one_item":  # every pair reads item 0: the backward sums N contributions into one item row
        item_index.zero_()
    elif indexing == "one_user":  # and into one user row
        user_index.zero_()
    elif indexing == "sorted":
        user_index, item_index = user_index.sort().values, item_index.sort().values
    return tensors, user_index, item_index


def reduction_bound(tensors, ui, ii, grad_out) -> tuple[int, float]:
    """(terms, magnitude) of the rounding floor (tests/_tolerance.py) for one call of the op.

    The longest chain of sums: <u, i> over d, the layer over 4d, a gate's gradient over e, a table row's
    gradient over its pairs (at most N) and the weight's gradient over the M items, plus a few scalar
    steps. The magnitude: the largest sum of absolute summands of any output, from the float64 reference
    with one leaf row per pair (the per-pair terms of the row gradients, summed as absolute values per row).
    """
    user, user_sim, item, item_sim, weight = (t.detach().double() for t in tensors[:5])
    M, d = item.shape
    N, e = grad_out.shape
    rows = [t[index].requires_grad_() for t, index in ((user, ui), (user_sim, ui), (item, ii), (item_sim, ii))]
    hae = holistic_attention_reference(*(r[None] for r in rows), upcast=False)[0]  # [N, 4d]
    g = grad_out.double()
    terms = torch.autograd.grad(hae, rows, g @ weight)
    sums = [torch.zeros_like(t).index_add_(0, index, term.abs())
            for t, index, term in zip((user, user_sim, item, item_sim), (ui, ui, ii, ii), terms, strict=True)]
    out = hae.abs() @ weight.abs().T + (tensors[5].detach().double().abs() if len(tensors) > 5 else 0)
    magnitudes = [*sums, out, g.abs().T @ hae.abs(), g.abs().sum(0)]
    return 4 * d + e + N + M + 8, max(m.max().item() for m in magnitudes)


def call(backend, ui, ii):
    def fn(user, user_sim, item, item_sim, weight, bias=None):
        return op(user, user_sim, item, item_sim, weight, bias, user_index=ui, item_index=ii, backend=backend)

    return fn


def assert_matches_reference(backend, device, dtype, shape, indexing="random"):
    tensors, ui, ii = make_inputs(*shape, dtype=dtype, device=device, indexing=indexing)
    N, e = shape[2], shape[4]
    grad_out = torch.randn(N, e, dtype=dtype, device=device)
    out, grads = run_with_grads(call(backend, ui, ii), tensors, grad_out)
    assert out.dtype == dtype and out.shape == (N, e)
    assert [g.shape for g in grads] == [t.shape for t in tensors]
    truth_in = [t.detach().double().requires_grad_() for t in tensors]
    reference = lambda upcast: lambda *t: holistic_attention_projected_reference(*t[:5], t[5], ui, ii, upcast=upcast)  # noqa: E731
    truth, truth_grads = run_with_grads(reference(True), truth_in, grad_out.double())
    lowp, lowp_grads = run_with_grads(reference(False), tensors, grad_out)
    bound = dict(zip(("terms", "magnitude"), reduction_bound(tensors, ui, ii, grad_out), strict=True))
    bound["stored"] = 2  # the projected values and the bias sum are rounded to the inputs' dtype
    check_flash_style(out, lowp, truth, "output", **bound)
    names = ("user", "user_sim", "item", "item_sim", "weight", "bias")
    for name, g, gl, gt in zip(names, grads, lowp_grads, truth_grads, strict=True):
        check_flash_style(g, gl, gt, f"grad {name}", **bound)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("indexing", INDEXINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(device, backend, shape, indexing):
    assert_matches_reference(backend, device, torch.float32, shape, indexing)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_matches_reference_every_dtype(device, backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take no float64")
    assert_matches_reference(backend, device, dtype, (3, 7, 40, 17, 9))
    assert_matches_reference(backend, device, dtype, (4, 30, 200, 64, 64), "one_item")


def _triton_kernels():
    """The Triton kernel module (the test is skipped where Triton cannot run)."""
    why = op_module.backend_reason("triton", "cuda" if torch.cuda.is_available() else "cpu")
    if why:
        pytest.skip(why)
    import grasp_kernels.holistic_attention_projected as kernels

    return kernels


SKEWED_SHAPE = (3, 4, 700, 17, 40)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("indexing", ["one_item", "one_user"])
def test_skewed_pairs(device, backend, dtype, indexing):
    """One item (or one user) holds every pair. In the Triton backward its segment spans every chunk of the
    sorted pairs, and the combine adds more partial sums than one of its tiles holds."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take no float64")
    if backend == "triton":
        kernels = _triton_kernels()
        _, _, N, d, e = SKEWED_SHAPE
        chunks = -(-N // kernels._chunk_length(N))
        for width in (d, e):
            assert chunks > kernels._pick_by_width(kernels._COMBINE_CONFIGS, {}, W=width)[0].kwargs["PARTS"]
    assert_matches_reference(backend, device, dtype, SKEWED_SHAPE, indexing)


@pytest.mark.parametrize("device,backend", [(dev, b) for dev, b in BACKEND_CASES if b != "triton"])
@pytest.mark.parametrize("indexing", INDEXINGS)
def test_gradcheck_float64(device, backend, indexing):
    tensors, ui, ii = make_inputs(3, 4, 11, 5, 3, dtype=torch.float64, device=device, indexing=indexing)
    assert torch.autograd.gradcheck(call(backend, ui, ii), tensors)


def test_equals_holistic_attention_then_linear():
    """The op's defining identity, through the public unfused op and nn.Linear (any backend order)."""
    U, M, N, d, e = 4, 6, 25, 16, 12
    (u, us, i, is_, _w, _b), ui, ii = make_inputs(U, M, N, d, e, dtype=torch.float64, device="cpu", requires_grad=False)
    linear = torch.nn.Linear(4 * d, e, dtype=torch.float64)
    hae = grasp.ops.holistic_attention(u[ui][None], us[ui][None], i[ii][None], is_[ii][None])[0]
    expected = linear(hae)
    out = op(u, us, i, is_, linear.weight, linear.bias, user_index=ui, item_index=ii)
    torch.testing.assert_close(out, expected)
    v = projected_values(i, is_, linear.weight)
    assert v.shape == (M, 3, e)


def _op_for(backend: str):
    if backend == "triton":
        import grasp_kernels.holistic_attention_projected  # noqa: F401

        return torch.ops.grasp.holistic_attention_projected_forward_triton.default
    return torch.ops.grasp.holistic_attention_projected_forward.default


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("indexing", ["random", "one_item"])
def test_opcheck(device, backend, indexing):
    (u, us, i, is_, w), ui, ii = make_inputs(3, 5, 19, 17, 7, dtype=torch.float32, device=device,
                                             indexing=indexing, bias=False)
    values = projected_values(i, is_, w).detach().requires_grad_()
    torch.library.opcheck(_op_for(backend), (u, us, i, is_, values, ui, ii))


class TinyEnhancer(torch.nn.Module):
    """Adapters, the fused op and a second layer, as the GRASP enhancer uses them."""

    def __init__(self, d: int, backend: str) -> None:
        super().__init__()
        self.adapt = torch.nn.Linear(d, d)
        self.first = torch.nn.Linear(4 * d, d)
        self.second = torch.nn.Linear(d, 1)
        self.backend = backend

    def forward(self, user, user_sim, item, item_sim, ui, ii):
        h = op(self.adapt(user), user_sim, self.adapt(item), item_sim, self.first.weight, self.first.bias,
               user_index=ui, item_index=ii, backend=self.backend)  # fmt: skip
        return self.second(torch.nn.functional.gelu(h)).squeeze(-1)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_torch_compile_fullgraph(device, backend):
    d = 16
    model = TinyEnhancer(d, backend).to(device)
    tensors, ui, ii = make_inputs(3, 6, 21, d, d, dtype=torch.float32, device=device, requires_grad=False)
    u, us, i, is_ = tensors[:4]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(u, us, i, is_, ui, ii)
    eager_grads = torch.autograd.grad(eager_out.sum(), model.parameters())
    out = compiled(u, us, i, is_, ui, ii)
    grads = torch.autograd.grad(out.sum(), model.parameters())
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_non_contiguous_views(device, backend):
    U, M, N, d, e = 3, 5, 23, 9, 7
    base = torch.randn(d, U + M, 2, device=device, requires_grad=True)
    user, item = base[:, :U, 0].t(), base[:, U:, 0].t()
    user_sim, item_sim = base[:, :U, 1].t(), base[:, U:, 1].t()
    base_w = torch.randn(4 * d, e, device=device, requires_grad=True)
    weight = base_w.t()
    ui = torch.randint(0, U, (2 * N,), device=device)[::2]
    ii = torch.randint(0, M, (2 * N,), device=device)[::2]
    assert not any(t.is_contiguous() for t in (user, item, user_sim, item_sim, weight, ui, ii))
    grad_out = torch.randn(N, e, device=device)
    leaves = (base, base_w)
    out, grads = run_with_grads(lambda *_: op(user, user_sim, item, item_sim, weight, user_index=ui,
                                              item_index=ii, backend=backend), leaves, grad_out)  # fmt: skip
    expected, expected_grads = run_with_grads(
        lambda *_: holistic_attention_projected_reference(
            user.contiguous(), user_sim.contiguous(), item.contiguous(), item_sim.contiguous(), weight.contiguous(),
            None, ui.contiguous(), ii.contiguous(),
        ),
        leaves, grad_out,
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_many_pairs(backend):
    """More pairs than one launch's warps / programs cover (grid-stride loops), in bfloat16 and float32."""
    for dtype in (torch.bfloat16, torch.float32):
        assert_matches_reference(backend, "cuda", dtype, (512, 3000, 300_000, 64, 64))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_no_pairs(device, backend):
    tensors, ui, ii = make_inputs(2, 3, 0, 8, 5, dtype=torch.float32, device=device)
    out, grads = run_with_grads(call(backend, ui, ii), tensors, torch.zeros(0, 5, device=device))
    assert out.shape == (0, 5)
    assert all(not g.any() for g in grads)


def test_cpu_backward_is_deterministic_across_thread_counts():
    if op_module.backend_reason("cpu", "cpu"):
        pytest.skip(op_module.backend_reason("cpu", "cpu"))
    tensors, ui, ii = make_inputs(7, 40, 3000, 33, 21, dtype=torch.float32, device="cpu")
    grad_out = torch.randn(3000, 21)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(run_with_grads(call("cpu", ui, ii), tensors, grad_out))
    finally:
        torch.set_num_threads(threads)
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


@pytest.mark.skipif(os.environ.get("GRASP_NO_EXTENSION") == "1", reason="built without the extension")
def test_expected_backends_are_present(monkeypatch):
    """The parametrised cases only exist for runnable backends: make a missing one fail here."""
    monkeypatch.delenv("GRASP_BACKEND", raising=False)
    assert not op_module.backend_reason("cpu", "cpu"), op_module.backend_reason("cpu", "cpu")
    assert op_module._choose_backend(None, "cpu", torch.float32) == "cpu"
    assert not op_module.backend_reason("triton", "cpu") or not interpreting()
    if torch.cuda.is_available():
        assert op_module._choose_backend(None, "cuda", torch.bfloat16) == "triton"
        assert not op_module.backend_reason("cuda", "cuda"), op_module.backend_reason("cuda", "cuda")


def test_backend_for_another_device_is_explained():
    assert "the cuda backend runs cuda tensors only" in op_module.backend_reason("cuda", "cpu")
    args, kwargs = _good()
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        op(*args, **kwargs, backend="cuda")


# ---- bad input: a clear error naming the argument, never a crash inside a kernel ----


def _good():
    tensors, ui, ii = make_inputs(2, 3, 5, 4, 6, dtype=torch.float32, device="cpu", requires_grad=False)
    return tensors, {"user_index": ui, "item_index": ii}


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a, kw: a.__setitem__(3, torch.randn(3, 5)), ValueError, r"item_sim must have item's shape"),
        (lambda a, kw: a.__setitem__(0, torch.randn(2, 5)), ValueError, r"user must be \[U, d\] with d = 4"),
        (lambda a, kw: a.__setitem__(1, torch.randn(3, 4)), ValueError, r"user_sim must have user's shape"),
        (lambda a, kw: a.__setitem__(2, torch.randn(3, 4, 1)), ValueError, r"item must be \[M, d\]"),
        (lambda a, kw: a.__setitem__(4, torch.randn(6, 15)), ValueError, r"weight must be \[e, 4d\] = \[e, 16\]"),
        (lambda a, kw: a.__setitem__(5, torch.randn(5)), ValueError, r"bias must be \[e\] = \[6\]"),
        (lambda a, kw: a.__setitem__(4, torch.randn(6, 16, dtype=torch.float64)), TypeError,
         r"mixed dtypes: weight is torch.float64"),
        (lambda a, kw: a.__setitem__(0, torch.ones(2, 4, dtype=torch.int64)), TypeError,
         r"user must be float32, float16, bfloat16 or float64"),
        (lambda a, kw: kw.__setitem__("item_index", torch.tensor([0, 1, 2, 3, 0])), ValueError,
         r"item_index must lie in 0..2 \(item has 3 rows\), got values in 0..3"),
        (lambda a, kw: kw.__setitem__("user_index", torch.tensor([0, -1, 0, 0, 0])), ValueError,
         r"user_index must lie in 0..1"),
        (lambda a, kw: kw.__setitem__("user_index", torch.zeros(5, dtype=torch.int32)), TypeError,
         r"user_index must be a 1-d int64 tensor, got torch.int32"),
        (lambda a, kw: kw.__setitem__("item_index", torch.zeros(4, dtype=torch.int64)), ValueError,
         r"user_index and item_index must have one length, got 5 and 4"),
        (lambda a, kw: kw.__setitem__("backend", "tpu"), ValueError, r"unknown backend 'tpu'"),
        (lambda a, kw: a.__setitem__(2, [1.0]), TypeError, r"item must be a torch.Tensor, got list"),
    ],
    ids=["item_sim_shape", "user_width", "user_sim_shape", "item_rank", "weight_shape", "bias_shape", "mixed_dtype",
         "int_tensor", "index_range", "negative_index", "index_dtype", "index_lengths", "backend", "not_tensor"],
)
def test_bad_input_is_named(mutate, exc, pattern):
    args, kwargs = _good()
    mutate(args, kwargs)
    with pytest.raises(exc, match=pattern):
        op(*args, **kwargs)


def test_mixed_devices_are_rejected():
    args, kwargs = _good()
    kwargs["item_index"] = kwargs["item_index"].to("meta")
    with pytest.raises(ValueError, match=r"mixed devices: item_index is on meta"):
        op(*args, **kwargs)


def test_out_of_range_index_under_torch_compile_is_named():
    args, kwargs = _good()
    fn = torch.compile(lambda *a, **kw: op(*a, **kw), fullgraph=True)
    torch._dynamo.reset()
    assert fn(*args, **kwargs).shape == (5, 6)
    kwargs["item_index"] = torch.tensor([0, 1, 2, 3, 0])
    with pytest.raises(RuntimeError, match=r"item_index out of range 0..2"):
        fn(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_triton_kernels_compile_for_sm90():
    """Without a GPU the interpreter runs the kernels; this checks that the real compiler takes them too."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_triton_sm90.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import _triton_sm90

    lines = [line for line in result.stdout.splitlines() if " sm_90 " in line]
    assert len(lines) == 3 * len(list(_triton_sm90.cases(64))), result.stdout  # every kept config, three dtypes
    for name in ("_fwd_kernel", "_bwd_pairs_kernel", "_bwd_rows_kernel", "_bwd_values_kernel", "_bwd_combine_kernel"):
        assert any(line.startswith(name) for line in lines), name


def test_cpu_kernel_checks_indices_itself():
    """A direct call of the kernel op (no Python validation) with a bad index is an error, not a wild write."""
    if op_module.backend_reason("cpu", "cpu"):
        pytest.skip(op_module.backend_reason("cpu", "cpu"))
    (u, us, i, is_, w), ui, ii = make_inputs(2, 3, 4, 4, 5, dtype=torch.float32, device="cpu", bias=False,
                                             requires_grad=False)  # fmt: skip
    values = projected_values(i, is_, w)
    cases = [(torch.tensor([0, 1, 2, 0]), ii, r"user_index\[2\] = 2 is outside 0..1"),
             (ui, torch.tensor([0, -1, 0, 0]), r"item_index\[1\] = -1 is outside 0..2")]  # fmt: skip
    for bad_ui, bad_ii, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.grasp.holistic_attention_projected_forward(u, us, i, is_, values, bad_ui, bad_ii)
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.grasp.holistic_attention_projected_backward(
                torch.zeros(4, 5), u, us, i, is_, values, bad_ui, bad_ii
            )


def test_triton_backward_is_not_tuned_and_resets_nothing():
    """The backward's kernels only store (no accumulator to zero between benchmark launches), and their configs
    are a function of the widths rather than of timings, which could differ between processes and change the
    order of the sums. The forward is tuned, and resets nothing either."""
    from triton.runtime.autotuner import Autotuner

    kernels = _triton_kernels()
    assert isinstance(kernels._fwd_kernel, Autotuner) and not kernels._fwd_kernel.reset_to_zero
    backward = (kernels._bwd_pairs_kernel, kernels._bwd_rows_kernel, kernels._bwd_values_kernel,
                kernels._bwd_combine_kernel)  # fmt: skip
    assert not any(isinstance(kernel, Autotuner) for kernel in backward)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_kernel_ops_take_no_pairs(device, backend):
    """The kernel ops themselves (the public function returns early for N = 0): empty output, zero gradients."""
    (u, us, i, is_, w), ui, ii = make_inputs(2, 3, 0, 8, 5, dtype=torch.float32, device=device, bias=False,
                                             requires_grad=False)  # fmt: skip
    values = projected_values(i, is_, w)
    forward = _op_for(backend)
    ops = torch.ops.grasp
    backward = (ops.holistic_attention_projected_backward_triton if backend == "triton"
                else ops.holistic_attention_projected_backward)
    assert forward(u, us, i, is_, values, ui, ii).shape == (0, 5)
    grads = backward(torch.zeros(0, 5, device=device), u, us, i, is_, values, ui, ii)
    assert [g.shape for g in grads] == [t.shape for t in (u, us, i, is_, values)] and not any(g.any() for g in grads)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_deterministic_mode_keeps_the_kernels(device, backend):
    """No backend's backward uses atomics: under torch.use_deterministic_algorithms(True) the kernels run (no
    error, no warning) and has_kernel keeps the GRASP enhancer on the fused op on every device."""
    tensors, ui, ii = make_inputs(2, 3, 7, 8, 5, dtype=torch.float32, device=device)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert op_module.has_kernel(None, device) and op_module.has_kernel(backend, device)
        if not op_module.backend_reason("triton", "cuda"):
            assert op_module.has_kernel(None, "cuda") and op_module.has_kernel("triton", "cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(backend, ui, ii)(*tensors).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)


def _backward(backend, tensors, ui, ii, grad_out):
    return run_with_grads(call(backend, ui, ii), tensors, grad_out)[1]


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bitwise_deterministic(device, backend, dtype):
    """Two backward runs give bitwise equal gradients, with shared rows, a skewed item and a skewed user."""
    for indexing in ("random", "one_item", "one_user"):
        tensors, ui, ii = make_inputs(6, 11, 500, 17, 9, dtype=dtype, device=device, indexing=indexing)
        grad_out = torch.randn(500, 9, dtype=dtype, device=device)
        first, second = (_backward(backend, tensors, ui, ii, grad_out) for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), indexing


@pytest.mark.skipif(not interpreting(), reason="reorders the programs of Triton's interpreter")
def test_triton_backward_does_not_depend_on_the_order_of_its_programs(monkeypatch):
    """A GPU runs a kernel's programs in any order. Under the interpreter, which runs them one after the other,
    the gradients must not change when the programs run in reverse order: an order-dependent accumulation
    (atomic adds of floats) would round differently."""
    import triton.runtime.interpreter as interpreter

    _triton_kernels()
    tensors, ui, ii = make_inputs(6, 11, 1000, 17, 9, dtype=torch.float32, device="cpu", indexing="one_item")
    grad_out = torch.randn(1000, 9)
    in_order = _backward("triton", tensors, ui, ii, grad_out)
    builder = interpreter.interpreter_builder
    set_grid_idx = builder.set_grid_idx

    def reversed_grid_idx(x, y, z):
        nx, ny, nz = builder.grid_dim
        set_grid_idx(nx - 1 - x, ny - 1 - y, nz - 1 - z)

    monkeypatch.setattr(builder, "set_grid_idx", reversed_grid_idx)
    in_reverse = _backward("triton", tensors, ui, ii, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(in_order, in_reverse, strict=True))


def test_forward_autotuner_benchmarks_once_per_width(monkeypatch):
    """The forward's tuning key holds the widths only: a sweep over the number of pairs benchmarks the configs
    once per (d, e), not once per N (the benchmark is replaced by a counter)."""
    import triton

    kernels = _triton_kernels()
    tuner = triton.autotune(configs=kernels._FWD_CONFIGS, **kernels._FWD_TUNING)(kernels._fwd_kernel.fn)
    benchmarked = []

    def bench(*args, config, **kwargs):
        benchmarked.append((kwargs["D"], config))
        return 1.0 / config.kwargs["BLOCK_N"]  # the largest tile wins: the fewest programs to interpret

    monkeypatch.setattr(tuner, "_bench", bench)
    monkeypatch.setattr(kernels, "_fwd_kernel", tuner)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for d in (16, 40):
        for N in (1, 7, 100, 1000, 4099):
            (u, us, i, is_, w), ui, ii = make_inputs(5, 9, N, d, d, dtype=torch.float32, device=device, bias=False,
                                                     requires_grad=False)  # fmt: skip
            values = projected_values(i, is_, w)
            out = kernels.holistic_attention_projected_forward(u, us, i, is_, values, ui, ii)
            expected = holistic_attention_projected_reference(u, us, i, is_, w, None, ui, ii)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    kept = [len(kernels._prune_fwd_configs(kernels._FWD_CONFIGS, {}, D=d, E=d, BLOCK_D=b, BLOCK_E=b))
            for d, b in ((16, 16), (40, 64))]
    assert min(kept) > 1  # the tuner has a choice to make
    assert [d for d, _ in benchmarked] == [16] * kept[0] + [40] * kept[1]


# ---- autocast: the float inputs are cast to the autocast dtype, as F.linear casts them ----


def _autocast_devices():
    return [(dev, b) for dev, b in BACKEND_CASES if torch.amp.is_autocast_available(dev)]


@pytest.mark.parametrize("device,backend", _autocast_devices())
def test_autocast_casts_the_inputs(device, backend):
    """Under autocast, float32 inputs run as bfloat16 inputs would outside it (same values, bitwise), the
    output is bfloat16, and the gradients reach the float32 leaves in float32."""
    tensors, ui, ii = make_inputs(3, 7, 40, 17, 9, dtype=torch.float32, device=device)
    grad_out = torch.randn(40, 9, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = call(backend, ui, ii)(*tensors)
    grads = torch.autograd.grad(out, tensors, grad_out)  # as a training step runs it: after the autocast region
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    casts = [t.detach().bfloat16().requires_grad_() for t in tensors]
    expected, expected_grads = run_with_grads(call(backend, ui, ii), casts, grad_out)
    assert torch.equal(out.detach(), expected)
    for g, ge in zip(grads, expected_grads, strict=True):
        assert torch.equal(g, ge.float())


@pytest.mark.parametrize("device,backend", _autocast_devices())
def test_autocast_takes_mixed_dtypes(device, backend):
    """Mixed float32 / bfloat16 inputs: an error outside autocast, cast to the autocast dtype inside it."""
    tensors, ui, ii = make_inputs(3, 7, 40, 17, 9, dtype=torch.float32, device=device, requires_grad=False)
    tensors[0], tensors[2] = tensors[0].bfloat16(), tensors[2].bfloat16()  # user and item, as bf16 adapters give
    with pytest.raises(TypeError, match="mixed dtypes"):
        call(backend, ui, ii)(*tensors)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = call(backend, ui, ii)(*tensors)
    assert torch.equal(out, call(backend, ui, ii)(*(t.bfloat16() for t in tensors)))


@pytest.mark.parametrize("device,backend", [(dev, b) for dev, b in _autocast_devices() if b != "triton"])
def test_autocast_leaves_float64(device, backend):
    """As F.linear under autocast, float64 inputs are not cast."""
    tensors, ui, ii = make_inputs(3, 7, 40, 17, 9, dtype=torch.float64, device=device, requires_grad=False)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = call(backend, ui, ii)(*tensors)
    assert out.dtype == torch.float64 and torch.equal(out, call(backend, ui, ii)(*tensors))


def test_triton_launches_run_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: each launcher makes the inputs' device current first."""
    pytest.importorskip("triton")
    from torch._subclasses.fake_tensor import FakeTensorMode

    import grasp_kernels.holistic_attention_projected as kernels

    names = [name for name in dir(kernels) if name.endswith("_kernel") and hasattr(getattr(kernels, name), "run")]
    launches = record_launches(monkeypatch, kernels, names)
    with FakeTensorMode():
        user, user_sim = (torch.empty(3, 8, device="cuda:1") for _ in range(2))
        item, item_sim = (torch.empty(4, 8, device="cuda:1") for _ in range(2))
        values = torch.empty(4, 3, 6, device="cuda:1")
        ui, ii = (torch.zeros(7, dtype=torch.int64, device="cuda:1") for _ in range(2))
        kernels.holistic_attention_projected_forward(user, user_sim, item, item_sim, values, ui, ii)
        kernels.holistic_attention_projected_backward(
            torch.empty(7, 6, device="cuda:1"), user, user_sim, item, item_sim, values, ui, ii
        )
    assert {launch.name for launch in launches} == set(names), launches
    assert all(launch.current == "cuda:1" and launch.devices == {"cuda:1"} for launch in launches), launches
    assert CurrentDevice.current == "cuda:0"
