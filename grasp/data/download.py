"""Download of the MovieLens archives into a local cache, verified by SHA-256.

Layout of the cache folder (:func:`default_cache_dir`, ``~/.cache/grasp`` by default)::

    movielens/ml-100k.zip       the verified archive
    movielens/ml-100k/          its extracted folder (u.data, u.item, ...), with a .grasp-sha256 marker

Every step is atomic: the archive is downloaded to a temporary file in the cache folder, hashed while it
is written and renamed into place only when its SHA-256 matches; it is extracted into a temporary folder
that is renamed into place only when complete, with a marker naming the archive's hash. A cache whose
marker matches is used without any network access; an interrupted run leaves only temporary files
(``*.part``, ``.extract-*``), which the next run ignores.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from grasp._console import progress as progress_bar
from grasp._io import sha256_file
from grasp.data.core import DataError

__all__ = ["MOVIELENS_URL", "MOVIELENS_SHA256", "DownloadError", "default_cache_dir", "fetch_movielens"]

#: Where GroupLens serves the archives: ``<MOVIELENS_URL>/<name>.zip``.
MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens"
#: SHA-256 of the GroupLens archives that :func:`fetch_movielens` accepts.
MOVIELENS_SHA256: dict[str, str | None] = {
    "ml-100k": "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
    "ml-1m": "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
}
_MARKER = ".grasp-sha256"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download failed (network, server or checksum problem); the message says what to do instead."""


def default_cache_dir() -> Path:
    """The download cache: the folder of the shared cache, :func:`grasp.cache.cache_dir` (``$GRASP_CACHE``,
    else ``$XDG_CACHE_HOME/grasp``, else ``~/.cache/grasp``; also with ``GRASP_CACHE=off``, which turns off only
    the cached embeddings and descriptions)."""
    from grasp.cache.store import cache_dir

    return cache_dir()


def _offline_hint(name: str, url: str) -> str:
    return (
        f"without network access, download {url} elsewhere, unzip it and pass --data-dir with the folder "
        f"holding its files (the {name} folder inside the archive)"
    )


def _download(url: str, target: Path, expected: str, name: str, progress: bool) -> None:
    """Download ``url`` to ``target`` through a temporary file, renamed into place only if its hash matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False)
    temporary = Path(handle.name)
    try:
        digest = hashlib.sha256()
        try:
            with handle, urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress_bar(total, f"download {url}", "B", enabled=progress) as bar:
                    while chunk := response.read(_CHUNK):
                        handle.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise DownloadError(f"could not download {url}: {reason}; {_offline_hint(name, url)}") from None
        got = digest.hexdigest()
        if got != expected:
            raise DataError(
                target, None, f"sha256 mismatch for {url}: expected {expected}, got {got}; the download was discarded"
            )
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _extract(archive: Path, target: Path, digest: str, name: str) -> None:
    """Extract ``archive`` (its single top folder, or all of it) into ``target``, atomically, with a marker."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".extract-{name}-"))
    try:
        try:
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.namelist():
                    parts = PurePosixPath(member.replace("\\", "/")).parts
                    if member.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                        raise DataError(archive, None, f"unsafe path {member!r} in the archive")
                bundle.extractall(staging)
        except zipfile.BadZipFile as e:
            raise DataError(archive, None, f"not a valid zip archive: {e}") from None
        entries = [entry for entry in staging.iterdir() if not entry.name.startswith(("__MACOSX", "."))]
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        (root / _MARKER).write_text(digest + "\n")
        if _verified(target, digest):  # another process finished first
            return
        if target.exists():
            shutil.rmtree(target)
        os.replace(root, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _verified(folder: Path, digest: str) -> bool:
    marker = folder / _MARKER
    return marker.is_file() and marker.read_text().strip() == digest


def fetch_movielens(
    name: str, cache_dir: Path | None = None, *, base_url: str = MOVIELENS_URL, progress: bool = True
) -> Path:
    """The extracted folder of a MovieLens archive, downloading and verifying it on first use.

    Args:
        name: ``"ml-100k"`` or ``"ml-1m"`` (the archives with a pinned checksum in :data:`MOVIELENS_SHA256`).
        cache_dir: the cache folder; :func:`default_cache_dir` (``$GRASP_CACHE`` or
            ``~/.cache/grasp``) by default.
        base_url: where the archives are served (``<base_url>/<name>.zip``).
        progress: print download progress on stderr.

    Returns:
        The folder holding the archive's files (``u.data`` ... or ``ratings.dat`` ...), for
        :func:`grasp.data.load_movielens`.

    Raises:
        ValueError: an unknown ``name``, or one without a pinned checksum.
        DownloadError: the download failed (the message says how to use a local copy instead).
        DataError: the downloaded archive's SHA-256 differs from the pinned one, or the archive is invalid.
    """
    if name not in MOVIELENS_SHA256:
        raise ValueError(f"name must be one of {', '.join(MOVIELENS_SHA256)}, got {name!r}")
    expected = MOVIELENS_SHA256[name]
    url = f"{base_url.rstrip('/')}/{name}.zip"
    if expected is None:
        raise ValueError(f"no pinned sha256 for {name}: cannot verify a download; {_offline_hint(name, url)}")
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "movielens"
    folder, archive = root / name, root / f"{name}.zip"
    if _verified(folder, expected):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    if not (archive.is_file() and sha256_file(archive) == expected):
        _download(url, archive, expected, name, progress)
    _extract(archive, folder, expected, name)
    return folder
