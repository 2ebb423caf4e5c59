"""Data-root resolution, checksum checks and downloads (through ``file://`` mirrors, no network)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.error
from pathlib import Path

import pytest

from lightning_etap.data import _download
from lightning_etap.data._download import (
    ENV_DATA,
    ENV_MIRROR,
    ChecksumError,
    DownloadError,
    RemoteFile,
    fetch,
    read_verified,
    resolve_root,
)

PAYLOAD = b"date,a\n2020-01-01,1.5\n" * 50
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
ORIGIN = "https://example.invalid/data/toy.csv"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in (ENV_DATA, ENV_MIRROR, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)


def toy(gzip_ok: bool = False) -> RemoteFile:
    return RemoteFile(folder="toy", name="toy.csv", url=ORIGIN, sha256=PAYLOAD_SHA, gzip_ok=gzip_ok)


def make_mirror(base: Path, name: str = "toy.csv", data: bytes = PAYLOAD) -> Path:
    (base / "toy").mkdir(parents=True, exist_ok=True)
    (base / "toy" / name).write_bytes(data)
    return base


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- resolve_root
def test_resolve_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root() == tmp_path / "home" / ".cache" / "lightning-etap"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root() == tmp_path / "xdg" / "lightning-etap"
    monkeypatch.setenv(ENV_DATA, str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert not (tmp_path / "arg").exists()  # resolving never creates anything


# ----------------------------------------------------------------------------- local files
def test_present_file_is_verified_and_returned(tmp_path):
    make_mirror(tmp_path)
    path, content = read_verified(tmp_path, toy(), download=False)
    assert path == tmp_path / "toy" / "toy.csv"
    assert content == PAYLOAD
    assert fetch(tmp_path, toy(), download=False) == path


def test_root_from_environment(tmp_path, monkeypatch):
    make_mirror(tmp_path)
    monkeypatch.setenv(ENV_DATA, str(tmp_path))
    assert fetch(None, toy(), download=False) == tmp_path / "toy" / "toy.csv"


def test_gzip_copy_is_checked_against_uncompressed_hash(tmp_path):
    make_mirror(tmp_path, "toy.csv.gz", gzip.compress(PAYLOAD))
    path, content = read_verified(tmp_path, toy(gzip_ok=True), download=False)
    assert path.name == "toy.csv.gz" and content == PAYLOAD
    # without gzip_ok the .gz copy is not looked at
    with pytest.raises(FileNotFoundError):
        read_verified(tmp_path, toy(), download=False)


def test_missing_file_without_download_names_path_variable_and_option(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fetch(tmp_path, toy(gzip_ok=True), download=False)
    msg = str(info.value)
    assert str(tmp_path / "toy" / "toy.csv") in msg and str(tmp_path / "toy" / "toy.csv.gz") in msg
    assert "`root`" in msg and ENV_DATA in msg and "download=True" in msg and ORIGIN in msg


def test_checksum_mismatch_is_refused(tmp_path):
    bad = PAYLOAD.replace(b"1.5", b"1.6", 1)
    make_mirror(tmp_path, data=bad)
    with pytest.raises(ChecksumError) as info:
        fetch(tmp_path, toy(), download=True)  # a present file is never silently replaced
    msg = str(info.value)
    assert str(tmp_path / "toy" / "toy.csv") in msg
    assert PAYLOAD_SHA in msg and hashlib.sha256(bad).hexdigest() in msg
    assert "Delete" in msg and "re-download" in msg
    assert isinstance(info.value, ValueError)
    assert (tmp_path / "toy" / "toy.csv").read_bytes() == bad


def test_broken_gzip_is_refused(tmp_path):
    data = bytearray(gzip.compress(PAYLOAD))
    data[len(data) // 2] ^= 0xFF
    make_mirror(tmp_path, "toy.csv.gz", bytes(data))
    with pytest.raises(ChecksumError, match="toy.csv.gz"):
        fetch(tmp_path, toy(gzip_ok=True), download=False)


# ----------------------------------------------------------------------------- downloads
def test_download_from_file_mirror(tmp_path, monkeypatch):
    mirror = make_mirror(tmp_path / "mirror")
    monkeypatch.setenv(ENV_MIRROR, mirror.as_uri() + "/")
    root = tmp_path / "root"
    path, content = read_verified(root, toy())
    assert path == root / "toy" / "toy.csv" and content == PAYLOAD
    assert path.read_bytes() == PAYLOAD
    assert leftovers(root / "toy") == ["toy.csv"]  # no temporary file left behind
    assert path.stat().st_mode & 0o444 == 0o444
    # second call uses the local copy even with the mirror gone
    shutil.rmtree(mirror)
    assert fetch(root, toy()) == path


def test_mirror_may_be_a_plain_directory_and_serve_gzip(tmp_path, monkeypatch):
    mirror = make_mirror(tmp_path / "mirror", "toy.csv.gz", gzip.compress(PAYLOAD))
    monkeypatch.setenv(ENV_MIRROR, str(mirror))
    path, content = read_verified(tmp_path / "root", toy(gzip_ok=True))
    assert path.name == "toy.csv.gz" and content == PAYLOAD
    assert leftovers(tmp_path / "root" / "toy") == ["toy.csv.gz"]


def test_mirror_with_wrong_bytes_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    mirror = make_mirror(tmp_path / "mirror", data=b"not the data")
    monkeypatch.setenv(ENV_MIRROR, mirror.as_uri())
    root = tmp_path / "root"
    with pytest.raises(ChecksumError) as info:
        fetch(root, toy())
    msg = str(info.value)
    assert (mirror / "toy" / "toy.csv").as_uri() in msg and PAYLOAD_SHA in msg
    assert leftovers(root / "toy") == []


def test_mirror_without_the_file_raises_download_error(tmp_path, monkeypatch):
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv(ENV_MIRROR, (tmp_path / "mirror").as_uri())
    root = tmp_path / "root"
    with pytest.raises(DownloadError) as info:
        fetch(root, toy())
    msg = str(info.value)
    assert (tmp_path / "mirror" / "toy" / "toy.csv").as_uri() in msg  # the URL tried
    assert ORIGIN in msg and str(root / "toy" / "toy.csv") in msg  # the manual fix
    assert leftovers(root / "toy") == []


def test_origin_url_is_used_without_mirror(tmp_path, monkeypatch):
    seen = []

    def offline(url, timeout=None):
        seen.append(url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(_download.urllib.request, "urlopen", offline)
    with pytest.raises(DownloadError, match="offline"):
        fetch(tmp_path, toy())
    assert seen == [ORIGIN]
    assert leftovers(tmp_path / "toy") == []


def test_interrupted_download_leaves_no_partial_file(tmp_path, monkeypatch):
    class Broken:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(_download.urllib.request, "urlopen", lambda url, timeout=None: Broken())
    with pytest.raises(KeyboardInterrupt):
        fetch(tmp_path, toy())
    assert leftovers(tmp_path / "toy") == []
