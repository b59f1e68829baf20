"""The run directory's ``manifest.json``: versions, each stage's config, input hashes and outputs.

A stage is *current* when its recorded key (a hash of its config and its inputs) equals the key of the
new request and every output it recorded still exists with the recorded sha256. Current stages are
skipped; anything else runs again. The manifest itself is rewritten atomically after each stage, so an
interrupted stage is simply not recorded and runs again next time.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from grasp._io import sha256_file, write_json
from grasp.data.core import DataError

__all__ = ["Manifest", "stage_key"]

_FORMAT = 1


def stage_key(name: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    """sha256 of a stage's name, config and input hashes (JSON with sorted keys)."""
    blob = json.dumps({"stage": name, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _versions() -> dict[str, str]:
    import torch  # only for its version: `grasp --help` imports this module and must not import torch

    from grasp import __version__

    return {"grasp": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}  # fmt: skip


class Manifest:
    """``RUN_DIR/manifest.json``, loaded on construction (a new, empty one when absent)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "manifest.json"
        if self.path.is_file():
            try:
                self.data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DataError(self.path, getattr(error, "lineno", None), f"not valid JSON: {error}") from None
            if self.data.get("format") != _FORMAT:
                raise DataError(self.path, None, f"manifest format {self.data.get('format')!r}, expected {_FORMAT}")
        else:
            self.data = {"format": _FORMAT, "created": _now(), "versions": _versions(), "stages": {}}

    def stage(self, name: str) -> dict[str, Any] | None:
        """The recorded entry of stage ``name``, or None."""
        return self.data["stages"].get(name)

    def is_current(self, name: str, key: str) -> bool:
        """True when stage ``name`` ran with ``key`` and its outputs are intact."""
        entry = self.stage(name)
        if entry is None or entry.get("key") != key:
            return False
        for rel, digest in entry.get("outputs", {}).items():
            path = self.run_dir / rel
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def output_hashes(self, name: str) -> dict[str, str]:
        """{relative path: sha256} of the outputs stage ``name`` recorded (inputs of the next stage)."""
        entry = self.stage(name)
        return dict(entry["outputs"]) if entry else {}

    def record(
        self, name: str, key: str, config: dict[str, Any], inputs: dict[str, str], outputs: list[Path],
        seconds: float, **extra: Any,
    ) -> None:  # fmt: skip
        """Record a finished stage and save the manifest atomically."""
        self.data["stages"][name] = {
            "key": key,
            "config": config,
            "inputs": inputs,
            "outputs": {str(Path(p).relative_to(self.run_dir)): sha256_file(p) for p in outputs},
            "finished": _now(),
            "seconds": round(seconds, 3),
            **extra,
        }
        self.data["versions"] = _versions()
        self.save()

    def save(self) -> None:
        """Write the manifest atomically."""
        write_json(self.path, self.data)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
