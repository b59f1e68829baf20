"""Recording Triton launches on a machine without a GPU (shared by the op tests).

Triton launches on the *current* CUDA device, so each launcher must make its inputs' device current first.
The op tests run a launcher on FakeTensorMode tensors on ``cuda:1`` with ``torch.cuda.device`` replaced by
:class:`CurrentDevice` and the module's kernels by recorders, then check the device current at each launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Launch(NamedTuple):
    name: str
    grid: object
    current: str  # the CUDA device current at the launch
    devices: set[str]  # the devices of the tensors passed to the kernel


class CurrentDevice:
    """Stands in for torch.cuda.device: tracks the current device (``cuda:0`` as in a fresh process)."""

    current = "cuda:0"

    def __init__(self, device) -> None:
        self.device = str(torch.device(device))

    def __enter__(self) -> None:
        self.previous, CurrentDevice.current = CurrentDevice.current, self.device

    def __exit__(self, *exc) -> None:
        CurrentDevice.current = self.previous


def record_launches(monkeypatch, module, names) -> list[Launch]:
    """Replace ``torch.cuda.device`` and the kernels ``names`` of ``module`` (launched directly, not through
    wrap_triton); return the list each launch is appended to."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs) -> None:
                devices = {str(a.device) for a in args if isinstance(a, torch.Tensor)}
                launches.append(Launch(self.name, grid, CurrentDevice.current, devices))

            return launch

    monkeypatch.setattr(CurrentDevice, "current", "cuda:0")
    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    monkeypatch.setattr(module, "launcher", lambda kernel: kernel)
    for name in names:
        monkeypatch.setattr(module, name, Recorder(name))
    return launches
