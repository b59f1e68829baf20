"""Experiment settings in a TOML file: ``grasp train --config exp.toml`` and ``RUN_DIR/config.toml``.

A config file sets any option of a command by its name, the long flag without the dashes (``epochs = 50``,
``hidden-size = 64``, ``hae-branches = ["self", "sim"]``) or its Python name (``hidden_size``, ``d``);
``[tables]`` only group keys for the reader and are flattened. Values are TOML types or the text the flag
would take (``eval-negatives = "all"``). The command line wins over the file, the file over the defaults.

:func:`write_config` writes the resolved options of a command in the same format, so that
``grasp train --config RUN_DIR/config.toml --out OTHER`` repeats a run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI
    import tomli as tomllib

from grasp._io import write_text

__all__ = ["ConfigFileError", "apply_config", "write_config", "NOT_SETTINGS"]

#: Options that say how to run a command this time rather than what the experiment is: never read from
#: or written to a config file.
NOT_SETTINGS = frozenset({"help", "config", "force", "resume", "no_progress"})


class ConfigFileError(ValueError):
    """A config file that cannot be read or sets an unknown or invalid option (the message names the file)."""


def _settable(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """Every name a config file may use for an option of ``parser`` -> (its action, whether the name negates).

    A switch spelled ``--no-X`` that stores False (``--no-attention``) may be set as ``no-attention = true``
    or as ``attention = false``.
    """
    names: dict[str, tuple[argparse.Action, bool]] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if action.dest in NOT_SETTINGS or action.dest == argparse.SUPPRESS or not action.option_strings:
            continue
        negates = isinstance(action, argparse._StoreFalseAction)
        for name in (action.dest, *(flag[2:] for flag in action.option_strings if flag.startswith("--"))):
            entry = (action, negates and name != action.dest)
            names.setdefault(name, entry)
            names.setdefault(name.replace("_", "-"), entry)
            names.setdefault(name.replace("-", "_"), entry)
    return names


def _flatten(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, Mapping) else [(key, value)]
        for name, item in items:
            if isinstance(item, Mapping):
                raise ConfigFileError(f"{path}: [{key}.{name}]: tables nest one level at most")
            if name in flat:
                raise ConfigFileError(f"{path}: option {name!r} is set twice")
            flat[name] = item
    return flat


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from the file as the command line would have produced it for ``action``."""
    if action.nargs == 0:  # a switch: store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: must be true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*")
    if many != isinstance(value, list):
        raise ConfigFileError(f"{where}: must be {'a list' if many else 'a single value'}, got {value!r}")
    converted = []
    for item in value if many else [value]:
        if isinstance(item, (bool, list, dict)) or (action.type is int and isinstance(item, float)):
            raise ConfigFileError(f"{where}: not a valid value: {item!r}")
        if action.type is not None:
            try:  # custom parsers take the flag's text, as on the command line
                item = action.type(item if action.type in (int, float) else str(item))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
                problem = str(error)
                if action.type in (int, float):
                    problem = f"must be {'an integer' if action.type is int else 'a number'}, got {item!r}"
                raise ConfigFileError(f"{where}: {problem}") from None
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise ConfigFileError(f"{where}: must be one of {choices}, got {item!r}")
        converted.append(item)
    return converted if many else converted[0]


def apply_config(parser: argparse.ArgumentParser, path: Path) -> None:
    """Make the options set in the TOML file at ``path`` the defaults of ``parser``.

    Options the file sets are no longer required on the command line; the command line still overrides
    them when ``parser`` parses it.

    Raises:
        ConfigFileError: the file is missing or not TOML, or sets an unknown option or a bad value
            (the message names the file and the option, and suggests the closest option name).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigFileError(f"--config {path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"{path}: not a TOML file: {error}") from None
    names = _settable(parser)
    defaults: dict[str, Any] = {}
    for key, value in _flatten(data, path).items():
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigFileError(f"{path}: {key!r} is not an option of `{parser.prog}`{hint}")
        action, negates = names[key]
        if action.dest in defaults:
            raise ConfigFileError(f"{path}: {key!r} sets {action.option_strings[0]} again")
        converted = _convert(action, value, f"{path}: {key}")
        defaults[action.dest] = (not converted) if negates else converted
        action.required = False
    parser.set_defaults(**defaults)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return repr(value)
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _key(action: argparse.Action) -> str:
    """The name :func:`write_config` gives an option: its first long flag, or its dest for a ``--no-X`` switch."""
    if isinstance(action, argparse._StoreFalseAction):
        return action.dest.replace("_", "-")
    return next(flag[2:] for flag in action.option_strings if flag.startswith("--"))


def write_config(path: Path, parser: argparse.ArgumentParser, args: argparse.Namespace, header: str) -> Path:
    """Write the resolved options of ``args`` (parsed by ``parser``) to ``path`` as TOML, one table per
    help group of ``parser``.

    Options whose value is None (unset, with no default) are left out: TOML has no null, and leaving
    them out gives them the same value when the file is read back.
    """
    top, tables = [f"# {line}" for line in header.splitlines()], []
    for group in parser._action_groups:  # argparse has no public list of its help groups
        actions = [a for a in group._group_actions if a.dest not in NOT_SETTINGS and a.option_strings]
        entries = [f"{_key(a)} = {_toml_value(getattr(args, a.dest))}" for a in actions
                   if getattr(args, a.dest, None) is not None]  # fmt: skip
        if group.title in ("options", "optional arguments"):  # argparse's own group: keys before any table
            top += entries
        elif entries:
            tables += ["", f"[{group.title.split(' ')[0]}]", *entries]
    return write_text(path, "\n".join(top + tables) + "\n")
