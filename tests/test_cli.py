"""The grasp command line."""

from __future__ import annotations

import subprocess
import sys

from grasp.cli import main


def test_info_lists_every_backend_with_a_status(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for backend in ("reference", "cpu", "cuda", "triton"):
        assert f"| holistic_attention | {backend} |" in text
    assert "torch" in text and "extension grasp._C" in text


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "grasp.cli", "info"], capture_output=True, text=True, check=True)
    assert "| op | backend | device | status |" in done.stdout
