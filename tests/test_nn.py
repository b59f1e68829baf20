"""grasp.nn.HolisticAttention: the enhancer block of docs/design.md section 6."""

from __future__ import annotations

import pytest
import torch

from grasp.nn import Adapter, Dropout, HolisticAttention


@pytest.mark.parametrize("per_position", [False, True])
def test_shapes_and_gradients_reach_every_parameter(per_position):
    hae = HolisticAttention(user_dim=24, item_dim=40, d=16, dropout=0.1)
    B, L = 3, 7
    user_shape = (B, L, 24) if per_position else (B, 24)
    mask = torch.rand(B, L) > 0.2
    out = hae(torch.randn(user_shape), torch.randn(user_shape), torch.randn(B, L, 40), torch.randn(B, L, 40), mask)
    assert out.shape == (B, L, 16)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hae.parameters())


def test_backends_agree():
    torch.manual_seed(1)
    hae = HolisticAttention(8, 8, d=8, backend="reference").eval()
    args = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    ref = hae(*args)
    hae.backend = None  # automatic: the compiled cpu kernel when built
    torch.testing.assert_close(hae(*args), ref, rtol=1e-5, atol=1e-6)


def test_bad_configuration():
    with pytest.raises(ValueError, match="activation"):
        HolisticAttention(8, 8, activation="tanh")
    with pytest.raises(ValueError, match="d must be >= 1"):
        HolisticAttention(8, 8, d=0)


def test_dropout_scales_and_zeroes():
    x = torch.ones(20000)
    drop = Dropout(0.25)
    y = drop(x)
    assert torch.isin(y, torch.tensor([0.0, 4 / 3])).all() and abs((y == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(drop.eval()(x), x)
    assert not Dropout(1.0)(x).any()
    assert repr(Dropout(0.1)) == "Dropout(p=0.1)"
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        Dropout(1.5)


def test_masked_positions_give_zero_and_branches_size_the_mlp():
    hae = HolisticAttention(8, 8, d=4, branches=("self", "global"))
    assert hae.mlp[0].in_features == 3 * 4
    mask = torch.rand(2, 5) > 0.4
    out = hae(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), mask)
    assert out.shape == (2, 5, 4) and not out[~mask].any()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"branches": ("self", "local")}, "branches: unknown 'local'"),
    ({"branches": ()}, "branches must name at least one"),
    ({"attention": False, "activation": "softmax"}, "incompatible flags"),
    ({"attention": False, "branches": ("self",)}, "incompatible flags"),
])  # fmt: skip
def test_bad_ablation_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HolisticAttention(8, 8, **kwargs)


@pytest.mark.parametrize(("in_dim", "d"), [(7, 3), (5, 16)])
def test_adapter_init_linear_computes_the_linear_map(in_dim, d):
    adapter = Adapter(in_dim, d)
    weight, bias, x = (torch.randn(*shape, dtype=torch.float64) for shape in ((d, in_dim), (d,), (9, in_dim)))
    adapter.double().init_linear(weight, bias)
    # gelu(z) - gelu(-z) = z in exact arithmetic; float64 leaves rounding of order 1e-15 per element
    torch.testing.assert_close(adapter(x), x @ weight.T + bias, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"Adapter.init_linear: weight \(3, 7\) / bias \(3,\) must be"):
        Adapter(7, 2).init_linear(torch.randn(3, 7), torch.randn(3))
    with pytest.raises(ValueError, match="with hidden width 6, got hidden 5"):
        Adapter(7, 3, hidden=5).init_linear(torch.randn(3, 7), torch.randn(3))
