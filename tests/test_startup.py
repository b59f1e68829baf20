"""Start-up cost: the ``grasp`` command line builds its parser without importing torch, and ``import grasp``
and ``import grasp.ops`` stay light. Structural checks (which modules got imported), not timings."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grasp
from grasp.models import options
from grasp.nn.holistic_attention import BRANCHES
from grasp.ops import _backends
from grasp.ops.holistic_attention import ACTIVATIONS

#: Modules that cost seconds to import (torch itself, torch.compile's machinery, Triton, the extension).
HEAVY = ("torch", "torch._dynamo", "triton", "grasp._C")


def imported_after(code: str) -> list[str]:
    """The modules of :data:`HEAVY` that a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_building_the_parser_imports_no_torch():
    assert imported_after("import grasp.cli; grasp.cli.build_parser()") == []


def test_import_grasp_imports_no_torch():
    assert imported_after("import grasp") == []


def test_import_grasp_ops_imports_neither_torch_compile_nor_triton():
    imported = imported_after("import grasp.ops")
    assert "torch" in imported and not {"torch._dynamo", "triton"} & set(imported)


def test_grasp_info_prints_the_versions_before_importing_torch():
    assert imported_after("from grasp.info import report_lines; print(next(report_lines()))") == []


@pytest.mark.parametrize("command", [[sys.executable, "-m", "grasp.cli"], [str(Path(sys.executable).parent / "grasp")]])
def test_grasp_help_exits_0(command):
    if not Path(command[0]).is_file():
        pytest.skip(f"no console script at {command[0]}")
    done = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: grasp")


@pytest.mark.parametrize("package", ["grasp", "grasp.models", "grasp.training", "grasp.inference"])
def test_every_lazy_export_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        module.missing  # noqa: B018


def test_public_api_through_the_lazy_package():
    assert grasp.nn.HolisticAttention.__module__ == "grasp.nn.holistic_attention"
    assert grasp.ops.holistic_attention is importlib.import_module("grasp.ops").holistic_attention
    assert grasp.TrainedRecommender.__name__ == "TrainedRecommender"


def test_constant_under_compile_marks_as_assume_constant_result_does():
    def ours():
        return 1

    def torchs():
        return 1

    assert _backends.constant_under_compile(ours) is ours
    assert vars(ours) == vars(torch.compiler.assume_constant_result(torchs)) != {}


def test_option_choices_match_the_modules_that_define_them():
    assert options.DEFAULT_BRANCHES == tuple(BRANCHES)
    assert options.ACTIVATIONS == ACTIVATIONS
