"""grasp.ops.holistic_attention on every backend that can run here, against the plain-PyTorch reference."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from _kernel_launches import CurrentDevice, record_launches
from _support import ALL_DTYPES, run_with_grads
from _tolerance import check_flash_style
from conftest import DEVICES

import grasp
from grasp.ops._backends import interpreting
from grasp.ops._holistic_attention_reference import holistic_attention_reference

#: The dispatch module (the package attribute of the same name is the public function).
op_module = importlib.import_module("grasp.ops.holistic_attention")

LOW = (torch.float16, torch.bfloat16)


def backend_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """Dtypes each backend supports (the Triton kernels have no float64; bfloat16 is emulated by the
    interpreter of triton 3.9 on CPU tensors)."""
    if backend == "triton":
        return (torch.float32, torch.float16, torch.bfloat16)
    return ALL_DTYPES


def runnable(device: str) -> list[str]:
    return [b for b in ("reference", "cpu", "cuda", "triton") if not op_module.backend_reason(b, device)]


BACKEND_CASES = [(dev, b) for dev in DEVICES for b in runnable(dev)]
KERNEL_CASES = [(dev, b) for dev, b in BACKEND_CASES if b != "reference"]
# (B, L, d): single row/position, odd lengths and widths, and the wide d's of real models.
SHAPES = [(1, 1, 1), (1, 37, 17), (3, 37, 17), (2, 5, 128), (2, 3, 256), (4, 1, 64)]
MASKS = ["none", "random", "full_row"]


def make_inputs(B, L, d, *, per_position, mask_kind, dtype, device, requires_grad=True):
    user_shape = (B, L, d) if per_position else (B, d)
    tensors = [
        torch.randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)
        for shape in (user_shape, user_shape, (B, L, d), (B, L, d))
    ]
    mask = None
    if mask_kind != "none":
        mask = torch.rand(B, L, device=device) > 0.3
        if mask_kind == "full_row":
            mask[-1] = False
    return tensors, mask


def reduction_bound(tensors, mask, activation, grad_out) -> tuple[int, float]:
    """(terms, magnitude) of the rounding floor (tests/_tolerance.py) for one call of the op.

    The longest chain of sums: <u, i> over d, a gate's gradient over 2d (the global gate reads g3·i + g4·ī),
    the softmax's row statistics over L and a broadcast user's gradient over L, plus a few scalar steps. The
    magnitude: the largest output or gradient, and for a broadcast user the sum over L of the absolute
    per-position terms of its gradient (the float64 reference with the user repeated at every position).
    """
    B, L, d = tensors[2].shape
    rows = [t.detach().double() for t in tensors]
    broadcast = rows[0].dim() == 2
    if broadcast:
        rows[0], rows[1] = (r.unsqueeze(1).expand(B, L, d).contiguous() for r in rows[:2])
    rows = [r.requires_grad_() for r in rows]
    out, grads = run_with_grads(lambda *t: holistic_attention_reference(*t, mask, activation), rows, grad_out.double())
    sums = [g.abs().sum(1) if broadcast and n < 2 else g.abs() for n, g in enumerate(grads)]
    magnitude = max(t.max().item() for t in [out.abs(), *sums])
    return 3 * d + 2 * L + 8, magnitude


def assert_matches_reference(backend, device, dtype, B, L, d, per_position, mask_kind, activation):
    tensors, mask = make_inputs(B, L, d, per_position=per_position, mask_kind=mask_kind, dtype=dtype, device=device)
    grad_out = torch.randn(B, L, 4 * d, dtype=dtype, device=device)
    out, grads = run_with_grads(
        lambda *t: grasp.ops.holistic_attention(*t, mask=mask, activation=activation, backend=backend),
        tensors,
        grad_out,
    )
    assert out.dtype == dtype and out.shape == (B, L, 4 * d)
    assert [g.shape for g in grads] == [t.shape for t in tensors]
    truth_in = [t.detach().double().requires_grad_() for t in tensors]
    truth, truth_grads = run_with_grads(
        lambda *t: holistic_attention_reference(*t, mask, activation), truth_in, grad_out.double()
    )
    lowp, lowp_grads = run_with_grads(
        lambda *t: holistic_attention_reference(*t, mask, activation, upcast=False), tensors, grad_out
    )
    bound = dict(zip(("terms", "magnitude"), reduction_bound(tensors, mask, activation, grad_out), strict=True))
    check_flash_style(out, lowp, truth, "output", **bound)
    for name, g, gl, gt in zip(("user", "user_sim", "item", "item_sim"), grads, lowp_grads, truth_grads, strict=True):
        check_flash_style(g, gl, gt, f"grad {name}", **bound)
    if mask is not None:
        dead = ~mask
        assert not out[dead].any(), "masked positions must give zero output"
        per_position_grads = grads if per_position else grads[2:]
        assert not any(g[dead].any() for g in per_position_grads), "masked positions must get zero gradient"
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("per_position", [False, True], ids=["user_bd", "user_bld"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(device, backend, shape, per_position, mask_kind, activation):
    assert_matches_reference(backend, device, torch.float32, *shape, per_position, mask_kind, activation)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("per_position", [False, True], ids=["user_bd", "user_bld"])
def test_matches_reference_every_dtype(device, backend, dtype, per_position, activation):
    if dtype not in backend_dtypes(backend):
        pytest.skip(f"{backend} on {device} does not support {dtype}")
    assert_matches_reference(backend, device, dtype, 3, 37, 17, per_position, "full_row", activation)
    assert_matches_reference(backend, device, dtype, 2, 9, 64, per_position, "random", activation)


@pytest.mark.parametrize("device,backend", [(dev, b) for dev, b in BACKEND_CASES if b != "triton"])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("per_position", [False, True], ids=["user_bd", "user_bld"])
def test_gradcheck_float64(device, backend, per_position, activation):
    tensors, mask = make_inputs(
        2, 6, 5, per_position=per_position, mask_kind="full_row", dtype=torch.float64, device=device
    )
    mask[0, :2] = True  # at least one real position in the first row
    fn = lambda *t: grasp.ops.holistic_attention(*t, mask=mask, activation=activation, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors)


def _op_for(backend: str):
    if backend == "triton":
        import grasp_kernels.holistic_attention  # noqa: F401

        return torch.ops.grasp.holistic_attention_forward_triton.default
    return torch.ops.grasp.holistic_attention_forward.default


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("per_position", [False, True], ids=["user_bd", "user_bld"])
@pytest.mark.parametrize("mask_kind", ["none", "full_row"])
def test_opcheck(device, backend, per_position, activation, mask_kind):
    tensors, mask = make_inputs(3, 7, 17, per_position=per_position, mask_kind=mask_kind, dtype=torch.float32,
                                device=device)
    torch.library.opcheck(_op_for(backend), (*tensors, mask, activation == "softmax"))


class TinyModel(torch.nn.Module):
    """A module that calls the op between ordinary layers, as a model would."""

    def __init__(self, d: int, backend: str) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.out = torch.nn.Linear(4 * d, 1)
        self.backend = backend

    def forward(self, user, user_sim, item, item_sim, mask):
        h = grasp.ops.holistic_attention(
            self.proj(user), user_sim, self.proj(item), item_sim, mask=mask, backend=self.backend
        )
        return self.out(h).squeeze(-1)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_torch_compile_fullgraph(device, backend):
    d = 16
    model = TinyModel(d, backend).to(device)
    (u, us, i, is_), mask = make_inputs(2, 9, d, per_position=False, mask_kind="random", dtype=torch.float32,
                                        device=device, requires_grad=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(u, us, i, is_, mask)
    eager_grads = torch.autograd.grad(eager_out.sum(), model.parameters())
    out = compiled(u, us, i, is_, mask)
    grads = torch.autograd.grad(out.sum(), model.parameters())
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_non_contiguous_views(device, backend):
    B, L, d = 3, 11, 17
    base_items = torch.randn(B, d, L, 2, device=device, requires_grad=True)
    item, item_sim = base_items[..., 0].transpose(1, 2), base_items[..., 1].transpose(1, 2)  # strided views
    base_user = torch.randn(d, B, device=device, requires_grad=True)
    user = base_user.t()
    base_user_sim = torch.randn(B, 2 * d, device=device, requires_grad=True)
    user_sim = base_user_sim[:, ::2]
    mask = (torch.rand(L, B, device=device) > 0.3).t()
    assert not any(t.is_contiguous() for t in (item, item_sim, user, user_sim, mask))
    grad_out = torch.randn(B, L, 4 * d, device=device)
    leaves = (base_items, base_user, base_user_sim)
    out, grads = run_with_grads(
        lambda *_: grasp.ops.holistic_attention(user, user_sim, item, item_sim, mask=mask, backend=backend),
        leaves, grad_out,
    )
    expected, expected_grads = run_with_grads(
        lambda *_: holistic_attention_reference(
            user.contiguous(), user_sim.contiguous(), item.contiguous(), item_sim.contiguous(), mask.contiguous()
        ),
        leaves, grad_out,
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for g, ge in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("per_position", [False, True], ids=["user_bd", "user_bld"])
def test_padding_is_never_read(device, backend, activation, per_position):
    """Padded positions may hold garbage (torch.empty, NaN): output and gradients stay clean and equal."""
    (u, us, i, is_), mask = make_inputs(3, 9, 16, per_position=per_position, mask_kind="full_row",
                                        dtype=torch.float32, device=device, requires_grad=False)
    poisoned = [t.clone() for t in (u, us, i, is_)]
    for t in poisoned[2:] + (poisoned[:2] if per_position else []):
        t[~mask] = float("nan")
    grad_out = torch.randn(3, 9, 64, device=device)
    results = []
    for tensors in ((u, us, i, is_), poisoned):
        leaves = [t.clone().requires_grad_() for t in tensors]
        results.append(run_with_grads(
            lambda *t: grasp.ops.holistic_attention(*t, mask=mask, activation=activation, backend=backend),
            leaves, grad_out,
        ))
    (clean_out, clean_grads), (out, grads) = results
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out, clean_out)
    for g, gc in zip(grads, clean_grads, strict=True):
        torch.testing.assert_close(g, gc)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_unaligned_storage_and_many_positions(backend):
    """d a multiple of the vector width but storage not 16-byte aligned (scalar path), and a grid
    larger than one launch covers (grid-stride loops)."""
    B, L, d = 5, 7, 64
    flat = torch.randn(4 * B * L * d + 1, device="cuda", dtype=torch.bfloat16)
    item, item_sim = flat[1 : 1 + B * L * d].view(B, L, d), flat[1 + B * L * d : 1 + 2 * B * L * d].view(B, L, d)
    user = flat[1 + 2 * B * L * d : 1 + 2 * B * L * d + B * d].view(B, d)
    user_sim = flat[1 + 3 * B * L * d : 1 + 3 * B * L * d + B * d].view(B, d)
    out = grasp.ops.holistic_attention(user, user_sim, item, item_sim, backend=backend)
    expected = holistic_attention_reference(user, user_sim, item, item_sim)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert_matches_reference(backend, "cuda", torch.bfloat16, 4096, 100, 64, False, "random", "sigmoid")


# A broadcast user's gradient is summed over a row inside the backward kernels: one position, a long row,
# and odd and wide rows (on CUDA, d = 600 in 16-bit and d = 1030 unvectorised take several column passes).
USER_SUM_SHAPES = [(3, 1, 50), (2, 4096, 16), (2, 37, 600), (2, 9, 1030)]


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", USER_SUM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_broadcast_user_gradient_sum(device, backend, dtype, activation, shape):
    if dtype not in backend_dtypes(backend):
        pytest.skip(f"{backend} on {device} does not support {dtype}")
    if backend == "triton" and device == "cpu" and shape[1] > 1000:
        pytest.skip("too slow for the Triton interpreter (its row loop is covered by the shorter rows)")
    assert_matches_reference(backend, device, dtype, *shape, False, "random", activation)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_gradients_are_deterministic(device, backend, activation):
    """The same call twice gives the same bits (no atomics; every sum in a fixed order)."""
    tensors, mask = make_inputs(3, 300, 64, per_position=False, mask_kind="random", dtype=torch.bfloat16,
                                device=device)
    grad_out = torch.randn(3, 300, 256, dtype=torch.bfloat16, device=device)
    runs = [
        run_with_grads(
            lambda *t: grasp.ops.holistic_attention(*t, mask=mask, activation=activation, backend=backend),
            tensors, grad_out,
        )
        for _ in range(2)
    ]
    (out, grads), (out2, grads2) = runs
    assert torch.equal(out, out2)
    assert all(torch.equal(g, g2) for g, g2 in zip(grads, grads2, strict=True))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_empty_batch(device, backend):
    (u, us, i, is_), _ = make_inputs(0, 4, 8, per_position=False, mask_kind="none", dtype=torch.float32,
                                     device=device)
    out = grasp.ops.holistic_attention(u, us, i, is_, backend=backend)
    assert out.shape == (0, 4, 32)


@pytest.mark.skipif(os.environ.get("GRASP_NO_EXTENSION") == "1", reason="built without the extension")
def test_default_backend_is_the_compiled_kernel(monkeypatch):
    monkeypatch.delenv("GRASP_BACKEND", raising=False)
    assert op_module._choose_backend(None, "cpu", torch.float32) == "cpu"
    if torch.cuda.is_available():
        assert op_module._choose_backend(None, "cuda", torch.bfloat16) == "cuda"


def test_grasp_backend_env_forces_and_explains(monkeypatch):
    monkeypatch.setenv("GRASP_BACKEND", "reference")
    assert op_module._choose_backend(None, "cpu", torch.float32) == "reference"
    monkeypatch.setenv("GRASP_BACKEND", "cuda")
    assert op_module._choose_backend("reference", "cpu", torch.float32) == "reference"  # an explicit argument wins
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
        op_module._choose_backend(None, "cpu", torch.float32)
    monkeypatch.setenv("GRASP_BACKEND", "tpu")
    with pytest.raises(ValueError, match="unknown GRASP_BACKEND 'tpu'"):
        op_module._choose_backend(None, "cpu", torch.float32)


@pytest.mark.skipif(os.environ.get("GRASP_NO_EXTENSION") == "1", reason="built without the extension")
def test_expected_backends_are_present():
    """The parametrised cases above only exist for runnable backends: make a missing one fail here."""
    assert not op_module.backend_reason("cpu", "cpu"), op_module.backend_reason("cpu", "cpu")
    assert not op_module.backend_reason("triton", "cpu") or not interpreting()
    if torch.cuda.is_available():
        for backend in ("cuda", "triton"):
            assert not op_module.backend_reason(backend, "cuda"), op_module.backend_reason(backend, "cuda")


def test_missing_extension_is_named(monkeypatch):
    from grasp import _extension

    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: no _C")
    monkeypatch.setattr(_extension, "LOADED", False)
    assert "grasp._C is not available" in op_module.backend_reason("cpu", "cpu")
    assert "no _C" in op_module.backend_reason("cuda", "cuda")


# ---- bad input: a clear error naming the argument, never a crash inside a kernel ----

def _good(B=2, L=3, d=4, dtype=torch.float32):
    return [torch.randn(B, d, dtype=dtype), torch.randn(B, d, dtype=dtype),
            torch.randn(B, L, d, dtype=dtype), torch.randn(B, L, d, dtype=dtype)]


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a, kw: a.__setitem__(2, torch.randn(2, 3, 5)), ValueError, r"item_sim must have item's shape"),
        (lambda a, kw: a.__setitem__(0, torch.randn(2, 5)), ValueError, r"user must be \[B, d\]"),
        (lambda a, kw: a.__setitem__(1, torch.randn(2, 3, 4)), ValueError, r"user_sim must have user's shape"),
        (lambda a, kw: a.__setitem__(3, torch.randn(2, 3, 4, dtype=torch.float64)), TypeError,
         r"mixed dtypes: item_sim is torch.float64"),
        (lambda a, kw: a.__setitem__(0, torch.ones(2, 4, dtype=torch.int64)), TypeError,
         r"user must be float32, float16, bfloat16 or float64, got torch.int64"),
        (lambda a, kw: a.__setitem__(2, torch.randn(2, 4)), ValueError, r"item must be \[B, L, d\]"),
        (lambda a, kw: kw.__setitem__("mask", torch.ones(2, 4, dtype=torch.bool)), ValueError,
         r"mask must be \[B, L\] = \(2, 3\), got \(2, 4\)"),
        (lambda a, kw: kw.__setitem__("mask", torch.ones(2, 3)), TypeError, r"mask must have dtype torch.bool"),
        (lambda a, kw: kw.__setitem__("activation", "relu"), ValueError, r"activation must be 'sigmoid' or 'softmax'"),
        (lambda a, kw: kw.__setitem__("backend", "tpu"), ValueError, r"unknown backend 'tpu'"),
        (lambda a, kw: a.__setitem__(0, [1.0, 2.0]), TypeError, r"user must be a torch.Tensor, got list"),
    ],
    ids=["item_shape", "user_shape", "user_sim_shape", "mixed_dtype", "int_tensor", "item_rank", "mask_shape",
         "mask_dtype", "activation", "backend", "not_tensor"],
)
def test_bad_input_is_named(mutate, exc, pattern):
    args, kwargs = _good(), {}
    mutate(args, kwargs)
    with pytest.raises(exc, match=pattern):
        grasp.ops.holistic_attention(*args, **kwargs)


def test_zero_width_is_rejected():
    with pytest.raises(ValueError, match=r"feature size d .* must be >= 1, got 0"):
        grasp.ops.holistic_attention(*_good(d=0))


def test_mixed_devices_are_rejected():
    args = _good()
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match=r"mixed devices: item_sim is on meta"):
        grasp.ops.holistic_attention(*args)
    with pytest.raises(ValueError, match=r"mask is on meta"):
        grasp.ops.holistic_attention(*_good(), mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))


def test_fp64_on_triton_is_a_clear_error_and_never_chosen():
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available .* not torch.float64"):
        grasp.ops.holistic_attention(*_good(dtype=torch.float64), backend="triton")
    assert op_module._choose_backend(None, "cuda", torch.float64) != "triton"


# ---- autocast: the inputs are cast to the autocast dtype, as F.linear does ----

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("autocast_dtype", LOW, ids=str)
def test_autocast_runs_in_the_autocast_dtype(device, backend, autocast_dtype):
    (u, us, i, is_), mask = make_inputs(2, 7, 16, per_position=False, mask_kind="random", dtype=torch.float32,
                                        device=device)
    u_low = u.detach().to(autocast_dtype).requires_grad_()  # an input already in the autocast dtype
    grad_out = torch.randn(2, 7, 64, dtype=autocast_dtype, device=device)
    with torch.autocast(device, dtype=autocast_dtype):
        out, grads = run_with_grads(
            lambda *t: grasp.ops.holistic_attention(*t, mask=mask, backend=backend), (u_low, us, i, is_), grad_out
        )
    cast = [t.detach().to(autocast_dtype).requires_grad_() for t in (u, us, i, is_)]
    expected, expected_grads = run_with_grads(
        lambda *t: grasp.ops.holistic_attention(*t, mask=mask, backend=backend), cast, grad_out
    )
    assert out.dtype == autocast_dtype
    assert torch.equal(out, expected)
    assert [g.dtype for g in grads] == [autocast_dtype] + 3 * [torch.float32]  # each leaf's own dtype
    for g, ge in zip(grads, expected_grads, strict=True):
        assert torch.equal(g, ge.to(g.dtype))


@pytest.mark.parametrize("device,backend", [(dev, b) for dev, b in BACKEND_CASES if b != "triton"])
def test_autocast_leaves_float64_alone(device, backend):
    tensors, _ = make_inputs(2, 5, 8, per_position=True, mask_kind="none", dtype=torch.float64, device=device,
                             requires_grad=False)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = grasp.ops.holistic_attention(*tensors, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, grasp.ops.holistic_attention(*tensors, backend=backend), rtol=0, atol=0)


def test_mixed_dtypes_outside_autocast_are_an_error():
    args = _good()
    args[0] = args[0].to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"mixed dtypes: user is torch.bfloat16 but item is torch.float32"):
        grasp.ops.holistic_attention(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False), pytest.raises(TypeError, match="mixed dtypes"):
        grasp.ops.holistic_attention(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grasp.ops.holistic_attention(*args).dtype == torch.bfloat16


# ---- the Triton launchers: the inputs' device, and autotuning keyed on buckets ----

def _triton_kernels():
    if op_module.backend_reason("triton", "cpu") and op_module.backend_reason("triton", "cuda"):
        pytest.skip("the Triton backend cannot run here")
    import grasp_kernels.holistic_attention as kernels

    return kernels


def test_triton_launches_run_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: each launcher makes the inputs' device current first."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels = _triton_kernels()
    launches = record_launches(monkeypatch, kernels, ["_hae_fwd_kernel", "_hae_bwd_kernel"])
    with FakeTensorMode():
        user, user_sim = (torch.empty(3, 8, device="cuda:1") for _ in range(2))
        item, item_sim = (torch.empty(3, 5, 8, device="cuda:1") for _ in range(2))
        out = kernels.holistic_attention_forward(user, user_sim, item, item_sim, None, False)
        kernels.holistic_attention_backward(torch.empty_like(out), user, user_sim, item, item_sim, None, True)
    assert launches == [
        ("_hae_fwd_kernel", (3,), "cuda:1", {"cuda:1"}), ("_hae_bwd_kernel", (3,), "cuda:1", {"cuda:1"})
    ]
    assert CurrentDevice.current == "cuda:0"


def test_autotuning_benchmarks_once_per_length_bucket(monkeypatch):
    """New batch sizes and sequence lengths within one power-of-two bucket of L reuse the benchmarked config."""
    import triton

    kernels = _triton_kernels()
    configs = [triton.Config({"BLOCK_L": block_l}, num_warps=4, num_stages=1) for block_l in (1, 4, 16)]
    benchmarked = {"fwd": [], "bwd": []}
    tuners = {}
    for name in ("fwd", "bwd"):
        tuner = kernels.autotuner(configs, backward=name == "bwd")(getattr(kernels, f"_hae_{name}_kernel").fn)
        # The benchmark is replaced by a count (the interpreter has no timer); the largest tile "wins".
        monkeypatch.setattr(tuner, "_bench", lambda *a, config, _n=name, **k: benchmarked[_n].append(config)
                            or [1.0 / config.kwargs["BLOCK_L"]] * 3)
        monkeypatch.setattr(kernels, f"_hae_{name}_kernel", tuner)
        tuners[name] = tuner

    def sweep(sizes):
        for B, L in sizes:
            (u, us, i, is_), mask = make_inputs(B, L, 8, per_position=False, mask_kind="random", dtype=torch.float32,
                                                device="cuda" if op_module.backend_reason("triton", "cpu") else "cpu")
            out = grasp.ops.holistic_attention(u, us, i, is_, mask=mask, backend="triton")
            torch.autograd.grad(out.sum(), (u, us, i, is_))
        return {name: len(calls) for name, calls in benchmarked.items()}

    assert sweep([(1, 33), (5, 40), (2, 64), (7, 50)]) == {"fwd": 3, "bwd": 3}  # one bucket: benchmarked once
    assert sweep([(3, 65), (4, 100)]) == {"fwd": 6, "bwd": 6}  # a new bucket: once more
    assert sweep([(9, 48), (2, 128)]) == {"fwd": 6, "bwd": 6}  # both buckets seen
    assert all(len(tuner.cache) == 2 for tuner in tuners.values())


def test_autotuning_prunes_long_and_spilling_tiles():
    import triton

    kernels = _triton_kernels()
    configs = [triton.Config({"BLOCK_L": block_l}, num_warps=w, num_stages=1) for block_l in (1, 4, 16, 64)
               for w in (4, 8)]
    every = [(1, 4), (1, 8), (4, 4), (4, 8), (16, 4), (16, 8), (64, 8)]

    def kept(backward, block_d, L):
        prune = kernels._prune_backward_configs if backward else kernels._prune_forward_configs
        pruned = prune(configs, {}, BLOCK_D=block_d, L_BUCKET=kernels.l_bucket(L))
        return sorted((c.kwargs["BLOCK_L"], c.num_warps) for c in pruned)

    assert kept(False, 32, 1) == [(1, 4), (1, 8)]  # no tile longer than the row's bucket
    assert kept(False, 32, 3) == [(1, 4), (1, 8), (4, 4), (4, 8)]
    assert kept(False, 32, 200) == sorted([*every, (64, 4)])  # 64 x 32 on 4 warps: 16 per thread
    assert kept(True, 32, 200) == every  # the backward keeps at most 8 per thread
    assert kept(True, 128, 200) == [(1, 4), (1, 8), (4, 4), (4, 8), (16, 8)]
    assert kept(False, 1024, 200) == [(1, 4), (1, 8), (4, 8)]  # wide rows: short tiles only
    assert kept(True, 4096, 200) == [(1, 8)]  # none fits: the smallest tile per thread
    assert kept(False, 64, 200) == [c for c in every if c != (16, 4)]  # a tile that ptxas spills
    assert kept(False, 256, 200) == [(1, 4), (1, 8), (4, 4)]
    assert kernels.l_bucket(200) == 256 and kernels.l_bucket(1) == 1
    assert kernels.l_bucket(5000) == kernels.l_bucket(kernels.L_BUCKET_MAX) == kernels.L_BUCKET_MAX


@pytest.mark.skipif(not interpreting(), reason="a GPU's conversions are the hardware's")
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_triton_low_precision_results_round_to_nearest(dtype):
    """The kernels compute in float32 and round each result once, to nearest even as a GPU does, also under
    the interpreter (whose own float32 -> bfloat16 conversion truncates): on inputs that are exact in
    ``dtype``, the ``dtype`` results are the float32 results rounded by torch."""
    kernels = _triton_kernels()
    tensors, mask = make_inputs(3, 37, 24, per_position=False, mask_kind="random", dtype=dtype, device="cpu",
                                requires_grad=False)
    tensors[2][0, 0] = torch.tensor([1 + 2**-8, -(1 + 2**-8)] * 12)  # ties in bfloat16
    grad_out = torch.randn(3, 37, 96, dtype=dtype)

    def results(grad_out, *inputs, softmax):
        return [kernels.holistic_attention_forward(*inputs, mask, softmax),
                *kernels.holistic_attention_backward(grad_out, *inputs, mask, softmax)]

    for softmax in (False, True):
        low = results(grad_out, *tensors, softmax=softmax)
        high = results(grad_out.float(), *(t.float() for t in tensors), softmax=softmax)
        for result, reference in zip(low, high, strict=True):
            assert torch.equal(result, reference.to(dtype))


def test_default_cuda_order_moves_the_fewest_bytes():
    moved = {b: op_module.kernel_bytes(b, **op_module.GPU_TARGET) for b in ("cuda", "triton")}
    assert moved["cuda"] == moved["triton"] == 315_097_088 + 420_478_976
    assert op_module.AUTO_ORDER["cuda"] == ("cuda", "triton", "reference")


def test_interpreter_flag_is_on_without_a_gpu():
    # Guards the conftest switch: without it the triton cases above would silently not exist.
    if not torch.cuda.is_available():
        assert interpreting()
