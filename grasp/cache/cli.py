"""``grasp cache info`` and ``grasp cache clear``: what the shared cache holds, and emptying it."""

from __future__ import annotations

import argparse
import json

from grasp.cache.store import CACHE_FILE, EMBEDDING, SharedCache, cache_dir, open_shared_cache

__all__ = ["add_cache_arguments", "cache_main"]

#: Characters of a namespace's description shown by ``grasp cache info``.
_WIDTH = 100


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``info`` and ``clear [--embeddings | --generations]`` actions to ``parser``."""
    actions = parser.add_subparsers(dest="cache_action", required=True, metavar="ACTION")
    actions.add_parser("info", help="where the cache is, its size, and its entries per namespace")
    clear = actions.add_parser("clear", help="delete the cached embeddings and LLM descriptions")
    which = clear.add_mutually_exclusive_group()
    which.add_argument("--embeddings", action="store_true", help="delete only the embeddings")
    which.add_argument("--generations", action="store_true", help="delete only the LLM descriptions")


def _size(count: int) -> str:
    """Bytes in B, KB, MB or GB (powers of 1000)."""
    if count < 1000:
        return f"{count} B"
    value, unit = float(count), "B"
    for unit in ("KB", "MB", "GB"):  # noqa: B007  (the unit reached is the one printed)
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"


def _describe(label: str) -> str:
    """A namespace label in one short line: encoder or model first, then the server, then the rest."""
    try:
        fields = json.loads(label)
    except ValueError:
        fields = None
    if isinstance(fields, dict):
        first = [key for key in ("encoder", "model", "base_url") if key in fields]
        label = ", ".join(f"{key}={fields[key]}" for key in first + sorted(set(fields) - set(first))
                          if fields[key] is not None)  # fmt: skip
    label = " ".join(label.split())
    return label if len(label) <= _WIDTH else label[: _WIDTH - 1] + "…"


def _info(cache: SharedCache) -> None:
    namespaces = cache.namespaces()
    print(f"shared cache: {cache.path} ({_size(cache.size())})")
    if not namespaces:
        print("empty")
        return
    print(f"{'kind':<10} {'entries':>9} {'size':>9}  namespace")
    for space in namespaces:
        print(f"{space.kind:<10} {space.entries:>9,} {_size(space.bytes):>9}  {_describe(space.label)}")


def cache_main(args: argparse.Namespace) -> int:
    """Run ``grasp cache info`` or ``grasp cache clear``; returns the exit status."""
    cache = open_shared_cache()
    if cache is None:
        print(f"the shared cache is off (GRASP_CACHE=off); otherwise it would be {cache_dir() / CACHE_FILE}")
        return 0
    with cache:
        if args.cache_action == "info":
            _info(cache)
            return 0
        which = "embeddings" if args.embeddings else "generations" if args.generations else "all"
        before = cache.size()
        removed = cache.clear(which)
        what = {"all": "entries", "embeddings": f"{EMBEDDING} entries", "generations": "generation entries"}[which]
        print(f"removed {removed:,} {what} from {cache.path} ({_size(before)} -> {_size(cache.size())})")
    return 0
