"""Checkpoints: model weights, optimizer and trainer state.

A run directory keeps ``checkpoints/last.safetensors`` + ``checkpoints/last.pt`` (written after every
epoch) and ``checkpoints/best.safetensors`` (the weights with the best validation NDCG@10 so far):

* ``*.safetensors``: the model's ``state_dict`` (CPU copies), with string metadata (``epoch``, ...).
* ``last.pt`` (``torch.save``): optimizer and gradient-scaler state, and the trainer state (epoch, best
  metric, patience counter, epoch history, the RNG states of torch, CUDA, Python ``random`` and the
  batch sampler's numpy generator, per rank). It holds only tensors and plain Python values, and is
  read back with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

Every file is written to a temporary name in the same directory and renamed into place
(:mod:`grasp._io`), so a crash never leaves a half-written file; the weights are written before the
``.pt`` file and carry the same epoch, which :func:`load_training_state` checks.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from grasp._io import write_bytes

__all__ = ["save_weights", "load_weights", "saved_epoch", "save_training_state", "load_training_state",
           "CheckpointError"]  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that is missing, inconsistent or does not match the model; the message names the file."""


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Save ``model.state_dict()`` (CPU copies) as safetensors with string ``metadata``, atomically."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    write_bytes(path, save(state, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def load_weights(path: str | Path, model: torch.nn.Module) -> dict[str, str]:
    """Load safetensors weights into ``model`` (on the model's devices); return the file's metadata.

    The keys and shapes are checked by ``load_state_dict(strict=True)``; on a mismatch the model may be left
    partly loaded, so it should not be used after the error.

    Raises:
        CheckpointError: the file is missing, or its keys / shapes differ from the model's (names them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:  # torch lists every missing / unexpected key and size mismatch, over many lines
        raise CheckpointError(f"{path}: checkpoint does not match the model: {' '.join(str(error).split())}") from None
    return metadata


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` the optimizer / trainer state dict atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def saved_epoch(weights_path: str | Path) -> int | None:
    """The epoch recorded in a weights file's metadata (None when the file or the record is missing or unreadable)."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return int((f.metadata() or {})["epoch"])
    except Exception:  # a missing or unreadable file (safetensors raises its own error types), no epoch record
        return None


def load_training_state(path: str | Path, weights_path: str | Path) -> dict[str, Any]:
    """The state saved by :func:`save_training_state`, checked against the epoch in ``weights_path``'s metadata.

    Raises:
        CheckpointError: a file is missing or unreadable, or the two files come from different epochs.
    """
    path, weights_path = Path(path), Path(weights_path)
    for p in (path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, or one holding objects the safe unpickler refuses
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from e
    with safe_open(str(weights_path), framework="pt") as f:
        weights_epoch = (f.metadata() or {}).get("epoch")
    if weights_epoch != str(state.get("epoch")):
        raise CheckpointError(
            f"{path} (epoch {state.get('epoch')}) and {weights_path} (epoch {weights_epoch}) do not belong "
            "together (interrupted while saving?)"
        )
    return state
