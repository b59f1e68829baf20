"""Package attributes imported on first use (PEP 562), so that importing a package does not import torch.

``grasp --help`` builds every subcommand's parser from modules inside ``grasp.training``, ``grasp.inference``
and ``grasp.models``; were their ``__init__`` to import the trainer, the recommender and the models eagerly,
every ``grasp`` command would spend seconds importing torch before it could print a line.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for names imported on first access.

    Args:
        package: the package's ``__name__``.
        exports: module -> the names the package takes from it. A name that is the module itself
            (``"grasp.ops": ("ops",)`` in ``grasp``) gives the module.

    Example (a package's ``__init__``)::

        _EXPORTS = {"grasp.training.trainer": ("train", "evaluate_run")}
        __all__ = [name for names in _EXPORTS.values() for name in names]
        __getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(where[name])
        value = module if where[name] == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later look-ups find it without this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
