"""Where stores and checkpoints live: a local folder, or an fsspec URL (``s3://…``, ``gs://…``, ``file:///…``).

The one module that knows about URLs. A location is a local :class:`~pathlib.Path` or a URL string;
the helpers that take a location work on both, those named for URLs take only URLs.

Reading: a remote file is copied once into a local cache (:func:`download`) and then used as a
local file, because the store's reader memory-maps its shards. The cache lives in
``$CROSSCODER_CACHE`` (default ``~/.cache/crosscoder-audit/remote``), one sub-folder per remote
folder, named by a hash of its URL. A cached copy is reused while the remote file's size and
version stamp (ETag, modification time, … whatever the backend reports) are unchanged.

Writing: files are written locally and uploaded whole (:func:`upload`, :func:`write_text`). An
object store makes each uploaded object appear at once, complete; a ``file://`` URL gets a
temporary name and a rename for the same effect. Callers order their uploads so that the file
that marks something complete goes last.

Backends other than memory and local files come in their own packages (``s3fs`` for ``s3://``,
``gcsfs`` for ``gs://``, …), which users install as they need them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from pathlib import Path

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# "s3://", "gs://", "memory://"… but not a Windows drive such as "C:/" (one letter, no "//" needed).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
# The packages of the common backends, for the error when one is missing.
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "ssh": "paramiko", "sftp": "paramiko"}
# Keys of fsspec's info() that change when a file is rewritten, by backend.
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "updated", "mtime",
                 "created")

Location = Path | str


class StorageError(RuntimeError):
    """A URL that no installed fsspec backend can open."""


def is_url(location: object) -> bool:
    """True for a string with a ``scheme://`` prefix; paths and ``Path`` objects are local."""
    return isinstance(location, str) and _URL.match(location) is not None


def locate(location: str | os.PathLike) -> Location:
    """A URL without its trailing slash, or a local ``Path``."""
    return location.rstrip("/") if is_url(location) else Path(location)


def child(location: Location, *names: str) -> Location:
    if isinstance(location, Path):
        return location.joinpath(*names)
    return "/".join([location.rstrip("/"), *names])


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path within it."""
    protocol = url.split("://", 1)[0]
    try:
        return url_to_fs(url)
    except ImportError as exc:
        package = _BACKENDS.get(protocol)
        hint = f"install {package} to use {protocol}:// URLs" if package else f"install the fsspec backend for {protocol}://"
        raise StorageError(f"{url}: {hint} ({exc})") from exc
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise StorageError(f"{url}: {protocol}:// is not a storage protocol that fsspec knows "
                           "(use a local folder, or a URL such as s3://bucket/path)") from exc


def is_file(location: Location) -> bool:
    if isinstance(location, Path):
        return location.is_file()
    fs, path = filesystem(location)
    fs.invalidate_cache(path)  # another process or node may have written it since a listing was cached
    return fs.isfile(path)


def read_text(location: Location) -> str:
    """The file's text; ``FileNotFoundError`` when there is none."""
    if isinstance(location, Path):
        return location.read_text()
    fs, path = filesystem(location)
    return fs.cat_file(path).decode()


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a remote file, fetched without reading the rest."""
    fs, path = filesystem(url)
    return fs.cat_file(path, start=start, end=end)


def write_text(url: str, text: str) -> None:
    """Write a small file in one piece (an object store's PUT is atomic; ``file://`` renames)."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        tmp = _local_tmp(fs, path)
        fs.pipe_file(tmp, text.encode())
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, text.encode())


def upload(local: Path, url: str) -> None:
    """Copy a local file to ``url``; readers see the old object or the whole new one."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        tmp = _local_tmp(fs, path)
        fs.put_file(str(local), tmp)
        fs.mv(tmp, path)
    else:
        fs.put_file(str(local), path)


def _local_tmp(fs: AbstractFileSystem, path: str) -> str:
    """A temporary name beside ``path`` (``.name.<random>.tmp``), its folder created."""
    parent, name = path.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    return f"{parent}/.{name}.{secrets.token_hex(4)}.tmp"


def list_names(url: str) -> list[str]:
    """Names of the files and folders directly in ``url`` (none when it does not exist)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries} - {""})


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file (or a folder with ``recursive``); nothing to delete is fine."""
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


def cache_root() -> Path:
    return Path(os.environ.get("CROSSCODER_CACHE") or Path.home() / ".cache" / "crosscoder-audit" / "remote")


def cache_folder(url: str) -> Path:
    """The local folder that holds cached copies of the files in remote folder ``url``."""
    url = url.rstrip("/")
    return cache_root() / hashlib.sha256(url.encode()).hexdigest()[:16]


def _cached_path(url: str) -> Path:
    folder, name = url.rstrip("/").rsplit("/", 1)
    return cache_folder(folder) / name


def _stamp_path(local: Path) -> Path:
    return local.with_name(f".{local.name}.remote.json")


def _version(info: dict) -> dict:
    """What identifies this version of a remote file: its size and the backend's version keys."""
    return {"size": info.get("size")} | {key: str(info[key]) for key in _VERSION_KEYS if key in info}


def download(url: str) -> Path:
    """A local copy of remote file ``url``, downloaded unless the cached copy is current.

    ``FileNotFoundError`` (naming the URL) when there is no such file.
    """
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such file", url) from None
    local = _cached_path(url)
    version = _version(info)
    if _is_current(local, info, version):
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    # The ranks of one node share the cache: the first to take the lock downloads, the others wait
    # and then find the copy current, so a file crosses the network once per node, not once per rank.
    with open(local.with_name(f".{local.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(local, info, version):
            return local
        # Under a temporary name, so that no reader sees a partial file; the rename is atomic.
        tmp = local.with_name(f".{local.name}.{secrets.token_hex(4)}.tmp")
        try:
            fs.get_file(path, str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        remember(local, version)
    return local


def _is_current(local: Path, info: dict, version: dict) -> bool:
    stamp = _stamp_path(local)
    if not (local.is_file() and stamp.is_file() and local.stat().st_size == info.get("size")):
        return False
    try:
        return json.loads(stamp.read_text()) == version
    except json.JSONDecodeError:
        return False  # a stamp cut short: download again


def download_files(url: str, names: list[str] | tuple[str, ...]) -> Path:
    """Download ``names`` of remote folder ``url``; returns the local folder that holds them."""
    for name in names:
        download(child(url, name))
    return cache_folder(url)


def remember(local: Path, version: dict) -> None:
    """Record which remote version the cached file ``local`` is a copy of."""
    stamp = _stamp_path(local)
    tmp = stamp.with_name(f"{stamp.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(version, sort_keys=True))
    os.replace(tmp, stamp)


def upload_cached(local: Path, url: str) -> None:
    """Upload ``local``, a file in ``cache_folder`` of ``url``'s folder, and mark it a current copy."""
    upload(local, url)
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    remember(local, _version(fs.info(path)))


def copy_to_local(url: str, local: Path) -> None:
    """Download ``url`` to ``local`` (no cache: for files read once, such as a training state)."""
    fs, path = filesystem(url)
    try:
        fs.get_file(path, str(local))
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such file", url) from None
