"""A failing randomised test names its replay seed where ``pytest -q`` shows it (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = '''
import torch

def test_draws_and_fails():
    assert torch.rand(()).item() > 2, "drew a value below 2"
'''


def test_failure_summary_names_the_seed(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "GRASP_TEST_SEED": "12345", "COLUMNS": "200"}  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", str(probe)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert len(summary) == 1 and "[GRASP_TEST_SEED=12345] AssertionError: drew a value below 2" in summary[0]
    assert "replay with GRASP_TEST_SEED=12345 python -m pytest" in result.stdout
