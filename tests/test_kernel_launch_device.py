"""Every Triton launcher runs its kernels with the inputs' CUDA device current.

Triton launches on the *current* device and its stream, whatever device the pointers belong to. Here the
inputs are fake tensors on ``cuda:1`` (no GPU needed), ``torch.cuda.device`` is replaced by a context that
records which device it makes current, and each kernel by a recorder of the device current at its launch.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton")

import grasp_kernels.holistic_attention as hae_kernels  # noqa: E402
import grasp_kernels.holistic_attention_projected as projected_kernels  # noqa: E402
import grasp_kernels.knn as knn_kernels  # noqa: E402

CURRENT: list[int | None] = [0]


class _DeviceContext:
    """Stands in for torch.cuda.device: makes ``device``'s index current inside the block."""

    def __init__(self, device) -> None:
        self.index = torch.device(device).index

    def __enter__(self) -> None:
        self.saved = CURRENT[0]
        CURRENT[0] = self.index

    def __exit__(self, *exc) -> None:
        CURRENT[0] = self.saved


class _Kernel:
    """Stands in for a kernel: ``kernel[grid](...)`` records the device current at the launch."""

    def __init__(self, name: str, launches: list[tuple[str, int | None]]) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, CURRENT[0]))


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, int | None]]:
    """Every kernel of the three modules replaced by a recorder; device 0 current, as in a fresh process."""
    record: list[tuple[str, int | None]] = []
    monkeypatch.setattr(torch.cuda, "device", _DeviceContext)
    CURRENT[0] = 0
    for module in (hae_kernels, projected_kernels, knn_kernels):
        monkeypatch.setattr(module, "launcher", lambda kernel: kernel)
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "run"):
                monkeypatch.setattr(module, name, _Kernel(name, record))
    monkeypatch.setattr(knn_kernels, "_device_sm_count", lambda device: 132)
    return record


def _on_cuda1(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype, device="cuda:1") for s in shapes]


def test_holistic_attention_launches_on_the_inputs_device(launches):
    with FakeTensorMode(allow_non_fake_inputs=True):
        user, user_sim, item, item_sim = _on_cuda1((2, 8), (2, 8), (2, 5, 8), (2, 5, 8))
        hae_kernels.hae_forward(user, user_sim, item, item_sim, None, False)
        hae_kernels.hae_backward(torch.randn(2, 5, 32, device="cuda:1"), user, user_sim, item, item_sim, None, False)
    assert launches and all(device == 1 for _, device in launches), launches
    assert {name for name, _ in launches} >= {"_hae_fwd_kernel", "_hae_bwd_kernel"}


def test_projected_op_launches_on_the_inputs_device(launches):
    with FakeTensorMode(allow_non_fake_inputs=True):
        user, user_sim, item, item_sim = _on_cuda1((3, 8), (3, 8), (4, 8), (4, 8))
        (values,) = _on_cuda1((4, 3, 6))
        ui = torch.zeros(7, dtype=torch.int64, device="cuda:1")
        ii = torch.zeros(7, dtype=torch.int64, device="cuda:1")
        projected_kernels.hae_gather_forward(user, user_sim, item, item_sim, values, ui, ii)
        projected_kernels.hae_gather_backward(torch.randn(7, 6, device="cuda:1"), user, user_sim, item, item_sim,
                                              values, ui, ii)  # fmt: skip
    assert len({name for name, _ in launches}) >= 2, launches
    assert all(device == 1 for _, device in launches), launches


def test_knn_launches_on_the_inputs_device(launches):
    with FakeTensorMode(allow_non_fake_inputs=True):
        queries, db = _on_cuda1((5, 16), (50, 16))
        knn_kernels.knn_search(queries, db, 3, 0, True)
        knn_kernels.gather_mean(db, torch.zeros(5, 3, dtype=torch.int64, device="cuda:1"))
    assert {name for name, _ in launches} >= {"_knn_search_kernel", "_gather_mean_kernel"}, launches
    assert all(device == 1 for _, device in launches), launches
