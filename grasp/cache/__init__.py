"""The cache shared by every run (docs/design.md section 1, "Shared cache"): embeddings and LLM answers.

A text embedded or a prompt answered once, by any run directory, is read back from
``$GRASP_CACHE/cache.sqlite3`` (default ``~/.cache/grasp``) instead of being embedded or asked again.
:class:`CachedEncoder` puts it in front of an encoder, :func:`generation_cache` behind a generator;
``grasp cache info`` and ``grasp cache clear`` (:mod:`grasp.cache.cli`) show and empty it, and
``GRASP_CACHE=off`` turns it off. Names are imported on first use, so ``grasp cache`` needs only the
standard library's sqlite3.
"""

from grasp import _lazy

_EXPORTS = {
    "grasp.cache.store": ("SharedCache", "NamespaceInfo", "open_shared_cache", "cache_dir", "CACHE_FILE", "EMBEDDING"),
    "grasp.cache.encoder": ("CachedEncoder", "encoder_namespace"),
    "grasp.cache.responses": ("SharedResponses", "generation_cache"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
