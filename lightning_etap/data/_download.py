"""Where dataset files live, how they get there, and how they are checked.

Data root
    :func:`resolve_root` picks the directory that holds one folder per dataset
    (``<root>/chemical/83_X_train.npy``, ``<root>/ettm1/ETTm1.csv``, ...):
    the ``root`` argument if given, else the ``LIGHTNING_ETAP_DATA``
    environment variable, else a per-user cache directory
    (``$XDG_CACHE_HOME/lightning-etap`` or ``~/.cache/lightning-etap``).

Fetching
    :func:`read_verified` returns the verified bytes of a :class:`RemoteFile`.
    A file that is present is hashed and compared with the sha256 the library
    ships; a mismatch is refused with :class:`ChecksumError`. A missing file is
    downloaded (``download=True``, the default) with :mod:`urllib` to a
    temporary file in the target folder, verified, and only then renamed into
    place atomically, so an interrupted or wrong download never leaves a file
    that looks complete.

Mirror
    ``LIGHTNING_ETAP_MIRROR`` (a URL prefix such as ``https://example.org/etap/``
    or ``file:///srv/etap-data/``; a plain directory path also works) replaces
    the origin servers. A mirror is laid out like a data root:
    ``<mirror>/<folder>/<name>``, so any complete data root can serve as a
    mirror for another machine. With a mirror set, the origin is not contacted.

Why hash on every load instead of caching the verification
    The loaders parse the very bytes that were hashed (one read, no window
    between "verified" and "parsed"), the largest file (ETTm1, 10 MB
    uncompressed) hashes in about 10 ms and all six datasets together in well
    under 100 ms, and no sidecar file has to be written, which matters because
    a shared data root is often read-only (the test fixtures are).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENV_DATA",
    "ENV_MIRROR",
    "ChecksumError",
    "DownloadError",
    "RemoteFile",
    "fetch",
    "read_verified",
    "resolve_root",
]

#: Environment variable naming the data root.
ENV_DATA = "LIGHTNING_ETAP_DATA"
#: Environment variable naming a mirror (URL prefix or directory) that replaces the origin servers.
ENV_MIRROR = "LIGHTNING_ETAP_MIRROR"
#: Seconds urllib waits for a server before giving up.
TIMEOUT = 60.0


class ChecksumError(ValueError):
    """A local or downloaded file does not have the expected sha256."""


class DownloadError(RuntimeError):
    """A missing file could not be downloaded from any source."""


@dataclass(frozen=True)
class RemoteFile:
    """One source file of a dataset.

    Args:
        folder: the dataset's folder under the data root (``"chemical"``).
        name: the file name inside that folder, as the origin serves it.
        url: origin URL of the file.
        sha256: hex sha256 of the file's bytes; for ``gzip_ok`` files, of the
            *uncompressed* bytes, so one checksum covers both forms.
        gzip_ok: also accept ``name + ".gz"`` locally (and on a mirror).
    """

    folder: str
    name: str
    url: str
    sha256: str
    gzip_ok: bool = False

    @property
    def relpath(self) -> str:
        """``folder/name``, the file's path relative to a data root."""
        return f"{self.folder}/{self.name}"

    def local_names(self) -> tuple[str, ...]:
        """File names accepted on disk, in order of preference."""
        return (self.name, self.name + ".gz") if self.gzip_ok else (self.name,)


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root``, else ``$LIGHTNING_ETAP_DATA``, else the per-user cache dir.

    The cache dir is ``$XDG_CACHE_HOME/lightning-etap`` when ``XDG_CACHE_HOME``
    is set, otherwise ``~/.cache/lightning-etap``. The directory is not created.
    """
    return _resolve_root(root)[0]


def _resolve_root(root: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The data root and a phrase saying where it came from (for error messages)."""
    if root is not None and str(root) != "":
        return Path(root).expanduser(), "the `root` argument"
    env = os.environ.get(ENV_DATA, "")
    if env:
        return Path(env).expanduser(), f"the {ENV_DATA} environment variable"
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "lightning-etap", f"the default cache directory (neither `root` nor {ENV_DATA} was set)"


def fetch(root: str | os.PathLike[str] | None, remote: RemoteFile, *, download: bool = True) -> Path:
    """The verified local path of ``remote`` under the data root (downloading it if allowed).

    See :func:`read_verified`; this variant discards the bytes.
    """
    return read_verified(root, remote, download=download)[0]


def read_verified(
    root: str | os.PathLike[str] | None, remote: RemoteFile, *, download: bool = True
) -> tuple[Path, bytes]:
    """Return ``(local_path, content)`` of ``remote`` after checking its sha256.

    ``content`` is the uncompressed file content (a ``.gz`` copy is
    decompressed), i.e. exactly the bytes whose sha256 was checked.

    Args:
        root: data root, or ``None`` for ``$LIGHTNING_ETAP_DATA`` / the cache dir.
        remote: which file.
        download: fetch a missing file from the origin (or the
            ``LIGHTNING_ETAP_MIRROR`` mirror). With ``False`` a missing file is
            an error.

    Raises:
        FileNotFoundError: missing and ``download=False``; the message names
            the path(s) looked for, the ``root`` argument, the
            ``LIGHTNING_ETAP_DATA`` variable and the ``download`` option.
        ChecksumError: the local or downloaded file has the wrong sha256 (or
            is a broken gzip file). A wrong download is deleted.
        DownloadError: the file could not be fetched from any source.
    """
    base, how = _resolve_root(root)
    folder = base / remote.folder
    for name in remote.local_names():
        path = folder / name
        if path.is_file():
            return path, _verified_content(path, remote, origin=None)
    if not download:
        looked = " or ".join(str(folder / n) for n in remote.local_names())
        raise FileNotFoundError(
            f"{remote.relpath} not found: looked for {looked}. The data root {base} comes from {how}. "
            f"Pass `root=` (the directory that holds {remote.folder}/), or set the {ENV_DATA} "
            f"environment variable to it, or call with download=True to fetch the file from {remote.url} "
            f"(or from a mirror named by {ENV_MIRROR})."
        )
    return _download(remote, folder)


# --------------------------------------------------------------------------- internals
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified_content(path: Path, remote: RemoteFile, origin: str | None) -> bytes:
    """Read ``path``, gunzip it if it is a ``.gz``, and check the sha256 of the content."""
    raw = path.read_bytes()
    what = f"{path}" if origin is None else f"{path} (downloaded from {origin})"
    fix = (
        "The download was deleted; check the mirror or the origin, or download the file by hand."
        if origin is not None
        else f"Delete it and load again with download=True to re-download it from {remote.url}, "
        f"or replace it with an intact copy."
    )
    if path.name.endswith(".gz") and not remote.name.endswith(".gz"):
        try:
            content = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ChecksumError(f"{what} is not a valid gzip file ({err}). {fix}") from err
        label = "sha256 of the uncompressed content"
    else:
        content = raw
        label = "sha256"
    actual = _sha256(content)
    if actual != remote.sha256:
        raise ChecksumError(
            f"checksum mismatch for {what}: expected {label} {remote.sha256}, got {actual}. "
            f"The file is corrupt, truncated or a different version. {fix}"
        )
    return content


def _mirror_prefix() -> str | None:
    """The mirror URL prefix (with a trailing slash), or ``None`` when no mirror is set."""
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    if not mirror:
        return None
    if "://" not in mirror:  # a plain directory path
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return mirror.rstrip("/") + "/"


def _sources(remote: RemoteFile) -> list[tuple[str, str]]:
    """``(url, local file name)`` pairs to try, in order."""
    mirror = _mirror_prefix()
    if mirror is None:
        return [(remote.url, remote.name)]
    folder = urllib.parse.quote(remote.folder)
    return [(f"{mirror}{folder}/{urllib.parse.quote(n)}", n) for n in remote.local_names()]


def _download(remote: RemoteFile, folder: Path) -> tuple[Path, bytes]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(
            f"cannot create {folder} to download {remote.relpath} into ({err}). "
            f"Choose a writable data root with `root=` or {ENV_DATA}."
        ) from err
    failures: list[str] = []
    for url, name in _sources(remote):
        target = folder / name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
                failures.append(f"{url}: {err}")
                tmp.unlink(missing_ok=True)
                continue
            # verify under the final name's suffix (".gz" decides whether to gunzip)
            verify_as = tmp.with_name(tmp.name + (".gz" if name.endswith(".gz") else ""))
            if verify_as != tmp:
                tmp.rename(verify_as)
                tmp = verify_as
            content = _verified_content(tmp, remote, origin=url)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            return target, content
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tried = "; ".join(failures)
    raise DownloadError(
        f"could not download {remote.relpath} ({tried}). Fix: download {remote.url} by hand and save it "
        f"as {folder / remote.name}, or point {ENV_MIRROR} at a mirror (a URL or directory laid out "
        f"like a data root), or pass `root=` / set {ENV_DATA} to a directory that already has it."
    )
